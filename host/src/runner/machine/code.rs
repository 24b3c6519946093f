//! Flows written as code: the body's submissions become task runs (nodes made from a declared
//! task, its template, with the body's input, trigger and the submissions they wait for as
//! upstream tasks), each within the flow's `max_task_runs`; what the body may see of them (a
//! state, with the output while the body holds the handle); releasing a handle; and the flow
//! run's state from how the body ended (Prefect 2's final state determination).

use super::*;
use crate::flow::Hint;

/// The task name a code flow's body's logs are stored under (no declared task can be named
/// so).
pub const BODY_LOG_NAME: &str = "(flow body)";

/// Why a body's submission was refused; the body sees the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The flow declares no such task: a body runs only what the manifest declares.
    #[error("the flow declares no task `{name}`{hint}")]
    UnknownTask {
        /// The name the body gave.
        name: String,
        /// A did-you-mean.
        hint: Hint,
    },
    /// Not a trigger a submission can take.
    #[error(
        "unknown trigger `{0}`: a submission takes all_successful, all_failed, any_successful, \
         any_failed or all_finished"
    )]
    UnknownTrigger(String),
    /// The flow run's task-run limit.
    #[error(
        "submitting {asked} more task runs would make {would} in this flow run, more than the \
         flow's max_task_runs of {limit}"
    )]
    TooMany {
        /// How many this submission asked for.
        asked: usize,
        /// How many the run would have.
        would: usize,
        /// The limit.
        limit: usize,
    },
    /// The run is being cancelled: nothing new starts.
    #[error("the flow run is being cancelled: nothing new is submitted")]
    Cancelled,
    /// A handle that names no task run of this flow run.
    #[error("no task run {0} was submitted in this flow run")]
    UnknownSubmission(usize),
    /// The flow is a DAG, not code.
    #[error("flow `{0}` is not written as code: its tasks are not submitted by a body")]
    NotCode(String),
}

impl FlowMachine {
    /// The unit's map index: a mapped child's, or the element of a code flow's map it runs.
    pub(super) fn map_index(&self, unit: Unit) -> Option<u32> {
        unit.child.or(self.run.tasks[unit.task].map_index)
    }

    /// Submit task runs of the declared task `task`, one per input (`mapped`: a map, each with
    /// its map index), starting once every one of `wait_for` (earlier submissions, by index)
    /// is final; their states feed `trigger`, or the task's own. All or nothing: a refused
    /// submission creates nothing. Returns each task run's index and id.
    pub fn submit(
        &mut self,
        task: &str,
        inputs: Vec<Json>,
        mapped: bool,
        wait_for: &[usize],
        trigger: Option<&str>,
    ) -> Result<Vec<(usize, TaskRunId)>, SubmitError> {
        if self.def.body.is_none() {
            return Err(SubmitError::NotCode(self.def.name.clone()));
        }
        if self.cancelled {
            return Err(SubmitError::Cancelled);
        }
        let Some(&template) = self.index.get(task) else {
            return Err(SubmitError::UnknownTask {
                name: task.to_owned(),
                hint: Hint::closest(task, self.def.tasks.iter().map(|t| t.name.as_str())),
            });
        };
        let trigger = match trigger {
            None => None,
            Some(name) => Some(
                Trigger::ALL
                    .into_iter()
                    .find(|t| t.as_str() == name && *t != Trigger::ManualOnly)
                    .ok_or_else(|| SubmitError::UnknownTrigger(name.to_owned()))?,
            ),
        };
        let limit = self.def.max_task_runs;
        let would = self.nodes.len().saturating_add(inputs.len());
        if would > limit {
            return Err(SubmitError::TooMany {
                asked: inputs.len(),
                would,
                limit,
            });
        }
        let mut upstream: Edges = wait_for.iter().copied().collect();
        upstream.sort_unstable();
        upstream.dedup();
        if let Some(&bad) = upstream.iter().find(|&&u| u >= self.nodes.len()) {
            return Err(SubmitError::UnknownSubmission(bad));
        }
        let waiting_on = upstream
            .iter()
            .filter(|&&u| !self.run.tasks[u].state.is_terminal())
            .count();
        let now = self.now();
        let def = self.def.clone();
        let name = &def.tasks[template].name;
        let mut submitted = Vec::with_capacity(inputs.len());
        for (k, input) in inputs.into_iter().enumerate() {
            let i = self.nodes.len();
            for &u in &upstream {
                self.nodes[u].downstream.push(i);
            }
            let map_index = mapped.then(|| u32::try_from(k).unwrap_or(u32::MAX));
            let mut rec = TaskRun::new(name, map_index, now);
            rec.cached_input = Some(input.clone());
            submitted.push((i, rec.id));
            self.run.tasks.push(rec);
            self.nodes.push(Node {
                template,
                trigger,
                upstream: upstream.clone(),
                waiting_on,
                // The body's handle: the output is held until it is released.
                consumers_left: 1,
                input: Some(input),
                ..Node::default()
            });
            let unit = Unit::task(i);
            // Recorded Pending at once, with its whole history.
            self.unwritten.insert(unit);
            self.persist(unit, None);
            self.emit(|| FlowEvent::Task {
                name: name.clone(),
                map_index,
                state: StateName::Pending,
            });
        }
        if waiting_on == 0 {
            // A stack: the first submitted is evaluated first.
            self.wake.extend(submitted.iter().rev().map(|&(i, _)| i));
        }
        self.settle();
        Ok(submitted)
    }

