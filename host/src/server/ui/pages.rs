//! The UI's pages, as HTML (maud escapes every value it writes). Each page has one `h1`, its
//! landmarks (`header`, `nav`, `main`), labelled form fields and captioned tables, so that
//! keyboard and screen-reader users get the same page.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::graph::{self, Node};
use crate::runner::record::TaskRun;
use crate::server::wire::RunView;
use crate::state::StateName;
use crate::store::{LogTail, RunSummary};

/// Values longer than this are cut on a page (the API has them whole).
const SHOWN_BYTES: usize = 4096;

/// Mapped children per page of a task.
const CHILDREN_PAGE: usize = 100;

fn page(title: &str, tenant: Option<&str>, body: Markup) -> Markup {
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
                        @if let Some(t) = tenant {
                            a href="/ui/runs" { "Runs" }
                            span class="tenant" { "Tenant " strong { (t) } }
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
                label for="token" { "Tenant token" }
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

fn time(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M:%S%.3f UTC")) } }
}

/// The runs list's filters and paging.
#[derive(Debug, Default)]
pub struct RunsFilters {
    pub state: Option<StateName>,
    pub flow: Option<String>,
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
        if let Some(b) = before {
            q.append_pair("before", b);
        }
        q.finish()
    }
}

/// The runs list.
pub fn runs(tenant: &str, items: &[(bool, RunSummary)], filters: &RunsFilters) -> Markup {
    page(
        "Runs",
        Some(tenant),
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

/// The graph's nodes: the flow's tasks in the manifest's order (or the run's, without one).
fn nodes(view: &RunView) -> Vec<Node> {
    let task = |name: &str| view.run.tasks.iter().find(|t| t.name == name);
    match &view.graph {
        Some(graph) => graph
            .iter()
            .map(|t| Node::new(&t.task, t.upstream.clone(), task(&t.task)))
            .collect(),
        None => view
            .run
            .tasks
            .iter()
            .map(|t| Node::new(&t.name, Vec::new(), Some(t)))
            .collect(),
    }
}

/// A run's page.
pub fn run(tenant: &str, view: &RunView) -> Markup {
    let id = view.run.id;
    page(
        &format!("Run {}", short(&id.to_string())),
        Some(tenant),
        html! {
            p class="crumbs" { a href="/ui/runs" { "Runs" } " / " (view.run.flow) }
            h1 { "Run of " (view.run.flow) " " code { (short(&id.to_string())) } }
            div id="live" data-run=(id) data-live=(view.live) { (run_live(view)) }
        },
    )
}

/// The part of a run's page that changes while it runs.
pub fn run_live(view: &RunView) -> Markup {
    let id = view.run.id;
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
                    button type="submit" class="danger" { "Cancel run" }
                }
            }
            @if let Some(at) = view.cancel_requested_at { p { "Cancel requested " (time(at)) } }
        }
        section aria-labelledby="graph-h" {
            h2 id="graph-h" { "Graph" }
            div class="graph-box" {
                (graph::svg(&nodes(view), |task| format!("/ui/runs/{id}/tasks/{}", enc(task))))
            }
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
                            td { a href={"/ui/runs/" (id) "/tasks/" (enc(&t.name))} { (t.name) } }
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

fn value(label: &str, text: Option<&str>) -> Markup {
    html! {
        @match text {
            None => p { (label) ": none" },
            Some(t) => {
                @let (shown, cut) = cut(t);
                details open {
                    summary { (label) @if cut { " (the first " (SHOWN_BYTES) " bytes of " (t.len()) ")" } }
                    pre { (shown) }
                }
            }
        }
    }
}

/// A task's page: `task` of the run, showing `shown` (itself, or one of its mapped children).
pub fn task(
    tenant: &str,
    view: &RunView,
    task: &TaskRun,
    shown: &TaskRun,
    logs: Option<&LogTail>,
    page_no: usize,
) -> Markup {
    let id = view.run.id;
    let base = format!("/ui/runs/{id}/tasks/{}", enc(&task.name));
    let title = match shown.map_index {
        Some(i) if task.map_index.is_none() => format!("{}[{i}]", task.name),
        _ => task.name.clone(),
    };
    let grants = view
        .grants
        .as_ref()
        .and_then(|g| g.iter().find(|g| g.task == task.name));
    page(
        &title,
        Some(tenant),
        html! {
            p class="crumbs" {
                a href="/ui/runs" { "Runs" } " / "
                a href={"/ui/runs/" (id)} { (view.run.flow) " " (short(&id.to_string())) } " / "
                @if shown.map_index.is_some() { a href=(base) { (task.name) } } @else { (task.name) }
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
                @match logs {
                    None => p { "No log lines." },
                    Some(tail) => {
                        @if tail.omitted > 0 {
                            p { "The newest " (tail.records.len()) " lines; " (tail.omitted) " before them are left out (the API pages them all)." }
                        }
                        pre class="logs" {
                            @for l in &tail.records {
                                span class={"log " (format!("{:?}", l.level).to_ascii_lowercase())} {
                                    (l.time.format("%H:%M:%S%.3f")) " " (format!("{:?}", l.level).to_ascii_uppercase()) " " (l.message)
                                }
                                "\n"
                            }
                        }
                    }
                }
            }
            section aria-labelledby="io-h" {
                h2 id="io-h" { "Input and output" }
                (value("Input", shown.cached_input.as_ref().map(|j| j.as_str())))
                (value("Output", shown.output.as_ref().map(|j| j.as_str())))
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
            @if !task.children.is_empty() && shown.map_index.is_none() {
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
                                    td { a href={(base) "?child=" (i)} { (i) } }
                                    td { (badge(Some(c.state.name))) }
                                    td { (c.attempts) }
                                }
                            }
                        }
                    }
                    @if pages > 1 {
                        nav aria-label="Pages of children" class="pages" {
                            @if page_no > 0 { a href={(base) "?page=" (page_no - 1)} { "Previous" } }
                            span { "Page " (page_no + 1) " of " (pages) }
                            @if page_no + 1 < pages { a href={(base) "?page=" (page_no + 1)} { "Next" } }
                        }
                    }
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
