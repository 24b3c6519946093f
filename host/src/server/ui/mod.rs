//! The web UI, served by `sluice server` under `/ui`: rendered on the server (maud), with one
//! small script of our own for live updates (`assets/app.js`, no library, nothing from the
//! network). Sign-in takes a tenant's token and keeps it in an HttpOnly, SameSite=Strict cookie
//! scoped to `/ui`; every page is that tenant's, as the API is (another tenant's run answers
//! 404). An operator's token (`sluice operator`) opens `/ui/tenants`: every tenant with its
//! usage; the tenant it chooses to view (cookie `sluice_view`, honoured for operators only) is
//! then shown as that tenant sees it, and every form names the tenant its page was of, so an
//! operator who has since chosen another acts on nothing (409). Pages: the runs list (filtered by state and flow, paged on the server by a cursor),
//! a run (its graph coloured by state, its timeline, its tasks, cancel, resume from chosen
//! tasks), a task (state history, attempts, error, logs, input and output with downloads,
//! cache, grants, usage), the deployments (next runs, pause and resume) and the tenant's usage
//! against its quotas. A run page follows the run live: the script listens to the run's
//! server-sent events and fetches the run's live part again; a live task run's page appends
//! its new log lines (`tail`: that task run's lines alone, after every line the page could
//! show).

mod graph;
mod pages;
mod timeline;

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::api::authenticate;
use super::problem::ApiError;
use super::{Server, Space, Tenant, TenantError};
use crate::ids::FlowRunId;
use crate::runner::record::TaskRun;
use crate::state::StateName;
use crate::store::{ChangeCursor, RunFilter};

/// The cookie that carries the signed-in tenant's (or operator's) token.
const COOKIE: &str = "sluice_token";

/// The cookie that names the tenant an operator is viewing.
const VIEW: &str = "sluice_view";

/// Runs per page of the runs list.
pub const RUNS_PAGE: usize = 50;

pub(super) fn routes() -> Router<Server> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui", get(|| async { Redirect::to("/ui/runs") }))
        .route("/ui/login", get(login_form).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/runs", get(runs))
        .route("/ui/runs/{id}", get(run))
        .route("/ui/runs/{id}/live", get(run_live))
        .route("/ui/runs/{id}/events", get(run_events))
        .route("/ui/runs/{id}/cancel", post(cancel))
        .route("/ui/runs/{id}/resume", post(resume))
        .route("/ui/runs/{id}/tasks/{task}", get(task))
        .route(
            "/ui/runs/{id}/tasks/{task}/input",
            get(|v: Viewer, p: TaskPath, q: Query<TaskQuery>| download(v, p, q, Kept::Input)),
        )
        .route(
            "/ui/runs/{id}/tasks/{task}/output",
            get(|v: Viewer, p: TaskPath, q: Query<TaskQuery>| download(v, p, q, Kept::Output)),
        )
        .route("/ui/runs/{id}/tail", get(tail))
        .route("/ui/deployments", get(deployments))
        .route("/ui/deployments/{name}", get(deployment))
        .route("/ui/deployments/{name}/{action}", post(pause_deployment))
        .route("/ui/usage", get(usage))
        .route("/ui/tenants", get(tenants))
        .route("/ui/tenants/{name}/view", post(view_tenant))
        .route(
            "/ui/{*rest}",
            get(|| async { Refused::from(ApiError::not_found("no such page")) }),
        )
        .route("/ui/assets/app.js", get(script))
        .route("/ui/assets/app.css", get(style))
}

/// The tenant whose pages are shown, its space, and who looks: the tenant signed in, or an
/// operator viewing it. A request without a valid cookie goes to the sign-in page; an operator
/// who has not chosen a tenant, to the tenants.
struct Viewer(Arc<Space>, Tenant, pages::Who);

/// An operator signed in (its name), and the tenant it views, if any.
struct OperatorViewer(String, Option<String>);

