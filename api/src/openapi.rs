//! The OpenAPI 3.1 description of the API, generated from the code: served at
//! `GET /api/openapi.json` without a token.
//!
//! Every handler carries a `#[utoipa::path]` (its summary is the first paragraph of its doc
//! comment, its description the rest), and [`crate::routes`] registers handlers with
//! `utoipa_axum`'s `routes!`, which takes the method and path from that annotation: a route
//! cannot exist undocumented, nor be documented at a path it is not served on. [`assemble`]
//! joins what the routers collected with [`ApiDoc`] (title, tags, the `token` security
//! scheme, the shared error answers); [`crate::router`] serialises the result once, when it
//! is built, and [`document_json`] answers with those bytes.
//!
//! Every operation behind the token names the one role it needs in its `security`
//! requirement (`viewer`, `operator` or `admin`, each including the ones before it), and
//! that is the role `routes::guarded` enforces; public operations have none. Error answers
//! are [`ErrorBody`]; the answers every authenticated operation shares (401 and 403, named
//! together as [`Guarded`], and 500) and those of whole families of operations (415 and 413
//! for JSON bodies, 503 for telemetry reads) are components referenced by name.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use utoipa::{
    openapi::{
        header::HeaderBuilder,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
        ContentBuilder, Ref, RefOr, ResponseBuilder,
    },
    Modify, OpenApi,
};
use utoipa_axum::{router::OpenApiRouter, routes};

pub use crate::error::ErrorBody;
use crate::{routes, ApiError};

/// Where the description is served.
pub const PATH: &str = "/api/openapi.json";

/// What the routers do not say themselves: the title, the tags, the security scheme, and
/// the components every operation refers to.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tellus API",
        description = "The HTTP API of Tellus, a backend for IoT fleets: devices and their \
            certificates, telemetry, commands, device state, presence, rules and alerts. Every \
            `/api/v1` operation but the CRL needs `Authorization: Bearer <token>`; its \
            `security` names the role the token needs (`viewer` reads, `operator` also acts \
            on devices, alerts and rules, `admin` may do everything). Errors are \
            `{\"error\": {\"code\", \"message\"}}` with a stable `code`."
    ),
    modifiers(&TokenScheme),
    components(
        schemas(ErrorBody, tellus_core::LiveEvent, routes::telemetry::fleet::TagFilter),
        responses(
            Unauthorized,
            Forbidden,
            Internal,
            UnsupportedMediaType,
            PayloadTooLarge,
            StoreUnavailable
        )
    ),
    tags(
        (name = "devices", description = "Registration, certificates and the life cycle of devices"),
        (name = "commands", description = "Commands to one device"),
        (name = "jobs", description = "Fleet commands: one command to many devices"),
        (name = "state", description = "Desired and reported device state"),
        (name = "presence", description = "Connections: who is online, since when, and why they left"),
        (name = "telemetry", description = "Stored telemetry: ranges, buckets, newest values"),
        (name = "deadletters", description = "Payloads that were not valid telemetry"),
        (name = "pki", description = "The fleet CA's CRL and the external CAs the gate trusts"),
        (name = "audit", description = "The edge's decisions about connections"),
        (name = "rules", description = "Rules: CEL conditions, actions and dry runs"),
        (name = "alerts", description = "Alerts that rules raised"),
        (name = "stats", description = "Counters of ingest, the gate and the rules engine"),
        (name = "stream", description = "What happens to devices, as server-sent events"),
        (name = "tokens", description = "API tokens and their roles"),
        (name = "meta", description = "This description"),
        (name = "health", description = "Liveness, readiness and metrics, for load balancers and monitoring")
    )
)]
pub struct ApiDoc;

/// The bearer security scheme, `token`.
struct TokenScheme;

impl Modify for TokenScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token, as `Authorization: Bearer <token>`; the admin token is \
                         in `<data_dir>/admin.token`. Each operation names the role it needs: \
                         viewer, operator or admin (each including the ones before it).",
                    ))
                    .build(),
            ),
        );
    }
}

/// An error answer of `description`, with [`ErrorBody`] as JSON.
fn error(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("ErrorBody")))
            .build(),
    )
}

/// Shared error answers, as response components named after their type.
macro_rules! error_responses {
    ($($(#[$doc:meta])* $name:ident = $description:literal;)*) => {$(
        $(#[$doc])*
        pub struct $name;

        impl<'s> utoipa::ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<utoipa::openapi::Response>) {
                (stringify!($name), error_responses!(@build $name, $description))
            }
        }
    )*};
    (@build Unauthorized, $description:literal) => {
        error($description)
            .header(
                "WWW-Authenticate",
                HeaderBuilder::new()
                    .schema(<String as utoipa::PartialSchema>::schema())
                    .description(Some("`Bearer`"))
                    .build(),
            )
            .build()
            .into()
    };
    (@build $name:ident, $description:literal) => {
        error($description).build().into()
    };
}

