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

/// A JSON request body that may be absent: an empty body (whatever its content type), or
/// `null`, is `None`. A body that is not empty must be JSON, with the JSON content type, exactly as for
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
        // `null` is no body too.
        let Json(value) = Json::<Option<T>>::from_request(req, state).await?;
        Ok(OptionalJson(value))
    }
}

/// Sizes from query strings that saturate instead of failing: a `limit` too large for
/// `usize` is lowered to the maximum like any other too large one. A negative number, a
/// fraction or anything else that is not a whole number is still refused.
pub mod saturating {
    use serde::{de::Error, Deserialize, Deserializer};

    /// `text` as a whole number, clamped to `i128`'s range (plenty for the types here).
    fn whole(text: &str) -> Option<i128> {
        let (negative, digits) = match text.as_bytes().first() {
            Some(b'-') => (true, &text[1..]),
            Some(b'+') => (false, &text[1..]),
            _ => (false, text),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(match (digits.parse::<i128>(), negative) {
            (Ok(n), true) => -n,
            (Ok(n), false) => n,
            (Err(_), true) => i128::MIN,
            (Err(_), false) => i128::MAX,
        })
    }

    /// `text` as a `usize`, saturating above; `None` below 0.
    pub fn parse_usize(text: &str) -> Option<usize> {
        whole(text)
            .filter(|n| *n >= 0)
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// For `#[serde(default, deserialize_with = "saturating::usize")]`.
    pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                parse_usize(&s).ok_or_else(|| {
                    D::Error::custom(format!("expected a whole number of 0 or more, found {s:?}"))
                })
            })
            .transpose()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn whole_numbers_saturate_and_the_rest_is_refused() {
            assert_eq!(parse_usize("0"), Some(0));
            assert_eq!(parse_usize("+25"), Some(25));
            assert_eq!(parse_usize("18446744073709551616"), Some(usize::MAX));
            assert_eq!(parse_usize(&"9".repeat(60)), Some(usize::MAX));
            for bad in ["", "-", "+", "1.5", "1e3", " 1", "0x10", "١"] {
                assert_eq!(parse_usize(bad), None, "{bad:?}");
            }
            assert_eq!(parse_usize("-1"), None);
            assert_eq!(parse_usize(&format!("-{}", "9".repeat(60))), None);
        }
    }
}
