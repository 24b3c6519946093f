//! Errors of the API as `application/problem+json` (RFC 9457): an HTTP status, a stable code
//! and a message naming the run, task, field or limit.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::wire::Problem;
use crate::store::StoreError;

/// An API error.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The stable code (see [`Problem::code`]).
    pub code: &'static str,
    /// What went wrong.
    pub detail: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
        }
    }

    pub(crate) fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    pub(crate) fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// A quota of `tenant` refused the request: 429, naming the quota, its value and why.
    pub(crate) fn quota(
        tenant: &super::Tenant,
        quota: &str,
        limit: u64,
        why: impl std::fmt::Display,
    ) -> Self {
        let detail = match quota {
            "grants" => format!(
                "quota `grants` (the grant ceiling) of tenant `{}`: {why}",
                tenant.name
            ),
            _ => format!(
                "quota `{quota}` of tenant `{}` is {limit}: {why}",
                tenant.name
            ),
        };
        Self::new(StatusCode::TOO_MANY_REQUESTS, "quota-exceeded", detail)
    }

    /// A failure of the server itself: logged in full, reported without the server's paths.
    pub(crate) fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!("{what}: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what} failed in the server; its log has the details"),
        )
    }

    /// Something the server needs is unreachable for now (its database): 503, logged; the
    /// caller tries again.
    pub(crate) fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::warn!("{what}: {e}");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("{what}: the server's database is unreachable for now; try again"),
        )
    }

    /// A store error: unknown or ambiguous runs are the caller's; one that may pass (the
    /// database unreachable) is 503; anything else the server's.
    pub(crate) fn store(what: &str, e: StoreError) -> Self {
        match e {
            StoreError::UnknownRun(_) | StoreError::CacheKey(_) => Self::not_found(e.to_string()),
            StoreError::AmbiguousRun { .. } => Self::bad_request(e.to_string()),
            e if e.is_retriable() => Self::unavailable(what, &e),
            e => Self::internal(what, &e),
        }
    }

    /// The problem document.
    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:sluice:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        response
    }
}
