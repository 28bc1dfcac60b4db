//! Extractors that reject with [`ApiError`], so a malformed body, query string or path gets
//! the API's JSON error shape instead of axum's plain-text rejection.
//!
//! Handlers take these instead of `axum::Json`, `axum::extract::Query` and
//! `axum::extract::Path`; responses still use `axum::Json`. [`OptionalJson`] is for the
//! endpoints whose body may be left out.

use axum::{
    body::{Body, Bytes},
    extract::{rejection::JsonRejection, FromRequest, FromRequestParts, Request},
};
use serde::de::DeserializeOwned;

use crate::ApiError;

/// A JSON request body; a bad body is `invalid_body` (400), a wrong content type 415.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

/// A query string; a bad one is `invalid_query` (400).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

/// Path parameters; bad ones are `invalid_path` (400).
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

/// A JSON request body that may be absent: an empty body (whatever its content type) is
/// `None`. A body that is not empty must be JSON, with the JSON content type, exactly as for
/// [`Json`]; a body without a content type is refused (415) rather than taken for "no body".
#[derive(Debug)]
pub struct OptionalJson<T>(pub Option<T>);

impl<T, S> FromRequest<S> for OptionalJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        // Through `Bytes` so that the body limit applies as it does to `Json`.
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(JsonRejection::from)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(None));
        }
        let req = Request::from_parts(parts, Body::from(bytes));
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(OptionalJson(Some(value)))
    }
}
