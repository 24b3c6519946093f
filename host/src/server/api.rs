//! The HTTP API under `/api/v1` (axum), and its OpenAPI document, generated from these handlers
//! and the [`wire`](super::wire) types by utoipa and served at `/api/v1/openapi.json`. Every
//! route but the document needs a tenant's bearer token (401 otherwise) and is served from that
//! tenant's [`Space`] only.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::deployments::check_name;
use super::problem::ApiError;
use super::space::{MAX_WAIT, too_large};
use super::wire::{
    CacheCleared, CacheItem, CacheValue, Cancelled, ComponentInfo, Deploy, DeploymentRuns,
    DeploymentView, LogPage, Problem, ResumeRun, RunItem, RunStarted, RunView, SecretInfo,
    SetSecret, StartRun, Usage,
};
use super::{Server, Space, Tenant};
use crate::state::StateName;
use crate::store::{LOG_PAGE_LINES, RunFilter, Store};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "A sandboxed workflow engine: every task is a WebAssembly component. \
                       Every route needs `Authorization: Bearer <tenant token>`; errors are \
                       `application/problem+json`."
    ),
    components(schemas(Problem)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The API's router.
pub(super) fn router(server: Server) -> axum::Router {
    let v1 = OpenApiRouter::new()
        .routes(routes!(put_component, get_component))
        .routes(routes!(start_run, list_runs))
        .routes(routes!(show_run))
        .routes(routes!(run_logs))
        .routes(routes!(run_events))
        .routes(routes!(cancel_run))
        .routes(routes!(resume_run))
        .routes(routes!(list_cache, clear_cache))
        .routes(routes!(show_cache_entry))
        .routes(routes!(list_secrets))
        .routes(routes!(set_secret, remove_secret))
        .routes(routes!(usage))
        .routes(routes!(deploy, list_deployments))
        .routes(routes!(show_deployment, remove_deployment))
        .routes(routes!(pause_deployment))
        .routes(routes!(resume_deployment))
        .routes(routes!(deployment_runs));
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", v1)
        .split_for_parts();
    let doc = Arc::new(doc);
    api.route(
        "/api/v1/openapi.json",
        axum::routing::get(move || {
            let doc = doc.clone();
            async move { Json(doc.as_ref().clone()) }
        }),
    )
    .merge(super::worker_api::routes())
    .merge(super::ui::routes())
    // Uploads stream to disk under their own limit; other bodies (a run request with its
    // manifest, a worker's results) are small.
    .layer(DefaultBodyLimit::max(32 << 20))
    .fallback(|| async { ApiError::not_found("no such API route") })
    .with_state(server)
}

/// Run `f`, a blocking read of a store, for a request. On a multi-threaded runtime (the
/// server's) it runs on this thread, whose other tasks move to another worker meanwhile
/// (`block_in_place`): the answer then waits for no thread hand-off, two with `spawn_blocking`,
/// each of which may wait for a core while guests fill them. Elsewhere on the blocking pool.
pub(super) async fn read<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => Ok(tokio::task::block_in_place(f)),
        _ => tokio::task::spawn_blocking(f).await,
    }
}

/// 401, saying why.
pub(super) fn unauthorized(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

/// The request's `Authorization: Bearer <token>` (a `kind` of token), or 401 saying what is
/// wrong with it.
pub(super) fn bearer<'p>(parts: &'p Parts, kind: &str) -> Result<&'p str, ApiError> {
    Ok(parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized(format!("no `Authorization: Bearer <{kind}>` header")))?
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            unauthorized(format!(
                "the `Authorization` header is not `Bearer <{kind}>`"
            ))
        })?
        .trim())
}

/// The caller: the tenant whose token the request carries (as the registry has it now: its
/// quotas as they are), and its space.
struct Caller(Arc<Space>, Tenant);

impl FromRequestParts<Server> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, server: &Server) -> Result<Self, ApiError> {
        let token = bearer(parts, "token")?;
        let (space, tenant) = authenticate(server, token).await?;
        Ok(Caller(space, tenant))
    }
}

