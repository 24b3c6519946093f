//! Whether a stored run can be resumed (`sluice resume`, locally or on a server), and the rule
//! by which a server resumes by itself the runs it was executing when it died: a Crashed run is
//! resumed when every task run that crashed still has a retry left (attempts made ≤ its
//! `retries`); its retries then continue from the attempts made
//! ([`FlowRunner::resume_crashed`](super::FlowRunner::resume_crashed)), so a task whose attempts
//! keep killing the server runs at most `1 + retries` times, and a run that cannot be resumed
//! stays Crashed for `sluice resume`.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use super::record::{FlowRun, TaskRun};
use crate::flow::FlowDef;
use crate::ids::FlowRunId;
use crate::state::{StateName, StateType};
use crate::store::StoredRun;

/// Why a stored run cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotResumable {
    /// It completed.
    #[error(
        "flow run {run} is already {state}; nothing to resume (start a new run with `sluice run`)"
    )]
    Completed {
        /// The run.
        run: FlowRunId,
        /// Its state.
        state: StateName,
    },
    /// A start task already completed.
    #[error(
        "task `{task}` already ended {state} in flow run {run}; --start is for tasks that did \
         not complete"
    )]
    StartTaskCompleted {
        /// The run.
        run: FlowRunId,
        /// The task.
        task: String,
        /// Its state.
        state: StateName,
    },
    /// Part of its record could not be read.
    #[error(
        "flow run {run} cannot be resumed: the store lost part of it; nothing was changed\n{problems}"
    )]
    Damaged {
        /// The run.
        run: FlowRunId,
        /// What was lost, a line each.
        problems: String,
    },
    /// It was not started from a manifest.
    #[error(
        "flow run {0} was not started from a manifest, so this process cannot rebuild its flow"
    )]
    NoManifest(FlowRunId),
}

/// Check that `stored` can be resumed with `start` as start tasks; its manifest (path, text).
pub fn check(stored: &StoredRun, start: &[String]) -> Result<(PathBuf, String), NotResumable> {
    let run = stored.run.id;
    if stored.run.state.state_type() == StateType::Completed {
        return Err(NotResumable::Completed {
            run,
            state: stored.run.state.name,
        });
    }
    for s in start {
        if let Some(t) = stored.run.task(s)
            && t.state.state_type() == StateType::Completed
        {
            return Err(NotResumable::StartTaskCompleted {
                run,
                task: s.clone(),
                state: t.state.name,
            });
        }
    }
    if !stored.problems.is_empty() {
        let problems: Vec<String> = stored.problems.iter().map(|p| format!("  {p}")).collect();
        return Err(NotResumable::Damaged {
            run,
            problems: problems.join("\n"),
        });
    }
    stored.manifest.clone().ok_or(NotResumable::NoManifest(run))
}

/// A run recorded without its task runs (a process killed between the two writes, by a Sluice
/// that did not write them together): none of them started; they all start, Pending at `now`.
/// (A code flow's task runs are its body's: none is missing.)
pub fn fill_missing_tasks(run: &mut FlowRun, def: &FlowDef, now: DateTime<Utc>) {
    if run.tasks.is_empty() && run.flow == def.name && def.body.is_none() {
        run.tasks = def
            .tasks
            .iter()
            .map(|t| TaskRun::new(&t.name, None, now))
            .collect();
    }
}

/// Whether a server resumes Crashed run `run` of `def` by itself: `Err` says why not (a task run
/// that crashed on its last allowed attempt, naming it).
pub fn resumes_after_crash(run: &FlowRun, def: &FlowDef) -> Result<(), String> {
    if run.state.name != StateName::Crashed {
        return Err(format!("it is {}, not Crashed", run.state.name));
    }
    for rec in &run.tasks {
        let Some(t) = def.tasks.iter().find(|t| t.name == rec.name) else {
            continue;
        };
        for r in std::iter::once(rec).chain(&rec.children) {
            if r.state.name == StateName::Crashed && r.attempts > t.retries {
                return Err(format!(
                    "task `{}`{} crashed on attempt {} of {} (retries = {})",
                    t.name,
                    r.map_index.map_or_else(String::new, |i| format!("[{i}]")),
                    r.attempts,
                    1 + t.retries,
                    t.retries
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::flow::{FlowBuilder, TaskDef};
    use crate::state::State;

    fn crashed_run(b_attempts: u32, child: Option<u32>) -> (FlowRun, FlowDef) {
        let mut b = TaskDef::new("b", "b.wasm");
        b.retries = 1;
        let def = FlowBuilder::new("f")
            .task(TaskDef::new("a", "a.wasm"))
            .task(b)
            .build()
            .expect("flow");
        let now = DateTime::<Utc>::UNIX_EPOCH;
        let mut run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), now);
        run.state = State::new(StateName::Crashed, now);
        run.tasks[0].state = State::new(StateName::Completed, now);
        run.tasks[0].attempts = 1;
        let b = &mut run.tasks[1];
        b.state = State::new(StateName::Crashed, now);
        b.attempts = b_attempts;
        if let Some(attempts) = child {
            let mut c = TaskRun::new("b", Some(3), now);
            c.state = State::new(StateName::Crashed, now);
            c.attempts = attempts;
            b.children.push(c);
        }
        (run, def)
    }

    #[test]
    fn a_crashed_run_resumes_by_itself_only_while_its_crashed_tasks_have_retries_left() {
        let (run, def) = crashed_run(1, None);
        assert_eq!(resumes_after_crash(&run, &def), Ok(()));
        let (run, def) = crashed_run(2, None);
        assert_eq!(
            resumes_after_crash(&run, &def),
            Err("task `b` crashed on attempt 2 of 2 (retries = 1)".into())
        );
        let (run, def) = crashed_run(1, Some(2));
        assert_eq!(
            resumes_after_crash(&run, &def),
            Err("task `b`[3] crashed on attempt 2 of 2 (retries = 1)".into())
        );
        let (mut run, def) = crashed_run(1, None);
        run.state = State::new(StateName::Failed, run.state.timestamp);
        assert!(resumes_after_crash(&run, &def).is_err());
        // A task with no retries that crashed: the run stays Crashed.
        let (mut run, def) = crashed_run(1, None);
        run.tasks[0].state = State::new(StateName::Crashed, run.state.timestamp);
        assert_eq!(
            resumes_after_crash(&run, &def),
            Err("task `a` crashed on attempt 1 of 1 (retries = 0)".into())
        );
    }
}
