//! The UI's pages, as HTML (maud escapes every value it writes). Each page has one `h1`, its
//! landmarks (`header`, `nav`, `main`), labelled form fields and captioned tables, so that
//! keyboard and screen-reader users get the same page.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::graph::{self, Node};
use super::timeline;
use crate::runner::record::TaskRun;
use crate::server::wire::{DeploymentRuns, DeploymentView, RunView, SlotView, Usage};
use crate::state::StateName;
use crate::store::{LogTail, RunSummary};

/// Values longer than this are cut on a page (the API has them whole).
const SHOWN_BYTES: usize = 4096;

/// Mapped children per page of a task.
const CHILDREN_PAGE: usize = 100;

/// Who a page is for: the tenant it shows, and the operator looking at that tenant, if one is.
#[derive(Debug, Clone)]
pub struct Who {
    /// The tenant whose runs, deployments and usage the pages show.
    pub tenant: String,
    /// The operator signed in, when it is one (else the tenant is).
    pub operator: Option<String>,
}

fn page(title: &str, who: Option<&Who>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Sluice" }
                link rel="stylesheet" href="/ui/assets/app.css";
                script src="/ui/assets/app.js" defer {}
            }
            body {
                header {
                    nav aria-label="Main" {
                        a class="brand" href="/ui/runs" { "Sluice" }
                        @if let Some(who) = who {
                            // An operator who has not chosen a tenant has the tenants alone.
                            @if !who.tenant.is_empty() {
                                a href="/ui/runs" { "Runs" }
                                a href="/ui/deployments" { "Deployments" }
                                a href="/ui/usage" { "Usage" }
                            }
                            @if who.operator.is_some() { a href="/ui/tenants" { "Tenants" } }
                            span class="tenant" {
                                @match (&who.operator, who.tenant.is_empty()) {
                                    (Some(o), true) => { "Operator " strong { (o) } }
                                    (Some(o), false) => { "Operator " strong { (o) } ", viewing tenant " strong { (who.tenant) } }
                                    (None, _) => { "Tenant " strong { (who.tenant) } }
                                }
                            }
                            form method="post" action="/ui/logout" class="inline" {
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// The operator's page: every tenant, with what it uses now, each to view.
pub fn tenants(
    operator: &str,
    viewing: Option<&str>,
    rows: &[(String, Result<Usage, String>)],
) -> Markup {
    let who = Some(Who {
        tenant: viewing.unwrap_or("").to_owned(),
        operator: Some(operator.to_owned()),
    });
    let bytes = |v: u64| bytesize::ByteSize::b(v).display().iec().to_string();
    page(
        "Tenants",
        who.as_ref(),
        html! {
            h1 { "Tenants" }
            @if viewing.is_none() { p { "Signed in as operator " strong { (operator) } ": choose a tenant to view." } }
            table class="tenants" {
                caption { "Every tenant of this server, by name" }
                thead { tr {
                    th scope="col" { "Tenant" }
                    th scope="col" { "Weight" }
                    th scope="col" { "Running" }
                    th scope="col" { "Queued" }
                    th scope="col" { "Runs in the last minute" }
                    th scope="col" { "Stored" }
                    th scope="col" { "Action" }
                } }
                tbody {
                    @for (name, u) in rows {
                        tr {
                            th scope="row" { (name) }
                            @match u {
                                Ok(u) => {
                                    td { (u.weight) }
                                    td { (u.running_tasks) }
                                    td { (u.queued_tasks) }
                                    td { (u.runs_last_minute) }
                                    td { (bytes(u.stored_bytes)) }
                                }
                                Err(e) => td colspan="5" class="error" { (e) },
                            }
                            td {
                                form method="post" action={"/ui/tenants/" (enc(name)) "/view"} class="inline" {
                                    button type="submit" aria-label={"View tenant " (name)} {
                                        @if viewing == Some(name.as_str()) { "Viewing" } @else { "View" }
                                    }
                                }
                            }
                        }
                    }
                    @if rows.is_empty() { tr { td colspan="7" { "No tenants: " code { "sluice tenant add" } " adds one." } } }
                }
            }
        },
    )
}

/// An error page.
pub fn error(status: axum::http::StatusCode, detail: &str) -> Markup {
    page(
        status.canonical_reason().unwrap_or("Error"),
        None,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p class="error" role="alert" { (detail) }
            p { a href="/ui/runs" { "Back to the runs" } }
        },
    )
}

/// The sign-in form, with what went wrong with the last try.
pub fn login(problem: Option<&str>) -> Markup {
    page(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(p) = problem { p class="error" role="alert" { (p) } }
            form method="post" action="/ui/login" class="login" {
                label for="token" { "Tenant or operator token" }
                input id="token" name="token" type="password" autocomplete="off" required;
                button type="submit" { "Sign in" }
            }
        },
    )
}

fn badge(state: Option<StateName>) -> Markup {
    html! {
        span class={"badge " (graph::state_class(state))} {
            (state.map_or("not started", StateName::as_str))
        }
    }
}

/// A time as a `datetime-local` field's value (in UTC), or empty.
fn local(t: Option<DateTime<Utc>>) -> String {
    t.map_or(String::new(), |t| t.format("%Y-%m-%dT%H:%M:%S").to_string())
}

fn time(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S%.3f UTC")) } }
}

/// The runs list's filters and paging.
#[derive(Debug, Default)]
pub struct RunsFilters {
    pub state: Option<StateName>,
    pub flow: Option<String>,
    /// Started by this deployment.
    pub deployment: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// The cursor of the next page, when there is one.
    pub next: Option<String>,
    /// Whether this is a later page (not the newest runs).
    pub paged: bool,
}

impl RunsFilters {
    fn query(&self, before: Option<&str>) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(s) = self.state {
            q.append_pair("state", s.as_str());
        }
        if let Some(f) = &self.flow {
            q.append_pair("flow", f);
        }
        if let Some(d) = &self.deployment {
            q.append_pair("deployment", d);
        }
        if let Some(t) = self.since {
            q.append_pair("since", &t.to_rfc3339());
        }
        if let Some(t) = self.until {
            q.append_pair("until", &t.to_rfc3339());
        }
        if let Some(b) = before {
            q.append_pair("before", b);
        }
        q.finish()
    }
}

/// The runs list.
pub fn runs(who: &Who, items: &[(bool, RunSummary)], filters: &RunsFilters) -> Markup {
    page(
        "Runs",
        Some(who),
        html! {
            h1 { "Runs" }
            form method="get" action="/ui/runs" class="filters" {
                label for="state" { "State" }
                select id="state" name="state" {
                    option value="" selected[filters.state.is_none()] { "any" }
                    @for s in StateName::ALL {
                        option value=(s.as_str()) selected[filters.state == Some(*s)] { (s.as_str()) }
                    }
                }
                label for="flow" { "Flow" }
                input id="flow" name="flow" type="text" value=(filters.flow.as_deref().unwrap_or(""));
                label for="deployment" { "Deployment" }
                input id="deployment" name="deployment" type="text" value=(filters.deployment.as_deref().unwrap_or(""));
                label for="since" { "Created from (UTC)" }
                input id="since" name="since" type="datetime-local" step="1" value=(local(filters.since));
                label for="until" { "to (UTC)" }
                input id="until" name="until" type="datetime-local" step="1" value=(local(filters.until));
                button type="submit" { "Filter" }
            }
            // The newest page refreshes itself (`app.js`); a later one stays as it was read.
            div id="runs" data-refresh=[(!filters.paged).then(|| format!("/ui/runs?{}", filters.query(None)))] {
                table class="runs" {
                    caption { "Flow runs, newest first" }
                    thead { tr {
                        th scope="col" { "Run" }
                        th scope="col" { "Flow" }
                        th scope="col" { "State" }
                        th scope="col" { "Task runs" }
                        th scope="col" { "Created" }
                        th scope="col" { "Updated" }
                    } }
                    tbody {
                        @for (live, s) in items {
                            tr {
                                td { a href={"/ui/runs/" (s.id)} { code { (short(&s.id.to_string())) } } }
                                td { (s.flow) }
                                td { (badge(Some(s.state.name))) @if *live { " " span class="live" { "live" } } }
                                td { (counts(s.tasks.iter().map(|(k, v)| (k.as_str(), *v)))) }
                                td { (time(s.created_at)) }
                                td { (time(s.updated_at)) }
                            }
                        }
                        @if items.is_empty() {
                            tr { td colspan="6" { "No runs." } }
                        }
                    }
                }
                nav aria-label="Pages" class="pages" {
                    @if filters.paged { a href={"/ui/runs?" (filters.query(None))} { "Newest runs" } }
                    @if let Some(next) = &filters.next {
                        a href={"/ui/runs?" (filters.query(Some(next)))} { "Older runs" }
                    }
                }
            }
        },
    )
}

/// A run id as pages show it: whole (its first characters are its creation time, shared by
/// runs started in the same second).
fn short(id: &str) -> &str {
    id
}

fn counts<'a>(counts: impl Iterator<Item = (&'a str, u64)>) -> Markup {
    html! {
        @for (state, n) in counts {
            span class="count" { (n) " " (state) } " "
        }
    }
}

