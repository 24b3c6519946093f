//! The run history: `sluice runs`, `sluice show` and `sluice logs`. Each first records as Crashed
//! the runs whose process died, so nothing is shown Running forever.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use sluice::server::wire::{LogPage, RunItem, RunView};
use sluice::state::StateName;
use sluice::store::{LOG_PAGE_LINES, RunFilter, SqliteStore, Store, StoreError, StoredLog};

use crate::remote::Remote;
use crate::report::{column_width, fit, run_json, summary, truncate, when};
use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct RunsArgs {
    /// Only runs in this state (e.g. Running, Paused, Failed, Crashed).
    #[arg(long)]
    state: Option<StateName>,
    /// Only runs of this flow.
    #[arg(long)]
    flow: Option<String>,
    /// At most this many runs (1 or more), newest first.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    limit: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ShowArgs {
    /// The flow run's id (or a unique prefix of it).
    run: String,
    /// Print the flow run record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct LogsArgs {
    /// The flow run's id (or a unique prefix of it).
    run: String,
    /// Only this task's logs.
    task: Option<String>,
    /// Keep printing new lines until the run is no longer live.
    #[arg(long, short)]
    follow: bool,
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
}

/// Open the store and record dead runs as Crashed.
/// A read-only home is opened read-only when `read_only_ok` (showing history), refused otherwise.
pub(crate) fn open_recovered(home: &Path, read_only_ok: bool) -> Result<SqliteStore, UsageError> {
    let store = match SqliteStore::open(home) {
        Ok(s) => s,
        Err(e @ StoreError::ReadOnly { .. }) if read_only_ok => {
            eprintln!("warning: {e}; showing the history as it was left");
            SqliteStore::open_read_only(home).map_err(usage)?
        }
        Err(e) => return Err(usage(e)),
    };
    store.recover_dead(chrono::Utc::now()).map_err(usage)?;
    Ok(store)
}

pub(crate) async fn runs(
    home: &Path,
    remote: Option<&Remote>,
    args: &RunsArgs,
) -> Result<ExitCode, UsageError> {
    let filter = RunFilter {
        state: args.state,
        flow: args.flow.clone(),
        limit: usize::try_from(args.limit).unwrap_or(usize::MAX),
        before: None,
        since: None,
        until: None,
        deployment: None,
    };
    let (items, place) = match remote {
        Some(remote) => (remote.runs(&filter).await?, remote.to_string()),
        None => {
            let store = open_recovered(home, true)?;
            let items = store
                .list_runs(&filter)
                .map_err(usage)?
                .into_iter()
                .map(|summary| RunItem {
                    live: store.is_live(summary.id),
                    summary,
                })
                .collect();
            (items, store.path().display().to_string())
        }
    };
    crate::print_stdout(&render_runs(&items, args.json, &place));
    Ok(ExitCode::SUCCESS)
}

/// `sluice runs`: a table, or JSON.
fn render_runs(items: &[RunItem], json: bool, place: &str) -> String {
    let mut out = String::new();
    if json {
        let list: Vec<_> = items
            .iter()
            .map(|RunItem { summary: r, live }| {
                json!({
                    "id": r.id,
                    "flow": r.flow,
                    "state": r.state.name,
                    "type": r.state.state_type(),
                    "message": r.state.message,
                    "created_at": r.created_at,
                    "updated_at": r.updated_at,
                    "tasks": r.tasks,
                    "live": live,
                })
            })
            .collect();
        return format!("{:#}\n", json!(list));
    }
    let width = column_width(items.iter().map(|r| r.summary.flow.as_str()));
    let _ = writeln!(
        out,
        "{:<26}  {:<width$}  {:<11}  {:<19}  {:>9}  TASKS",
        "RUN", "FLOW", "STATE", "CREATED", "DURATION"
    );
    for RunItem { summary: r, .. } in items {
        let tasks: Vec<String> = r.tasks.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let duration = (r.updated_at - r.created_at)
            .to_std()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<26}  {:<width$}  {:<11}  {:<19}  {:>9}  {}",
            r.id.to_string(),
            fit(&r.flow, width),
            r.state.name.as_str(),
            when(r.created_at),
            duration,
            tasks.join(", ")
        );
    }
    if items.is_empty() {
        let _ = writeln!(out, "(no flow runs in {place})");
    }
    out
}

pub(crate) async fn show(
    home: &Path,
    remote: Option<&Remote>,
    args: &ShowArgs,
) -> Result<ExitCode, UsageError> {
    let view = match remote {
        Some(remote) => remote.show(&args.run, None).await?,
        None => {
            let store = open_recovered(home, true)?;
            let id = store.resolve_run(&args.run).map_err(usage)?;
            RunView::load(&store, id).map_err(usage)?
        }
    };
    for p in &view.problems {
        eprintln!("warning: {p}");
    }
    crate::print_stdout(&render_show(&view, args.json));
    Ok(ExitCode::SUCCESS)
}

