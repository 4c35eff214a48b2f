//! Errors as the admin API sends them: OpenAI's shape,
//! `{"error": {"message", "type", "code", "param"}}`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use keygate_store::DbError;
use serde_json::json;

/// An error response of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The machine-readable code (`invalid_admin_key`, `not_found`, ...).
    pub code: &'static str,
    /// For people; never a secret.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "insufficient_admin_scope", message)
    }

    pub(crate) fn unauthenticated() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_admin_key",
            "an admin key is required: Authorization: Bearer kg-admin-…",
        )
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        let (status, code) = match &e {
            DbError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            DbError::Exists(_) => (StatusCode::CONFLICT, "conflict"),
            DbError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            DbError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "admin API: the store failed");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({
            "error": {
                "message": self.message,
                "type": kind,
                "code": self.code,
                "param": null,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
            );
        }
        response
    }
}
