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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use super::mapping;
use super::record::{FlowEvent, FlowRun, TaskRun, Transition};
use super::{StateHandlers, task_write};
use crate::cache::{CacheInfo, CacheKey, CacheScope, CacheStatus, TaskIdentity};
use crate::clock::ClockRef;
use crate::context::TaskContext;
use crate::flow::{FlowDef, MapOver, TriggerDecision};
use crate::sandbox::{Ending, LogRecord, RunOutcome};
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
}

/// One attempt of a unit.
#[derive(Debug)]
pub struct Attempt {
    /// The unit.
    pub unit: Unit,
    /// Its input.
    pub input: Arc<Value>,
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
    /// Per task, the blake3 (hex) of its component, part of its cache keys.
    pub digests: Vec<String>,
}

/// What the machine tracks per task beside its record.
#[derive(Debug, Default)]
struct Node {
    upstream: Edges,
    downstream: Edges,
    /// Tasks whose output this task reads.
    data_upstream: Edges,
    /// Upstream tasks not finished yet.
    waiting_on: usize,
    /// Downstream tasks that have not received this task's output yet.
    consumers_left: usize,
    output: Option<Arc<Value>>,
    input: Option<Arc<Value>>,
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
    inputs: Vec<Arc<Value>>,
    outputs: Vec<Option<Arc<Value>>>,
    /// Attempts each child made before this run (when resuming).
    base_attempts: Vec<u32>,
}