/// `sluice show`: the run with details, grants and liveness, or its JSON record.
fn render_show(view: &RunView, json: bool) -> String {
    if json {
        let mut v = run_json(&view.run, &view.log_tails);
        v["created_at"] = json!(view.created_at);
        v["live"] = json!(view.live);
        v["cancel_requested_at"] = json!(view.cancel_requested_at);
        v["manifest"] = json!(view.manifest);
        v["problems"] = json!(view.problems);
        match (&view.grants, &view.grants_unknown) {
            (Some(grants), _) => {
                if let Some(tasks) = v["tasks"].as_array_mut() {
                    for t in tasks {
                        let g = grants.iter().find(|g| t["name"].as_str() == Some(&g.task));
                        t["grants"] = g.map_or_else(|| json!({}), |g| g.grants.clone());
                    }
                }
            }
            (None, e) => v["grants_unknown"] = json!(e),
        }
        return format!("{v:#}\n");
    }
    let mut s = summary(&view.run, true);
    match (&view.grants, &view.grants_unknown) {
        (Some(grants), _) if grants.iter().all(|g| g.lines.is_empty()) => {
            s.push_str("\nGrants: none (no task may reach files, env or secrets)\n");
        }
        (Some(grants), _) => {
            s.push_str("\nGrants:\n");
            for g in grants {
                if g.lines.is_empty() {
                    let _ = writeln!(s, "  {}: none", g.task);
                }
                for line in &g.lines {
                    let _ = writeln!(s, "  {}: {line}", g.task);
                }
            }
        }
        (None, e) => {
            let _ = writeln!(
                s,
                "\nGrants: unknown ({})",
                e.as_deref().unwrap_or_default()
            );
        }
    }
    if view.live {
        s.push_str("\n(live: a process is running it now)\n");
    }
    s
}

fn log_line(l: &StoredLog) -> String {
    let task = match l.map_index {
        Some(i) => format!("{}[{i}]", l.task),
        None => l.task.clone(),
    };
    format!(
        "{} {:<5} {}: {}\n",
        l.record
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        format!("{:?}", l.record.level).to_lowercase(),
        task,
        truncate(&l.record.message, 10_000)
    )
}

/// Write `text` to stdout; false when it cannot be written (the reader went away).
fn write_stdout(text: &str) -> bool {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// Print the run's logs page by page (never all of them in memory); with `--follow`, keep
/// reading pages until the run is no longer live.
pub(crate) async fn logs(
    home: &Path,
    remote: Option<&Remote>,
    args: &LogsArgs,
) -> Result<ExitCode, UsageError> {
    let source = match remote {
        Some(remote) => LogSource::Remote(remote, remote.resolve(&args.run).await?),
        None => {
            let store = open_recovered(home, true)?;
            let id = store.resolve_run(&args.run).map_err(usage)?;
            if let Some(task) = &args.task {
                let names = store.task_names(id).map_err(usage)?;
                if !names.iter().any(|n| n == task) {
                    return Err(UsageError(anyhow!(
                        "flow run {id} has no task `{task}`{}",
                        sluice::flow::Hint::closest(task, names.iter().map(String::as_str))
                    )));
                }
            }
            LogSource::Local(store, id)
        }
    };
    if let (LogSource::Remote(remote, id), true) = (&source, args.follow) {
        return follow_remote(remote, *id, args).await;
    }
    let mut after = 0;
    loop {
        let mut live = false;
        loop {
            // Whether the run was live before reading, so lines written just before it ended
            // are still printed.
            let page = source.page(args.task.as_deref(), after).await?;
            live |= args.follow && page.live;
            let Some(last) = page.lines.last() else {
                break;
            };
            after = last.seq;
            let mut out = String::new();
            for l in &page.lines {
                if args.json {
                    out.push_str(&serde_json::to_string(l).unwrap_or_default());
                    out.push('\n');
                } else {
                    out.push_str(&log_line(l));
                }
            }
            // A reader that went away (`| head`) ends the command: nothing more is read.
            if !write_stdout(&out) {
                return Ok(ExitCode::SUCCESS);
            }
        }
        if !live {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sluice logs --follow --server`: the run's lines from its event stream, printed as they
/// come, until the run ends. A broken stream is opened again after the last line printed (the
/// server restarting), at most a few times in a row.
async fn follow_remote(
    remote: &Remote,
    id: sluice::ids::FlowRunId,
    args: &LogsArgs,
) -> Result<ExitCode, UsageError> {
    let mut cursor = sluice::store::ChangeCursor::lines_after(0);
    let mut broken = 0;
    loop {
        let mut stream = match remote.events(id, args.task.as_deref(), cursor).await {
            Ok(s) => s,
            Err(e) if broken >= 3 => return Err(e),
            Err(_) => {
                broken += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.next().await {
                Ok(Some(event)) if event.kind == "log" => {
                    let line: StoredLog = serde_json::from_str(&event.data).map_err(|e| {
                        UsageError(anyhow!("server {remote}: unreadable log event: {e}"))
                    })?;
                    cursor.log = line.seq;
                    broken = 0;
                    let text = if args.json {
                        format!("{}\n", event.data)
                    } else {
                        log_line(&line)
                    };
                    if !write_stdout(&text) {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                Ok(Some(event)) if event.kind == "end" => return Ok(ExitCode::SUCCESS),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) if broken < 3 => {
                    broken += 1;
                    break;
                }
                Ok(None) => {
                    return Err(UsageError(anyhow!(
                        "server {remote}: the event stream of run {id} ended before the run"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Where `sluice logs` reads pages.
enum LogSource<'a> {
    Local(SqliteStore, sluice::ids::FlowRunId),
    Remote(&'a Remote, sluice::ids::FlowRunId),
}

impl LogSource<'_> {
    async fn page(&self, task: Option<&str>, after: i64) -> Result<LogPage, UsageError> {
        match self {
            LogSource::Local(store, id) => {
                let live = store.is_live(*id);
                let lines = store
                    .logs(*id, task, after, LOG_PAGE_LINES)
                    .map_err(usage)?;
                Ok(LogPage { lines, live })
            }
            LogSource::Remote(remote, id) => remote.logs(*id, task, after).await,
        }
    }
}
