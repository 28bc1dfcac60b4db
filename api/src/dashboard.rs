//! The operator dashboard: a single-page app served at `/`, its files at `/assets/{file}`.
//!
//! The files live in `api/dashboard/` (plain HTML, CSS and JavaScript modules, no build
//! step) and are compiled into the binary with `include_bytes!`, so the dashboard works
//! offline and always matches the API it talks to. The page and its files need no token:
//! they hold no data. Everything the page shows it fetches from `/api/v1` with the token
//! the operator signs in with, sent as `Authorization: Bearer`.
//!
//! Every answer carries:
//! - the file's `Content-Type`;
//! - a strong `ETag` (a SHA-256 prefix of the file, computed once) and `Cache-Control:
//!   no-cache`: browsers keep the files but ask each time whether they changed, and get a
//!   304 without a body while they have not. The asset URLs carry no version, so a new
//!   binary's files are picked up at the next load, never mixed with old ones for long;
//! - a strict `Content-Security-Policy`: everything from this origin only, no inline
//!   script or style, no framing, no plugins;
//! - `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
//!
//! An unknown file is a 404 in the API's error shape ([`ApiError::NotFound`]).

use std::sync::LazyLock;

use axum::{
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

use crate::{extract, ApiError};

/// What the page may load and do: only this origin's files and API, nothing inline.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// One file of the dashboard, as compiled in.
struct File {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $content_type:expr) => {
        File {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/dashboard/assets/",
                $name
            )),
        }
    };
}

const INDEX: File = File {
    name: "index.html",
    content_type: HTML,
    body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/index.html")),
};

/// Every file under `/assets/`; a test checks that this is the folder's whole content.
const ASSETS: &[File] = &[
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("format.js", JS),
    asset!("live.js", JS),
    asset!("chart.js", JS),
    asset!("signin.js", JS),
    asset!("fleet.js", JS),
    asset!("device.js", JS),
    asset!("alerts.js", JS),
    asset!("rules.js", JS),
    asset!("style.css", CSS),
    asset!("icon.svg", SVG),
];

/// A file ready to serve: its body and the header values that do not change.
struct Served {
    name: &'static str,
    content_type: HeaderValue,
    etag: HeaderValue,
    body: &'static [u8],
}

impl Served {
    fn new(file: &File) -> Served {
        let digest = ring::digest::digest(&ring::digest::SHA256, file.body);
        let etag = format!("\"{}\"", hex::encode(&digest.as_ref()[..12]));
        Served {
            name: file.name,
            content_type: HeaderValue::from_static(file.content_type),
            // Hex digits in quotes are always a valid header value.
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
            body: file.body,
        }
    }

    /// 200 with the body, or 304 when the request's `If-None-Match` names this version.
    fn respond(&self, request: &HeaderMap) -> Response {
        let fresh = request
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .any(|v| matches_etag(v.as_bytes(), self.etag.as_bytes()));
        let headers = [
            (header::CONTENT_TYPE, self.content_type.clone()),
            (header::ETAG, self.etag.clone()),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                HeaderName::from_static("referrer-policy"),
                HeaderValue::from_static("no-referrer"),
            ),
        ];
        if fresh {
            (StatusCode::NOT_MODIFIED, headers).into_response()
        } else {
            (headers, self.body).into_response()
        }
    }
}

/// Whether an `If-None-Match` value (`*`, or a list of entity tags, weak or strong) names
/// `etag`. Weak comparison, as RFC 9110 asks of `If-None-Match`.
fn matches_etag(if_none_match: &[u8], etag: &[u8]) -> bool {
    if if_none_match.trim_ascii() == b"*" {
        return true;
    }
    if_none_match.split(|&b| b == b',').any(|tag| {
        let tag = tag.trim_ascii();
        tag.strip_prefix(b"W/").unwrap_or(tag) == etag
    })
}

static SERVED_INDEX: LazyLock<Served> = LazyLock::new(|| Served::new(&INDEX));
static SERVED_ASSETS: LazyLock<Vec<Served>> =
    LazyLock::new(|| ASSETS.iter().map(Served::new).collect());

/// `GET /` and `GET /assets/{file}`; no token, no state.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
}