/// The run's top-level task runs by task name, each name's in the run's order: a code flow's
/// body may run a task many times (and a manifest's task runs once).
pub fn by_name(view: &RunView) -> HashMap<&str, Vec<&TaskRun>> {
    let mut named: HashMap<&str, Vec<&TaskRun>> = HashMap::new();
    for t in &view.run.tasks {
        named.entry(t.name.as_str()).or_default().push(t);
    }
    named
}

/// The link to task run `t` of the run: by its task's name, and by its id as well when the
/// name is not enough (a task a code flow's body ran more than once).
fn task_href(view: &RunView, named: &HashMap<&str, Vec<&TaskRun>>, t: &TaskRun) -> String {
    let base = format!("/ui/runs/{}/tasks/{}", view.run.id, enc(&t.name));
    match named
        .get(t.name.as_str())
        .is_some_and(|runs| runs.len() > 1)
    {
        true => format!("{base}?run={}", t.id),
        false => base,
    }
}

/// The graph's nodes, with each node's task runs: the flow's tasks in the manifest's order
/// (or the run's, without one), then any task run of a task the manifest does not name.
fn nodes<'v>(
    view: &'v RunView,
    named: &HashMap<&str, Vec<&'v TaskRun>>,
) -> Vec<(Node, Vec<&'v TaskRun>)> {
    let node = |name: &str, upstream: Vec<String>| {
        let runs = named.get(name).cloned().unwrap_or_default();
        let node = match runs.as_slice() {
            [] => Node::new(name, upstream, None),
            [one] => Node::new(name, upstream, Some(one)),
            many => Node::repeated(name, upstream, many),
        };
        (node, runs)
    };
    let mut out: Vec<(Node, Vec<&TaskRun>)> = match &view.graph {
        Some(graph) => graph
            .iter()
            .map(|t| node(&t.task, t.upstream.clone()))
            .collect(),
        None => Vec::new(),
    };
    let mut shown: std::collections::HashSet<String> =
        out.iter().map(|(n, _)| n.name.clone()).collect();
    for t in &view.run.tasks {
        if shown.insert(t.name.clone()) {
            out.push(node(&t.name, Vec::new()));
        }
    }
    out
}

