//! The flow state machine: given a flow definition, a run record and events (an attempt ended,
//! a retry timer fired, a cache answer or a state handler's answer arrived, cancel was
//! requested), it decides every transition and what to do next, and says so as commands (run
//! this attempt, start this timer, look this key up, run these handlers, write this record, send
//! this event). It does no I/O, owns no tokio task, and reads time only from the injected clock,
//! so the same decisions drive an embedded run, the server and remote workers, and the same
//! events replayed give the same transitions.
//!
//! Prefect's execution model lives here: triggers once every upstream task is finished, skip
//! propagation, input caching on the state, retries with their delays, mapping one child per
//! element, output caching, state handlers (closures called in place; handler components as a
//! command whose answer comes back as an event, so a slow handler holds only its own task),
//! reference tasks for the flow's state, and cancellation. Scheduling is event-driven: finishing
//! a task touches only its downstream tasks, never the whole graph, and an output is dropped as
//! soon as every task that consumes it has received it.
//!
//! A flow written as code has no graph up front: its body submits task runs ([`FlowMachine::
//! submit`]), each a node made from a declared task (its template) with the body's input and
//! the submissions it waits for as its upstream tasks, going through the same triggers,
//! retries, caching, handlers and limits. Its output is held while the body holds its handle
//! ([`FlowMachine::release`]), and the flow run ends as the body did
//! ([`FlowMachine::body_ended`]).

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use crate::ids::TenantId;
use crate::json::Json;

mod attempt;
mod code;
mod graph;
#[cfg(test)]
mod tests;
mod transition;

pub use self::code::{BODY_LOG_NAME, MAX_WAIT_EDGES, Submission, SubmitError};
use super::mapping;
use super::record::{FlowEvent, FlowRun, TaskRun, Transition};
use super::{StateHandlers, task_write};
use crate::cache::{CacheInfo, CacheKey, CacheScope, CacheStatus, TaskIdentity};
use crate::clock::ClockRef;
use crate::context::TaskContext;
use crate::flow::{FlowDef, MapOver, TaskDef, Trigger, TriggerDecision};
use crate::ids::TaskRunId;
use crate::sandbox::{Ending, LogLevel, LogRecord, LogSource, RunOutcome};
use crate::state::{Retry, State, StateName, StateType};
use crate::store::{Blob, CacheLookup, CacheWrite, Write};

/// One schedulable unit: a task (by its index in the flow), or one child of a mapped task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit {
    /// The task's index in the flow definition.
    pub task: usize,
    /// The child's map index, for a child of a mapped task.
    pub child: Option<u32>,
}

impl Unit {
    fn task(task: usize) -> Self {
        Self { task, child: None }
    }
}

/// What happened outside the machine.
#[derive(Debug)]
pub enum Event {
    /// An attempt started by [`Command::Run`] ended.
    AttemptEnded {
        /// The unit.
        unit: Unit,
        /// How it ended.
        outcome: RunOutcome,
    },
    /// The retry timer started by [`Command::Timer`] fired.
    TimerFired(Unit),
    /// The answer to [`Command::LookupCache`] (`Err`: the lookup failed, with why).
    CacheAnswered {
        /// The unit.
        unit: Unit,
        /// The answer.
        answer: Result<CacheLookup, String>,
    },
    /// The handler components of [`Command::RunHooks`] ran.
    HooksDone {
        /// The unit.
        unit: Unit,
        /// The request's sequence number.
        seq: u64,
        /// The state the last handler left.
        state: State,
        /// The handlers' logs (and a record per handler that failed), in order.
        logs: Vec<LogRecord>,
    },
    /// Stop the run: nothing new starts, running attempts are being interrupted.
    CancelRequested,
    /// The executor gave the unit a slot ([`Command::Acquire`]).
    SlotGranted(Unit),
}