/// The tenant whose token `token` is (as the registry has it now: its quotas as they are), and
/// its space; 401 when it is no tenant's.
pub(super) async fn authenticate(
    server: &Server,
    token: &str,
) -> Result<(Arc<Space>, Tenant), ApiError> {
    let tenants = server.inner.clone();
    let token = token.to_owned();
    let tenant = read(move || tenants.tenants.authenticate(&token))
        .await
        .map_err(|e| ApiError::internal("checking the token", &e))?
        // The registry unreachable (its database restarting): the caller tries again.
        .map_err(|e| ApiError::unavailable("checking the token", &e))?
        .ok_or_else(|| unauthorized("the token is not valid"))?;
    let space = server
        .space(&tenant)
        .map_err(|e| ApiError::internal("opening the tenant's store", &e))?;
    Ok((space, tenant))
}

/// Upload a component (content-addressed: idempotent).
#[utoipa::path(
    put,
    path = "/components/{digest}",
    params(("digest" = String, Path, description = "blake3 of the bytes, 64 hex digits")),
    request_body(content = Vec<u8>, content_type = "application/wasm"),
    responses(
        (status = 201, description = "Stored", body = ComponentInfo),
        (status = 200, description = "Already stored", body = ComponentInfo),
        (status = 400, description = "Not a digest, or the bytes do not match it", body = Problem),
        (status = 413, description = "Over the component size limit", body = Problem),
        (status = 429, description = "Over the `max_stored_bytes` quota", body = Problem),
    )
)]
async fn put_component(
    State(server): State<Server>,
    Caller(space, tenant): Caller,
    Path(digest): Path<String>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let max = server.inner.sandbox.max_component_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(&digest, max));
    }
    let new = space.put_component(&tenant, &digest, body, max).await?;
    let bytes = space
        .component_file(&digest)
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    let status = if new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ComponentInfo { digest, bytes })).into_response())
}

/// Download a component (`HEAD`: whether it is stored).
#[utoipa::path(
    get,
    path = "/components/{digest}",
    params(("digest" = String, Path, description = "blake3 of the bytes, 64 hex digits")),
    responses(
        (status = 200, description = "The component's bytes", content_type = "application/wasm"),
        (status = 404, description = "Not uploaded by this tenant", body = Problem),
    )
)]
async fn get_component(
    Caller(space, _): Caller,
    Path(digest): Path<String>,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found(format!("no component {digest}"));
    let path = space.component_file(&digest).ok_or_else(not_found)?;
    component_body(&path, not_found).await
}

