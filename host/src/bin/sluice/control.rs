//! Controlling stored runs from any process: `sluice resume` continues a Paused, Failed,
//! Cancelled or Crashed run from the store; `sluice cancel` stops a live run (its process notices
//! within a poll interval) or records a run nobody runs as Cancelled.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use sluice::flow::manifest;
use sluice::runner::TaskRun;
use sluice::state::StateType;
use sluice::store::{CancelOutcome, Store};

use crate::history::open_recovered;
use crate::run::Session;
use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct ResumeArgs {
    /// The flow run's id (or a unique prefix of it).
    run: String,
    /// Run this task as a root, without its trigger check (repeatable); e.g. a `manual_only`
    /// task that paused the run.
    #[arg(long = "start", value_name = "TASK")]
    start: Vec<String>,
    /// Print the flow run record as JSON.
    #[arg(long)]
    json: bool,
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
    if stored.run.state.state_type() == StateType::Completed {
        return Err(UsageError(anyhow!(
            "flow run {id} is already {}; nothing to resume (start a new run with `sluice run`)",
            stored.run.state.name
        )));
    }
    for s in &args.start {
        if let Some(t) = stored.run.task(s)
            && t.state.state_type() == StateType::Completed
        {
            return Err(UsageError(anyhow!(
                "task `{s}` already ended {} in flow run {id}; --start is for tasks that did not complete",
                t.state.name
            )));
        }
    }
    if !stored.problems.is_empty() {
        let list: Vec<String> = stored.problems.iter().map(|p| format!("  {p}")).collect();
        return Err(UsageError(anyhow!(
            "flow run {id} cannot be resumed: the store lost part of it; nothing was changed\n{}",
            list.join("\n")
        )));
    }
    let Some((path, text)) = stored.manifest.clone() else {
        return Err(UsageError(anyhow!(
            "flow run {id} was not started from a manifest, so this process cannot rebuild its flow"
        )));
    };
    // The flow as it was defined when the run started (the recorded text), with component paths
    // resolved against the manifest's directory.
    let policy = args.grants.policy(home)?;
    let def = manifest::parse_with(&path, &text, policy.as_ref())
        .map_err(|e| usage(anyhow!("{e} (recorded manifest)")))?;
    let secrets = args.grants.secrets()?;
    let mut stored = stored;
    if stored.run.tasks.is_empty() && stored.run.flow == def.name {
        // A run recorded without its task runs (a process killed between the two writes, by a
        // Sluice that did not write them together): none of them started; start them all.
        let now = chrono::Utc::now();
        stored.run.tasks = def
            .tasks
            .iter()
            .map(|t| TaskRun::new(&t.name, None, now))
            .collect();
    }
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
