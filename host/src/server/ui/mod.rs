//! The web UI, served by `sluice server` under `/ui`: rendered on the server (maud), with one
//! small script of our own for live updates (`assets/app.js`, no library, nothing from the
//! network). Sign-in takes a tenant's token and keeps it in an HttpOnly, SameSite=Strict cookie
//! scoped to `/ui`; every page is that tenant's, as the API is (another tenant's run answers
//! 404). Pages: the runs list (filtered by state and flow, paged on the server by a cursor),
//! a run (its graph coloured by state, its tasks, cancel), and a task (state history, attempts,
//! error, logs, input and output, cache, grants, usage). A run page follows the run live: the
//! script listens to the run's server-sent events and fetches the run's live part again.

mod graph;
mod pages;

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
use super::{Server, Space, Tenant};
use crate::ids::FlowRunId;
use crate::state::StateName;
use crate::store::{ChangeCursor, RunFilter};

/// The cookie that carries the signed-in tenant's token.
const COOKIE: &str = "sluice_token";

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
        .route("/ui/runs/{id}/tasks/{task}", get(task))
        .route("/ui/assets/app.js", get(script))
        .route("/ui/assets/app.css", get(style))
}

/// The signed-in tenant; a request without a valid cookie goes to the sign-in page.
struct Viewer(Arc<Space>, Tenant);

/// Why a page is not shown.
enum Refused {
    /// Not signed in (or no longer valid): to the sign-in page.
    SignIn,
    /// An error page with the API's status and message.
    Error(ApiError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::SignIn => Redirect::to("/ui/login").into_response(),
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
            Ok((space, tenant)) => Ok(Viewer(space, tenant)),
            Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(Refused::SignIn),
            Err(e) => Err(Refused::Error(e)),
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
        match authenticate(&server, token).await {
            Ok(_) => {
                let cookie = format!("{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict");
                let mut response = Redirect::to("/ui/runs").into_response();
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    response.headers_mut().insert(header::SET_COOKIE, v);
                }
                return Ok(response);
            }
            Err(e) if e.status != StatusCode::UNAUTHORIZED => return Err(e.into()),
            Err(_) => {}
        }
    }
    Ok((
        StatusCode::UNAUTHORIZED,
        pages::login(Some("That token is not valid.")),
    )
        .into_response())
}

async fn logout(headers: HeaderMap) -> Result<Response, Refused> {
    same_origin(&headers)?;
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("sluice_token=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    Ok(response)
}

#[derive(Debug, Default, Deserialize)]
struct RunsQuery {
    state: Option<String>,
    flow: Option<String>,
    /// The cursor of the next page: `<created µs>.<run id>` of the last run shown.
    before: Option<String>,
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
    Viewer(space, tenant): Viewer,
    Query(q): Query<RunsQuery>,
) -> Result<Response, Refused> {
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<StateName>().map_err(|e| {
            ApiError::bad_request(format!("query `state`: `{s}` is not a state name: {e}"))
        })?),
    };
    let flow = q.flow.clone().filter(|f| !f.is_empty());
    let before = match q.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(c) => Some(parse_cursor(c)?),
    };
    // One more than a page: whether there is a next one.
    let filter = RunFilter {
        state,
        flow: flow.clone(),
        limit: RUNS_PAGE + 1,
        before,
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
        next: next.flatten(),
        paged: before.is_some(),
    };
    Ok(pages::runs(&tenant.name, &items, &filters).into_response())
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

async fn run(Viewer(space, tenant): Viewer, Path(id): Path<String>) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    Ok(pages::run(&tenant.name, &view).into_response())
}

/// The live part of a run's page (its state, graph and tasks), fetched again as it changes.
async fn run_live(Viewer(space, _): Viewer, Path(id): Path<String>) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    Ok(pages::run_live(&view).into_response())
}

async fn run_events(
    Viewer(space, tenant): Viewer,
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
    Viewer(space, _): Viewer,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refused> {
    same_origin(&headers)?;
    let id = space.resolve(&id)?;
    let space2 = space.clone();
    tokio::task::spawn_blocking(move || space2.cancel(id))
        .await
        .map_err(|e| ApiError::internal("cancelling the run", &e))??;
    Ok(Redirect::to(&format!("/ui/runs/{id}")).into_response())
}

#[derive(Debug, Default, Deserialize)]
struct TaskQuery {
    /// A mapped task's child, by map index.
    child: Option<u32>,
    /// The page of a mapped task's children.
    page: Option<usize>,
}

async fn task(
    Viewer(space, tenant): Viewer,
    Path((id, name)): Path<(String, String)>,
    Query(q): Query<TaskQuery>,
) -> Result<Response, Refused> {
    let view = view(&space, &id).await?;
    let Some(task) = view.run.tasks.iter().find(|t| t.name == name) else {
        return Err(
            ApiError::not_found(format!("flow run {} has no task `{name}`", view.run.id)).into(),
        );
    };
    let shown = match q.child {
        None => task,
        Some(i) => task
            .children
            .iter()
            .find(|c| c.map_index == Some(i))
            .ok_or_else(|| ApiError::not_found(format!("task `{name}` has no child {i}")))?,
    };
    // Its logs: the newest lines of this task run (`RunView::log_tails`).
    let logs = view.log_tails.get(&shown.id);
    Ok(pages::task(&tenant.name, &view, task, shown, logs, q.page.unwrap_or(0)).into_response())
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