/// The run's timeline: a row per task in the graph's order; a task run more than once (by a
/// code flow's body), a row per run, up to [`timeline::REPEATED_ROWS`] (more: one row, the
/// union of their attempts).
fn run_timeline(
    view: &RunView,
    named: &HashMap<&str, Vec<&TaskRun>>,
    now: DateTime<Utc>,
) -> Markup {
    let (start, end) = timeline::extent(&view.run.tasks, view.created_at, view.live, now);
    let mut rows = Vec::new();
    let mut unions = Vec::new();
    for (n, runs) in nodes(view, named) {
        match runs.as_slice() {
            [] => rows.push((
                n.name.clone(),
                format!("/ui/runs/{}/tasks/{}", view.run.id, enc(&n.name)),
                None,
            )),
            [one] => rows.push((n.name.clone(), task_href(view, named, one), Some(*one))),
            many if many.len() <= timeline::REPEATED_ROWS => {
                for (k, t) in many.iter().enumerate() {
                    rows.push((
                        format!("{} #{}", n.name, k + 1),
                        task_href(view, named, t),
                        Some(*t),
                    ));
                }
            }
            many => {
                let href = format!("/ui/runs/{}/tasks/{}", view.run.id, enc(&n.name));
                rows.push((format!("{} ({} runs)", n.name, many.len()), href, None));
                unions.push((rows.len() - 1, many.to_vec(), n.state));
            }
        }
    }
    let span = end - start;
    // What is still open ends at the chart's end: now while the run is live, else its last
    // transition.
    let mut rows = timeline::rows(rows, end, span);
    for (i, runs, state) in unions {
        rows[i].bars = timeline::union_bars(runs, state, end, timeline::one_pixel(span));
    }
    timeline::svg(&rows, start, end)
}

/// A run's page.
pub fn run(who: &Who, view: &RunView, now: DateTime<Utc>) -> Markup {
    let id = view.run.id;
    page(
        &format!("Run {}", short(&id.to_string())),
        Some(who),
        html! {
            p class="crumbs" { a href="/ui/runs" { "Runs" } " / " (view.run.flow) }
            h1 { "Run of " (view.run.flow) " " code { (short(&id.to_string())) } }
            div id="live" data-run=(id) data-live=(view.live) { (run_live(view, &who.tenant, now)) }
        },
    )
}