/// What the machine asks its driver to do.
#[derive(Debug)]
pub enum Command {
    /// Run one attempt of a unit; answer with [`Event::AttemptEnded`].
    Run(Attempt),
    /// Answer with [`Event::TimerFired`] at `at`.
    Timer {
        /// The unit awaiting its retry.
        unit: Unit,
        /// When.
        at: DateTime<Utc>,
    },
    /// Look `key` up in the output cache; answer with [`Event::CacheAnswered`].
    LookupCache {
        /// The unit.
        unit: Unit,
        /// The key.
        key: CacheKey,
    },
    /// Run the task's handler components on a transition; answer with [`Event::HooksDone`].
    RunHooks(HookRequest),
    /// Record this in the store.
    Write(Write),
    /// Tell whoever watches.
    Event(FlowEvent),
    /// Drop every retry timer: none will be answered.
    AbortTimers,
    /// Drop every handler run in progress: none will be answered.
    AbortHooks,
    /// Ask the executor for a slot for the unit ([`Settings::acquire`]); answer with
    /// [`Event::SlotGranted`].
    Acquire(Unit),
    /// Give back the unit's executor slot unused, if it was granted one.
    Release(Unit),
    /// A code flow's task run (by its index) is final: whoever waits for it may look.
    Settled(usize),
}

/// One attempt of a unit.
#[derive(Debug)]
pub struct Attempt {
    /// The unit.
    pub unit: Unit,
    /// The declared task it runs (its index in the flow; a code flow's task run's template).
    pub template: usize,
    /// Its input.
    pub input: Json,
    /// What the task run sees of its context.
    pub ctx: TaskContext,
}

/// Which handler lists of a task apply to a transition, in the order they run: `on_state`,
/// then `on_completion`, `on_failure` or `on_retry`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookKinds {
    /// Every transition.
    pub on_state: bool,
    /// Into a Completed-type state.
    pub on_completion: bool,
    /// Into a Failed- or Crashed-type state.
    pub on_failure: bool,
    /// Into Retrying.
    pub on_retry: bool,
}

/// A transition waiting for the task's handler components.
#[derive(Debug)]
pub struct HookRequest {
    /// The unit.
    pub unit: Unit,
    /// The declared task whose handlers run.
    pub template: usize,
    /// Matches the answer to the request.
    pub seq: u64,
    /// The state before.
    pub old: State,
    /// The proposed state (after the in-process handlers).
    pub new: State,
    /// Which handler lists run.
    pub kinds: HookKinds,
    /// The task run's context.
    pub ctx: TaskContext,
}

/// How the machine is set up beside the flow and the run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Time, for every timestamp and retry.
    pub clock: ClockRef,
    /// The in-process state handlers.
    pub handlers: Arc<StateHandlers>,
    /// Whether a store records the run ([`Command::Write`]) and serves the output cache.
    pub record: bool,
    /// Whether to emit [`Command::Event`].
    pub events: bool,
    /// Per declared task, the blake3 (hex) of its component, part of its cache keys.
    pub digests: Vec<String>,
    /// Per declared task: the digests of its grants and of its granted secrets' values (empty when
    /// nothing is granted), for its cache key.
    pub grants: Vec<(String, String)>,
    /// What the logs the run kept before this execution cost (a resumed run; see
    /// `Store::log_cost`): counted against the flow's `max_log_bytes`.
    pub logs_before: u64,
    /// The server tenant the run belongs to: its cache keys are within it.
    pub tenant: Option<TenantId>,
    /// A resumed run's tasks count their retries from their first attempt, not from the
    /// resume (a crashed run resumed by the server; see `FlowRunner::resume_crashed`).
    pub keep_retry_budget: bool,
    /// Attempts wait for an executor's slot ([`Command::Acquire`]) before they are Running:
    /// the executor queues them (a server's fair queue), and a task run waiting there is
    /// Pending.
    pub acquire: bool,
}

/// What the machine tracks per task beside its record.
#[derive(Debug, Default)]
struct Node {
    /// The declared task it runs: itself in a DAG, a code flow's task run's template.
    template: usize,
    /// The trigger a code flow's body gave the task run instead of its template's.
    trigger: Option<Trigger>,
    upstream: Edges,
    downstream: Edges,
    /// Tasks whose output this task reads.
    data_upstream: Edges,
    /// Upstream tasks not finished yet.
    waiting_on: usize,
    /// Downstream tasks that have not received this task's output yet.
    consumers_left: usize,
    output: Option<Json>,
    input: Option<Json>,
    /// For a mapped task whose children are running.
    map: Option<Box<MapRun>>,
    /// The trigger was evaluated (a task is evaluated at most once per run).
    evaluated: bool,
    /// Attempts made before this run (when resuming): retries count from here.
    base_attempts: u32,
    /// Resuming: every task this one reads from had completed before, so its input is what it
    /// was, and mapped children that completed keep their outputs.
    input_unchanged: bool,
}

type Edges = smallvec::SmallVec<[usize; 2]>;