async fn index(request: HeaderMap) -> Response {
    SERVED_INDEX.respond(&request)
}

async fn asset(
    extract::Path(file): extract::Path<String>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    SERVED_ASSETS
        .iter()
        .find(|a| a.name == file)
        .map(|a| a.respond(&request))
        .ok_or_else(|| ApiError::NotFound(format!("/assets/{file}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    async fn get(path: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut request = axum::http::Request::get(path);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Body::empty()).unwrap();
        let response = router::<()>()
            .fallback(crate::routes::not_found)
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    fn text<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name}"))
            .to_str()
            .unwrap()
    }

    #[tokio::test]
    async fn the_page_and_its_files_come_with_their_types() {
        for (path, content_type) in [
            ("/", HTML),
            ("/assets/app.js", JS),
            ("/assets/chart.js", JS),
            ("/assets/style.css", CSS),
            ("/assets/icon.svg", SVG),
        ] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(text(&headers, "content-type"), content_type, "{path}");
            assert!(!body.is_empty(), "{path}");
        }
        let (_, _, page) = get("/", &[]).await;
        assert_eq!(page, INDEX.body);
    }

    #[tokio::test]
    async fn every_answer_carries_the_security_and_cache_headers() {
        for path in ["/", "/assets/app.js", "/assets/style.css"] {
            let (_, headers, _) = get(path, &[]).await;
            let csp = text(&headers, "content-security-policy");
            assert!(csp.starts_with("default-src 'self'"), "{csp}");
            assert!(csp.contains("script-src 'self';"), "{csp}");
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
            assert_eq!(text(&headers, "x-content-type-options"), "nosniff");
            assert_eq!(text(&headers, "cache-control"), "no-cache");
            assert_eq!(text(&headers, "referrer-policy"), "no-referrer");
            let etag = text(&headers, "etag");
            assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 26);
        }
    }

    #[tokio::test]
    async fn a_known_version_is_answered_not_modified() {
        let (_, headers, _) = get("/assets/app.js", &[]).await;
        let etag = text(&headers, "etag").to_owned();
        for given in [
            etag.clone(),
            format!("W/{etag}"),
            format!("\"other\", {etag}"),
            "*".to_owned(),
        ] {
            let (status, headers, body) = get("/assets/app.js", &[("if-none-match", &given)]).await;
            assert_eq!(status, StatusCode::NOT_MODIFIED, "{given}");
            assert!(body.is_empty());
            assert_eq!(text(&headers, "etag"), etag);
        }
        let (status, _, body) = get("/assets/app.js", &[("if-none-match", "\"old\"")]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!body.is_empty());
        // Another file has another tag.
        let (_, other, _) = get("/assets/api.js", &[]).await;
        assert_ne!(text(&other, "etag"), etag);
    }

    #[tokio::test]
    async fn unknown_files_are_not_found() {
        for path in [
            "/assets/nope.js",
            "/assets/",
            "/assets/../Cargo.toml",
            "/assets/sub/app.js",
            "/index.html",
        ] {
            let (status, headers, body) = get(path, &[]).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(text(&headers, "content-type"), "application/json");
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["error"]["code"], "not_found", "{path}");
        }
    }

    /// The table above serves exactly the folder's files, and the page loads no script or
    /// style the policy would refuse.
    #[test]
    fn the_table_is_the_folder_and_the_page_has_nothing_inline() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboard/assets");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut served: Vec<String> = ASSETS.iter().map(|a| a.name.to_owned()).collect();
        on_disk.sort();
        served.sort();
        assert_eq!(on_disk, served);

        let page = std::str::from_utf8(INDEX.body).unwrap();
        for tag in page.split("<script").skip(1) {
            let open = &tag[..tag.find('>').unwrap()];
            assert!(open.contains("src=\"/assets/"), "inline script: {open}");
        }
        assert!(!page.contains("<style"), "inline style");
        assert!(!page.contains(" style="), "style attribute");
        let handler = page.match_indices(" on").any(|(at, _)| {
            let rest = &page[at + 3..];
            let name = rest.len() - rest.trim_start_matches(char::is_alphabetic).len();
            name > 0 && rest[name..].starts_with('=')
        });
        assert!(!handler, "inline event handler");
    }
}
