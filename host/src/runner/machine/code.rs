//! Flows written as code: the body's submissions become task runs (nodes made from a declared
//! task, its template, with the body's input, trigger and the submissions they wait for as
//! upstream tasks), each within the flow's `max_task_runs`; what the body may see of them (a
//! state, with the output while the body holds the handle); releasing a handle; the flow run's
//! state from how the body ended (Prefect 2's final state determination); and the journal.
//!
//! Durability by replay: every submission and every value the body observes that could differ
//! on another execution (a state without waiting, which of several finished first, the time)
//! is a [`JournalEntry`], written to the store. A resumed run runs its body again from the
//! start; each call is matched against the next entry and answered from it, and the task runs
//! recorded before are taken back by the submissions that made them: those that finished keep
//! their state and output and do not run again, the others (and those whose process died)
//! run. A call that does not match its entry makes the run fail, naming the entry: the body is
//! not deterministic.

use super::*;
use crate::flow::Hint;
use crate::runner::JournalEntry;

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
    /// The flow declares no such subflow.
    #[error("the flow declares no subflow `{name}`{hint}")]
    UnknownSubflow {
        /// The name the body gave.
        name: String,
        /// A did-you-mean.
        hint: Hint,
    },
    /// A subflow's parameters are not a JSON object.
    #[error("the parameters of subflow `{0}` must be a JSON object of parameter names and values")]
    SubflowParameters(String),
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
    /// The body already ended (a call that was on its way).
    #[error("the flow body has ended")]
    BodyEnded,
    /// The flow run's limit on what its task runs wait for, summed.
    #[error(
        "this submission would make its task runs wait for {would} task runs in all in this \
         flow run, more than the limit of {MAX_WAIT_EDGES} (each of a map's task runs waits for \
         every one of `wait_for`)"
    )]
    TooManyWaits {
        /// The sum the run would reach.
        would: usize,
    },
    /// A handle that names no task run of this flow run.
    #[error("no task run {0} was submitted in this flow run")]
    UnknownSubmission(usize),
    /// The flow is a DAG, not code.
    #[error("flow `{0}` is not written as code: its tasks are not submitted by a body")]
    NotCode(String),
    /// The body diverged from its journal.
    #[error("{0}")]
    Diverged(String),
    /// Refused before, as the journal says (a resumed run answers the same).
    #[error("{0}")]
    Journaled(String),
}

/// A resumed code flow's journal as its body replays it.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// The entries recorded before, without `Replayed` marks.
    entries: Vec<JournalEntry>,
    /// The next entry a call must match.
    next: usize,
    /// The task runs recorded before, by index: taken back as the body submits them again.
    tasks: Vec<Option<TaskRun>>,
    /// Whether the replay's end was marked in the journal.
    marked: bool,
    /// Why the body is not deterministic, once it diverged.
    diverged: Option<String>,
}

impl Replay {
    /// The replay of `run`'s journal, taking its task runs (a fresh run: nothing to replay).
    pub(super) fn of(run: &mut FlowRun) -> Self {
        Self {
            entries: run
                .journal
                .iter()
                .filter(|e| !matches!(e, JournalEntry::Replayed { .. }))
                .cloned()
                .collect(),
            tasks: std::mem::take(&mut run.tasks)
                .into_iter()
                .map(Some)
                .collect(),
            ..Self::default()
        }
    }
}

/// How an entry reads in a divergence message.
fn describe(e: &JournalEntry) -> String {
    match e {
        JournalEntry::Submit {
            task,
            count,
            mapped,
            ..
        } => match mapped {
            true => format!("a map of {count} task runs of `{task}`"),
            false => format!("a task run of `{task}`"),
        },
        JournalEntry::Refused { task, .. } => format!("a refused submission of `{task}`"),
        JournalEntry::State { of, .. } => format!("the state of task run #{of}"),
        JournalEntry::WaitAny { all, .. } => format!("wait_any of {} task runs", all.len()),
        JournalEntry::Now { .. } => "now()".into(),
        JournalEntry::Replayed { .. } => "the end of a replay".into(),
    }
}

/// What a body submits: task runs of the declared task `task`, one per input (a map, each
/// with its map index, when `mapped`), waiting for the task runs `wait_for` (by index), with
/// `trigger` instead of the task's own.
#[derive(Debug)]
pub struct Submission<'a> {
    /// The declared task.
    pub task: &'a str,
    /// One input per task run.
    pub inputs: Vec<Json>,
    /// A map.
    pub mapped: bool,
    /// What they wait for.
    pub wait_for: &'a [usize],
    /// Their trigger.
    pub trigger: Option<&'a str>,
    /// `task` names a subflow (a child flow run, its input the parameters), not a task.
    pub subflow: bool,
}

/// The most `wait_for` entries a code flow run's task runs may have, summed over all of them
/// (each costs an edge both ways): 1,000,000.
pub const MAX_WAIT_EDGES: usize = 1_000_000;

