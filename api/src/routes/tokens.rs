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

use super::{blocking, page, page_limit, IdPage};
use crate::{
    auth::{mint, Caller},
    extract, openapi as doc,
    timestamps::rfc3339,
    ApiError, AppState,
};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for, for people: 1 to 100 characters, none of them a control
    /// character.
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: String,
    pub role: Role,
}

/// A token as lists show it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[schema(format = DateTime)]
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
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub view: TokenView,
    /// `Authorization: Bearer <token>`. Tellus keeps no copy.
    pub token: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
    pub next: Option<String>,
}

/// The caller, as `GET /api/v1/whoami` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub id: String,
    pub name: String,
    pub role: Role,
}

/// Create an API token.
///
/// `{"name", "role"}` → 201 with the token, whose secret is shown only here.
#[utoipa::path(
    post,
    path = "/tokens",
    operation_id = "create_token",
    tag = "tokens",
    request_body = CreateToken,
    responses(
        (status = 201, description = "The token, with its secret", body = CreatedToken),
        (status = 400, description = "A bad name or body (`invalid_body`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 409, description = "The registry refused it (`refused`)", body = doc::ErrorBody),
        (status = 413, response = doc::PayloadTooLarge),
        (status = 415, response = doc::UnsupportedMediaType),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
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

/// List API tokens.
///
/// By id, paged by `after`; never a secret.
#[utoipa::path(
    get,
    path = "/tokens",
    operation_id = "list_tokens",
    tag = "tokens",
    params(IdPage),
    responses(
        (status = 200, description = "A page of tokens", body = TokenList),
        (status = 400, description = "A bad parameter (`invalid_query`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
pub async fn list(
    State(state): State<AppState>,
    extract::Query(q): extract::Query<IdPage>,
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

/// Revoke an API token.
///
/// 204; the token is refused from the next request on.
#[utoipa::path(
    delete,
    path = "/tokens/{id}",
    operation_id = "delete_token",
    tag = "tokens",
    params(("id" = String, Path, description = "The token's id (the part before the `.`)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "A path that is not UTF-8 once decoded (`invalid_path`)", body = doc::ErrorBody),
        doc::Guarded,
        (status = 404, description = "No such token (`token_not_found`)", body = doc::ErrorBody),
        (status = 500, response = doc::Internal),
    ),
    security(("token" = ["admin"]))
)]
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

/// Show the caller's token.
///
/// The token the request presented: its id, name and role.
#[utoipa::path(
    get,
    path = "/whoami",
    operation_id = "whoami",
    tag = "tokens",
    responses(
        (status = 200, description = "The caller's token", body = WhoAmI),
        doc::Guarded,
    ),
    security(("token" = ["viewer"]))
)]
pub async fn whoami(Extension(caller): Extension<Caller>) -> Json<WhoAmI> {
    Json(WhoAmI {
        id: caller.token_id,
        name: caller.name,
        role: caller.role,
    })
}