error_responses! {
    /// 401 `unauthorized`, with `WWW-Authenticate: Bearer`.
    Unauthorized = "No bearer token, or not a valid one (`unauthorized`)";
    /// 403 `forbidden`: a valid token without the operation's role.
    Forbidden = "The token's role may not do this (`forbidden`)";
    /// 500 `internal`: logged, with a generic message.
    Internal = "The server failed (`internal`); the cause is logged, not sent";
    /// 415: a body that is not sent as `application/json`.
    UnsupportedMediaType = "The body is not sent as `application/json` (`unsupported_media_type`)";
    /// 413: a body over the size limit.
    PayloadTooLarge = "The body is too large (`payload_too_large`)";
    /// 503: the telemetry store's backend (QuestDB) cannot answer now.
    StoreUnavailable = "The telemetry store cannot answer now; try again (`store_unavailable`)";
}

/// What every operation behind the token may answer about the token itself: 401 (none, or
/// not valid) and 403 (its role may not), as references to [`Unauthorized`] and
/// [`Forbidden`]. Named in an operation's `responses(…)` beside its own answers.
pub struct Guarded;

impl utoipa::IntoResponses for Guarded {
    fn responses() -> std::collections::BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        use utoipa::ToResponse;
        [
            ("401", Unauthorized::response().0),
            ("403", Forbidden::response().0),
        ]
        .into_iter()
        .map(|(status, name)| (status.to_owned(), Ref::from_response_name(name).into()))
        .collect()
    }
}

/// The serialised description, shared by every request for it.
#[derive(Clone)]
pub struct Description(Arc<Result<Bytes, String>>);

impl Description {
    /// `doc` as JSON, serialised now, once.
    pub fn new(doc: &utoipa::openapi::OpenApi) -> Description {
        Description(Arc::new(
            serde_json::to_vec(doc)
                .map(Bytes::from)
                .map_err(|e| e.to_string()),
        ))
    }
}

/// This description of the API.
///
/// The whole OpenAPI 3.1 document, generated from the code. No token needed.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    operation_id = "openapi",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object),
        (status = 500, response = Internal),
    )
)]
pub async fn document_json(State(description): State<Description>) -> Result<Response, ApiError> {
    match description.0.as_ref() {
        Ok(json) => Ok((
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json.clone(),
        )
            .into_response()),
        Err(e) => Err(ApiError::internal(e.clone())),
    }
}

/// The route of the description itself; its state is the serialised description.
pub fn router() -> OpenApiRouter<Description> {
    OpenApiRouter::new().routes(routes!(document_json))
}

/// The whole description: [`ApiDoc`], the `/api/v1` operations behind the token (`v1`) and
/// those without (`public`), both relative to `/api/v1`, and the top-level ones (`top`: the
/// description's own, the probes, the metrics).
pub fn assemble(
    v1: utoipa::openapi::OpenApi,
    public: utoipa::openapi::OpenApi,
    top: impl IntoIterator<Item = utoipa::openapi::OpenApi>,
) -> utoipa::openapi::OpenApi {
    let mut api = ApiDoc::openapi();
    for own in top {
        api.merge(own);
    }
    let mut under_v1 = v1;
    under_v1.merge(public);
    let mut api = api.nest("/api/v1", under_v1);
    open_flattened(&mut api);
    api
}

/// A type that `#[serde(flatten)]` puts into another is an `allOf` part of the other's
/// schema, so it must not close itself with `additionalProperties: false` (which utoipa
/// writes for `deny_unknown_fields`): the other's own properties would break it. Such parts
/// are opened; what is sent is described all the same, and requests only less strictly.
fn open_flattened(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::Schema;
    let Some(components) = api.components.as_mut() else {
        return;
    };
    let parts: Vec<String> = components
        .schemas
        .values()
        .filter_map(|schema| match schema {
            RefOr::T(Schema::AllOf(all)) => Some(all.items.iter()),
            _ => None,
        })
        .flatten()
        .filter_map(|item| match item {
            RefOr::Ref(r) => r
                .ref_location
                .strip_prefix("#/components/schemas/")
                .map(str::to_owned),
            RefOr::T(_) => None,
        })
        .collect();
    for name in parts {
        if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(&name) {
            object.additional_properties = None;
        }
    }
}

