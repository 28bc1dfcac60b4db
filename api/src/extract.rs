//! Extractors that reject with [`ApiError`], so a malformed body, query string or path gets
//! the API's JSON error shape instead of axum's plain-text rejection.
//!
//! Handlers take these instead of `axum::Json`, `axum::extract::Query` and
//! `axum::extract::Path`; responses still use `axum::Json`.

use axum::extract::{FromRequest, FromRequestParts};

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