/// Why a page is not shown.
enum Refused {
    /// Not signed in (or no longer valid): to the sign-in page.
    SignIn,
    /// An operator who has not chosen a tenant to view: to the tenants.
    PickTenant,
    /// An error page with the API's status and message.
    Error(ApiError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn => Redirect::to("/ui/login").into_response(),
            Refused::PickTenant => Redirect::to("/ui/tenants").into_response(),
            Refused::Error(e) => (e.status, pages::error(e.status, &e.detail)).into_response(),
        }
    }
}

impl From<ApiError> for Refused {
    fn from(e: ApiError) -> Self {
        Refused::Error(e)
    }
}

/// The value of cookie `name` in `headers`.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

impl FromRequestParts<Server> for Viewer {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, server: &Server) -> Result<Self, Refused> {
        let token = cookie(&parts.headers, COOKIE).ok_or(Refused::SignIn)?;
        match authenticate(server, token).await {
            Ok((space, tenant)) => {
                let who = pages::Who {
                    tenant: tenant.name.clone(),
                    operator: None,
                };
                Ok(Viewer(space, tenant, who))
            }
            Err(e) if e.status == StatusCode::UNAUTHORIZED => {
                let OperatorViewer(operator, viewing) =
                    OperatorViewer::from_request_parts(parts, server).await?;
                let name = viewing.ok_or(Refused::PickTenant)?;
                let tenants = server.inner.clone();
                let found = super::api::read(move || tenants.tenants.get(&name))
                    .await
                    .map_err(|e| ApiError::internal("reading the tenants", &e))?;
                let tenant = match found {
                    Ok(t) => t,
                    // Removed since it was chosen: choose again.
                    Err(TenantError::Unknown(_)) => return Err(Refused::PickTenant),
                    Err(e) => return Err(ApiError::unavailable("reading the tenants", &e).into()),
                };
                let space = server
                    .space(&tenant)
                    .map_err(|e| ApiError::internal("opening the tenant's store", &e))?;
                let who = pages::Who {
                    tenant: tenant.name.clone(),
                    operator: Some(operator),
                };
                Ok(Viewer(space, tenant, who))
            }
            Err(e) => Err(Refused::Error(e)),
        }
    }
}

/// The operator whose token `token` is, if it is one's.
async fn operator(server: &Server, token: &str) -> Result<Option<String>, ApiError> {
    let tenants = server.inner.clone();
    let token = token.to_owned();
    super::api::read(move || tenants.tenants.authenticate_operator(&token))
        .await
        .map_err(|e| ApiError::internal("checking the token", &e))?
        .map_err(|e| ApiError::unavailable("checking the token", &e))
}

impl FromRequestParts<Server> for OperatorViewer {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, server: &Server) -> Result<Self, Refused> {
        let token = cookie(&parts.headers, COOKIE).ok_or(Refused::SignIn)?;
        match operator(server, token).await? {
            Some(name) => Ok(OperatorViewer(
                name,
                cookie(&parts.headers, VIEW).map(str::to_owned),
            )),
            None => {
                // A tenant's token: signed in, but not an operator.
                if authenticate(server, token).await.is_ok() {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "operators-only",
                        "only an operator sees every tenant (`sluice operator add`)",
                    )
                    .into());
                }
                Err(Refused::SignIn)
            }
        }
    }
}

/// A state-changing request signed in by cookie must come from this server's own pages: its
/// `Origin`, when sent, names the host it was sent to (the cookie is SameSite=Strict too).
fn same_origin(headers: &HeaderMap) -> Result<(), Refused> {
    let (Some(origin), Some(host)) = (headers.get(header::ORIGIN), headers.get(header::HOST))
    else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("");
    let host = host.to_str().unwrap_or("");
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    match origin_host == host {
        true => Ok(()),
        false => Err(Refused::Error(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-origin",
            format!("a request from `{origin}` may not act on this server's UI"),
        ))),
    }
}