/// The description as [`crate::router`] serves it, built from the same registrations.
pub fn document() -> utoipa::openapi::OpenApi {
    assemble(
        routes::v1().into_openapi(),
        routes::public().into_openapi(),
        [
            router().into_openapi(),
            routes::probes().into_openapi(),
            routes::metrics_routes().into_openapi(),
        ],
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use serde_json::Value;

    use super::*;

    /// The served description, as JSON, parsed back.
    fn served() -> Value {
        let bytes = match Description::new(&document()).0.as_ref() {
            Ok(bytes) => bytes.clone(),
            Err(e) => panic!("the description does not serialise: {e}"),
        };
        let doc: Value = serde_json::from_slice(&bytes).expect("the description is JSON");
        doc
    }

    /// Every operation: (method, path, operation).
    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let paths = doc["paths"].as_object().expect("paths");
        let mut ops = Vec::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().expect("path item") {
                ops.push((method.clone(), path.clone(), op.clone()));
            }
        }
        ops
    }

    const PUBLIC: [&str; 4] = ["/api/v1/pki/crl.pem", PATH, "/healthz", "/readyz"];

    #[test]
    fn every_operation_is_named_summarised_and_guarded_by_one_role() {
        let doc = served();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        assert_eq!(
            doc["components"]["securitySchemes"]["token"]["scheme"],
            "bearer"
        );
        let ops = operations(&doc);
        assert!(ops.len() > 40, "only {} operations", ops.len());
        let mut ids = HashSet::new();
        for (method, path, op) in &ops {
            let id = op["operationId"].as_str().unwrap_or_default();
            assert!(!id.is_empty(), "{method} {path} has no operationId");
            assert!(ids.insert(id.to_owned()), "operationId {id} twice");
            let summary = op["summary"].as_str().unwrap_or_default();
            assert!(!summary.trim().is_empty(), "{method} {path} has no summary");
            assert!(!op["responses"].as_object().unwrap().is_empty());
            let security = op.get("security").and_then(Value::as_array);
            if PUBLIC.contains(&path.as_str()) {
                assert!(
                    security.is_none_or(|s| s.is_empty()),
                    "{method} {path} is public"
                );
                continue;
            }
            assert!(path.starts_with("/api/v1/") || path == "/metrics", "{path}");
            let security = security.unwrap_or_else(|| panic!("{method} {path}: no security"));
            let [requirement] = security.as_slice() else {
                panic!("{method} {path}: {} security requirements", security.len())
            };
            let requirement = requirement.as_object().unwrap();
            assert_eq!(requirement.len(), 1, "{method} {path}: {requirement:?}");
            let roles = requirement["token"].as_array().expect("the token scheme");
            let [role] = roles.as_slice() else {
                panic!("{method} {path}: roles {roles:?}")
            };
            let role = role.as_str().unwrap();
            assert!(
                ["viewer", "operator", "admin"].contains(&role),
                "{method} {path}: role {role}"
            );
            // Reading is a viewer's (but for tokens, an admin's); so is a dry run, which
            // changes nothing.
            let tokens = path.starts_with("/api/v1/tokens");
            let reads = (method == "get" && !tokens) || path == "/api/v1/rules/test";
            assert_eq!(reads, role == "viewer", "{method} {path}: role {role}");
            assert!(!tokens || role == "admin", "{method} {path}: role {role}");
            // A token can be refused, or lack the role.
            assert!(op["responses"].get("401").is_some(), "{method} {path}: 401");
            assert!(op["responses"].get("403").is_some(), "{method} {path}: 403");
        }
    }

    #[test]
    fn every_reference_names_a_component() {
        let doc = served();
        let mut refs = BTreeSet::new();
        fn walk(v: &Value, refs: &mut BTreeSet<String>) {
            match v {
                Value::Object(map) => {
                    if let Some(Value::String(r)) = map.get("$ref") {
                        refs.insert(r.clone());
                    }
                    map.values().for_each(|v| walk(v, refs));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        walk(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let pointer = r.strip_prefix('#').expect("a local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} names nothing");
        }
    }

    #[test]
    fn the_routes_serve_every_documented_path() {
        // Each documented operation's path and method come from the handler `routes!`
        // registered; the routers' own listing must be the description's.
        let doc = served();
        let mut documented: Vec<_> = operations(&doc)
            .into_iter()
            .map(|(method, path, _)| format!("{method} {path}"))
            .collect();
        documented.sort();
        let mut registered = Vec::new();
        for (prefix, api) in [
            ("/api/v1", routes::v1().into_openapi()),
            ("/api/v1", routes::public().into_openapi()),
            ("", router().into_openapi()),
            ("", routes::probes().into_openapi()),
            ("", routes::metrics_routes().into_openapi()),
        ] {
            let api = serde_json::to_value(api).unwrap();
            for (method, path, _) in operations(&api) {
                registered.push(format!("{method} {prefix}{path}"));
            }
        }
        registered.sort();
        assert_eq!(documented, registered);
    }
}