#[derive(Debug, Default)]
struct MapRun {
    children_left: usize,
    inputs: Vec<Json>,
    outputs: Vec<Option<Json>>,
    /// Attempts each child made before this run (when resuming).
    base_attempts: Vec<u32>,
}

/// What follows a transition once it is recorded.
#[derive(Debug)]
enum Then {
    /// The unit waits, paused, to be resumed by a later run.
    Wait,
    /// Nothing: the run is ending.
    End,
    /// The unit is finished: wake what waits for it.
    Finished,
    /// Run the component.
    Launch,
    /// An attempt (or a cache hit) ended: retry, hand the output on, or finish.
    Proceed {
        output: Option<Json>,
        from_cache: bool,
        guest_cancelled: bool,
    },
}

/// A transition whose handler components are running.
#[derive(Debug)]
struct Pending {
    seq: u64,
    old: State,
    /// The state after the in-process handlers (recorded as is if the run is cancelled first).
    state: State,
    /// The state before the handlers (what a replacement is checked against).
    proposed: (StateName, Option<DateTime<Utc>>),
    output: Option<Blob>,
    then: Then,
}

/// The flow state machine of one flow run. See the module documentation.
pub struct FlowMachine {
    def: Arc<FlowDef>,
    settings: Settings,
    run: FlowRun,
    nodes: Vec<Node>,
    index: HashMap<String, usize>,
    starts: HashSet<usize>,
    ready: VecDeque<Unit>,
    tag_blocked: HashMap<String, VecDeque<Unit>>,
    /// Units holding a slot: running, waiting for their cache answer, or for an executor's
    /// slot.
    running: usize,
    /// Units waiting for an executor's slot ([`Command::Acquire`]), Pending.
    awaiting: HashSet<Unit>,
    running_by_tag: HashMap<String, usize>,
    timers: usize,
    lookups: usize,
    hooks: HashMap<Unit, Pending>,
    next_seq: u64,
    /// Tasks whose upstream tasks all finished, to evaluate (a stack: depth first).
    wake: Vec<usize>,
    commands: VecDeque<Command>,
    parameters: Arc<str>,
    context: Arc<std::collections::BTreeMap<String, String>>,
    cancelled: bool,
    started: bool,
    /// Task names, shared by every record sent to the store.
    names: Vec<Arc<str>>,
    /// Cache keys of units that missed the cache: their output is cached when they complete.
    cache_keys: HashMap<Unit, CacheKey>,
    /// Mapped children created but not yet sent to the store: their first write carries their
    /// whole history.
    unwritten: HashSet<Unit>,
    /// The run's cache scope (namespace and context values), part of every cache key.
    cache_scope: CacheScope,
    /// Units whose cached output a state handler turned into a request to run again: their
    /// next start runs the component instead of looking the cache up again.
    skip_cache: HashSet<Unit>,
    /// Mapped children in the run, summed over its mapped tasks (bounded by the flow's
    /// `max_mapped_children`).
    mapped_children: usize,
    /// The run's logs against the flow's `max_log_bytes`.
    logs: LogCount,
    /// How a code flow's body ended (see [`FlowMachine::body_ended`]).
    body: Option<State>,
    /// What a code flow's task runs wait for, summed (within [`code::MAX_WAIT_EDGES`]).
    wait_edges: usize,
    /// A resumed code flow's journal, replayed.
    replay: code::Replay,
}

/// What a run logged, against the flow's `max_log_bytes`.
#[derive(Debug, Default)]
struct LogCount {
    /// What the records kept cost (message bytes plus [`LogRecord::OVERHEAD`] each).
    kept: u64,
    /// Message bytes of the records dropped.
    dropped_bytes: u64,
    /// Records dropped.
    dropped_records: u64,
    /// Who lost the first record dropped (a unit, or `None`: a code flow's body): the note of
    /// the cap goes on its record.
    first_dropped: Option<Option<Unit>>,
}

impl std::fmt::Debug for FlowMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowMachine")
            .field("run", &self.run.id)
            .field("running", &self.running)
            .field("timers", &self.timers)
            .field("lookups", &self.lookups)
            .field("hooks", &self.hooks.len())
            .finish_non_exhaustive()
    }
}

