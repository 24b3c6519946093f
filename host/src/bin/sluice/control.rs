//! Controlling stored runs from any process: `sluice resume` continues a Paused, Failed,
//! Cancelled or Crashed run from the store; `sluice cancel` stops a live run (its process notices
//! within a poll interval) or records a run nobody runs as Cancelled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use sluice::flow::manifest;
use sluice::runner::resumable;
use sluice::store::{CancelOutcome, Store};

use crate::history::open_recovered;
use crate::run::Session;
use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct ResumeArgs {
    /// The flow run's id (or a unique prefix of it).
    pub(crate) run: String,
    /// Run this task as a root, without its trigger check (repeatable); e.g. a `manual_only`
    /// task that paused the run.
    #[arg(long = "start", value_name = "TASK")]
    pub(crate) start: Vec<String>,
    /// Print the flow run record as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    grants: crate::GrantArgs,
}

#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// The flow run's id (or a unique prefix of it).
    pub(crate) run: String,
    /// How long to wait for a live run to record Cancelled.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    wait: Duration,
}

pub(crate) async fn resume(
    home: &Path,
    sandbox: &crate::SandboxArgs,
    args: ResumeArgs,
) -> Result<ExitCode, UsageError> {
    let store = open_recovered(home, false)?;
    let id = store.resolve_run(&args.run).map_err(usage)?;
    if store.is_live(id) {
        return Err(UsageError(anyhow!(
            "flow run {id} is live in another process; cancel it first (`sluice cancel {id}`)"
        )));
    }
    let stored = store.load_run(id).map_err(usage)?;
    let (path, text) = resumable::check(&stored, &args.start).map_err(usage)?;
    // The flow as it was defined when the run started (the recorded text), with component paths
    // resolved against the manifest's directory.
    let policy = args.grants.policy(home)?;
    let def = manifest::parse_with(&path, &text, policy.as_ref())
        .map_err(|e| usage(anyhow!("{e} (recorded manifest)")))?;
    let secrets = args.grants.secrets()?;
    let mut stored = stored;
    resumable::fill_missing_tasks(&mut stored.run, &def, chrono::Utc::now());
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    drop(store);
    let session = Session::open(home, sandbox, secrets)?;
    let flow = session.runner.prepare(def, &dir).await.map_err(usage)?;
    let starts = args.start;
    session
        .drive(
            flow.def().tasks.len(),
            args.json,
            move |runner, cancel| async move {
                let starts: Vec<&str> = starts.iter().map(String::as_str).collect();
                runner.resume(&flow, stored.run, &starts, cancel).await
            },
        )
        .await
}

pub(crate) async fn cancel(home: &Path, args: &CancelArgs) -> Result<ExitCode, UsageError> {
    let store = open_recovered(home, false)?;
    let id = store.resolve_run(&args.run).map_err(usage)?;
    match store.cancel(id, chrono::Utc::now()).map_err(usage)? {
        CancelOutcome::AlreadyFinished(state) => {
            crate::print_stdout(&format!("flow run {id} already ended {state}\n"));
            Ok(ExitCode::SUCCESS)
        }
        CancelOutcome::Cancelled => {
            crate::print_stdout(&format!(
                "flow run {id} was not running in any process; recorded Cancelled\n"
            ));
            Ok(ExitCode::SUCCESS)
        }
        CancelOutcome::Requested => {
            eprintln!("cancel requested; waiting for flow run {id} to stop…");
            let deadline = Instant::now() + args.wait;
            while store.is_live(id) {
                if Instant::now() >= deadline {
                    return Err(UsageError(anyhow!(
                        "flow run {id} did not stop within {}; it will when its process next checks",
                        humantime::format_duration(args.wait)
                    )));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let state = store.load_run(id).map_err(usage)?.run.state;
            crate::print_stdout(&format!(
                "flow run {id}: {} — {}\n",
                state.name,
                state.message.unwrap_or_default()
            ));
            Ok(ExitCode::SUCCESS)
        }
    }
}
