//! The run history: `sluice runs`, `sluice show` and `sluice logs`. Each first records as Crashed
//! the runs whose process died, so nothing is shown Running forever.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::json;
use sluice::grants::Grants;
use sluice::state::StateName;
use sluice::store::{LOG_PAGE_LINES, RunFilter, SqliteStore, Store, StoreError, StoredLog};

use crate::report::{column_width, fit, log_tails, run_json, summary, truncate, when};
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

pub(crate) fn runs(home: &Path, args: &RunsArgs) -> Result<ExitCode, UsageError> {
    let store = open_recovered(home, true)?;
    let runs = store
        .list_runs(&RunFilter {
            state: args.state,
            flow: args.flow.clone(),
            limit: usize::try_from(args.limit).unwrap_or(usize::MAX),
        })
        .map_err(usage)?;
    let mut out = String::new();
    if args.json {
        let list: Vec<_> = runs
            .iter()
            .map(|r| {
                json!({
                    "id": r.id,
                    "flow": r.flow,
                    "state": r.state.name,
                    "type": r.state.state_type(),
                    "message": r.state.message,
                    "created_at": r.created_at,
                    "updated_at": r.updated_at,
                    "tasks": r.tasks,
                    "live": store.is_live(r.id),
                })
            })
            .collect();
        out = format!("{:#}\n", json!(list));
    } else {
        use std::fmt::Write as _;
        let width = column_width(runs.iter().map(|r| r.flow.as_str()));
        let _ = writeln!(
            out,
            "{:<26}  {:<width$}  {:<11}  {:<19}  {:>9}  TASKS",
            "RUN", "FLOW", "STATE", "CREATED", "DURATION"
        );
        for r in &runs {
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
        if runs.is_empty() {
            let _ = writeln!(out, "(no flow runs in {})", store.path().display());
        }
    }
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn show(home: &Path, args: &ShowArgs) -> Result<ExitCode, UsageError> {
    let store = open_recovered(home, true)?;
    let id = store.resolve_run(&args.run).map_err(usage)?;
    let stored = store.load_run(id).map_err(usage)?;
    let live = store.is_live(id);
    for p in &stored.problems {
        eprintln!("warning: {p}");
    }
    // Each task's grants, from the manifest recorded with the run.
    let grants: Result<Vec<(String, Grants)>, String> = match &stored.manifest {
        None => Err("the run was not started from a manifest".into()),
        Some((path, text)) => sluice::flow::manifest::parse(path, text)
            .map(|def| def.tasks.into_iter().map(|t| (t.name, t.grants)).collect())
            .map_err(|e| format!("the recorded manifest no longer parses: {e}")),
    };
    let out = if args.json {
        let tails = log_tails(&store, &stored.run);
        let mut v = run_json(&stored.run, &tails);
        v["created_at"] = json!(stored.created_at);
        v["live"] = json!(live);
        v["cancel_requested_at"] = json!(stored.cancel_requested_at);
        v["manifest"] = json!(stored.manifest.as_ref().map(|(p, _)| p));
        v["problems"] = stored
            .problems
            .iter()
            .map(|p| json!(p.to_string()))
            .collect();
        match &grants {
            Ok(grants) => {
                if let Some(tasks) = v["tasks"].as_array_mut() {
                    for t in tasks {
                        let g = grants.iter().find(|(n, _)| t["name"].as_str() == Some(n));
                        t["grants"] = json!(g.map(|(_, g)| g.clone()).unwrap_or_default());
                    }
                }
            }
            Err(e) => v["grants_unknown"] = json!(e),
        }
        format!("{v:#}\n")
    } else {
        let mut s = summary(&stored.run, true);
        match &grants {
            Ok(grants) if grants.iter().all(|(_, g)| g.is_empty()) => {
                s.push_str("\nGrants: none (no task may reach files, env or secrets)\n");
            }
            Ok(grants) => {
                s.push_str("\nGrants:\n");
                for (task, g) in grants {
                    if g.is_empty() {
                        let _ = writeln!(s, "  {task}: none");
                    }
                    for line in g.lines() {
                        let _ = writeln!(s, "  {task}: {line}");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(s, "\nGrants: unknown ({e})");
            }
        }
        if live {
            s.push_str("\n(live: a process is running it now)\n");
        }
        s
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
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
pub(crate) async fn logs(home: &Path, args: &LogsArgs) -> Result<ExitCode, UsageError> {
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
    let mut after = 0;
    loop {
        // Whether the run was live before reading, so lines written just before it ended are
        // still printed.
        let live = args.follow && store.is_live(id);
        loop {
            let lines = store
                .logs(id, args.task.as_deref(), after, LOG_PAGE_LINES)
                .map_err(usage)?;
            let Some(last) = lines.last() else {
                break;
            };
            after = last.seq;
            let mut out = String::new();
            for l in &lines {
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