impl FlowMachine {
    /// A machine for `run` (fresh, or a record being resumed with `starts` as its start tasks)
    /// of the flow `def`. Nothing happens until [`FlowMachine::start`].
    pub fn new(def: Arc<FlowDef>, mut run: FlowRun, starts: &[usize], settings: Settings) -> Self {
        // A code flow's task runs are made again by its body's submissions (see `code`).
        let replay = match def.body {
            Some(_) => code::Replay::of(&mut run),
            None => code::Replay::default(),
        };
        let index: HashMap<String, usize> = def
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let dag = match def.body {
            None => def.tasks.len(),
            Some(_) => 0,
        };
        let mut nodes: Vec<Node> = (0..dag)
            .map(|template| Node {
                template,
                ..Node::default()
            })
            .collect();
        for (i, t) in def.tasks.iter().enumerate().take(dag) {
            for u in t.upstream() {
                let j = index[u];
                nodes[i].upstream.push(j);
                nodes[j].downstream.push(i);
            }
            let mut data: Edges = t.input.task_refs().iter().map(|u| index[*u]).collect();
            data.sort_unstable();
            data.dedup();
            for &j in &data {
                nodes[j].consumers_left += 1;
            }
            nodes[i].data_upstream = data;
        }
        let mut parameters = serde_json::Map::new();
        for (k, v) in &run.parameters {
            parameters.insert(k.clone(), v.clone());
        }
        // The user's context values (not the per-run `scheduled_start` added below) are part of
        // every cache key.
        let mut cache_scope =
            CacheScope::new(&run.flow, def.cache_namespace.as_deref(), &run.context);
        if let Some(tenant) = settings.tenant {
            cache_scope = cache_scope.within(tenant);
        }
        let mapped_children: usize = run.tasks.iter().map(|t| t.children.len()).sum();
        let mut context = run.context.clone();
        context
            .entry(crate::cache::SCHEDULED_START.into())
            .or_insert_with(|| {
                run.history
                    .first()
                    .map_or_else(|| run.state.timestamp, |h| h.time)
                    .to_rfc3339()
            });
        let names = def
            .tasks
            .iter()
            .map(|t| Arc::from(t.name.as_str()))
            .collect();
        Self {
            index,
            nodes,
            starts: starts.iter().copied().collect(),
            ready: VecDeque::new(),
            tag_blocked: HashMap::new(),
            running: 0,
            awaiting: HashSet::new(),
            running_by_tag: HashMap::new(),
            timers: 0,
            lookups: 0,
            hooks: HashMap::new(),
            next_seq: 0,
            wake: Vec::new(),
            commands: VecDeque::new(),
            parameters: Value::Object(parameters).to_string().into(),
            context: Arc::new(context),
            cancelled: false,
            started: false,
            names,
            cache_keys: HashMap::new(),
            unwritten: HashSet::new(),
            cache_scope,
            skip_cache: HashSet::new(),
            mapped_children,
            logs: LogCount {
                kept: settings.logs_before,
                ..LogCount::default()
            },
            body: None,
            wait_edges: 0,
            replay,
            run,
            def,
            settings,
        }
    }

    /// The run as recorded so far.
    pub fn run(&self) -> &FlowRun {
        &self.run
    }

    /// The next command for the driver, in the order they were decided.
    pub fn next_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Whether nothing is outstanding: no attempt, timer, cache answer or handler answer is
    /// awaited, so [`FlowMachine::finish`] may be called.
    pub fn is_idle(&self) -> bool {
        self.running == 0 && self.timers == 0 && self.lookups == 0 && self.hooks.is_empty()
    }

    /// Whether the run is being cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Begin: the flow run is Running, the record is prepared (a resumed run's unfinished tasks
    /// go back to Pending) and every task without unfinished upstream tasks is evaluated.
    pub fn start(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        self.flow_transition(State::new(StateName::Running, self.now()));
        self.restore();
        for i in (0..self.nodes.len()).rev() {
            let node = &self.nodes[i];
            if node.waiting_on == 0 && !node.evaluated && !self.run.tasks[i].state.is_terminal() {
                self.wake.push(i);
            }
        }
        self.settle();
    }