async fn login_form() -> Response {
    pages::login(None).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(server): State<Server>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    let token = form.token.trim();
    // A cookie value may not hold every byte a token could: tokens are printable ASCII.
    let printable = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic() && b != b';');
    if printable {
        // A tenant's token opens its runs; an operator's, the tenants.
        let to = match authenticate(&server, token).await {
            Ok(_) => Some("/ui/runs"),
            Err(e) if e.status != StatusCode::UNAUTHORIZED => return Err(e.into()),
            Err(_) => operator(&server, token).await?.map(|_| "/ui/tenants"),
        };
        if let Some(to) = to {
            let mut response = Redirect::to(to).into_response();
            set_cookie(&mut response, COOKIE, token);
            // A new session views no tenant until it chooses one.
            set_cookie(&mut response, VIEW, "");
            return Ok(response);
        }
    }
    Ok((
        StatusCode::UNAUTHORIZED,
        pages::login(Some("That token is not valid.")),
    )
        .into_response())
}

/// Add cookie `name` (for `/ui`, HttpOnly, SameSite=Strict) to `response`; an empty `value`
/// removes it.
fn set_cookie(response: &mut Response, name: &str, value: &str) {
    let expire = if value.is_empty() { "; Max-Age=0" } else { "" };
    let cookie = format!("{name}={value}; Path=/ui; HttpOnly; SameSite=Strict{expire}");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

async fn logout(headers: HeaderMap) -> Result<Response, Refused> {
    same_origin(&headers)?;
    let mut response = Redirect::to("/ui/login").into_response();
    set_cookie(&mut response, COOKIE, "");
    set_cookie(&mut response, VIEW, "");
    Ok(response)
}

/// The operator's page: every tenant with its usage.
async fn tenants(
    State(server): State<Server>,
    OperatorViewer(operator, viewing): OperatorViewer,
) -> Result<Response, Refused> {
    let registry = server.inner.clone();
    let list = super::api::read(move || registry.tenants.list())
        .await
        .map_err(|e| ApiError::internal("reading the tenants", &e))?
        .map_err(|e| ApiError::unavailable("reading the tenants", &e))?;
    // A tenant whose store cannot be opened is listed with why, the others as they are.
    let mut rows = Vec::with_capacity(list.len());
    for tenant in list {
        let usage = match server.space(&tenant) {
            Ok(space) => Ok(space.usage(&tenant)),
            Err(e) => Err(format!("its store cannot be opened: {e}")),
        };
        rows.push((tenant.name.clone(), usage));
    }
    // A tenant viewed that is no longer one is not shown as viewed.
    let viewing = viewing.filter(|v| rows.iter().any(|(n, _)| n == v));
    Ok(pages::tenants(&operator, viewing.as_deref(), &rows).into_response())
}

/// An operator chooses the tenant to view: its runs from then on.
async fn view_tenant(
    State(server): State<Server>,
    OperatorViewer(..): OperatorViewer,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    let registry = server.inner.clone();
    let lookup = name.clone();
    super::api::read(move || registry.tenants.get(&lookup))
        .await
        .map_err(|e| ApiError::internal("reading the tenants", &e))?
        .map_err(|e| match e {
            TenantError::Unknown(_) => ApiError::not_found(format!("no tenant `{name}`")),
            e => ApiError::unavailable("reading the tenants", &e),
        })?;
    let mut response = Redirect::to("/ui/runs").into_response();
    set_cookie(&mut response, VIEW, &name);
    Ok(response)
}

#[derive(Debug, Default, Deserialize)]
struct RunsQuery {
    state: Option<String>,
    flow: Option<String>,
    /// The cursor of the next page: `<created µs>.<run id>` of the last run shown.
    before: Option<String>,
    /// Only runs created at or after this time (UTC; `2026-12-03T18:00` or RFC 3339).
    since: Option<String>,
    /// Only runs created before this time.
    until: Option<String>,
    /// Only runs this deployment started.
    deployment: Option<String>,
}

/// A time from the runs filter: a form's `datetime-local` value (taken as UTC), or RFC 3339.
fn parse_time(field: &str, s: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    [
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M:%S%.f",
    ]
    .iter()
    .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
    .map(|t| t.and_utc())
    .ok_or_else(|| {
        ApiError::bad_request(format!(
            "query `{field}`: `{s}` is not a time (2026-12-03T18:00, in UTC, or RFC 3339)"
        ))
    })
}

/// Parse a runs-list cursor.
fn parse_cursor(s: &str) -> Result<(chrono::DateTime<chrono::Utc>, FlowRunId), ApiError> {
    let bad = || ApiError::bad_request(format!("query `before`: `{s}` is not a page cursor"));
    let (micros, id) = s.split_once('.').ok_or_else(bad)?;
    let at = micros
        .parse::<i64>()
        .ok()
        .and_then(chrono::DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    let id = id.parse::<FlowRunId>().map_err(|_| bad())?;
    Ok((at, id))
}

async fn runs(
    Viewer(space, _, who): Viewer,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Refused> {
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<StateName>().map_err(|e| {
            ApiError::bad_request(format!("query `state`: `{s}` is not a state name: {e}"))
        })?),
    };
    let flow = q.flow.clone().filter(|f| !f.is_empty());
    let deployment = q.deployment.clone().filter(|d| !d.is_empty());
    let before = match q.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(parse_cursor(c)?),
    };
    let time = |field: &str, v: &Option<String>| {
        v.as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| parse_time(field, s))
            .transpose()
    };
    let (since, until) = (time("since", &q.since)?, time("until", &q.until)?);
    // One more than a page: whether there is a next one.
    let filter = RunFilter {
        state,
        flow: flow.clone(),
        limit: RUNS_PAGE + 1,
        before,
        since,
        until,
        deployment: deployment.clone(),
    };
    let store = space.store().clone();
    let mut items = super::api::read(move || {
        store.list_runs(&filter).map(|runs| {
            runs.into_iter()
                .map(|s| (store.is_live(s.id), s))
                .collect::<Vec<_>>()
        })
    })
    .await
    .map_err(|e| ApiError::internal("listing runs", &e))?
    .map_err(|e| ApiError::store("listing runs", e))?;
    let next = (items.len() > RUNS_PAGE).then(|| {
        items.truncate(RUNS_PAGE);
        items
            .last()
            .map(|(_, s)| format!("{}.{}", s.created_at.timestamp_micros(), s.id))
    });
    let filters = pages::RunsFilters {
        state,
        flow,
        deployment,
        since,
        until,
        next: next.flatten(),
        paged: before.is_some(),
    };
    Ok(pages::runs(&who, &items, &filters).into_response())
}

