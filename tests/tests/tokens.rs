//! API tokens and roles, end to end: tokens made, used, listed and revoked through a real
//! `tellus serve`; a viewer cannot act, an operator cannot change the fleet.

use reqwest::Method;
use serde_json::{json, Value};
use tellus_tests::Tellus;

/// Makes a token with `role` as the admin; returns its body.
async fn make_token(t: &Tellus, name: &str, role: &str) -> Value {
    let (status, body) = t
        .post("/api/v1/tokens", json!({"name": name, "role": role}))
        .await;
    assert_eq!(status, 201, "{body}");
    body
}

fn secret(body: &Value) -> String {
    body["token"].as_str().expect("the token, once").to_owned()
}

#[tokio::test]
async fn roles_decide_what_a_token_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    t.create_device("d1").await;
    t.create_device("d2").await;

    let viewer = make_token(&t, "wallboard", "viewer").await;
    let operator = make_token(&t, "night shift", "operator").await;
    assert_eq!(viewer["role"], "viewer");
    assert_eq!(viewer["name"], "wallboard");
    let id = viewer["id"].as_str().unwrap();
    assert!(secret(&viewer).starts_with(&format!("{id}.")), "{viewer}");
    let (viewer, operator) = (secret(&viewer), secret(&operator));

    // Each token knows itself; the admin token is an admin.
    for (token, role) in [(&viewer, "viewer"), (&operator, "operator")] {
        let (status, me) = t
            .request_as(token, Method::GET, "/api/v1/whoami", None)
            .await;
        assert_eq!((status, me["role"].as_str()), (200, Some(role)), "{me}");
    }
    let (_, me) = t.get("/api/v1/whoami").await;
    assert_eq!(me["role"], "admin", "{me}");

    // A viewer reads, and may do nothing else.
    let command = json!({"name": "reboot"});
    let (status, _) = t
        .request_as(&viewer, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(status, 200);
    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(command.clone()),
        ),
        (
            Method::PATCH,
            "/api/v1/devices/d1/state",
            Some(json!({"desired": {"on": true}})),
        ),
        (Method::POST, "/api/v1/devices", Some(json!({"id": "d3"}))),
        (Method::GET, "/api/v1/tokens", None),
    ] {
        let (status, body) = t.request_as(&viewer, method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path} as a viewer: {body}");
        assert_eq!(body["error"]["code"], "forbidden", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("viewer"),
            "{body}"
        );
    }

    // An operator sends commands, and cannot change the fleet.
    let (status, body) = t
        .request_as(
            &operator,
            Method::POST,
            "/api/v1/devices/d1/commands",
            Some(command),
        )
        .await;
    assert_eq!(status, 202, "an operator's command: {body}");
    for (method, path, body) in [
        (Method::DELETE, "/api/v1/devices/d1", None),
        (Method::POST, "/api/v1/devices/d1/revoke", None),
        (
            Method::POST,
            "/api/v1/tokens",
            Some(json!({"name": "x", "role": "admin"})),
        ),
    ] {
        let (status, body) = t.request_as(&operator, method.clone(), path, body).await;
        assert_eq!(status, 403, "{method} {path} as an operator: {body}");
    }
    let (status, _) = t.get("/api/v1/devices/d1").await;
    assert_eq!(status, 200, "the operator's delete was refused");
    // The admin may.
    let (status, body) = t.delete("/api/v1/devices/d2").await;
    assert_eq!(status, 204, "{body}");

    // Tokens survive a restart.
    t.stop();
    let t = Tellus::start_in(dir.path(), None);
    let (status, me) = t
        .request_as(&operator, Method::GET, "/api/v1/whoami", None)
        .await;
    assert_eq!((status, me["name"].as_str()), (200, Some("night shift")));
}

#[tokio::test]
async fn tokens_are_listed_without_secrets_and_revoked_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let made = make_token(&t, "grafana", "viewer").await;
    let (id, token) = (made["id"].as_str().unwrap(), secret(&made));

    let (status, list) = t.get("/api/v1/tokens").await;
    assert_eq!(status, 200);
    let listed = list["tokens"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{list}");
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["role"], "viewer");
    let text = list.to_string();
    let (_, secret_part) = token.split_once('.').unwrap();
    assert!(
        !text.contains(secret_part),
        "a listing shows no secret: {list}"
    );
    assert!(listed[0].get("token").is_none() && listed[0].get("secret_sha256").is_none());

    // The right id with the wrong secret is no token.
    let forged = format!("{id}.{}", "0".repeat(64));
    let (status, body) = t
        .request_as(&forged, Method::GET, "/api/v1/whoami", None)
        .await;
    assert_eq!(status, 401, "{body}");

    let (status, _) = t.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, 204);
    let (status, body) = t
        .request_as(&token, Method::GET, "/api/v1/devices", None)
        .await;
    assert_eq!(status, 401, "a revoked token: {body}");
    let (status, body) = t.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "token_not_found");
}

#[tokio::test]
async fn bad_token_requests_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    for (body, why) in [
        (json!({"name": "x", "role": "root"}), "role"),
        (json!({"name": "", "role": "viewer"}), "1 to 100"),
        (
            json!({"name": "x".repeat(101), "role": "viewer"}),
            "1 to 100",
        ),
        (json!({"name": "x"}), "role"),
        (json!({"name": "x", "role": "viewer", "extra": 1}), "extra"),
    ] {
        let (status, answer) = t.post("/api/v1/tokens", body.clone()).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(why),
            "{body}: {answer}"
        );
    }
    let (status, list) = t.get("/api/v1/tokens").await;
    assert_eq!(
        (status, list["tokens"].as_array().map(Vec::len)),
        (200, Some(0))
    );
}