impl FlowMachine {
    /// The unit's map index: a mapped child's, or the element of a code flow's map it runs.
    pub(super) fn map_index(&self, unit: Unit) -> Option<u32> {
        unit.child.or(self.run.tasks[unit.task].map_index)
    }

    /// Submit task runs of the declared task `task`, one per input (`mapped`: a map, each with
    /// its map index), starting once every one of `wait_for` (earlier submissions, by index)
    /// is final; their states feed `trigger`, or the task's own. All or nothing: a refused
    /// submission creates nothing. Returns each task run's index and id. Journaled (a resumed
    /// run: matched against the journal, taking back the task runs it recorded).
    pub fn submit(&mut self, s: Submission<'_>) -> Result<Vec<(usize, TaskRunId)>, SubmitError> {
        let digest = {
            let mut h = blake3::Hasher::new();
            for i in &s.inputs {
                h.update(i.as_str().as_bytes());
                h.update(b"\n");
            }
            h.finalize().to_hex().to_string()
        };
        let call = JournalEntry::Submit {
            task: s.task.to_owned(),
            count: s.inputs.len(),
            mapped: s.mapped,
            inputs: digest,
            wait_for: s.wait_for.to_vec(),
            trigger: s.trigger.map(str::to_owned),
            first: self.nodes.len(),
            subflow: s.subflow,
        };
        if let Some(why) = &self.replay.diverged {
            return Err(SubmitError::Diverged(why.clone()));
        }
        let live = match self.replayed() {
            Some(JournalEntry::Refused { task, why }) if task == s.task => {
                return Err(SubmitError::Journaled(why));
            }
            Some(entry) if entry != call => return Err(self.diverge(&call, &entry)),
            Some(_) => false,
            None => true,
        };
        let task = s.task;
        let made = self.submit_checked(s);
        match &made {
            Ok(_) if live => self.journal(call),
            Err(e) if live => self.journal(JournalEntry::Refused {
                task: task.to_owned(),
                why: e.to_string(),
            }),
            _ => {}
        }
        made
    }

    /// The next entry of the journal being replayed, consumed (`None`: the body runs live; the
    /// first time, the end of the replay is marked).
    fn replayed(&mut self) -> Option<JournalEntry> {
        if let Some(e) = self.replay.entries.get(self.replay.next) {
            self.replay.next += 1;
            return Some(e.clone());
        }
        if !self.replay.marked && !self.replay.entries.is_empty() {
            self.replay.marked = true;
            let calls = self.replay.entries.len();
            self.journal(JournalEntry::Replayed { calls });
        }
        None
    }

    /// Record `entry` in the journal (and the store).
    fn journal(&mut self, entry: JournalEntry) {
        let seq = self.run.journal.len() as u64;
        let run = self.run.id;
        if self.settings.record {
            let text = serde_json::to_string(&entry).unwrap_or_default();
            self.commands.push_back(Command::Write(Write::Journal {
                run,
                seq,
                entry: text,
            }));
        }
        self.run.journal.push(entry);
    }

    /// The body's call `call` does not match the journal's `entry`: it is not deterministic.
    fn diverge(&mut self, call: &JournalEntry, entry: &JournalEntry) -> SubmitError {
        let why = format!(
            "the flow body is not deterministic: its call #{} was {}, but the journal of the run \
             it resumes has {} there",
            self.replay.next.saturating_sub(1),
            describe(call),
            describe(entry)
        );
        self.replay.diverged.get_or_insert(why.clone());
        SubmitError::Diverged(why)
    }