/// The run's view, for a page (404 when it is not this tenant's).
async fn view(space: &Arc<Space>, id: &str) -> Result<super::wire::RunView, ApiError> {
    let id = space.resolve(id)?;
    let store = space.store().clone();
    super::api::read(move || super::wire::RunView::load(&*store, id))
        .await
        .map_err(|e| ApiError::internal("reading the run", &e))?
        .map_err(|e| ApiError::store("reading the run", e))
}

async fn run(Viewer(space, _, who): Viewer, Path(id): Path<String>) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    Ok(pages::run(&who, &view, space.now()).into_response())
}

/// The live part of a run's page (its state, graph and tasks), fetched again as it changes.
async fn run_live(
    Viewer(space, tenant, _): Viewer,
    Path(id): Path<String>,
) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    Ok(pages::run_live(&view, &tenant.name, space.now()).into_response())
}

/// A form's `tenant` field must name the tenant viewed now: an operator's page of one tenant
/// never acts on another's run or deployment of the same name (409 otherwise).
fn acting_as(tenant: &Tenant, field: Option<&str>) -> Result<(), Refused> {
    match field {
        Some(t) if t == tenant.name => Ok(()),
        Some(t) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "other-tenant",
            format!(
                "this form was of tenant `{t}`, and tenant `{}` is viewed now: nothing was done",
                tenant.name
            ),
        )
        .into()),
        None => Err(ApiError::bad_request("the form has no `tenant` field").into()),
    }
}