/// The part of a run's page that changes while it runs.
pub fn run_live(view: &RunView, tenant: &str, now: DateTime<Utc>) -> Markup {
    let id = view.run.id;
    let named = by_name(view);
    let graph_nodes: Vec<Node> = nodes(view, &named).into_iter().map(|(n, _)| n).collect();
    let cancellable = view.live || !view.run.state.is_terminal();
    html! {
        section aria-labelledby="state-h" {
            h2 id="state-h" class="visually-hidden" { "State" }
            p class="run-state" {
                "State " (badge(Some(view.run.state.name)))
                @if let Some(m) = &view.run.state.message { " " span class="message" { (m) } }
                @if view.live { " " span class="live" { "live" } }
            }
            p { "Created " (time(view.created_at)) " · id " code { (id) } }
            @if cancellable && view.cancel_requested_at.is_none() {
                form method="post" action={"/ui/runs/" (id) "/cancel"} class="inline" {
                    (acting_as(tenant))
                    button type="submit" class="danger" { "Cancel run" }
                }
            }
            @if let Some(at) = view.cancel_requested_at { p { "Cancel requested " (time(at)) } }
            @if resumable(view) { (resume_form(view, tenant)) }
        }
        section aria-labelledby="graph-h" {
            h2 id="graph-h" { "Graph" }
            div class="graph-box" {
                (graph::svg(&graph_nodes, |task| format!("/ui/runs/{id}/tasks/{}", enc(task))))
            }
        }
        section aria-labelledby="timeline-h" {
            h2 id="timeline-h" { "Timeline" }
            div class="graph-box" { (run_timeline(view, &named, now)) }
        }
        section aria-labelledby="tasks-h" {
            h2 id="tasks-h" { "Tasks" }
            table class="tasks" {
                caption class="visually-hidden" { "Task runs of this flow run" }
                thead { tr {
                    th scope="col" { "Task" }
                    th scope="col" { "State" }
                    th scope="col" { "Attempts" }
                    th scope="col" { "Mapped children" }
                    th scope="col" { "Run time" }
                } }
                tbody {
                    @for t in &view.run.tasks {
                        tr {
                            td { a href=(task_href(view, &named, t)) { (t.name) } }
                            td { (badge(Some(t.state.name))) }
                            td { (t.attempts) }
                            td { (children(t)) }
                            td { (format!("{:.1} ms", t.run_time.as_secs_f64() * 1e3)) }
                        }
                    }
                }
            }
        }
    }
}

/// Whether the run may be resumed: it is not executing, did not complete, and is not a
/// subflow's run (its parent's resume resumes it).
fn resumable(view: &RunView) -> bool {
    !view.live
        && view.run.state.state_type() != crate::state::StateType::Completed
        && !view
            .run
            .context
            .contains_key(crate::runner::PARENT_FLOW_RUN)
}

/// The tenant a form acts for, as its page showed it: an operator who has since chosen
/// another tenant is refused rather than acting on the other's run or deployment of that name.
fn acting_as(tenant: &str) -> Markup {
    html! { input type="hidden" name="tenant" value=(tenant); }
}

/// Resume the run: where it stopped, or from chosen tasks (run again as roots; a completed
/// task cannot be one).
fn resume_form(view: &RunView, tenant: &str) -> Markup {
    let id = view.run.id;
    // By name, once each (a code flow's body may have run a task several times).
    let mut seen = std::collections::HashSet::new();
    let startable: Vec<&TaskRun> = view
        .run
        .tasks
        .iter()
        .filter(|t| t.state.state_type() != crate::state::StateType::Completed)
        .filter(|t| seen.insert(t.name.as_str()))
        .collect();
    html! {
        form method="post" action={"/ui/runs/" (id) "/resume"} class="resume" {
            (acting_as(tenant))
            button type="submit" { "Resume run" }
            @if !startable.is_empty() {
                details {
                    summary { "Resume from chosen tasks" }
                    fieldset {
                        legend { "Start tasks (run again as roots; completed tasks keep their results)" }
                        @for t in &startable {
                            @let field = format!("start-{}", enc(&t.name));
                            label for=(field) class="check" {
                                input type="checkbox" id=(field) name="start" value=(t.name);
                                " " (t.name) " " (badge(Some(t.state.name)))
                            }
                        }
                    }
                }
            }
        }
    }
}

fn children(t: &TaskRun) -> Markup {
    let mut by: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for c in &t.children {
        *by.entry(c.state.name.as_str()).or_insert(0) += 1;
    }
    counts(by.into_iter())
}