/// The component file at `path`, streamed (a component may be hundreds of megabytes);
/// `not_found` when it cannot be read.
pub(super) async fn component_body(
    path: &std::path::Path,
    not_found: impl Fn() -> ApiError,
) -> Result<Response, ApiError> {
    let file = tokio::fs::File::open(path).await.map_err(|_| not_found())?;
    let len = file.metadata().await.map_err(|_| not_found())?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/wasm".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Start a run of a flow manifest whose components were uploaded.
#[utoipa::path(
    post,
    path = "/runs",
    request_body = StartRun,
    responses(
        (status = 201, description = "Recorded and executing", body = RunStarted),
        (status = 422, description = "The manifest, a component or a parameter is not valid", body = Problem),
        (status = 429, description = "A quota refused the run (named in `detail`)", body = Problem),
    )
)]
async fn start_run(
    State(server): State<Server>,
    Caller(space, tenant): Caller,
    Json(req): Json<StartRun>,
) -> Result<Response, ApiError> {
    let started = space
        .start_run(&tenant, req, &server.inner.policy, None)
        .await?;
    Ok((StatusCode::CREATED, Json(started)).into_response())
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ListQuery {
    /// Only runs in this state.
    state: Option<String>,
    /// Only runs of this flow.
    flow: Option<String>,
    /// Only runs this deployment started.
    deployment: Option<String>,
    /// At most this many runs (default 20).
    limit: Option<usize>,
}

/// List runs, newest first.
#[utoipa::path(
    get,
    path = "/runs",
    params(ListQuery),
    responses((status = 200, description = "Runs", body = Vec<RunItem>))
)]
async fn list_runs(
    Caller(space, _): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<RunItem>>, ApiError> {
    let state = match &q.state {
        None => None,
        Some(s) => Some(s.parse::<StateName>().map_err(|e| {
            ApiError::bad_request(format!("query `state`: `{s}` is not a state name: {e}"))
        })?),
    };
    let filter = RunFilter {
        state,
        flow: q.flow,
        limit: q.limit.unwrap_or(20).max(1),
        before: None,
        since: None,
        until: None,
        deployment: q.deployment,
    };
    let store = space.store().clone();
    let items = tokio::task::spawn_blocking(move || {
        store.list_runs(&filter).map(|runs| {
            runs.into_iter()
                .map(|summary| RunItem {
                    live: store.is_live(summary.id),
                    summary,
                })
                .collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|e| ApiError::internal("listing runs", &e))?
    .map_err(|e| ApiError::store("listing runs", e))?;
    Ok(Json(items))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ShowQuery {
    /// Wait up to this many seconds (at most 60) for the run to end first.
    wait: Option<u64>,
}

/// Show a run: its record, task runs, grants and newest logs.
#[utoipa::path(
    get,
    path = "/runs/{id}",
    params(("id" = String, Path, description = "A run id or a unique prefix of one"), ShowQuery),
    responses(
        (status = 200, description = "The run", body = RunView),
        (status = 404, description = "No such run of this tenant", body = Problem),
    )
)]
async fn show_run(
    Caller(space, _): Caller,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Result<Json<RunView>, ApiError> {
    let id = space.resolve(&id)?;
    if let Some(wait) = q.wait {
        space
            .wait(id, Duration::from_secs(wait).min(MAX_WAIT))
            .await;
    }
    let store = space.store().clone();
    let view = read(move || RunView::load(&*store, id))
        .await
        .map_err(|e| ApiError::internal("reading the run", &e))?
        .map_err(|e| ApiError::store("reading the run", e))?;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct LogsQuery {
    /// Only this task's lines.
    task: Option<String>,
    /// Lines after this position (`seq` of the last line read; default 0).
    after: Option<i64>,
    /// At most this many lines (at most 1,000).
    limit: Option<usize>,
}

/// Run `id` has a task named `task` (404 naming the closest one otherwise).
fn has_task(store: &dyn Store, id: crate::ids::FlowRunId, task: &str) -> Result<(), ApiError> {
    let names = store
        .task_names(id)
        .map_err(|e| ApiError::store("reading the run", e))?;
    if names.iter().any(|n| n == task) {
        return Ok(());
    }
    Err(ApiError::not_found(format!(
        "flow run {id} has no task `{task}`{}",
        crate::flow::Hint::closest(task, names.iter().map(String::as_str))
    )))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct EventsQuery {
    /// Only this task's changes and lines.
    task: Option<String>,
    /// Start after this cursor (an event id; the `Last-Event-ID` header wins).
    after: Option<String>,
}

/// A run's changes as server-sent events, until it ends: `flow` (its state and history), `task`
/// (a task run's state now, attempts and history), `log` (a line), then `end`
/// (`{"state": …}`). The last event of each batch has the cursor after it as its id: reconnect
/// with `Last-Event-ID` to continue. At most 16 streams per tenant (`max_event_streams`).
#[utoipa::path(
    get,
    path = "/runs/{id}/events",
    params(("id" = String, Path, description = "A run id or a unique prefix of one"), EventsQuery),
    responses(
        (status = 200, description = "The events", content_type = "text/event-stream", body = String),
        (status = 400, description = "A bad cursor", body = Problem),
        (status = 404, description = "No such run or task", body = Problem),
        (status = 429, description = "Too many streams open (`max_event_streams`)", body = Problem),
    )
)]
async fn run_events(
    Caller(space, tenant): Caller,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = space.resolve(&id)?;
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let after = match last.or(q.after) {
        Some(c) => c
            .parse()
            .map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "bad-cursor", e))?,
        None => crate::store::ChangeCursor::START,
    };
    if let Some(task) = &q.task {
        let store = space.store().clone();
        let task = task.clone();
        tokio::task::spawn_blocking(move || has_task(&*store, id, &task))
            .await
            .map_err(|e| ApiError::internal("reading the run", &e))??;
    }
    Ok(super::events::stream(&space, &tenant, id, q.task, after)?.into_response())
}

/// A page of a run's logs.
#[utoipa::path(
    get,
    path = "/runs/{id}/logs",
    params(("id" = String, Path, description = "A run id or a unique prefix of one"), LogsQuery),
    responses(
        (status = 200, description = "A page of lines", body = LogPage),
        (status = 404, description = "No such run or task", body = Problem),
    )
)]
async fn run_logs(
    Caller(space, _): Caller,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<LogPage>, ApiError> {
    let id = space.resolve(&id)?;
    let store = space.store().clone();
    let page = tokio::task::spawn_blocking(move || {
        if let Some(task) = &q.task {
            has_task(&*store, id, task)?;
        }
        let live = store.is_live(id);
        let limit = q.limit.unwrap_or(LOG_PAGE_LINES).clamp(1, LOG_PAGE_LINES);
        let lines = store
            .logs(id, q.task.as_deref(), q.after.unwrap_or(0), limit)
            .map_err(|e| ApiError::store("reading logs", e))?;
        Ok(LogPage { lines, live })
    })
    .await
    .map_err(|e| ApiError::internal("reading logs", &e))??;
    Ok(Json(page))
}

/// Cancel a run.
#[utoipa::path(
    post,
    path = "/runs/{id}/cancel",
    params(("id" = String, Path, description = "A run id or a unique prefix of one")),
    responses(
        (status = 200, description = "What was done", body = Cancelled),
        (status = 404, description = "No such run of this tenant", body = Problem),
    )
)]
async fn cancel_run(
    Caller(space, _): Caller,
    Path(id): Path<String>,
) -> Result<Json<Cancelled>, ApiError> {
    let id = space.resolve(&id)?;
    let space2 = space.clone();
    let outcome = tokio::task::spawn_blocking(move || space2.cancel(id))
        .await
        .map_err(|e| ApiError::internal("cancelling the run", &e))??;
    Ok(Json(outcome))
}

