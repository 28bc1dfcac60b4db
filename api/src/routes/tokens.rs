//! API tokens: `POST /api/v1/tokens` makes one with a role and shows its secret once,
//! `GET /api/v1/tokens` lists them (never a secret, nor its hash), `DELETE
//! /api/v1/tokens/{id}` revokes one; `GET /api/v1/whoami` tells any caller which token it
//! presented and its role. Only an admin manages tokens.
//!
//! A token is `<id>.<secret>` ([`crate::auth::mint`]): the id is public, and of the secret
//! the registry keeps only the SHA-256.

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Extension, Json,
};
use serde::{Deserialize, Serialize};
use tellus_core::{now_ms, ApiToken, Role};

use super::{blocking, page, page_limit};
use crate::{
    auth::{mint, Caller},
    extract,
    timestamps::rfc3339,
    ApiError, AppState,
};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for, for people: 1 to 100 characters.
    pub name: String,
    pub role: Role,
}

/// A token as lists show it.
#[derive(Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
}

impl TryFrom<ApiToken> for TokenView {
    type Error = ApiError;
    fn try_from(t: ApiToken) -> Result<Self, ApiError> {
        Ok(TokenView {
            created_at: rfc3339(t.created_at_ms)?,
            id: t.id,
            name: t.name,
            role: t.role,
        })
    }
}

/// A token just made: its view and, this once, the token to present.
#[derive(Debug, Serialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// `Authorization: Bearer <token>`. Tellus keeps no copy.
    pub token: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
    pub next: Option<String>,
}

/// The caller, as `GET /api/v1/whoami` shows it.
#[derive(Debug, Serialize)]
pub struct WhoAmI {
    pub id: String,
    pub name: String,
    pub role: Role,
}

/// `POST /api/v1/tokens` `{"name", "role"}` → 201 with the token.
pub async fn create(
    State(state): State<AppState>,
    extract::Json(body): extract::Json<CreateToken>,
) -> Result<Response, ApiError> {
    let (record, token) = mint(body.name, body.role, now_ms()).map_err(ApiError::InvalidBody)?;
    let registry = state.registry.clone();
    let stored = record.clone();
    blocking(move || registry.insert_api_token(&stored)).await?;
    tracing::info!(token = %record.id, role = %record.role, "API token created");
    let created = CreatedToken {
        view: record.try_into()?,
        token,
    };
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /api/v1/tokens?limit=&after=`.
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<ListQuery>,
) -> Result<Json<TokenList>, ApiError> {
    let limit = page_limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let registry = state.registry.clone();
    let rows = blocking(move || registry.api_tokens(q.after.as_deref(), limit + 1)).await?;
    let (rows, next) = page(rows, limit, |t| t.id.clone());
    let tokens = rows
        .into_iter()
        .map(TokenView::try_from)
        .collect::<Result<_, _>>()?;
    Ok(Json(TokenList { tokens, next }))
}

/// `DELETE /api/v1/tokens/{id}` → 204; the token is refused from the next request on.
pub async fn delete(
    State(state): State<AppState>,
    extract::Path(id): extract::Path<String>,
) -> Result<StatusCode, ApiError> {
    let registry = state.registry.clone();
    let key = id.clone();
    if !blocking(move || registry.delete_api_token(&key)).await? {
        return Err(ApiError::TokenNotFound(id));
    }
    tracing::info!(token = %id, "API token revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/v1/whoami`: the token the request presented.
pub async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        id: caller.token_id,
        name: caller.name,
        role: caller.role,
    })
}