/// `s` as one segment of a URL's path (a task's name may hold spaces, slashes, anything).
fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `text` cut to [`SHOWN_BYTES`] at a character boundary, and whether it was.
fn cut(text: &str) -> (&str, bool) {
    if text.len() <= SHOWN_BYTES {
        return (text, false);
    }
    let mut end = SHOWN_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

/// A task run's input or output: its first [`SHOWN_BYTES`], and a link to download it whole.
fn value(label: &str, text: Option<&str>, download: &str) -> Markup {
    html! {
        @match text {
            None => p { (label) ": none" },
            Some(t) => {
                @let (shown, cut) = cut(t);
                details open {
                    summary { (label) @if cut { " (the first " (SHOWN_BYTES) " bytes of " (t.len()) ")" } }
                    pre { (shown) }
                    p { a href=(download) download { "Download the " (label.to_ascii_lowercase()) " (JSON, " (t.len()) " bytes)" } }
                }
            }
        }
    }
}

/// Links within a task's pages: its path, and the task run's id when its name is not enough
/// (a task a code flow's body ran more than once).
struct TaskLink {
    base: String,
    run: Option<crate::ids::TaskRunId>,
}

impl TaskLink {
    /// `base` + `suffix` (`""`, `/output`, …) with `params` (and the run's id) as its query.
    fn to(&self, suffix: &str, params: &[(&str, String)]) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(run) = self.run {
            q.append_pair("run", &run.to_string());
        }
        for (k, v) in params {
            q.append_pair(k, v);
        }
        let q = q.finish();
        match q.is_empty() {
            true => format!("{}{suffix}", self.base),
            false => format!("{}{suffix}?{q}", self.base),
        }
    }
}

/// A task's timeline: its attempts, or for a mapped task, a row per child of the page shown.
fn task_timeline(
    view: &RunView,
    task: &TaskRun,
    shown: &TaskRun,
    link: &TaskLink,
    page_no: usize,
    now: DateTime<Utc>,
) -> Markup {
    let children = !task.children.is_empty() && std::ptr::eq(task, shown);
    let runs: Vec<&TaskRun> = match children {
        true => task
            .children
            .iter()
            .skip(page_no * CHILDREN_PAGE)
            .take(CHILDREN_PAGE)
            .collect(),
        false => vec![shown],
    };
    let first = runs
        .iter()
        .filter_map(|t| t.history.first().map(|h| h.time))
        .min()
        .unwrap_or(view.created_at);
    let (start, end) = timeline::extent(runs.iter().copied(), first, view.live, now);
    // A mapped child (a row of its parent's page, or its own page): `name[i]`, linked to it.
    let rows = runs.iter().map(|t| match t.map_index {
        Some(i) if children || !std::ptr::eq(task, shown) => (
            format!("{}[{i}]", task.name),
            link.to("", &[("child", i.to_string())]),
            Some(*t),
        ),
        _ => (task.name.clone(), link.to("", &[]), Some(*t)),
    });
    // What is still open ends at the chart's end: now while the run is live, else its last
    // transition.
    timeline::svg(&timeline::rows(rows, end, end - start), start, end)
}

/// A task run's log lines as its page shows them.
#[derive(Debug, Clone, Copy)]
pub struct Lines<'a> {
    /// Its newest lines.
    pub tail: Option<&'a LogTail>,
    /// The run's newest line's position before the run was read: a live page follows the lines
    /// after it and after the tail's.
    pub newest: i64,
}