    fn submit_checked(
        &mut self,
        s: Submission<'_>,
    ) -> Result<Vec<(usize, TaskRunId)>, SubmitError> {
        let Submission {
            task,
            inputs,
            mapped,
            wait_for,
            trigger,
            subflow,
        } = s;
        if self.def.body.is_none() {
            return Err(SubmitError::NotCode(self.def.name.clone()));
        }
        if self.cancelled {
            return Err(SubmitError::Cancelled);
        }
        if self.body.is_some() {
            return Err(SubmitError::BodyEnded);
        }
        let kind = |t: &&crate::flow::TaskDef| t.subflow.is_some() == subflow;
        let template = match self.index.get(task) {
            Some(&t) if kind(&&self.def.tasks[t]) => t,
            _ => {
                let name = task.to_owned();
                let names = self.def.tasks.iter().filter(kind).map(|t| t.name.as_str());
                let hint = Hint::closest(task, names);
                return Err(match subflow {
                    true => SubmitError::UnknownSubflow { name, hint },
                    false => SubmitError::UnknownTask { name, hint },
                });
            }
        };
        if subflow
            && !inputs
                .iter()
                .all(|p| p.as_str().trim_start().starts_with('{'))
        {
            return Err(SubmitError::SubflowParameters(task.to_owned()));
        }
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
        let edges = self
            .wait_edges
            .saturating_add(upstream.len().saturating_mul(inputs.len()));
        if edges > MAX_WAIT_EDGES {
            return Err(SubmitError::TooManyWaits { would: edges });
        }
        self.wait_edges = edges;
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
            let mut node = Node {
                template,
                trigger,
                upstream: upstream.clone(),
                waiting_on,
                // The body's handle: the output is held until it is released.
                consumers_left: 1,
                ..Node::default()
            };
            // A resumed run takes back the task run this submission made before: finished,
            // it keeps its state and output; else (or its process died) it runs again.
            let before = self
                .replay
                .tasks
                .get_mut(i)
                .and_then(Option::take)
                .filter(|r| r.name == *name && r.map_index == map_index);
            let (rec, fresh) = match before {
                Some(mut rec)
                    if rec.state.is_terminal() && rec.state.name != StateName::Crashed =>
                {
                    node.evaluated = true;
                    if rec.state.state_type() == StateType::Completed {
                        node.output = rec.output.take();
                    }
                    (rec, false)
                }
                Some(mut rec) => {
                    node.base_attempts = match self.settings.keep_retry_budget {
                        true => 0,
                        false => rec.attempts,
                    };
                    reset_to_pending(&mut rec, now);
                    rec.cached_input = Some(input.clone());
                    node.input = Some(input);
                    (rec, false)
                }
                None => {
                    let mut rec = TaskRun::new(name, map_index, now);
                    rec.cached_input = Some(input.clone());
                    node.input = Some(input);
                    (rec, true)
                }
            };
            let state = rec.state.name;
            let settled = node.evaluated;
            submitted.push((i, rec.id));
            self.run.tasks.push(rec);
            self.nodes.push(node);
            let unit = Unit::task(i);
            if fresh {
                // Recorded Pending at once, with its whole history.
                self.unwritten.insert(unit);
            }
            if fresh || !settled {
                self.persist(unit, None);
            }
            self.emit(|| FlowEvent::Task {
                name: name.clone(),
                map_index,
                state,
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

    /// `get-state` of task run `i`: its state now (a Completed-type state carries the
    /// output), journaled; a resumed run answers what the journal says.
    pub fn observe_state(&mut self, i: usize) -> Option<State> {
        let live = self.state_of(i)?;
        let call = JournalEntry::State {
            of: i,
            state: live.name,
        };
        match self.replayed() {
            Some(JournalEntry::State { of, state }) if of == i => {
                let mut s = State::new(state, live.timestamp);
                if state == live.name {
                    s = live;
                } else if state.state_type() == StateType::Completed {
                    s.result = live.result;
                }
                Some(s)
            }
            Some(entry) => {
                self.diverge(&call, &entry);
                Some(live)
            }
            None => {
                self.journal(call);
                Some(live)
            }
        }
    }

    /// `wait-any` of `all`: the journal's answer when replaying (`Some`), else `None` and the
    /// answer is journaled with [`FlowMachine::answered_any`].
    pub fn replay_any(&mut self, all: &[usize]) -> Option<usize> {
        let call = JournalEntry::WaitAny {
            all: all.to_vec(),
            index: 0,
        };
        match self.replayed() {
            Some(JournalEntry::WaitAny { all: a, index }) if a == all => Some(index),
            Some(entry) => {
                self.diverge(&call, &entry);
                None
            }
            None => None,
        }
    }

    /// A live `wait-any` of `all` was answered `index`.
    pub fn answered_any(&mut self, all: Vec<usize>, index: usize) {
        if self.replay.diverged.is_none() {
            self.journal(JournalEntry::WaitAny { all, index });
        }
    }

    /// `now`: the time `now`, journaled; a resumed run answers the journal's.
    pub fn observe_now(&mut self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self.replayed() {
            Some(JournalEntry::Now { at }) => at,
            Some(entry) => {
                self.diverge(&JournalEntry::Now { at: now }, &entry);
                now
            }
            None => {
                self.journal(JournalEntry::Now { at: now });
                now
            }
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
        let (made, recorded) = (self.replay.next, self.replay.entries.len());
        if made < recorded && self.replay.diverged.is_none() {
            self.replay.diverged = Some(format!(
                "the flow body is not deterministic: it ended after {made} calls, but the journal \
                 of the run it resumes has {recorded}"
            ));
        }
        self.body = Some(state);
        // Its handles are gone. With a store, outputs are there; without one the record keeps
        // them.
        if self.settings.record {
            for i in 0..self.nodes.len() {
                if self.nodes[i].consumers_left > 0 {
                    self.release_one(i);
                }
            }
        }
    }

    /// A code flow's final state once its task runs are final (Prefect 2): what the body
    /// raised; a value it returned (Completed, carrying it); or, when it returned nothing, what
    /// its task runs did (Failed if any failed or crashed, Cancelled if any was cancelled).
    pub(super) fn code_final_state(&self, now: DateTime<Utc>) -> State {
        if let Some(why) = &self.replay.diverged {
            return State::new(StateName::Failed, now).with_message(why.clone());
        }
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
