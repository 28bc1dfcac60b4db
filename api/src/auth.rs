//! Who may call the API: the bearer-token middleware in front of every `/api/v1` route but
//! one and of `/metrics`, and the role check each route adds.
//!
//! A request must carry `Authorization: Bearer <token>`. Two kinds of token are accepted:
//! - the admin token of the data directory's `admin.token`, an admin, compared first;
//! - a token made through `POST /api/v1/tokens` or `tellus token create`, `<id>.<secret>`
//!   with a 16-hex-digit id, with the role it was made with. The registry keeps the SHA-256
//!   of its secret; the presented secret is hashed and compared with it. A presented token of
//!   another shape is refused without a registry read. A deleted token is refused from the
//!   next request on (a stream already open runs on).
//!
//! Comparisons run in constant time (`subtle`), so response timing does not reveal how much of
//! a guess was right. An empty configured admin token admits no one. Unknown `/api/v1` paths
//! are behind the token too, so without it they answer 401, not 404.
//!
//! [`authenticate`] puts the [`Caller`] into the request's extensions; each route then
//! requires a [`Role`] ([`require`], applied by `routes::guarded` with the role the route's
//! description names).
//! A valid token without the role is answered 403 `forbidden`.
//!
//! The one exception is `GET /api/v1/pki/crl.pem`: the fleet CA's CRL is signed public data,
//! fetched by other brokers that front the fleet and hold no token. It is not an exemption
//! inside this middleware: [`crate::router`] mounts [`crate::routes::public`] beside the
//! routes this middleware wraps, so the middleware never sees that request and any
//! `Authorization` header on it (a wrong token included) is ignored.

use axum::{
    extract::{Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::Response,
};
use rand::RngCore;
use subtle::ConstantTimeEq;
pub use tellus_core::Role;
use tellus_core::{ApiToken, TimestampMs};

use crate::{routes::blocking, ApiError, AppState};

const MISSING: &str =
    "a bearer token is required: send the header \"Authorization: Bearer <token>\"";
const WRONG: &str = "the bearer token is not valid";

/// The id the data directory's admin token goes by.
pub const ADMIN_TOKEN_ID: &str = "admin";
/// The length of a token id, in lowercase hex characters.
const ID_LEN: usize = 16;

/// Who made a request: the token it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

/// Lets the request through only if it presents a valid token, and tells the routes whose.
pub async fn authenticate(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()))
        .ok_or(ApiError::Unauthorized(MISSING))?;
    let caller = identify(&state, presented)
        .await?
        .ok_or(ApiError::Unauthorized(WRONG))?;
    request.extensions_mut().insert(caller);
    Ok(next.run(request).await)
}

/// Lets the request through only if [`authenticate`] found a caller with at least `role`.
pub async fn require(role: Role, request: Request, next: Next) -> Result<Response, ApiError> {
    // Without a caller the route was mounted outside `authenticate`: refuse rather than serve.
    let caller = request
        .extensions()
        .get::<Caller>()
        .ok_or(ApiError::Unauthorized(MISSING))?;
    if caller.role < role {
        return Err(ApiError::Forbidden(format!(
            "this token's role, {}, may not do this: it takes the role {role} or above",
            caller.role
        )));
    }
    Ok(next.run(request).await)
}

/// The caller a presented token stands for, if it is valid.
async fn identify(state: &AppState, presented: &[u8]) -> Result<Option<Caller>, ApiError> {
    let Ok(presented) = std::str::from_utf8(presented) else {
        return Ok(None);
    };
    // The admin token first, whatever its shape (a hand-written one may hold a `.`).
    if token_matches(state.admin_token.as_bytes(), presented.as_bytes()) {
        return Ok(Some(Caller {
            token_id: ADMIN_TOKEN_ID.into(),
            name: "admin.token".into(),
            role: Role::Admin,
        }));
    }
    // Only what `mint` makes is looked up: junk costs no registry read.
    let Some((id, secret)) = ApiToken::split(presented).filter(|(id, _)| minted_id(id)) else {
        return Ok(None);
    };
    let registry = state.registry.clone();
    let lookup = id.to_owned();
    let Some(token) = blocking(move || registry.api_token(&lookup)).await? else {
        return Ok(None);
    };
    let hash = secret_sha256(secret);
    let valid = token_matches(token.secret_sha256.as_bytes(), hash.as_bytes());
    Ok(valid.then_some(Caller {
        token_id: token.id,
        name: token.name,
        role: token.role,
    }))
}

/// A new token named `name` with `role`: the record to keep, and the token to hand over
/// once (`<id>.<secret>`: 16 hex characters of id, 64 of secret from 32 random bytes).
pub fn mint(name: String, role: Role, now: TimestampMs) -> Result<(ApiToken, String), String> {
    ApiToken::check_name(&name)?;
    let mut id = [0u8; ID_LEN / 2];
    let mut secret = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut id);
    rand::thread_rng().fill_bytes(&mut secret);
    let (id, secret) = (hex::encode(id), hex::encode(secret));
    let token = format!("{id}.{secret}");
    let record = ApiToken {
        id,
        name,
        role,
        secret_sha256: secret_sha256(&secret),
        created_at_ms: now,
    };
    Ok((record, token))
}

/// Whether `id` has the shape of the ids [`mint`] makes.
fn minted_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The SHA-256 of a token's secret, in lowercase hex, as the registry keeps it.
pub fn secret_sha256(secret: &str) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.as_bytes(),
    ))
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

    #[test]
    fn minted_tokens_are_id_dot_secret_and_kept_as_a_hash() {
        let (record, token) = mint("ci".into(), Role::Operator, 7).unwrap();
        let (id, secret) = ApiToken::split(&token).unwrap();
        assert_eq!((id, id.len(), secret.len()), (record.id.as_str(), 16, 64));
        assert!(minted_id(id));
        assert!(!minted_id("0123456789ABCDEF") && !minted_id("0123") && !minted_id(""));
        assert_eq!(record.secret_sha256, secret_sha256(secret));
        assert!(!record.secret_sha256.contains(secret));
        assert_ne!(mint("ci".into(), Role::Operator, 7).unwrap().1, token);
        assert!(mint(String::new(), Role::Viewer, 7).is_err());
    }

    #[test]
    fn secrets_hash_to_lowercase_hex_sha256() {
        assert_eq!(
            secret_sha256("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