/// A task's page: `task` of the run, showing `shown` (itself, or one of its mapped children).
pub fn task(
    who: &Who,
    view: &RunView,
    task: &TaskRun,
    shown: &TaskRun,
    lines: Lines<'_>,
    page_no: usize,
    now: DateTime<Utc>,
) -> Markup {
    let logs = lines.tail;
    let page_no = page_no.min(
        task.children
            .len()
            .div_ceil(CHILDREN_PAGE)
            .saturating_sub(1),
    );
    let id = view.run.id;
    let named = by_name(view);
    let siblings = named.get(task.name.as_str()).cloned().unwrap_or_default();
    let link = TaskLink {
        base: format!("/ui/runs/{id}/tasks/{}", enc(&task.name)),
        run: (siblings.len() > 1).then_some(task.id),
    };
    // A child's page: its downloads name the child.
    let child: Vec<(&str, String)> = match shown.map_index {
        Some(i) if !std::ptr::eq(task, shown) => vec![("child", i.to_string())],
        _ => Vec::new(),
    };
    let nth = siblings.iter().position(|t| std::ptr::eq(*t, task));
    let title = match (shown.map_index, nth) {
        (Some(i), _) if !std::ptr::eq(task, shown) => format!("{}[{i}]", task.name),
        (_, Some(k)) if siblings.len() > 1 => format!("{} #{}", task.name, k + 1),
        _ => task.name.clone(),
    };
    let grants = view
        .grants
        .as_ref()
        .and_then(|g| g.iter().find(|g| g.task == task.name));
    page(
        &title,
        Some(who),
        html! {
            p class="crumbs" {
                a href="/ui/runs" { "Runs" } " / "
                a href={"/ui/runs/" (id)} { (view.run.flow) " " (short(&id.to_string())) } " / "
                @if !std::ptr::eq(task, shown) { a href=(link.to("", &[])) { (task.name) } } @else { (title) }
            }
            h1 { "Task " (title) }
            p class="task-state" { "State " (badge(Some(shown.state.name))) }
            @if let Some(m) = &shown.state.message {
                section aria-labelledby="msg-h" {
                    h2 id="msg-h" { @if shown.state.name.state_type() == crate::state::StateType::Failed { "Error" } @else { "Message" } }
                    pre class="message" { (m) }
                }
            }
            section aria-labelledby="usage-h" {
                h2 id="usage-h" { "Attempts and usage" }
                dl class="usage" {
                    dt { "Attempts" } dd { (shown.attempts) }
                    dt { "Run time" } dd { (format!("{:.2} ms", shown.run_time.as_secs_f64() * 1e3)) }
                    dt { "Fuel" } dd { (shown.fuel_consumed) }
                    dt { "Peak memory" } dd { (bytesize::ByteSize::b(shown.memory_peak_bytes).display().iec()) }
                }
            }
            section aria-labelledby="timeline-h" {
                h2 id="timeline-h" { "Timeline" }
                div class="graph-box" { (task_timeline(view, task, shown, &link, page_no, now)) }
            }
            @if siblings.len() > 1 {
                section aria-labelledby="runs-h" {
                    h2 id="runs-h" { "Runs of this task (" (siblings.len()) ")" }
                    p { "The flow's body ran this task " (siblings.len()) " times, in this order." }
                    table class="siblings" {
                        caption class="visually-hidden" { "Task runs of this task, in order" }
                        thead { tr { th scope="col" { "Run" } th scope="col" { "State" } th scope="col" { "Attempts" } } }
                        tbody {
                            @for (k, t) in siblings.iter().enumerate() {
                                tr {
                                    td {
                                        @if std::ptr::eq(*t, task) { "#" (k + 1) " (this one)" }
                                        @else { a href=(task_href(view, &named, t)) { "#" (k + 1) } }
                                    }
                                    td { (badge(Some(t.state.name))) }
                                    td { (t.attempts) }
                                }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="history-h" {
                h2 id="history-h" { "State history" }
                table class="history" {
                    caption class="visually-hidden" { "Transitions, oldest first" }
                    thead { tr { th scope="col" { "Time" } th scope="col" { "State" } th scope="col" { "Message" } } }
                    tbody {
                        @for t in &shown.history {
                            tr { td { (time(t.time)) } td { (badge(Some(t.to))) } td { (t.message.as_deref().unwrap_or("")) } }
                        }
                    }
                }
            }
            section aria-labelledby="logs-h" {
                h2 id="logs-h" { "Logs" }
                @let records = logs.map_or(&[][..], |t| t.records.as_slice());
                // While the run is live, new lines are appended as they come (`app.js`): those
                // after the last shown, of this task run (a child's, by its index).
                @let follow = (view.live && (task.children.is_empty() || !std::ptr::eq(task, shown))).then(|| {
                    let after = logs.map_or(0, |t| t.last_seq).max(lines.newest);
                    format!("/ui/runs/{id}/tail?task_run={}&after={after}", shown.id)
                });
                @if let Some(tail) = logs.filter(|t| t.omitted > 0) {
                    p { "The newest " (tail.records.len()) " lines; " (tail.omitted) " before them are left out (the API pages them all)." }
                }
                @if records.is_empty() && follow.is_none() {
                    p { "No log lines." }
                } @else {
                    pre class="logs" id="logs" data-tail=[follow.as_deref()] aria-live="polite" {
                        @for l in records {
                            span class={"log " (format!("{:?}", l.level).to_ascii_lowercase())} {
                                (l.time.format("%H:%M:%S%.3f")) " " (format!("{:?}", l.level).to_ascii_uppercase()) " " (l.message)
                            }
                            "\n"
                        }
                    }
                    @if follow.is_some() { p class="live" { "Following new lines while the run is live." } }
                }
            }
            section aria-labelledby="io-h" {
                h2 id="io-h" { "Input and output" }
                (value("Input", shown.cached_input.as_ref().map(|j| j.as_str()), &link.to("/input", &child)))
                (value("Output", shown.output.as_ref().map(|j| j.as_str()), &link.to("/output", &child)))
            }
            section aria-labelledby="cache-h" {
                h2 id="cache-h" { "Cache" }
                @match &shown.cache {
                    None => p { "Not cached." },
                    Some(c) => dl class="usage" {
                        dt { "Status" } dd { (format!("{:?}", c.status)) }
                        dt { "Why" } dd { (c.reason) }
                        dt { "Key" } dd { code { (c.key) } }
                    },
                }
            }
            section aria-labelledby="grants-h" {
                h2 id="grants-h" { "Grants" }
                @match grants {
                    None => p { (view.grants_unknown.as_deref().unwrap_or("None.")) },
                    Some(g) if g.lines.is_empty() => p { "None: no authority beyond its input." },
                    Some(g) => ul { @for l in &g.lines { li { code { (l) } } } },
                }
            }
            @if !task.children.is_empty() && std::ptr::eq(task, shown) {
                @let pages = task.children.len().div_ceil(CHILDREN_PAGE);
                @let page_no = page_no.min(pages.saturating_sub(1));
                section aria-labelledby="children-h" {
                    h2 id="children-h" { "Mapped children (" (task.children.len()) ")" }
                    table class="children" {
                        caption class="visually-hidden" { "Mapped children, by index" }
                        thead { tr { th scope="col" { "Index" } th scope="col" { "State" } th scope="col" { "Attempts" } } }
                        tbody {
                            @for c in task.children.iter().skip(page_no * CHILDREN_PAGE).take(CHILDREN_PAGE) {
                                @let i = c.map_index.unwrap_or(0);
                                tr {
                                    td { a href=(link.to("", &[("child", i.to_string())])) { (i) } }
                                    td { (badge(Some(c.state.name))) }
                                    td { (c.attempts) }
                                }
                            }
                        }
                    }
                    @if pages > 1 {
                        nav aria-label="Pages of children" class="pages" {
                            @if page_no > 0 { a href=(link.to("", &[("page", (page_no - 1).to_string())])) { "Previous" } }
                            span { "Page " (page_no + 1) " of " (pages) }
                            @if page_no + 1 < pages { a href=(link.to("", &[("page", (page_no + 1).to_string())])) { "Next" } }
                        }
                    }
                }
            }
        },
    )
}

/// A pause or resume button for deployment `name`; done, it comes back to the list (`list`) or
/// to the deployment's page.
fn pause_button(tenant: &str, name: &str, paused: bool, list: bool) -> Markup {
    let (action, text) = match paused {
        true => ("resume", "Resume"),
        false => ("pause", "Pause"),
    };
    html! {
        form method="post" action={"/ui/deployments/" (enc(name)) "/" (action)} class="inline" {
            (acting_as(tenant))
            @if list { input type="hidden" name="back" value="list"; }
            button type="submit" aria-label={(text) " deployment " (name)} { (text) }
        }
    }
}

/// The deployments list.
pub fn deployments(who: &Who, items: &[DeploymentView]) -> Markup {
    page(
        "Deployments",
        Some(who),
        html! {
            h1 { "Deployments" }
            table class="deployments" {
                caption { "Flows run on a schedule, by name" }
                thead { tr {
                    th scope="col" { "Deployment" }
                    th scope="col" { "Flow" }
                    th scope="col" { "Schedule" }
                    th scope="col" { "Status" }
                    th scope="col" { "Next runs" }
                    th scope="col" { "Action" }
                } }
                tbody {
                    @for d in items {
                        tr {
                            td { a href={"/ui/deployments/" (enc(&d.name))} { (d.name) } }
                            td { (d.flow) }
                            td { code { (d.schedule) } }
                            td { @if d.paused { span class="badge st-paused" { "paused" } } @else { span class="badge st-running" { "active" } } }
                            td { @for at in &d.upcoming { (time(*at)) br; } @if d.upcoming.is_empty() { "none" } }
                            td { (pause_button(&who.tenant, &d.name, d.paused, true)) }
                        }
                    }
                    @if items.is_empty() {
                        tr { td colspan="6" { "No deployments: " code { "sluice deploy" } " registers one." } }
                    }
                }
            }
        },
    )
}

fn slots(caption: &str, slots: &[SlotView]) -> Markup {
    html! {
        table class="slots" {
            caption { (caption) }
            thead { tr {
                th scope="col" { "Time" }
                th scope="col" { "State" }
                th scope="col" { "Run" }
                th scope="col" { "Message" }
            } }
            tbody {
                @for s in slots {
                    tr {
                        td { (time(s.at)) }
                        td { (badge_named(&s.state)) }
                        td { @if let Some(r) = s.run { a href={"/ui/runs/" (r)} { code { (r) } } } }
                        td { (s.message.as_deref().unwrap_or("")) }
                    }
                }
                @if slots.is_empty() { tr { td colspan="4" { "None." } } }
            }
        }
    }
}

/// A badge for a state given by name (a slot's, which may be `Started`).
fn badge_named(name: &str) -> Markup {
    match name.parse::<StateName>() {
        Ok(s) => badge(Some(s)),
        Err(_) => html! { span class="badge st-none" { (name) } },
    }
}

/// One deployment: its settings, upcoming runs and past runs.
pub fn deployment(who: &Who, d: &DeploymentView, runs: &DeploymentRuns) -> Markup {
    page(
        &format!("Deployment {}", d.name),
        Some(who),
        html! {
            p class="crumbs" { a href="/ui/deployments" { "Deployments" } " / " (d.name) }
            h1 { "Deployment " (d.name) }
            dl class="usage" {
                dt { "Flow" } dd { (d.flow) }
                dt { "Schedule" } dd { code { (d.schedule) } }
                dt { "Catch-up" } dd { (d.catchup) }
                dt { "Late after" } dd { (d.late_after_seconds) " s" }
                dt { "Status" } dd { @if d.paused { "paused" } @else { "active" } " " (pause_button(&who.tenant, &d.name, d.paused, false)) }
                dt { "Deployed" } dd { (time(d.created_at)) ", last changed " (time(d.updated_at)) }
            }
            @if !d.parameters.is_empty() {
                details {
                    summary { "Parameters" }
                    pre { (serde_json::to_string_pretty(&d.parameters).unwrap_or_default()) }
                }
            }
            (slots("Upcoming runs, soonest first", &runs.upcoming))
            (slots("Past runs, newest first", &runs.past))
            p { a href={"/ui/runs?deployment=" (enc(&d.name))} { "All runs of " (d.name) " in the runs list" } }
        },
    )
}

/// One line of the usage page: what is used of `quota` (`None`: unlimited).
fn usage_row(what: &str, used: u64, quota: Option<u64>, unit: fn(u64) -> String) -> Markup {
    html! {
        tr {
            th scope="row" { (what) }
            td { (unit(used)) }
            td { @match quota { Some(q) => (unit(q)), None => "unlimited" } }
            td {
                @if let Some(q) = quota.filter(|q| *q > 0) {
                    meter min="0" max=(q) value=(used.min(q)) high=(q / 10 * 9) aria-label={(what) " against its quota"} {
                        (used) " of " (q)
                    }
                    " " (format!("{:.0} %", used as f64 * 100.0 / q as f64))
                }
            }
        }
    }
}

/// The tenant's usage against its quotas.
pub fn usage(who: &Who, u: &Usage) -> Markup {
    let n = |v: u64| v.to_string();
    let bytes = |v: u64| bytesize::ByteSize::b(v).display().iec().to_string();
    let ms = |v: u64| format!("{v} ms");
    let q = &u.quotas;
    page(
        "Usage",
        Some(who),
        html! {
            h1 { "Usage of tenant " (u.tenant) }
            p { "Weight " (u.weight) ": its share of the run slots against other busy tenants." }
            table class="usage" {
                caption { "Now, against the tenant's quotas" }
                thead { tr {
                    th scope="col" { "Measure" }
                    th scope="col" { "Used" }
                    th scope="col" { "Quota" }
                    th scope="col" { "Share" }
                } }
                tbody {
                    (usage_row("Task runs running", u.running_tasks, q.max_running_tasks, n))
                    (usage_row("Task runs queued", u.queued_tasks, q.max_queued_tasks, n))
                    (usage_row("Flow runs started in the last minute", u.runs_last_minute, q.runs_per_minute, n))
                    (usage_row("Fuel used in the last minute", u.fuel_last_minute, q.fuel_per_minute, n))
                    (usage_row("Bytes stored", u.stored_bytes, q.max_stored_bytes, bytes))
                }
            }
            table class="limits" {
                caption { "Limits on each task run" }
                thead { tr { th scope="col" { "Limit" } th scope="col" { "Most allowed" } } }
                tbody {
                    tr { th scope="row" { "Fuel" } td { (q.max_task_fuel.map_or("unlimited".into(), n)) } }
                    tr { th scope="row" { "Memory" } td { (q.max_task_memory.map_or("unlimited".into(), bytes)) } }
                    tr { th scope="row" { "Deadline" } td { (q.max_task_timeout_ms.map_or("unlimited".into(), ms)) } }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task's name is one path segment in its links, whatever it holds (a path decodes only
    /// percent escapes: a `+` for a space would name another task).
    #[test]
    fn task_names_are_percent_encoded_as_one_path_segment() {
        assert_eq!(enc("a b/c+d?é"), "a%20b%2Fc%2Bd%3F%C3%A9");
        assert_eq!(enc("add_one"), "add%5Fone");
    }
}