/// Resume a Paused, Failed, Cancelled or Crashed run, as `sluice resume` does: completed task
/// runs keep their results, `start` tasks run as roots. The quotas that refuse a run apply.
#[utoipa::path(
    post,
    path = "/runs/{id}/resume",
    params(("id" = String, Path, description = "A run id or a unique prefix of one")),
    request_body = ResumeRun,
    responses(
        (status = 200, description = "Executing again", body = RunStarted),
        (status = 404, description = "No such run of this tenant", body = Problem),
        (status = 409, description = "It is running, completed, or cannot be rebuilt (`not-resumable`)", body = Problem),
        (status = 429, description = "A quota refused it", body = Problem),
    )
)]
async fn resume_run(
    State(server): State<Server>,
    Caller(space, tenant): Caller,
    Path(id): Path<String>,
    Json(req): Json<ResumeRun>,
) -> Result<Json<RunStarted>, ApiError> {
    let id = space.resolve(&id)?;
    let started = space
        .resume_run(&tenant, id, req.start, &server.inner.policy, false)
        .await?;
    Ok(Json(started))
}

/// What the caller uses now, against its quotas.
#[utoipa::path(
    get,
    path = "/usage",
    responses((status = 200, description = "Usage and quotas", body = Usage))
)]
async fn usage(Caller(space, tenant): Caller) -> Json<Usage> {
    Json(space.usage(&tenant))
}