    /// The body dropped its handle of task run `i`: its output is not kept for the body (once
    /// it completes, if it has not yet).
    pub fn release(&mut self, i: usize) {
        if i < self.nodes.len() && self.def.body.is_some() {
            self.release_one(i);
        }
    }

    /// Task run `i`'s state as the body sees it: a Completed-type state carries the output.
    pub fn state_of(&self, i: usize) -> Option<State> {
        let rec = self.run.tasks.get(i)?;
        let mut state = rec.state.clone();
        if state.state_type() == StateType::Completed {
            state.result = self.nodes[i].output.clone();
        }
        Some(state)
    }

    /// What a code flow's body sees of its context: the run's, under the body's own id.
    pub fn body_context(&self) -> TaskContext {
        TaskContext {
            flow_run_id: self.run.id,
            task_run_id: TaskRunId::of_body(self.run.id),
            task_name: Arc::from(BODY_LOG_NAME),
            attempt: 1,
            map_index: None,
            parameters: self.parameters.clone(),
            values: self.context.clone(),
        }
    }

    /// Whether task run `i` is final (an index that names none is, so nobody waits for it).
    pub fn is_final(&self, i: usize) -> bool {
        self.run.tasks.get(i).is_none_or(|t| t.state.is_terminal())
    }

    /// A code flow's body ended in `state` (what its run's ending maps to), having logged
    /// `logs`: the flow run ends by it once its task runs are final.
    pub fn body_ended(&mut self, state: State, logs: Vec<LogRecord>) {
        self.add_logs(None, logs);
        self.body = Some(state);
    }

    /// A code flow's final state once its task runs are final (Prefect 2): what the body
    /// raised; a value it returned (Completed, carrying it); or, when it returned nothing, what
    /// its task runs did (Failed if any failed or crashed, Cancelled if any was cancelled).
    pub(super) fn code_final_state(&self, now: DateTime<Utc>) -> State {
        let Some(body) = &self.body else {
            return State::new(StateName::Crashed, now)
                .with_message("the flow body did not end before the flow run did");
        };
        if body.state_type() != StateType::Completed {
            let mut state = body.clone();
            state.timestamp = now;
            state.message = Some(format!(
                "the flow body ended {}{}",
                body.name,
                body.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
            return state;
        }
        if let Some(value) = body.result.as_ref().filter(|v| **v != Json::null()) {
            return State::new(StateName::Completed, now)
                .with_message("the flow body returned a value")
                .with_result(value.clone());
        }
        let names = |ty: &[StateType]| -> Vec<String> {
            let mut names: Vec<String> = Vec::new();
            for (i, t) in self.run.tasks.iter().enumerate() {
                if !ty.contains(&t.state.state_type()) {
                    continue;
                }
                if names.len() == 5 {
                    names.push("…".into());
                    break;
                }
                {
                    names.push(match t.map_index {
                        Some(k) => format!("{} #{i} [{k}]", t.name),
                        None => format!("{} #{i}", t.name),
                    });
                }
            }
            names
        };
        let failed = names(&[StateType::Failed, StateType::Crashed]);
        if !failed.is_empty() {
            return State::new(StateName::Failed, now).with_message(format!(
                "the flow body returned nothing and task runs did not succeed: {}",
                failed.join(", ")
            ));
        }
        let cancelled = names(&[StateType::Cancelled]);
        if !cancelled.is_empty() {
            return State::new(StateName::Cancelled, now).with_message(format!(
                "the flow body returned nothing and task runs were cancelled: {}",
                cancelled.join(", ")
            ));
        }
        State::new(StateName::Completed, now).with_message(format!(
            "the flow body returned nothing and its {} task runs succeeded",
            self.run.tasks.len()
        ))
    }
}
