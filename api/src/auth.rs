//! The bearer-token middleware in front of every `/api/v1` route but one.
//!
//! A request must carry `Authorization: Bearer <token>` with the configured admin token.
//! Tokens are compared in constant time (`subtle`), so response timing does not reveal how
//! much of a guess was right. An empty configured token admits no one. Unknown `/api/v1`
//! paths are behind the token too, so without it they answer 401, not 404.
//!
//! The one exception is `GET /api/v1/pki/crl.pem`: the fleet CA's CRL is signed public data,
//! fetched by other brokers that front the fleet and hold no admin token. It is not an
//! exemption inside this middleware: [`crate::router`] mounts [`crate::routes::public`]
//! beside the routes this middleware wraps, so the middleware never sees that request and
//! any `Authorization` header on it (a wrong token included) is ignored.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::Response,
};
use subtle::ConstantTimeEq;

use crate::ApiError;

const MISSING: &str =
    "a bearer token is required: send the header \"Authorization: Bearer <token>\"";
const WRONG: &str = "the bearer token is not valid";

/// Lets the request through only if it presents the admin token.
pub async fn require_bearer(
    State(token): State<Arc<str>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
        .ok_or(ApiError::Unauthorized(MISSING))?;
    if !token_matches(token.as_bytes(), presented) {
        return Err(ApiError::Unauthorized(WRONG));
    }
    Ok(next.run(request).await)
}

/// The token of an `Authorization` header value of the Bearer scheme (case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let token = token.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Constant time in the token's contents (a length mismatch answers early, which reveals only
/// the length).
fn token_matches(expected: &[u8], presented: &[u8]) -> bool {
    !expected.is_empty() && bool::from(expected.ct_eq(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_bearer_scheme_only() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer"), None);
    }

    #[test]
    fn an_empty_token_admits_no_one() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        assert!(!token_matches(b"s3cret", b"s3creT"));
        assert!(!token_matches(b"s3cret", b"s3cre"));
        assert!(!token_matches(b"", b""));
    }
}