/// A form's fields (`application/x-www-form-urlencoded`): each value of `name`.
fn fields(body: &[u8], name: &str) -> Vec<String> {
    url::form_urlencoded::parse(body)
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

async fn run_events(
    Viewer(space, tenant, _): Viewer,
    Path(id): Path<String>,
) -> Result<Response, Refused> {
    let id = space.resolve(&id)?;
    // States only: the page shows no log lines live, and a reconnect reads the run as it is.
    Ok(
        super::events::stream(&space, &tenant, id, None, ChangeCursor::STATES_ONLY)?
            .into_response(),
    )
}

async fn cancel(
    Viewer(space, tenant, _): Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    acting_as(&tenant, fields(&body, "tenant").first().map(String::as_str))?;
    let id = space.resolve(&id)?;
    let space2 = space.clone();
    tokio::task::spawn_blocking(move || space2.cancel(id))
        .await
        .map_err(|e| ApiError::internal("cancelling the run", &e))??;
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}

/// Resume a run: the form's `start` fields (repeated) are its start tasks.
async fn resume(
    State(server): State<Server>,
    Viewer(space, tenant, _): Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    acting_as(&tenant, fields(&body, "tenant").first().map(String::as_str))?;
    let id = space.resolve(&id)?;
    let start = fields(&body, "start");
    space
        .resume_run(&tenant, id, start, &server.inner.policy, false)
        .await?;
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TaskQuery {
    /// Which run of the task, by its id (a task a code flow's body ran more than once; default
    /// the first).
    run: Option<String>,
    /// A mapped task's child, by map index.
    child: Option<u32>,
    /// The page of a mapped task's children.
    page: Option<usize>,
}

/// Task `name` of the run `view`, and the task run shown: itself, or its mapped child `child`
/// (404 naming what is missing).
fn find_task<'v>(
    view: &'v super::wire::RunView,
    name: &str,
    q: &TaskQuery,
) -> Result<(&'v TaskRun, &'v TaskRun), ApiError> {
    let run = match q.run.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<crate::ids::TaskRunId>().map_err(|_| {
            ApiError::bad_request(format!("query `run`: `{s}` is not a task run id"))
        })?),
    };
    let found = view
        .run
        .tasks
        .iter()
        .find(|t| t.name == name && run.is_none_or(|id| t.id == id));
    let Some(task) = found else {
        return Err(ApiError::not_found(match run {
            None => format!("flow run {} has no task `{name}`", view.run.id),
            Some(id) => format!("flow run {} has no task run {id} of `{name}`", view.run.id),
        }));
    };
    let child = q.child;
    let shown = match child {
        None => task,
        Some(i) => task
            .children
            .iter()
            .find(|c| c.map_index == Some(i))
            .ok_or_else(|| ApiError::not_found(format!("task `{name}` has no child {i}")))?,
    };
    Ok((task, shown))
}

async fn task(
    Viewer(space, _, who): Viewer,
    Path((id, name)): Path<(String, String)>,
    Query(q): Query<TaskQuery>,
) -> Result<Response, Refused> {
    // Where a live page's tail starts: after every line stored before the run is read (the
    // lines of the task run stored since are in its tail, `RunView::log_tails`).
    // Both in one read: the id resolved once, one hand-off to the store.
    let run = space.resolve(&id)?;
    let store = space.store().clone();
    let (newest, view) = super::api::read(move || {
        let newest = store.newest_log_seq(run)?;
        super::wire::RunView::load(&*store, run).map(|view| (newest, view))
    })
    .await
    .map_err(|e| ApiError::internal("reading the run", &e))?
    .map_err(|e| ApiError::store("reading the run", e))?;
    let (task, shown) = find_task(&view, &name, &q)?;
    // Its logs: the newest lines of this task run (`RunView::log_tails`).
    let logs = view.log_tails.get(&shown.id);
    let page = q.page.unwrap_or(0);
    let lines = pages::Lines { tail: logs, newest };
    Ok(pages::task(&who, &view, task, shown, lines, page, space.now()).into_response())
}

/// A task's path: its run's id and its name.
type TaskPath = Path<(String, String)>;

/// What a task run keeps that may be downloaded.
#[derive(Debug, Clone, Copy)]
enum Kept {
    Input,
    Output,
}