/// Register a deployment: a flow whose manifest has a `[schedule]`, run on that schedule. A
/// deployment of the same name is replaced (its runs not started yet are planned again).
#[utoipa::path(
    post,
    path = "/deployments",
    request_body = Deploy,
    responses(
        (status = 201, description = "Deployed", body = DeploymentView),
        (status = 422, description = "The manifest is not valid or has no `[schedule]`", body = Problem),
        (status = 429, description = "A quota or the grant ceiling refused the flow", body = Problem),
    )
)]
async fn deploy(
    State(server): State<Server>,
    Caller(space, tenant): Caller,
    Json(req): Json<Deploy>,
) -> Result<Response, ApiError> {
    let def = space.check(&tenant, &req.flow, &server.inner.policy)?;
    let Some(schedule) = &def.schedule else {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-manifest",
            format!(
                "{}: flow `{}` has no `[schedule]` table: a deployment runs on one (cron or \
                 interval)",
                req.flow.manifest_path, def.name
            ),
        ));
    };
    let name = req.name.clone().unwrap_or_else(|| def.name.clone());
    check_name(&name)?;
    let view = space
        .deployments()
        .deploy(&name, &req.flow, &def.name, schedule, space.now())
        .await?;
    // Its first slots are recorded now (and one due now starts), not at the next tick.
    space
        .deployments()
        .tick(&space, &tenant, &server.inner.policy)
        .await;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// List deployments, by name.
#[utoipa::path(
    get,
    path = "/deployments",
    responses((status = 200, description = "Deployments", body = Vec<DeploymentView>))
)]
async fn list_deployments(Caller(space, _): Caller) -> Result<Json<Vec<DeploymentView>>, ApiError> {
    Ok(Json(space.deployments().list(&space)?))
}

/// One deployment.
#[utoipa::path(
    get,
    path = "/deployments/{name}",
    params(("name" = String, Path, description = "The deployment")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentView),
        (status = 404, description = "No such deployment", body = Problem),
    )
)]
async fn show_deployment(
    Caller(space, _): Caller,
    Path(name): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    Ok(Json(space.deployments().get(&space, &name)?))
}

/// Remove a deployment and its runs not started; its started runs stay.
#[utoipa::path(
    delete,
    path = "/deployments/{name}",
    params(("name" = String, Path, description = "The deployment")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such deployment", body = Problem),
    )
)]
async fn remove_deployment(
    Caller(space, _): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    space.deployments().remove(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Pause a deployment: it starts nothing (runs already scheduled turn Late) until resumed.
#[utoipa::path(
    post,
    path = "/deployments/{name}/pause",
    params(("name" = String, Path, description = "The deployment")),
    responses(
        (status = 200, description = "Paused", body = DeploymentView),
        (status = 404, description = "No such deployment", body = Problem),
    )
)]
async fn pause_deployment(
    Caller(space, _): Caller,
    Path(name): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    Ok(Json(
        space.deployments().set_paused(&space, &name, true).await?,
    ))
}

