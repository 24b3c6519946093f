//! The worker API under `/api/v1/worker` (`sluice server --workers`): `sluice worker`
//! processes claim attempts, extend their claims, report results ([`super::workers`]) and fetch
//! the components they run by digest. Every route needs a worker token (`sluice worker-token
//! add`), checked against the database's, never a tenant's; a worker is the operator's and sees
//! every tenant's attempts. Not part of the tenants' OpenAPI document.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::response::Response;

use super::Server;
use super::problem::ApiError;
use super::workers::Remote;
use crate::ids::TenantId;
use crate::store::StoreError;
use crate::worker::wire::{
    ClaimRequest, ClaimResponse, ExtendRequest, ExtendResponse, FinishRequest, FinishResponse,
    QueueStats,
};

/// The routes, merged into the server's router.
pub(super) fn routes() -> axum::Router<Server> {
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/api/v1/worker/claim", post(claim))
        .route("/api/v1/worker/extend", post(extend))
        .route("/api/v1/worker/finish", post(finish))
        .route("/api/v1/worker/stats", get(stats))
        .route(
            "/api/v1/worker/components/{tenant}/{digest}",
            get(component),
        )
        // Results carry outputs and logs as large as budgets allow (a worker batches them at
        // 8 MiB, a larger one alone); workers are the operator's.
        .layer(axum::extract::DefaultBodyLimit::max(1 << 30))
}

/// The calling worker: its token's name, and the server's queue of worker attempts.
struct Worker(String, Arc<Remote>);

impl FromRequestParts<Server> for Worker {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Server) -> Result<Self, ApiError> {
        let token = super::api::bearer(parts, "worker token")?.to_owned();
        let Some(remote) = server.inner.remote.get() else {
            return Err(ApiError::not_found(
                "this server runs its task runs itself: start it with --database URL --workers \
                 to give them to workers",
            ));
        };
        let name = remote
            .worker_for(&super::tenants::token_hash(&token))
            .await
            .map_err(|e| unavailable("checking the worker token", &e))?
            .ok_or_else(|| super::api::unauthorized("the worker token is not valid"))?;
        Ok(Worker(name, remote.clone()))
    }
}

/// A database failure: 503 when it may pass (the worker tries again), else the server's fault.
fn unavailable(what: &str, e: &StoreError) -> ApiError {
    match e.is_retriable() {
        true => ApiError::unavailable(what, e),
        false => ApiError::internal(what, e),
    }
}

/// The worker process `instance` of token `name`: the holder of its claims. Only printable,
/// and short, so it can be named in messages.
fn holder(name: &str, instance: &str) -> Result<String, ApiError> {
    if instance.is_empty() || instance.len() > 200 || instance.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "`instance` names the worker process: 1 to 200 printable characters",
        ));
    }
    Ok(format!("{name}/{instance}"))
}

/// Claim attempts, waiting up to `wait_ms` for some.
async fn claim(
    Worker(name, remote): Worker,
    Json(req): Json<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let worker = holder(&name, &req.instance)?;
    if let Some(tag) = req
        .tags
        .iter()
        .find(|t| t.is_empty() || t.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(format!(
            "tag {tag:?}: a tag is not empty and has no control character"
        )));
    }
    remote
        .claim(worker, req)
        .await
        .map(Json)
        .map_err(|e| unavailable("claiming attempts", &e))
}

/// Extend claims.
async fn extend(
    Worker(name, remote): Worker,
    Json(req): Json<ExtendRequest>,
) -> Result<Json<ExtendResponse>, ApiError> {
    let worker = holder(&name, &req.instance)?;
    remote
        .extend(worker, req.claims)
        .await
        .map(Json)
        .map_err(|e| unavailable("extending claims", &e))
}

/// Report results.
async fn finish(
    Worker(name, remote): Worker,
    Json(req): Json<FinishRequest>,
) -> Result<Json<FinishResponse>, ApiError> {
    let worker = holder(&name, &req.instance)?;
    remote
        .finish(worker, req.results)
        .await
        .map(|accepted| Json(FinishResponse { accepted }))
        .map_err(|e| unavailable("reporting results", &e))
}

/// What the queue of worker attempts has done.
async fn stats(Worker(_, remote): Worker) -> Json<QueueStats> {
    Json(remote.queue_stats())
}

/// A component a claimed attempt runs, by its tenant and digest.
async fn component(
    State(server): State<Server>,
    Worker(..): Worker,
    Path((tenant, digest)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no component {digest} of tenant {tenant}"));
    let id: TenantId = tenant.parse().map_err(|_| not_found())?;
    let tenants = server.inner.clone();
    let found = super::workers::blocking(move || {
        tenants
            .tenants
            .list()
            .map_err(|e| StoreError::io("reading the tenants", e))
    })
    .await
    .map_err(|e| unavailable("reading the tenants", &e))?
    .into_iter()
    .find(|t| t.id == id)
    .ok_or_else(not_found)?;
    let space = server
        .space(&found)
        .map_err(|e| ApiError::internal("opening the tenant's store", &e))?;
    let path = space.component_file(&digest).ok_or_else(not_found)?;
    super::api::component_body(&path, not_found).await
}