/// A task run's whole input or output, as a JSON file to download.
async fn download(
    Viewer(space, _, _): Viewer,
    Path((id, name)): TaskPath,
    Query(q): Query<TaskQuery>,
    kept: Kept,
) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    let (_, shown) = find_task(&view, &name, &q)?;
    let (value, what) = match kept {
        Kept::Input => (shown.cached_input.as_ref(), "input"),
        Kept::Output => (shown.output.as_ref(), "output"),
    };
    let Some(value) = value else {
        return Err(ApiError::not_found(format!(
            "task `{name}` of flow run {} has no {what} kept",
            view.run.id
        ))
        .into());
    };
    // The file's name: the run, the task (its characters a file name may hold), the child.
    let safe: String = name
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '_',
            },
        )
        .collect();
    let child = q.child.map_or(String::new(), |i| format!("-{i}"));
    let file = format!("{}-{safe}{child}-{what}.json", view.run.id);
    Ok((
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file}\""),
            ),
        ],
        value.as_str().to_owned(),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TailQuery {
    /// The task run whose lines to follow.
    task_run: Option<String>,
    /// Lines after this position (the page's: after every line it could show).
    after: Option<i64>,
}

/// A task run's new log lines as server-sent events (`log`, then `end` when the run ends),
/// after the position the page gave (or, reconnecting, the `Last-Event-ID` its last event
/// carried).
async fn tail(
    Viewer(space, tenant, _): Viewer,
    Path(id): Path<String>,
    Query(q): Query<TailQuery>,
    headers: HeaderMap,
) -> Result<Response, Refused> {
    let id = space.resolve(&id)?;
    let task_run = q
        .task_run
        .as_deref()
        .unwrap_or("")
        .parse::<crate::ids::TaskRunId>()
        .map_err(|_| ApiError::bad_request("query `task_run`: not a task run id"))?;
    let reconnected = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<ChangeCursor>().ok())
        .map(|c| c.log);
    let after = reconnected.or(q.after).unwrap_or(0).max(0);
    let scope = super::events::Scope::Lines(task_run);
    let cursor = ChangeCursor::lines_after(after);
    Ok(super::events::scoped(&space, &tenant, id, scope, cursor)?.into_response())
}

async fn deployments(Viewer(space, _, who): Viewer) -> Result<Response, Refused> {
    let space2 = space.clone();
    let items = super::api::read(move || space2.deployments().list(&space2))
        .await
        .map_err(|e| ApiError::internal("listing deployments", &e))??;
    Ok(pages::deployments(&who, &items).into_response())
}

/// Past runs a deployment's page lists.
const DEPLOYMENT_RUNS: usize = 50;

async fn deployment(
    Viewer(space, _, who): Viewer,
    Path(name): Path<String>,
) -> Result<Response, Refused> {
    let space2 = space.clone();
    let (d, runs) = super::api::read(move || {
        let d = space2.deployments().get(&space2, &name)?;
        let runs = space2.deployments().runs(&space2, &name, DEPLOYMENT_RUNS)?;
        Ok::<_, ApiError>((d, runs))
    })
    .await
    .map_err(|e| ApiError::internal("reading the deployment", &e))??;
    Ok(pages::deployment(&who, &d, &runs).into_response())
}

#[derive(Debug, Deserialize)]
struct PauseForm {
    /// The tenant the page was of.
    tenant: Option<String>,
    /// `list`: back to the deployments list after.
    back: Option<String>,
}

/// Pause or resume a deployment (`action`: `pause` or `resume`), then back to where it was
/// done from.
async fn pause_deployment(
    State(server): State<Server>,
    Viewer(space, tenant, _): Viewer,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<PauseForm>,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    acting_as(&tenant, form.tenant.as_deref())?;
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        _ => return Err(ApiError::not_found(format!("no deployment action `{action}`")).into()),
    };
    space
        .deployments()
        .set_paused(&space, &name, paused)
        .await?;
    if !paused {
        // Missed runs are caught up now, as the API's resume does.
        space
            .deployments()
            .tick(&space, &tenant, &server.inner.policy)
            .await;
    }
    // Back to the page the button was on (the list, or the deployment's own page).
    let to = match form.back.as_deref() == Some("list") {
        true => "/ui/deployments".to_owned(),
        false => format!(
            "/ui/deployments/{}",
            percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
        ),
    };
    Ok(Redirect::to(&to).into_response())
}

async fn usage(Viewer(space, tenant, who): Viewer) -> Response {
    pages::usage(&who, &space.usage(&tenant)).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/app.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/app.css"),
    )
        .into_response()
}