/// Resume a deployment: runs missed while it was paused are started or skipped as its
/// `catchup` says.
#[utoipa::path(
    post,
    path = "/deployments/{name}/resume",
    params(("name" = String, Path, description = "The deployment")),
    responses(
        (status = 200, description = "Resumed", body = DeploymentView),
        (status = 404, description = "No such deployment", body = Problem),
    )
)]
async fn resume_deployment(
    State(server): State<Server>,
    Caller(space, tenant): Caller,
    Path(name): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    let view = space.deployments().set_paused(&space, &name, false).await?;
    // Missed runs are caught up now, not at the next tick.
    space
        .deployments()
        .tick(&space, &tenant, &server.inner.policy)
        .await;
    Ok(Json(view))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct SlotsQuery {
    /// At most this many past runs (default 20).
    limit: Option<usize>,
}

/// A deployment's upcoming runs (Scheduled, Late) and its past ones with their states.
#[utoipa::path(
    get,
    path = "/deployments/{name}/runs",
    params(("name" = String, Path, description = "The deployment"), SlotsQuery),
    responses(
        (status = 200, description = "Its runs", body = DeploymentRuns),
        (status = 404, description = "No such deployment", body = Problem),
    )
)]
async fn deployment_runs(
    Caller(space, _): Caller,
    Path(name): Path<String>,
    Query(q): Query<SlotsQuery>,
) -> Result<Json<DeploymentRuns>, ApiError> {
    let limit = q.limit.unwrap_or(20).clamp(1, 1000);
    Ok(Json(space.deployments().runs(&space, &name, limit)?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct CacheQuery {
    /// Only this task's entries.
    task: Option<String>,
    /// (`DELETE` only) only entries that have expired.
    expired: Option<bool>,
}

/// List the tenant's output cache entries, newest first.
#[utoipa::path(
    get,
    path = "/cache",
    params(CacheQuery),
    responses((status = 200, description = "Cache entries", body = Vec<CacheItem>))
)]
async fn list_cache(
    Caller(space, _): Caller,
    Query(q): Query<CacheQuery>,
) -> Result<Json<Vec<CacheItem>>, ApiError> {
    let now = space.now();
    let store = space.store().clone();
    let entries = tokio::task::spawn_blocking(move || store.cache_entries(q.task.as_deref()))
        .await
        .map_err(|e| ApiError::internal("reading the cache", &e))?
        .map_err(|e| ApiError::store("reading the cache", e))?;
    Ok(Json(
        entries
            .into_iter()
            .map(|entry| CacheItem {
                valid: entry.expires_at > now,
                entry,
            })
            .collect(),
    ))
}

/// One cache entry (by key or a unique prefix of it) and its value.
#[utoipa::path(
    get,
    path = "/cache/{key}",
    params(("key" = String, Path, description = "A cache key or a unique prefix of one")),
    responses(
        (status = 200, description = "The entry and its value", body = CacheValue),
        (status = 404, description = "No such entry of this tenant", body = Problem),
    )
)]
async fn show_cache_entry(
    Caller(space, _): Caller,
    Path(key): Path<String>,
) -> Result<Json<CacheValue>, ApiError> {
    let now = space.now();
    let store = space.store().clone();
    let (entry, value) = tokio::task::spawn_blocking(move || store.cache_entry(&key))
        .await
        .map_err(|e| ApiError::internal("reading the cache", &e))?
        .map_err(|e| ApiError::store("reading the cache", e))?;
    Ok(Json(CacheValue {
        item: CacheItem {
            valid: entry.expires_at > now,
            entry,
        },
        value: serde_json::to_value(&value).unwrap_or_default(),
    }))
}

/// Remove the tenant's cache entries: every one, one task's, or only expired ones. Runs keep
/// their results.
#[utoipa::path(
    delete,
    path = "/cache",
    params(CacheQuery),
    responses((status = 200, description = "How many were removed", body = CacheCleared))
)]
async fn clear_cache(
    Caller(space, _): Caller,
    Query(q): Query<CacheQuery>,
) -> Result<Json<CacheCleared>, ApiError> {
    let now = space.now();
    let store = space.store().clone();
    let expired = q.expired.unwrap_or(false).then_some(now);
    let removed =
        tokio::task::spawn_blocking(move || store.clear_cache(q.task.as_deref(), expired))
            .await
            .map_err(|e| ApiError::internal("clearing the cache", &e))?
            .map_err(|e| ApiError::store("clearing the cache", e))?;
    Ok(Json(CacheCleared {
        removed: removed as u64,
    }))
}

/// The tenant's secrets: names and when they were set, never values.
#[utoipa::path(
    get,
    path = "/secrets",
    responses((status = 200, description = "Secrets", body = Vec<SecretInfo>))
)]
async fn list_secrets(Caller(space, _): Caller) -> Result<Json<Vec<SecretInfo>>, ApiError> {
    Ok(Json(space.secrets().list()?))
}

/// Set a secret (stored encrypted). Runs read it only where their manifest grants it.
#[utoipa::path(
    put,
    path = "/secrets/{name}",
    params(("name" = String, Path, description = "The secret's name (letters, digits, `_`)")),
    request_body = SetSecret,
    responses(
        (status = 204, description = "Set"),
        (status = 400, description = "A bad name, or a value too short or too long", body = Problem),
    )
)]
async fn set_secret(
    Caller(space, _): Caller,
    Path(name): Path<String>,
    Json(req): Json<SetSecret>,
) -> Result<StatusCode, ApiError> {
    space.secrets().set(&name, &req.value, space.now())?;
    Ok(StatusCode::NO_CONTENT)
}

/// Remove a secret.
#[utoipa::path(
    delete,
    path = "/secrets/{name}",
    params(("name" = String, Path, description = "The secret")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such secret", body = Problem),
    )
)]
async fn remove_secret(
    Caller(space, _): Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    space.secrets().remove(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
