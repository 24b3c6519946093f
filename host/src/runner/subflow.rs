//! A code flow's subflows: the task run standing for a subflow in its parent's flow run is
//! carried out by running the subflow as a child flow run of its own (recorded like any run,
//! its context naming the parent flow run and task run), on the same runner and store; the
//! child's end becomes the standing task run's outcome (Completed: the child's result is its
//! output; a failure fails it, naming the child run; a cancel cancels it; a crash crashes it).
//! Cancelling the parent cancels the child. When the parent is resumed and the standing task
//! run runs again, the child run its earlier attempt started (the store finds it by the task
//! run) is not started anew: a Completed one stands as it ended, another is resumed, its
//! completed task runs kept.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures_util::FutureExt as _;
use serde_json::Value;

use super::executor::Finished;
use super::machine::Attempt;
use super::{FlowRun, FlowRunner, PrepareError, PreparedFlow, RunOptions};
use crate::flow::SubflowDef;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::sandbox::{
    CancelToken, Ending, LogLevel, LogRecord, LogSource, RunOutcome, Signal, Usage,
};
use crate::state::StateType;
use crate::store::StoreError;

/// The context key naming a child flow run's parent flow run.
pub const PARENT_FLOW_RUN: &str = "parent_flow_run_id";
/// The context key naming the task run that stands for a child flow run in its parent.
pub const PARENT_TASK_RUN: &str = "parent_task_run_id";

/// Run `attempt` (a task run of subflow `sub`, its input the parameters) as a child flow run of
/// `child`; the parent's `cancel` cancels it. Boxed, so that a run may run runs.
pub(super) fn run(
    parent: &FlowRunner,
    (child, sub): (Arc<PreparedFlow>, Arc<SubflowDef>),
    attempt: Attempt,
    cancel: CancelToken,
) -> Pin<Box<dyn Future<Output = Finished> + Send>> {
    // The child's state changes are its own run's, not the parent's to report.
    let mut runner = parent.clone();
    runner.events = None;
    let unit = attempt.unit;
    let run = AssertUnwindSafe(run_child(runner, (child, sub), attempt, cancel));
    Box::pin(async move {
        // A panic in the child's run still answers for the task run standing for it.
        run.catch_unwind().await.unwrap_or_else(|_| Finished {
            unit,
            outcome: RunOutcome {
                ending: Ending::HostFault {
                    message: "the subflow's run failed in the host: it panicked".into(),
                },
                logs: Vec::new(),
                logs_dropped_bytes: 0,
                usage: Usage::default(),
            },
        })
    })
}

async fn run_child(
    runner: FlowRunner,
    (child, sub): (Arc<PreparedFlow>, Arc<SubflowDef>),
    attempt: Attempt,
    cancel: CancelToken,
) -> Finished {
    let began = Instant::now();
    let unit = attempt.unit;
    let name = attempt.ctx.task_name.clone();
    let (ending, logs) = match parameters(&attempt.input) {
        Err(why) => (fail(format!("subflow `{name}`: {why}")), Vec::new()),
        Ok(parameters) => {
            let own = CancelToken::new();
            let standing = (attempt.ctx.flow_run_id, attempt.ctx.task_run_id);
            let options = RunOptions {
                parameters,
                parent: Some(standing),
                cancel: own.clone(),
                manifest: Some((sub.manifest.clone(), sub.text.clone())),
                ..RunOptions::default()
            };
            let child_run = async {
                match earlier_child(&runner, &child, standing).await? {
                    Some(run) if run.state.state_type() == StateType::Completed => Ok(run),
                    Some(run) => runner.resume(&child, run, &[], own.clone()).await,
                    None => runner.run(&child, options).await,
                }
            };
            tokio::pin!(child_run);
            let ran = tokio::select! {
                ran = &mut child_run => ran,
                () = cancel.cancelled() => {
                    own.cancel();
                    child_run.await
                }
            };
            match ran {
                Ok(run) => ended(&name, &run, runner.clock.now()),
                Err(e) => (
                    fail(format!("subflow `{name}` could not run: {e}")),
                    Vec::new(),
                ),
            }
        }
    };
    Finished {
        unit,
        outcome: RunOutcome {
            ending,
            logs,
            logs_dropped_bytes: 0,
            usage: Usage {
                duration: began.elapsed(),
                ..Usage::default()
            },
        },
    }
}

/// The child flow run an earlier attempt of task run `standing` (of its flow run) started (its
/// parent resumed), ready to resume (a run recorded without its task runs gets them), if there
/// is one: a run of the subflow's flow whose context names both.
async fn earlier_child(
    runner: &FlowRunner,
    child: &PreparedFlow,
    (parent, standing): (FlowRunId, TaskRunId),
) -> Result<Option<FlowRun>, PrepareError> {
    let Some(store) = runner.store.clone() else {
        return Ok(None);
    };
    let read = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let Some(id) = store.child_run(standing)? else {
            return Ok(None);
        };
        let stored = store.load_run(id)?;
        let problems = (!stored.problems.is_empty()).then(|| {
            let lines: Vec<String> = stored.problems.iter().map(ToString::to_string).collect();
            lines.join("; ")
        });
        Ok(Some((stored.run, problems)))
    });
    let found = read
        .await
        .map_err(|e| StoreError::io("child run lookup", e))??;
    let parent = parent.to_string();
    match found {
        None => Ok(None),
        Some((run, _))
            if run.flow != child.def.name || run.context.get(PARENT_FLOW_RUN) != Some(&parent) =>
        {
            Ok(None)
        }
        Some((run, Some(problems))) => Err(PrepareError::RecordMismatch {
            flow: child.def.name.clone(),
            detail: format!(
                "its earlier child run {} cannot be resumed: the store lost part of it: {problems}",
                run.id
            ),
        }),
        Some((mut run, None)) => {
            super::resumable::fill_missing_tasks(&mut run, &child.def, runner.clock.now());
            Ok(Some(run))
        }
    }
}

/// The parameters a body gave: a JSON object.
fn parameters(input: &Json) -> Result<BTreeMap<String, Value>, String> {
    serde_json::from_str(input.as_str())
        .map_err(|e| format!("its parameters are not a JSON object: {e}"))
}

fn fail(message: String) -> Ending {
    Ending::Signal(Signal::Fail { message })
}

/// How the standing task run ends when child flow run `run` ended, and the line it logs (at
/// `now`). A child that paused fails it: a code flow's task runs cannot pause.
fn ended(name: &str, run: &FlowRun, now: DateTime<Utc>) -> (Ending, Vec<LogRecord>) {
    let state = &run.state;
    let said = match &state.message {
        Some(m) => format!(
            "subflow run {} of `{name}` ended {}: {m}",
            run.id, state.name
        ),
        None => format!("subflow run {} of `{name}` ended {}", run.id, state.name),
    };
    let (ending, level) = match state.state_type() {
        StateType::Completed => (
            Ending::Output(state.result.clone().unwrap_or_else(Json::null)),
            LogLevel::Info,
        ),
        StateType::Cancelled => (Ending::Cancelled, LogLevel::Warn),
        StateType::Crashed => (
            Ending::HostFault {
                message: said.clone(),
            },
            LogLevel::Error,
        ),
        _ => (fail(said.clone()), LogLevel::Error),
    };
    let log = LogRecord {
        time: now,
        source: LogSource::Sluice,
        level,
        message: said,
    };
    (ending, vec![log])
}