    /// Take in one event.
    pub fn handle(&mut self, event: Event) {
        match event {
            Event::AttemptEnded { unit, outcome } => self.attempt_ended(unit, outcome),
            Event::TimerFired(unit) => {
                self.timers = self.timers.saturating_sub(1);
                if !self.cancelled {
                    self.ready.push_back(unit);
                }
            }
            Event::CacheAnswered { unit, answer } => {
                self.lookups = self.lookups.saturating_sub(1);
                self.cache_answered(unit, answer);
            }
            Event::HooksDone {
                unit,
                seq,
                state,
                logs,
            } => {
                if self.hooks.get(&unit).is_some_and(|p| p.seq == seq)
                    && let Some(p) = self.hooks.remove(&unit)
                {
                    self.add_logs(Some(unit), logs);
                    self.complete_transition(unit, p.old, state, p.output, p.proposed, p.then);
                }
            }
            Event::CancelRequested => {
                if !self.cancelled {
                    self.begin_cancel();
                }
            }
            Event::SlotGranted(unit) => match self.awaiting.remove(&unit) {
                true => self.begin_attempt(unit),
                // Cancelled while it waited: the slot goes back.
                false => self.commands.push_back(Command::Release(unit)),
            },
        }
        self.settle();
    }

    /// The run is over (call when [`FlowMachine::is_idle`]): what never ran is Cancelled (when
    /// cancelled), held outputs go into the record, and the flow run's final state follows its
    /// reference tasks. Its last commands are queued; then take the record with
    /// [`FlowMachine::into_run`].
    pub fn finish(&mut self) {
        if self.cancelled {
            // Nothing will run any more: paused tasks and those waiting on them end Cancelled.
            // Paused mapped children first: their parent then ends Cancelled as a mapped run
            // that was cancelled.
            let paused: Vec<Unit> = (0..self.run.tasks.len())
                .filter(|&i| self.nodes[i].map.is_some())
                .flat_map(|i| {
                    let t = &self.run.tasks[i];
                    (0..t.children.len())
                        .filter(move |&c| !t.children[c].state.is_terminal())
                        .map(move |c| Unit {
                            task: i,
                            child: Some(c as u32),
                        })
                })
                .collect();
            for unit in paused {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled while this task was paused");
                self.transition(unit, s, None, Then::Finished);
            }
            let waiting: Vec<Unit> = (0..self.run.tasks.len())
                .filter(|&i| !self.run.tasks[i].state.is_terminal())
                .map(Unit::task)
                .collect();
            for unit in waiting {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task ran");
                self.transition(unit, s, None, Then::End);
            }
        }
        // Outputs still held go into the record (a code flow's: those whose handles the body
        // kept to its end).
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(out) = node.output.take() {
                self.run.tasks[i].output = Some(out);
            }
        }
        self.note_dropped_logs();
        let state = self.final_state();
        self.flow_transition(state);
    }

    /// The record, once finished.
    pub fn into_run(self) -> FlowRun {
        self.run
    }

    fn now(&self) -> DateTime<Utc> {
        self.settings.clock.now()
    }

    /// The declared task node `i` runs.
    fn task_def(&self, i: usize) -> &TaskDef {
        &self.def.tasks[self.nodes[i].template]
    }

    /// Its name, shared by every record sent to the store.
    fn name_of(&self, i: usize) -> &Arc<str> {
        &self.names[self.nodes[i].template]
    }

    fn record(&mut self, u: Unit) -> &mut TaskRun {
        let t = &mut self.run.tasks[u.task];
        match u.child {
            Some(c) => &mut t.children[c as usize],
            None => t,
        }
    }

    fn record_ref(&self, u: Unit) -> &TaskRun {
        let t = &self.run.tasks[u.task];
        match u.child {
            Some(c) => &t.children[c as usize],
            None => t,
        }
    }

    /// Send an event, built only when someone listens.
    fn emit(&mut self, event: impl FnOnce() -> FlowEvent) {
        if self.settings.events {
            self.commands.push_back(Command::Event(event()));
        }
    }

    fn write(&mut self, write: impl FnOnce(&Self) -> Write) {
        if self.settings.record {
            let w = write(self);
            self.commands.push_back(Command::Write(w));
        }
    }

    /// Evaluate woken tasks (depth first) and start what the limits allow, until nothing moves.
    fn settle(&mut self) {
        loop {
            while let Some(i) = self.wake.pop() {
                self.evaluate(i);
            }
            self.start_ready();
            if self.wake.is_empty() {
                return;
            }
        }
    }
}

/// Move a record back to Pending when a run is resumed.
fn reset_to_pending(rec: &mut TaskRun, now: DateTime<Utc>) {
    let from = rec.state.name;
    rec.state = State::new(StateName::Pending, now).with_message("resumed");
    rec.history.push(Transition {
        from: Some(from),
        to: StateName::Pending,
        time: now,
        message: rec.state.message.clone(),
    });
}