/// Every operation the description lists, as `(method, path)` with its path parameters
/// filled in, and the role its `security` names (`None`: public).
async fn described_operations(t: &Tellus) -> Vec<(Method, String, Option<String>)> {
    let (status, doc) = t.get("/api/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        // Ids that name nothing: the role is checked before the handler looks anything up.
        let filled = path
            .replace("{id}", "nothing-here")
            .replace("{command}", "nothing-here")
            .replace("{job}", "nothing-here");
        for (method, op) in item.as_object().expect("a path item") {
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let role = op["security"][0]["token"][0].as_str().map(str::to_owned);
            ops.push((method, filled.clone(), role));
        }
    }
    assert!(ops.len() > 40, "only {} operations described", ops.len());
    ops
}

/// Status of `method path` with `token`, without reading the body (a stream never ends).
async fn status_of(t: &Tellus, token: &str, method: &Method, path: &str) -> u16 {
    let mut request = reqwest::Client::new().request(method.clone(), t.url(path));
    // An empty token: no `Authorization` header at all.
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    response.status().as_u16()
}

#[tokio::test]
async fn every_described_operation_takes_the_role_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let viewer = secret(&make_token(&t, "viewer", "viewer").await);
    let operator = secret(&make_token(&t, "operator", "operator").await);
    let (mut public, mut checked) = (0, 0);
    for (method, path, role) in described_operations(&t).await {
        let Some(role) = role else {
            // Public: answered without a token (no `Authorization` header).
            let status = status_of(&t, "", &method, &path).await;
            assert!(status != 401 && status != 403, "{method} {path}: {status}");
            public += 1;
            continue;
        };
        // The role just below the one named is refused; the role named is let through
        // (to whatever the handler answers: 404 for ids that name nothing, 400 for no body).
        let (below, at) = match role.as_str() {
            "viewer" => (None, &viewer),
            "operator" => (Some(&viewer), &operator),
            "admin" => (Some(&operator), &t.token),
            other => panic!("{method} {path}: role {other}"),
        };
        if let Some(below) = below {
            let status = status_of(&t, below, &method, &path).await;
            assert_eq!(
                status, 403,
                "{method} {path} (role {role}) with the role below"
            );
        }
        for wrong in ["not-a-token", ""] {
            let status = status_of(&t, wrong, &method, &path).await;
            assert_eq!(status, 401, "{method} {path} with {wrong:?} for a token");
        }
        // Deleting or revoking with the right role would take effect only on ids that name
        // something; these name nothing.
        let status = status_of(&t, at, &method, &path).await;
        assert!(
            status != 401 && status != 403,
            "{method} {path} with role {role}: {status}"
        );
        checked += 1;
    }
    assert!(
        public >= 3 && checked > 40,
        "{public} public, {checked} checked"
    );
}

#[tokio::test]
async fn webhook_secrets_are_for_admins_only() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let rule = json!({
        "name": "hot", "trigger": "telemetry", "condition": "metrics.t > 30.0",
        "actions": [{
            "type": "webhook",
            "url": "https://user:pw@hooks.example.com/services/T0/s3cret-path?key=s3cret-query",
            "headers": {"Authorization": "Bearer s3cret-header"}
        }]
    });
    let (status, made) = t.post("/api/v1/rules", rule).await;
    assert_eq!(status, 201, "{made}");
    let id = made["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/rules/{id}");
    let (_, admin_view) = t.get(&path).await;
    assert!(
        admin_view.to_string().contains("s3cret-header"),
        "{admin_view}"
    );

    for role in ["viewer", "operator"] {
        let token = secret(&make_token(&t, role, role).await);
        let (status, one) = t.request_as(&token, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{one}");
        let (_, list) = t
            .request_as(&token, Method::GET, "/api/v1/rules", None)
            .await;
        let dry = json!({"rule_id": id, "messages": [{"device": "d1", "metrics": {"t": 35.0}}]});
        let (status, run) = t
            .request_as(&token, Method::POST, "/api/v1/rules/test", Some(dry))
            .await;
        assert_eq!(status, 200, "{run}");
        assert!(
            !run["firings"].as_array().unwrap().is_empty(),
            "the dry run fired: {run}"
        );
        for shown in [&one, &list, &run] {
            let text = shown.to_string();
            assert!(
                !text.contains("s3cret") && !text.contains("pw@"),
                "{role}: {text}"
            );
        }
        let webhook = &one["actions"][0];
        assert_eq!(
            webhook["url"], "https://hooks.example.com/(hidden)",
            "{one}"
        );
        assert_eq!(webhook["headers"]["Authorization"], "(hidden)", "{one}");
    }
}

#[tokio::test]
async fn a_stream_ends_when_its_token_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tellus::start_in(dir.path(), None);
    let made = make_token(&t, "wallboard", "viewer").await;
    let (id, token) = (made["id"].as_str().unwrap(), secret(&made));
    let mut stream = reqwest::Client::new()
        .get(t.url("/api/v1/stream"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (status, _) = t.delete(&format!("/api/v1/tokens/{id}")).await;
    assert_eq!(status, 204);
    // Keep-alive comments may come first; then the body ends.
    let ended = tokio::time::timeout(tellus_tests::EVENTUALLY, async {
        while stream.chunk().await.expect("the stream's body").is_some() {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream went on after its token was revoked"
    );
}