/// What follows a transition once it is recorded.
#[derive(Debug)]
enum Then {
    /// Nothing: the unit waits (paused), or the run is ending.
    Nothing,
    /// The unit is finished: wake what waits for it.
    Finished,
    /// Run the component.
    Launch,
    /// An attempt (or a cache hit) ended: retry, hand the output on, or finish.
    Proceed {
        output: Option<Arc<Value>>,
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
    proposed: Option<(StateName, Option<DateTime<Utc>>)>,
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
    /// Units holding a slot: running, or waiting for their cache answer.
    running: usize,
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
    pub fn new(def: Arc<FlowDef>, run: FlowRun, starts: &[usize], settings: Settings) -> Self {
        let index: HashMap<String, usize> = def
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut nodes: Vec<Node> = (0..def.tasks.len()).map(|_| Node::default()).collect();
        for (i, t) in def.tasks.iter().enumerate() {
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
        let cache_scope = CacheScope::new(&run.flow, def.cache_namespace.as_deref(), &run.context);
        let mapped_children: usize = run.tasks.iter().map(|t| t.children.len()).sum();
        let mut context = run.context.clone();
        context.entry("scheduled_start".into()).or_insert_with(|| {
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
                    self.add_logs(unit, logs);
                    self.complete_transition(unit, p.old, state, p.output, p.proposed, p.then);
                }
            }
            Event::CancelRequested => {
                if !self.cancelled {
                    self.begin_cancel();
                }
            }
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
            let waiting: Vec<Unit> = (0..self.run.tasks.len())
                .filter(|&i| !self.run.tasks[i].state.is_terminal())
                .map(Unit::task)
                .collect();
            for unit in waiting {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task ran");
                self.transition(unit, s, None, Then::Nothing);
            }
        }
        // Outputs still held go into the record.
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(out) = node.output.take() {
                self.run.tasks[i].output = Some(Arc::unwrap_or_clone(out));
            }
        }
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

    /// Prepare the node table from the run record (a fresh run, or one being resumed).
    fn restore(&mut self) {
        let now = self.now();
        for i in 0..self.nodes.len() {
            let rec = &mut self.run.tasks[i];
            self.nodes[i].base_attempts = rec.attempts;
            if rec.state.state_type() == StateType::Completed {
                self.nodes[i].output = rec.output.take().map(Arc::new);
                continue;
            }
            if !matches!(rec.state.name, StateName::Pending) {
                reset_to_pending(rec, now);
                self.persist(Unit::task(i), None);
            }
            // Children are kept: when the task is scheduled again, completed children keep their
            // outputs and only the others run.
        }
        // Count unfinished upstream tasks; completed ones already delivered (or still hold)
        // their outputs.
        for i in 0..self.nodes.len() {
            if self.starts.contains(&i) {
                self.nodes[i].waiting_on = 0;
                continue;
            }
            let waiting = self.nodes[i]
                .upstream
                .iter()
                .filter(|&&u| !self.run.tasks[u].state.is_terminal())
                .count();
            self.nodes[i].waiting_on = waiting;
        }
        for i in 0..self.nodes.len() {
            let unchanged = self.nodes[i]
                .data_upstream
                .iter()
                .all(|&u| self.run.tasks[u].state.state_type() == StateType::Completed);
            self.nodes[i].input_unchanged = unchanged;
        }
        // A consumer that already received an output (it has a cached input, or completed)
        // no longer holds it.
        for i in 0..self.nodes.len() {
            let received = self.run.tasks[i].cached_input.is_some()
                || self.run.tasks[i].state.state_type() == StateType::Completed;
            if received {
                for u in self.nodes[i].data_upstream.clone() {
                    self.release_one(u);
                }
            }
        }
    }

    /// Every upstream task finished (or the task is a start task): decide whether it runs.
    fn evaluate(&mut self, i: usize) {
        if std::mem::replace(&mut self.nodes[i].evaluated, true) {
            return;
        }
        let unit = Unit::task(i);
        if self.cancelled {
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            return self.transition(unit, s, None, Then::Finished);
        }
        if !self.starts.contains(&i) {
            let def = self.def.clone();
            let task = &def.tasks[i];
            let ups = &self.nodes[i].upstream;
            if task.skip_on_upstream_skip
                && let Some(&u) = ups
                    .iter()
                    .find(|&&u| self.run.tasks[u].state.name == StateName::Skipped)
            {
                let msg = format!("upstream task `{}` was skipped", def.tasks[u].name);
                let s = State::new(StateName::Skipped, self.now()).with_message(msg);
                return self.transition(unit, s, None, Then::Finished);
            }
            let upstream_states: Vec<StateName> =
                ups.iter().map(|&u| self.run.tasks[u].state.name).collect();
            match task.trigger.decide(&upstream_states) {
                TriggerDecision::Run => {}
                TriggerDecision::Fail => {
                    let detail: Vec<String> = ups
                        .iter()
                        .map(|&u| {
                            format!(
                                "`{}` is {}",
                                def.tasks[u].name, self.run.tasks[u].state.name
                            )
                        })
                        .collect();
                    let msg = format!(
                        "trigger `{}` did not pass: {}",
                        task.trigger.as_str(),
                        detail.join(", ")
                    );
                    let s = State::new(StateName::TriggerFailed, self.now()).with_message(msg);
                    return self.transition(unit, s, None, Then::Finished);
                }
                TriggerDecision::Pause => {
                    self.resolve_input(i);
                    let s = State::new(StateName::Paused, self.now()).with_message(
                        "manual_only: waiting to be resumed with this task as a start task",
                    );
                    return self.transition(unit, s, None, Then::Nothing);
                }
            }
        }
        self.resolve_input(i);
        self.schedule(i);
    }

    /// Resolve the task's input from parameters and upstream outputs (or reuse the cached one),
    /// and cache it on the task run.
    fn resolve_input(&mut self, i: usize) {
        if self.nodes[i].input.is_some() {
            return;
        }
        if let Some(cached) = self.run.tasks[i].cached_input.clone() {
            self.nodes[i].input = Some(cached);
            return;
        }
        let task = &self.def.tasks[i];
        let params = &self.run.parameters;
        let nodes = &mut self.nodes;
        let index = &self.index;
        // References left to resolve per upstream task: the last reference of the last consumer
        // takes the output instead of copying it.
        let mut refs_left: HashMap<usize, usize> = HashMap::new();
        for t in task.input.task_refs() {
            *refs_left.entry(index[t]).or_default() += 1;
        }
        let value = task.input.resolve(&|p| params.get(p).cloned(), &mut |t| {
            let j = *index.get(t)?;
            let left = refs_left.get_mut(&j)?;
            *left -= 1;
            if *left == 0 && nodes[j].consumers_left == 1 {
                nodes[j].output.take().map(Arc::unwrap_or_clone)
            } else {
                nodes[j].output.as_deref().cloned()
            }
        });
        for u in self.nodes[i].data_upstream.clone() {
            self.release_one(u);
        }
        let value = Arc::new(value);
        self.run.tasks[i].cached_input = Some(value.clone());
        self.nodes[i].input = Some(value);
    }

    /// One consumer of `u`'s output received it; drop the output when none is left.
    fn release_one(&mut self, u: usize) {
        let node = &mut self.nodes[u];
        node.consumers_left = node.consumers_left.saturating_sub(1);
        if node.consumers_left == 0 && self.run.tasks[u].state.state_type() == StateType::Completed
        {
            node.output = None;
            self.run.tasks[u].output_released = true;
        }
    }

    /// Queue the task (or its mapped children). Newly ready work goes to the front of the queue
    /// (depth first): a consumer runs soon after its producer, so outputs waiting to be consumed
    /// stay few however wide the flow is.
    fn schedule(&mut self, i: usize) {
        let def = self.def.clone();
        let task = &def.tasks[i];
        if task.map == MapOver::No {
            self.ready.push_front(Unit::task(i));
            return;
        }
        let input = self.nodes[i].input.clone().unwrap_or_default();
        let unit = Unit::task(i);
        // The cap on mapped children, checked before any child is created.
        let others = self
            .mapped_children
            .saturating_sub(self.run.tasks[i].children.len());
        if let Some(n) = mapping::map_len(&input, &task.map) {
            let cap = def.max_mapped_children;
            let total = others.saturating_add(n);
            if total > cap {
                let msg = match others {
                    0 => format!(
                        "mapping over {n} elements would make more mapped children than the \
                         flow's max_mapped_children of {cap}"
                    ),
                    _ => format!(
                        "mapping over {n} elements would make {total} mapped children in this \
                         flow run ({others} already), more than the flow's max_mapped_children \
                         of {cap}"
                    ),
                };
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                return self.transition(unit, s, None, Then::Finished);
            }
        }
        let children = match mapping::children(&input, &task.map) {
            Ok(c) => {
                self.mapped_children = others.saturating_add(c.len());
                c
            }
            Err(msg) => {
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                return self.transition(unit, s, None, Then::Finished);
            }
        };
        let now = self.now();
        let n = children.len();
        let mut map = MapRun {
            children_left: n,
            outputs: vec![None; n],
            inputs: children,
            base_attempts: vec![0; n],
        };
        // Resuming: children recorded before keep their place (by map index); completed ones
        // keep their outputs, the others run again with retries counted from the attempts they
        // made. Children never recorded are created.
        let previous = std::mem::take(&mut self.run.tasks[i].children);
        let mut slots: Vec<Option<TaskRun>> = (0..n).map(|_| None).collect();
        for child in previous {
            if let Some(k) = child.map_index.map(|k| k as usize)
                && k < n
                && slots[k].is_none()
            {
                slots[k] = Some(child);
            }
        }
        let mut fresh = vec![false; n];
        self.run.tasks[i].children = slots
            .into_iter()
            .enumerate()
            .map(|(c, slot)| {
                slot.unwrap_or_else(|| {
                    fresh[c] = true;
                    TaskRun::new(&task.name, Some(c as u32), now)
                })
            })
            .collect();
        let mut todo = Vec::with_capacity(n);
        for (c, is_new) in fresh.into_iter().enumerate() {
            let unit = Unit {
                task: i,
                child: Some(c as u32),
            };
            todo.push(c);
            if is_new {
                // Recorded with its first transition (one row write instead of two).
                self.unwritten.insert(unit);
                continue;
            }
            let keep = self.nodes[i].input_unchanged;
            let child = &mut self.run.tasks[i].children[c];
            map.base_attempts[c] = child.attempts;
            if keep && child.state.state_type() == StateType::Completed {
                map.outputs[c] = Some(Arc::new(child.output.take().unwrap_or(Value::Null)));
                map.children_left -= 1;
                todo.pop();
                continue;
            }
            if child.state.name != StateName::Pending {
                reset_to_pending(child, now);
                self.persist(unit, None);
            }
        }
        let left = map.children_left;
        self.nodes[i].map = Some(Box::new(map));
        if left == 0 {
            return self.complete_mapped(i);
        }
        for c in todo.into_iter().rev() {
            self.ready.push_front(Unit {
                task: i,
                child: Some(c as u32),
            });
        }
    }

    /// Start queued units while the global and per-tag limits allow.
    fn start_ready(&mut self) {
        while self.running < self.def.concurrency {
            let Some(unit) = self.ready.pop_front() else {
                return;
            };
            if self.record_ref(unit).state.is_terminal() {
                // Cancelled while it waited for its retry timer.
                continue;
            }
            if self.cancelled {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task started");
                self.transition(unit, s, None, Then::Finished);
                continue;
            }
            let def = self.def.clone();
            let task = &def.tasks[unit.task];
            if let Some(tag) = task.tags.iter().find(|t| {
                def.tag_limits.get(*t).is_some_and(|&limit| {
                    self.running_by_tag.get(*t).copied().unwrap_or(0) >= limit
                })
            }) {
                self.tag_blocked
                    .entry(tag.clone())
                    .or_default()
                    .push_back(unit);
                continue;
            }
            // The slot is held while the cache is consulted, so the limits hold for what the
            // answer starts.
            self.take_slot(unit);
            if !self.ask_cache(unit) {
                self.begin_attempt(unit);
            }
        }
    }

    fn take_slot(&mut self, unit: Unit) {
        self.running += 1;
        for tag in &self.def.tasks[unit.task].tags {
            *self.running_by_tag.entry(tag.clone()).or_default() += 1;
        }
    }

    /// Give the unit's slot back; units blocked on its tags are queued again.
    fn release_slot(&mut self, unit: Unit) {
        self.running = self.running.saturating_sub(1);
        for tag in &self.def.tasks[unit.task].tags {
            if let Some(n) = self.running_by_tag.get_mut(tag) {
                *n = n.saturating_sub(1);
            }
            if let Some(blocked) = self.tag_blocked.get_mut(tag) {
                while let Some(u) = blocked.pop_back() {
                    self.ready.push_front(u);
                }
            }
        }
    }

    /// Attempts the unit made before this run (when resuming); retries count from there.
    fn base_attempts(&self, unit: Unit) -> u32 {
        match (unit.child, &self.nodes[unit.task].map) {
            (Some(c), Some(map)) => map.base_attempts.get(c as usize).copied().unwrap_or(0),
            (Some(_), None) => 0,
            (None, _) => self.nodes[unit.task].base_attempts,
        }
    }

    /// The unit's resolved input.
    fn unit_input(&self, unit: Unit) -> Arc<Value> {
        match (unit.child, &self.nodes[unit.task].map) {
            (Some(c), Some(map)) => map.inputs[c as usize].clone(),
            _ => self.nodes[unit.task].input.clone().unwrap_or_default(),
        }
    }

    /// Output caching: on the unit's first attempt in this run, ask for its key (returns true;
    /// the answer comes as [`Event::CacheAnswered`]).
    fn ask_cache(&mut self, unit: Unit) -> bool {
        let def = self.def.clone();
        let task = &def.tasks[unit.task];
        let Some(policy) = task.cache.as_ref().filter(|_| self.settings.record) else {
            return false;
        };
        if self.record_ref(unit).attempts > self.base_attempts(unit)
            || self.skip_cache.remove(&unit)
        {
            return false;
        }
        let input = self.unit_input(unit);
        let identity = TaskIdentity {
            scope: &self.cache_scope,
            task: &task.name,
            component: &self.settings.digests[unit.task],
            budget: &task.budget,
            map_index: unit.child,
        };
        let Some(key) = CacheKey::new(policy, identity, &input, &self.run.parameters) else {
            return false;
        };
        self.lookups += 1;
        self.commands.push_back(Command::LookupCache {
            unit,
            key: key.clone(),
        });
        self.cache_keys.insert(unit, key);
        true
    }

    /// A hit completes the unit as Cached without running the component; a miss records why
    /// and keeps the key, so the output is cached when the unit completes.
    fn cache_answered(&mut self, unit: Unit, answer: Result<CacheLookup, String>) {
        let Some(key) = self.cache_keys.remove(&unit) else {
            return;
        };
        let miss = |key: &CacheKey, reason: String| CacheInfo {
            status: CacheStatus::Miss,
            key: key.key.clone(),
            validator: key.validator.clone(),
            reason,
            source_flow_run: None,
            source_task_run: None,
            expires_at: None,
        };
        if self.cancelled {
            // The answer came too late: the unit ends Cancelled, not from the cache.
            self.release_slot(unit);
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            return self.transition(unit, s, None, Then::Finished);
        }
        match answer {
            Ok(CacheLookup::Hit {
                output,
                blob,
                entry,
            }) => {
                self.release_slot(unit);
                let now = self.now();
                let reason = format!(
                    "output of flow run {} (task run {}), cached at {}, valid until {}",
                    entry.flow_run,
                    entry.task_run,
                    entry.created_at.to_rfc3339(),
                    entry.expires_at.to_rfc3339()
                );
                let state = State::new(StateName::Cached, now)
                    .with_message(format!("cached result from flow run {}", entry.flow_run));
                self.record(unit).cache = Some(CacheInfo {
                    status: CacheStatus::Hit,
                    key: key.key,
                    validator: key.validator,
                    reason,
                    source_flow_run: Some(entry.flow_run),
                    source_task_run: Some(entry.task_run),
                    expires_at: Some(entry.expires_at),
                });
                let then = Then::Proceed {
                    output: Some(output),
                    from_cache: true,
                    guest_cancelled: false,
                };
                self.transition_after_attempt(unit, state, Some(Blob::Stored(blob)), then);
            }
            Ok(CacheLookup::Miss(reason)) => {
                self.record(unit).cache = Some(miss(&key, reason));
                self.cache_keys.insert(unit, key);
                self.begin_attempt(unit);
            }
            Err(e) => {
                let task = &self.def.tasks[unit.task].name;
                tracing::warn!(task = %task, "cache lookup failed: {e}");
                self.record(unit).cache = Some(miss(&key, format!("the lookup failed: {e}")));
                self.begin_attempt(unit);
            }
        }
    }

    /// The unit holds a slot and runs: Running (or Retrying), then its component.
    fn begin_attempt(&mut self, unit: Unit) {
        let attempt = self.record_ref(unit).attempts.saturating_add(1);
        let base = self.base_attempts(unit);
        let retrying = attempt > base + 1;
        let name = match retrying {
            true => StateName::Retrying,
            false => StateName::Running,
        };
        let mut s = State::new(name, self.now());
        s.message = retrying.then(|| format!("attempt {attempt}"));
        // Counted before the transition is recorded, so a crash mid-attempt still counts it.
        self.record(unit).attempts = attempt;
        self.transition(unit, s, None, Then::Launch);
    }

    fn context_of(&self, unit: Unit, attempt: u32) -> TaskContext {
        TaskContext {
            flow_run_id: self.run.id,
            task_run_id: self.record_ref(unit).id,
            task_name: self.names[unit.task].clone(),
            attempt,
            map_index: unit.child,
            parameters: self.parameters.clone(),
            values: self.context.clone(),
        }
    }

    fn launch(&mut self, unit: Unit) {
        let attempt = self.record_ref(unit).attempts;
        let ctx = self.context_of(unit, attempt);
        let input = self.unit_input(unit);
        self.commands
            .push_back(Command::Run(Attempt { unit, input, ctx }));
    }

    fn attempt_ended(&mut self, unit: Unit, outcome: RunOutcome) {
        self.release_slot(unit);
        let def = self.def.clone();
        let task = &def.tasks[unit.task];
        let base = self.base_attempts(unit);
        let made = self.record_ref(unit).attempts;
        let attempts = made - base.min(made);
        let retry = if self.cancelled {
            Retry::Exhausted
        } else if attempts <= task.retries {
            let delay =
                TimeDelta::from_std(task.retry_delay_for(attempts)).unwrap_or(TimeDelta::MAX);
            let max_delay = TimeDelta::from_std(task.retry_delay_cap()).unwrap_or(TimeDelta::MAX);
            Retry::Remaining { delay, max_delay }
        } else {
            Retry::Exhausted
        };
        let guest_cancelled = matches!(outcome.ending, Ending::Cancelled);
        let mut state = State::after_run(&outcome.ending, retry, self.now());
        let output = (state.state_type() == StateType::Completed)
            .then(|| Arc::new(state.result.take().unwrap_or(Value::Null)));
        let record = self.record(unit);
        record.run_time += outcome.usage.duration;
        record.fuel_consumed += outcome.usage.fuel_consumed;
        self.add_logs(unit, outcome.logs);
        let then = Then::Proceed {
            output: output.clone(),
            from_cache: false,
            guest_cancelled,
        };
        self.transition_after_attempt(unit, state, output.map(Blob::Value), then);
    }

    /// Record log records of the unit and send them to the store.
    fn add_logs(&mut self, unit: Unit, logs: Vec<LogRecord>) {
        if logs.is_empty() {
            return;
        }
        if self.settings.record {
            let write = Write::Logs {
                run: self.run.id,
                task_run: self.record_ref(unit).id,
                task: self.names[unit.task].clone(),
                map_index: unit.child,
                records: logs.clone(),
            };
            self.commands.push_back(Command::Write(write));
        }
        self.record(unit).logs.extend(logs);
    }

    /// After an attempt (or a cache hit) ended in `state`: wait for the retry, hand the output
    /// on, or finish the unit.
    fn proceed(&mut self, unit: Unit, state: &State, output: Option<Arc<Value>>) {
        match state.state_type() {
            StateType::Scheduled => {
                let at = state.scheduled_for.unwrap_or_else(|| self.now());
                self.timers += 1;
                self.commands.push_back(Command::Timer { unit, at });
            }
            StateType::Completed => {
                let out = output.unwrap_or_else(|| Arc::new(Value::Null));
                match (unit.child, &mut self.nodes[unit.task].map) {
                    (Some(c), Some(map)) => map.outputs[c as usize] = Some(out),
                    _ => self.nodes[unit.task].output = Some(out),
                }
                self.unit_finished(unit);
            }
            _ if state.is_terminal() => self.unit_finished(unit),
            // Paused: waits to be resumed with its cached input.
            _ => {}
        }
    }

    fn unit_finished(&mut self, unit: Unit) {
        match unit.child {
            None => self.task_finished(unit.task),
            Some(_) => {
                let left = self.nodes[unit.task].map.as_mut().map_or(0, |m| {
                    m.children_left = m.children_left.saturating_sub(1);
                    m.children_left
                });
                if left == 0 {
                    self.complete_mapped(unit.task);
                }
            }
        }
    }

    /// Every child of a mapped task finished: the parent is Mapped with the list of outputs, or
    /// Failed when any child did not succeed.
    fn complete_mapped(&mut self, i: usize) {
        let children = &self.run.tasks[i].children;
        let bad: Vec<String> = children
            .iter()
            .filter(|c| c.state.state_type() != StateType::Completed)
            .map(|c| format!("{} is {}", c.map_index.unwrap_or_default(), c.state.name))
            .collect();
        let n = children.len();
        let now = self.now();
        let map = self.nodes[i].map.take().unwrap_or_default();
        let mut output = None;
        let state = if bad.is_empty() {
            let outputs: Vec<Value> = map
                .outputs
                .into_iter()
                .map(|o| o.map_or(Value::Null, Arc::unwrap_or_clone))
                .collect();
            let list = Arc::new(Value::Array(outputs));
            output = Some(Blob::Value(list.clone()));
            self.nodes[i].output = Some(list);
            State::new(StateName::Mapped, now).with_message(format!("{n} mapped runs completed"))
        } else if self.cancelled {
            State::new(StateName::Cancelled, now).with_message("mapped runs were cancelled")
        } else {
            State::new(StateName::Failed, now).with_message(format!(
                "{} of {n} mapped runs did not succeed: {}",
                bad.len(),
                bad.join(", ")
            ))
        };
        self.transition(Unit::task(i), state, output, Then::Finished);
    }

    /// The task reached a terminal state: release what it held and wake its downstream tasks.
    fn task_finished(&mut self, i: usize) {
        self.nodes[i].input = None;
        if self.run.tasks[i].state.state_type() == StateType::Completed {
            self.run.tasks[i].cached_input = None;
        }
        let before = self.wake.len();
        for k in 0..self.nodes[i].downstream.len() {
            let d = self.nodes[i].downstream[k];
            let node = &mut self.nodes[d];
            node.waiting_on = node.waiting_on.saturating_sub(1);
            if node.waiting_on == 0 && !node.evaluated && !self.run.tasks[d].state.is_terminal() {
                self.wake.push(d);
            }
        }
        // A stack: the first woken is evaluated first, and what it wakes before the next one.
        self.wake[before..].reverse();
    }

    fn begin_cancel(&mut self) {
        self.cancelled = true;
        self.flow_transition(
            State::new(StateName::Cancelling, self.now())
                .with_message("cancel requested: interrupting running tasks"),
        );
        // Handlers still running are not waited for: their transitions are recorded as the
        // in-process handlers left them.
        if !self.hooks.is_empty() {
            self.commands.push_back(Command::AbortHooks);
            let mut pending: Vec<(Unit, Pending)> = self.hooks.drain().collect();
            pending.sort_by_key(|(_, p)| p.seq);
            for (unit, p) in pending {
                self.complete_transition(unit, p.old, p.state, p.output, p.proposed, p.then);
            }
        }
        // Retries waiting on a timer will not run.
        if self.timers > 0 {
            self.timers = 0;
            self.commands.push_back(Command::AbortTimers);
        }
        let waiting: Vec<Unit> = (0..self.run.tasks.len())
            .flat_map(|i| {
                let t = &self.run.tasks[i];
                let own = (t.state.state_type() == StateType::Scheduled).then_some(Unit::task(i));
                // Only children of a mapped run in progress (not records from before a resume).
                let active = self.nodes[i].map.is_some();
                let children = t
                    .children
                    .iter()
                    .enumerate()
                    .filter(move |(_, c)| active && c.state.state_type() == StateType::Scheduled)
                    .map(move |(c, _)| Unit {
                        task: i,
                        child: Some(c as u32),
                    });
                own.into_iter().chain(children)
            })
            .collect();
        for unit in waiting {
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled while this task awaited a retry");
            self.transition(unit, s, None, Then::Finished);
        }
    }

    /// The flow run's state once nothing runs: Cancelled, Paused (tasks wait to be resumed), or
    /// what its reference tasks (by default the tasks nothing depends on) say.
    fn final_state(&self) -> State {
        let now = self.now();
        let unfinished: Vec<&str> = self
            .run
            .tasks
            .iter()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.name.as_str())
            .collect();
        if self.cancelled {
            return State::new(StateName::Cancelled, now)
                .with_message("the flow run was cancelled");
        }
        if !unfinished.is_empty() {
            return State::new(StateName::Paused, now).with_message(format!(
                "waiting on paused tasks: {}",
                unfinished.join(", ")
            ));
        }
        let refs: Vec<usize> = if self.def.reference_tasks.is_empty() {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].downstream.is_empty())
                .collect()
        } else {
            self.def
                .reference_tasks
                .iter()
                .filter_map(|r| self.index.get(r).copied())
                .collect()
        };
        let failed: Vec<&str> = refs
            .iter()
            .filter(|&&i| {
                matches!(
                    self.run.tasks[i].state.state_type(),
                    StateType::Failed | StateType::Crashed
                )
            })
            .map(|&i| self.run.tasks[i].name.as_str())
            .collect();
        if !failed.is_empty() {
            State::new(StateName::Failed, now).with_message(format!(
                "reference tasks did not succeed: {}",
                failed.join(", ")
            ))
        } else if refs
            .iter()
            .all(|&i| self.run.tasks[i].state.state_type() == StateType::Completed)
        {
            State::new(StateName::Completed, now).with_message("all reference tasks succeeded")
        } else {
            State::new(StateName::Cancelled, now)
                .with_message("some reference tasks were cancelled")
        }
    }

    /// Move a unit to `new`, through the state handlers, carrying `output` (recorded when the
    /// unit ends in a Completed-type state); `then` follows once it is recorded.
    fn transition(&mut self, unit: Unit, new: State, output: Option<Blob>, then: Then) {
        self.transition_inner(unit, new, output, false, then);
    }

    /// [`FlowMachine::transition`] for the state an attempt (or a cache hit) ends in: what the
    /// state handlers replace it with goes through the task's retry policy
    /// ([`FlowMachine::police_replacement`]).
    fn transition_after_attempt(&mut self, unit: Unit, new: State, out: Option<Blob>, then: Then) {
        self.transition_inner(unit, new, out, true, then);
    }

    fn transition_inner(
        &mut self,
        unit: Unit,
        new: State,
        output: Option<Blob>,
        after_attempt: bool,
        then: Then,
    ) {
        let name = self.names[unit.task].clone();
        let old = self.record_ref(unit).state.clone();
        let proposed = after_attempt.then_some((new.name, new.scheduled_for));
        let mut state = new;
        let handlers = self.settings.handlers.clone();
        if let Some(hs) = handlers.task.get(&*name) {
            for h in hs {
                state = h(&name, &old, state);
            }
        }
        for h in &handlers.every_task {
            state = h(&name, &old, state);
        }
        let kinds = self.hook_kinds(unit.task, &state);
        if kinds != HookKinds::default() && !self.cancelled {
            self.next_seq += 1;
            let seq = self.next_seq;
            let attempt = self.record_ref(unit).attempts.max(1);
            let request = HookRequest {
                unit,
                seq,
                old: old.clone(),
                new: state.clone(),
                kinds,
                ctx: self.context_of(unit, attempt),
            };
            self.commands.push_back(Command::RunHooks(request));
            let pending = Pending {
                seq,
                old,
                state,
                proposed,
                output,
                then,
            };
            self.hooks.insert(unit, pending);
            return;
        }
        self.complete_transition(unit, old, state, output, proposed, then);
    }

    /// Which of the task's handler lists apply to a transition into `state`.
    fn hook_kinds(&self, task: usize, state: &State) -> HookKinds {
        let hooks = &self.def.tasks[task].hooks;
        let ty = state.state_type();
        HookKinds {
            on_state: !hooks.on_state.is_empty(),
            on_completion: ty == StateType::Completed && !hooks.on_completion.is_empty(),
            on_failure: matches!(ty, StateType::Failed | StateType::Crashed)
                && !hooks.on_failure.is_empty(),
            on_retry: state.name == StateName::Retrying && !hooks.on_retry.is_empty(),
        }
    }

    /// Record the transition the handlers left and do what follows it.
    fn complete_transition(
        &mut self,
        unit: Unit,
        old: State,
        mut state: State,
        output: Option<Blob>,
        proposed: Option<(StateName, Option<DateTime<Utc>>)>,
        then: Then,
    ) {
        if let Some(proposed) = proposed
            && (state.name, state.scheduled_for) != proposed
        {
            state = self.police_replacement(unit, proposed.0, state);
        }
        let record = self.record(unit);
        record.history.push(Transition {
            from: Some(old.name),
            to: state.name,
            time: state.timestamp,
            message: state.message.clone(),
        });
        record.state = state.clone();
        self.persist(unit, output);
        let name = &self.names[unit.task];
        if self.settings.events {
            let event = FlowEvent::Task {
                name: name.to_string(),
                map_index: unit.child,
                state: state.name,
            };
            self.commands.push_back(Command::Event(event));
        }
        match then {
            Then::Nothing => {}
            Then::Finished => self.unit_finished(unit),
            Then::Launch => self.launch(unit),
            Then::Proceed {
                output,
                from_cache,
                guest_cancelled,
            } => {
                if !from_cache && state.is_terminal() {
                    self.cache_output(unit, &state, output.as_ref());
                }
                if from_cache && state.state_type() == StateType::Scheduled {
                    // A handler asked to run it again: this time the component runs.
                    self.skip_cache.insert(unit);
                }
                if guest_cancelled && !self.cancelled {
                    // The guest saw the cancel before the driver did.
                    self.begin_cancel();
                }
                self.proceed(unit, &state, output);
            }
        }
    }

    /// A unit that missed the cache completed: its output is cached under the key it missed.
    fn cache_output(&mut self, unit: Unit, state: &State, output: Option<&Arc<Value>>) {
        let Some(key) = self.cache_keys.remove(&unit) else {
            return;
        };
        let (Some(policy), Some(out)) = (&self.def.tasks[unit.task].cache, output) else {
            return;
        };
        if state.name != StateName::Completed || !self.settings.record {
            return;
        }
        let expires_at = TimeDelta::from_std(policy.cache_for)
            .ok()
            .and_then(|d| state.timestamp.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let write = CacheWrite {
            key,
            output: out.clone(),
            created_at: state.timestamp,
            expires_at,
            flow_run: self.run.id,
            task_run: self.record_ref(unit).id,
        };
        self.commands
            .push_back(Command::Write(Write::Cache(Box::new(write))));
    }

    /// A state handler replaced the state an attempt ended in (`proposed`) with `state`. A
    /// Scheduled-type replacement asks to run the task again: it is a retry like any other, so
    /// it needs a retry left (attempts never exceed `retries + 1`), and it starts within the
    /// task's retry delay cap; otherwise the task is Failed, saying why. A replacement that
    /// would leave the task neither finished, paused nor scheduled (Running, Pending,
    /// Cancelling) would wait for ever, and fails too.
    fn police_replacement(&self, unit: Unit, proposed: StateName, mut state: State) -> State {
        let task = &self.def.tasks[unit.task];
        let now = self.now();
        match state.state_type() {
            StateType::Scheduled => {
                let rec = self.record_ref(unit);
                let used = rec.attempts.saturating_sub(self.base_attempts(unit));
                if self.cancelled {
                    return State::new(StateName::Cancelled, now).with_message(format!(
                        "a state handler replaced {proposed} with {}, but the flow run is \
                         being cancelled",
                        state.name
                    ));
                }
                if used > task.retries {
                    return State::new(StateName::Failed, now).with_message(format!(
                        "a state handler replaced {proposed} with {} to run the task again, but \
                         no retries remain ({used} attempts made, retries = {})",
                        state.name, task.retries
                    ));
                }
                let cap = TimeDelta::from_std(task.retry_delay_cap()).unwrap_or(TimeDelta::MAX);
                let latest = now
                    .checked_add_signed(cap)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let at = state.scheduled_for.unwrap_or(now);
                if at > latest {
                    let note = format!(
                        "(the handler's start time {} is capped at {} from now, the task's \
                         longest retry delay: max_retry_delay, or backoff.max)",
                        at.to_rfc3339(),
                        humantime::format_duration(task.retry_delay_cap())
                    );
                    state.message = Some(match state.message.take() {
                        Some(m) => format!("{m} {note}"),
                        None => note,
                    });
                }
                state.scheduled_for = Some(at.min(latest));
                state
            }
            StateType::Running | StateType::Pending | StateType::Cancelling => {
                State::new(StateName::Failed, now).with_message(format!(
                    "a state handler replaced {proposed} with {}, which cannot follow a finished \
                     attempt (only a finished, paused or scheduled state can)",
                    state.name
                ))
            }
            _ => state,
        }
    }

    /// Send the unit's state and its last transition to the store. Its input is stored when it
    /// will be needed later (a retry, or a paused task), its output when it completed.
    fn persist(&mut self, unit: Unit, output: Option<Blob>) {
        if !self.settings.record {
            return;
        }
        let first = self.unwritten.remove(&unit);
        self.write(|m| {
            let parent = unit.child.map(|c| (m.run.tasks[unit.task].id, c));
            let rec = m.record_ref(unit);
            let transitions = match first {
                true => rec.history.clone(),
                false => rec.history.last().cloned().into_iter().collect(),
            };
            let mut write = task_write(
                m.run.id,
                (unit.task, m.names[unit.task].clone()),
                parent,
                rec,
                transitions,
            );
            if rec.state.state_type() == StateType::Completed {
                write.output = output;
            }
            Write::Task(Box::new(write))
        });
    }

    fn flow_transition(&mut self, new: State) {
        let old = self.run.state.clone();
        let mut state = new;
        let handlers = self.settings.handlers.clone();
        for h in &handlers.flow {
            state = h(&self.run.flow, &old, state);
        }
        let transition = Transition {
            from: Some(old.name),
            to: state.name,
            time: state.timestamp,
            message: state.message.clone(),
        };
        self.run.history.push(transition.clone());
        self.emit(|| FlowEvent::Flow(state.name));
        let run = self.run.id;
        self.write(|_| Write::FlowState {
            run,
            state: state.clone(),
            transition,
        });
        self.run.state = state;
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
