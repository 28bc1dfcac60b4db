//! [`ApiError`]: every way a request can fail, and the one place failures become responses.
//!
//! A 4xx response carries `{"error": {"code": "...", "message": "..."}}`: `code` is stable
//! snake_case for programs, `message` is for people. A 5xx response logs the cause with its
//! source chain and answers with code `internal` and a generic message, so nothing about the
//! server's insides reaches the client. Extractor rejections (bad JSON, bad query string, bad
//! path) convert into [`ApiError`] too; see [`crate::extract`].

use std::error::Error as StdError;

use axum::{
    extract::rejection::{JsonRejection, PathRejection, QueryRejection},
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use tellus_broker::provision::ProvisionError;
use tellus_core::{DeviceId, InvalidDeviceId, RegistryError};
use tellus_ingest::StoreError;

type BoxError = Box<dyn StdError + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A valid token whose role may not do what was asked; the text says which role it takes.
    #[error("{0}")]
    Forbidden(String),
    #[error("token {0} not found")]
    TokenNotFound(String),
    #[error(transparent)]
    InvalidDeviceId(#[from] InvalidDeviceId),
    #[error("device {0} already exists")]
    DeviceExists(DeviceId),
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    /// The registry's state does not allow what was asked (the device is disabled, say); the
    /// text says why.
    #[error("{0}")]
    Refused(String),
    #[error("certificate {0} is not one of this device's")]
    CertificateNotFound(String),
    #[error("dead letter {0} not found")]
    DeadLetterNotFound(i64),
    #[error("device {0} has no command {1}")]
    CommandNotFound(DeviceId, String),
    #[error("job {0} not found")]
    JobNotFound(String),
    #[error("rule {0} not found")]
    RuleNotFound(String),
    #[error("alert {0} not found")]
    AlertNotFound(String),
    /// A rule that would not run: the text says why (which expression, which action).
    #[error("{0}")]
    InvalidRule(String),
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    #[error("invalid CA certificate: {0}")]
    InvalidCa(String),
    #[error("CA {0} is registered already")]
    CaExists(String),
    /// The gate traces a device certificate to its CA by issuer name, so two trusted CAs
    /// may not share a subject.
    #[error("CA {id} has the same subject ({subject}) and is registered already")]
    CaSubjectTaken { subject: String, id: String },
    #[error("CA {0} not found")]
    CaNotFound(String),
    /// The request body is not the JSON this endpoint takes.
    #[error("{0}")]
    InvalidBody(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    InvalidQuery(String),
    #[error("{0}")]
    InvalidPath(String),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("method {0} is not allowed on this endpoint")]
    MethodNotAllowed(Method),
    /// The telemetry store's backend (QuestDB) cannot answer now; the cause is logged,
    /// never sent.
    #[error("telemetry store unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// Anything that is the server's fault; the cause is logged, never sent.
    #[error("internal error: {0}")]
    Internal(#[source] BoxError),
}

impl ApiError {
    pub fn internal(e: impl Into<BoxError>) -> Self {
        ApiError::Internal(e.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::InvalidDeviceId(_)
            | ApiError::InvalidCsr(_)
            | ApiError::InvalidCa(_)
            | ApiError::InvalidBody(_)
            | ApiError::InvalidRule(_)
            | ApiError::InvalidQuery(_)
            | ApiError::InvalidPath(_) => StatusCode::BAD_REQUEST,
            ApiError::DeviceExists(_)
            | ApiError::Refused(_)
            | ApiError::CaExists(_)
            | ApiError::CaSubjectTaken { .. } => StatusCode::CONFLICT,
            ApiError::DeviceNotFound(_)
            | ApiError::CertificateNotFound(_)
            | ApiError::DeadLetterNotFound(_)
            | ApiError::CommandNotFound(..)
            | ApiError::JobNotFound(_)
            | ApiError::RuleNotFound(_)
            | ApiError::AlertNotFound(_)
            | ApiError::TokenNotFound(_)
            | ApiError::CaNotFound(_)
            | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable, machine-readable code of the error body.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::TokenNotFound(_) => "token_not_found",
            ApiError::InvalidDeviceId(_) => "invalid_device_id",
            ApiError::DeviceExists(_) => "device_exists",
            ApiError::DeviceNotFound(_) => "device_not_found",
            ApiError::Refused(_) => "refused",
            ApiError::CertificateNotFound(_) => "certificate_not_found",
            ApiError::DeadLetterNotFound(_) => "deadletter_not_found",
            ApiError::CommandNotFound(..) => "command_not_found",
            ApiError::JobNotFound(_) => "job_not_found",
            ApiError::RuleNotFound(_) => "rule_not_found",
            ApiError::AlertNotFound(_) => "alert_not_found",
            ApiError::InvalidRule(_) => "invalid_rule",
            ApiError::InvalidCsr(_) => "invalid_csr",
            ApiError::InvalidCa(_) => "invalid_ca",
            ApiError::CaExists(_) => "ca_exists",
            ApiError::CaSubjectTaken { .. } => "ca_subject_taken",
            ApiError::CaNotFound(_) => "ca_not_found",
            ApiError::InvalidBody(_) => "invalid_body",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::InvalidQuery(_) => "invalid_query",
            ApiError::InvalidPath(_) => "invalid_path",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::StoreUnavailable(_) => "store_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// `error` and its sources, joined with ": ", for the log.
fn chain(error: &dyn StdError) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        out.push_str(": ");
        out.push_str(&e.to_string());
        next = e.source();
    }
    out
}

/// The body of every error answer: `{"error": {"code", "message"}}`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable and snake_case, for programs: `device_not_found`, `invalid_query`, `internal`, …
    #[schema(example = "device_not_found")]
    pub code: &'static str,
    /// For people; a 5xx says nothing about its cause.
    #[schema(example = "device sensor-01 not found")]
    pub message: String,
}

fn body(code: &'static str, message: &str) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: ErrorDetail {
            code,
            message: message.to_owned(),
        },
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            let cause = match &self {
                ApiError::Internal(e) => chain(e.as_ref()),
                other => chain(other),
            };
            tracing::error!(error = %cause, "request failed");
            let message = match self {
                ApiError::StoreUnavailable(_) => "the telemetry store cannot answer now; try again",
                _ => "internal server error",
            };
            return (status, body(self.code(), message)).into_response();
        }
        let mut response = (status, body(self.code(), &self.to_string())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<ProvisionError> for ApiError {
    fn from(e: ProvisionError) -> Self {
        match e {
            ProvisionError::InvalidId(e) => ApiError::InvalidDeviceId(e),
            ProvisionError::AlreadyExists(id) => ApiError::DeviceExists(id),
            ProvisionError::BadCsr(reason) => ApiError::InvalidCsr(reason),
            ProvisionError::Refused(why) => ApiError::Refused(why),
            e @ (ProvisionError::Pki(_) | ProvisionError::Registry(_)) => ApiError::internal(e),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::AlreadyExists(id) => ApiError::DeviceExists(id),
            RegistryError::UnknownCertificate(serial) => ApiError::CertificateNotFound(serial),
            RegistryError::CaExists(id) => ApiError::CaExists(id),
            RegistryError::Refused(why) => ApiError::Refused(why),
            e @ RegistryError::VersionConflict { .. } => ApiError::Refused(e.to_string()),
            e @ RegistryError::Backend(_) => ApiError::internal(e),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            e @ StoreError::Unavailable(_) => ApiError::StoreUnavailable(e),
            e => ApiError::internal(e),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::internal(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let message = r.body_text();
        match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(message),
            s if s.is_server_error() => ApiError::internal(r),
            _ => ApiError::InvalidBody(message),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::InvalidQuery(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        if r.status().is_server_error() {
            // A handler asked for path parameters its route does not have: our bug.
            ApiError::internal(r)
        } else {
            ApiError::InvalidPath(r.body_text())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parts(e: ApiError) -> (StatusCode, serde_json::Value) {
        let response = e.into_response();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn server_errors_say_nothing_about_their_cause() {
        let cause = RegistryError::Backend("disk I/O error at /var/lib/tellus".into());
        let (status, body) = parts(cause.into()).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "internal", "message": "internal server error"}})
        );
    }

    #[tokio::test]
    async fn provisioning_refusals_are_client_errors() {
        let d1 = DeviceId::parse("d1").unwrap();
        let (status, body) = parts(ProvisionError::AlreadyExists(d1).into()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "device_exists");
        let why = "the device is disabled".to_owned();
        let (status, body) = parts(ProvisionError::Refused(why).into()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(body["error"]["code"], "refused");
        assert_eq!(body["error"]["message"], "the device is disabled");
    }

    #[tokio::test]
    async fn client_errors_carry_code_and_message() {
        let (status, body) = parts(ApiError::DeviceNotFound(DeviceId::parse("d1").unwrap())).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "device_not_found", "message": "device d1 not found"}})
        );
    }
}
