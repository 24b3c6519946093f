//! The flow runner: executes a flow run on tokio with Prefect's execution model. Ready tasks run
//! concurrently as soon as their upstream tasks finish; each task's trigger is evaluated once all
//! of its upstream tasks are finished; signals and failures drive states, retries wait for their
//! delay on the injected clock and reuse the inputs cached on the state; mapped tasks run one
//! child per element; state handlers see every transition; reference tasks decide the flow's
//! state. Scheduling is event-driven: finishing a task touches only its downstream tasks, never
//! the whole graph. An output is dropped as soon as every task that consumes it has received it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cache::{CacheInfo, CacheKey, CacheScope, CacheStatus, TaskIdentity};
use crate::clock::{ClockRef, SystemClock};
use crate::context::TaskContext;
use crate::flow::{FlowDef, MapOver, TaskDef, TriggerDecision};
use crate::ids::{FlowRunId, TaskRunId};
use crate::sandbox::{
    CancelToken, Ending, HandlerComponent, LoadError, LogRecord, RunBudget, RunOutcome, Sandbox,
    TaskComponent,
};
use crate::state::{Retry, State, StateName, StateType};
use crate::store::{
    Blob, CacheLookup, CacheWrite, CachedOutput, RunHeader, RunLease, Store, StoreError, TaskWrite,
    Write,
};

/// A state handler: `(name, old, new) -> new`. Handlers are chained; each one's result is the
/// next one's `new` (Prefect's state handlers).
pub type StateHandler = Arc<dyn Fn(&str, &State, State) -> State + Send + Sync>;

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The state before (none for the first).
    pub from: Option<StateName>,
    /// The state after.
    pub to: StateName,
    /// When.
    pub time: DateTime<Utc>,
    /// The new state's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The record of one task run (or one child of a mapped task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The task's name.
    pub name: String,
    /// This run's id.
    pub id: TaskRunId,
    /// For a child of a mapped task, its index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_index: Option<u32>,
    /// The current state.
    pub state: State,
    /// How many times the task's component ran.
    pub attempts: u32,
    /// Every transition, in order.
    pub history: Vec<Transition>,
    /// The output, while something may still need it (consumed outputs are released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Whether the output was dropped after every consumer received it.
    #[serde(default)]
    pub output_released: bool,
    /// The resolved input, kept until the task completes (input caching): a retry, a resume or
    /// a paused task runs with it instead of recomputing upstream tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Arc<Value>>,
    /// Time spent running, over all attempts.
    pub run_time: Duration,
    /// Fuel consumed, over all attempts.
    pub fuel_consumed: u64,
    /// Logs of every attempt, and of the state handlers, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRecord>,
    /// Whether the output cache was used, and why (tasks with `cache_for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheInfo>,
    /// The child runs of a mapped task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TaskRun>,
}

impl TaskRun {
    /// A task run that has not started: Pending at `now`, with that one transition.
    pub fn new(name: &str, map_index: Option<u32>, now: DateTime<Utc>) -> Self {
        let state = State::new(StateName::Pending, now);
        Self {
            name: name.to_owned(),
            id: TaskRunId::new(),
            map_index,
            history: vec![Transition {
                from: None,
                to: state.name,
                time: now,
                message: None,
            }],
            state,
            attempts: 0,
            output: None,
            output_released: false,
            cached_input: None,
            run_time: Duration::ZERO,
            fuel_consumed: 0,
            logs: Vec::new(),
            cache: None,
            children: Vec::new(),
        }
    }
}

/// The record of a flow run: everything needed to show it, and to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRun {
    /// This run's id.
    pub id: FlowRunId,
    /// The flow's name.
    pub flow: String,
    /// The flow run's state.
    pub state: State,
    /// Every transition of the flow run.
    pub history: Vec<Transition>,
    /// The parameters in effect.
    pub parameters: BTreeMap<String, Value>,
    /// The context in effect.
    pub context: BTreeMap<String, String>,
    /// The task runs, in definition order.
    pub tasks: Vec<TaskRun>,
}

impl FlowRun {
    /// The task run named `name`.
    pub fn task(&self, name: &str) -> Option<&TaskRun> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// What happened, as it happens (for live views).
#[derive(Debug, Clone, PartialEq)]
pub enum FlowEvent {
    /// A task run (or mapped child) changed state.
    Task {
        /// The task.
        name: String,
        /// The child index, for mapped children.
        map_index: Option<u32>,
        /// The new state.
        state: StateName,
    },
    /// The flow run changed state.
    Flow(StateName),
}

/// Why a flow could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A component could not be loaded.
    #[error("task `{task}`: {source}")]
    Load {
        /// The task.
        task: String,
        /// Why.
        #[source]
        source: LoadError,
    },
    /// A build command failed.
    #[error(transparent)]
    Build(#[from] crate::flow::build::BuildError),
    /// A parameter given on the command line or API is not declared.
    #[error("unknown parameter `{name}`{hint}")]
    UnknownParameter {
        /// The name.
        name: String,
        /// A did-you-mean.
        hint: crate::flow::Hint,
    },
    /// A start task that the flow does not have.
    #[error("unknown start task `{0}`")]
    UnknownStartTask(String),
    /// A run record that does not belong to this flow.
    #[error("the run record does not match flow `{flow}`: {detail}")]
    RecordMismatch {
        /// The flow.
        flow: String,
        /// What differs.
        detail: String,
    },
    /// The store refused the run before it started (e.g. another process runs it).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run ended but the store could not record all of it.
    #[error("flow run {} ended {} but was not fully recorded: {source}", run.id, run.state.name)]
    NotRecorded {
        /// The run as it ended.
        run: Box<FlowRun>,
        /// The store's error.
        #[source]
        source: StoreError,
    },
}

/// A flow with every component loaded, ready to run any number of times.
#[derive(Clone)]
pub struct PreparedFlow {
    def: Arc<FlowDef>,
    components: Vec<TaskComponent>,
    /// Per task; `None` when the task has no handler components.
    hooks: Vec<Option<Arc<TaskHooks>>>,
}

impl fmt::Debug for PreparedFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedFlow")
            .field("flow", &self.def.name)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Default)]
struct TaskHooks {
    on_completion: Vec<HandlerComponent>,
    on_failure: Vec<HandlerComponent>,
    on_retry: Vec<HandlerComponent>,
    on_state: Vec<HandlerComponent>,
}

impl PreparedFlow {
    /// The flow's definition.
    pub fn def(&self) -> &FlowDef {
        &self.def
    }
}

/// Runs flows. Configure with the builder methods; every setting has a default.
#[derive(Clone)]
pub struct FlowRunner {
    sandbox: Sandbox,
    clock: ClockRef,
    task_handlers: HashMap<String, Vec<StateHandler>>,
    all_task_handlers: Vec<StateHandler>,
    flow_handlers: Vec<StateHandler>,
    handler_budget: RunBudget,
    events: Option<mpsc::UnboundedSender<FlowEvent>>,
    store: Option<Arc<dyn Store>>,
}

impl fmt::Debug for FlowRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowRunner")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

/// How a run starts: fresh, or resuming a previous run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Parameter values (override the defaults).
    pub parameters: BTreeMap<String, Value>,
    /// Context values (override the flow's `[context]`).
    pub context: BTreeMap<String, String>,
    /// Stops the run: running guests are interrupted, nothing new starts.
    pub cancel: CancelToken,
    /// The manifest the flow came from (path and text), recorded so that `sluice resume` in
    /// another process can rebuild the flow.
    pub manifest: Option<(PathBuf, String)>,
}

impl FlowRunner {
    /// A runner using `sandbox`, the system clock and no handlers.
    pub fn new(sandbox: Sandbox) -> Self {
        Self {
            sandbox,
            clock: Arc::new(SystemClock),
            task_handlers: HashMap::new(),
            all_task_handlers: Vec::new(),
            flow_handlers: Vec::new(),
            handler_budget: RunBudget {
                timeout: Duration::from_secs(10),
                ..RunBudget::default()
            },
            events: None,
            store: None,
        }
    }

    /// Record every run in `store` (runs, transitions, logs, outputs), use its output cache, and
    /// watch it for cancellation requested from outside. Without a store nothing is persisted
    /// and output caching is off.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Use `clock` for timestamps and retry delays.
    pub fn clock(mut self, clock: ClockRef) -> Self {
        self.clock = clock;
        self
    }

    /// Add a state handler for the task `task`.
    pub fn task_handler(mut self, task: impl Into<String>, handler: StateHandler) -> Self {
        self.task_handlers
            .entry(task.into())
            .or_default()
            .push(handler);
        self
    }

    /// Add a state handler for every task (after the task's own handlers).
    pub fn every_task_handler(mut self, handler: StateHandler) -> Self {
        self.all_task_handlers.push(handler);
        self
    }

    /// Add a state handler for the flow run's own state.
    pub fn flow_handler(mut self, handler: StateHandler) -> Self {
        self.flow_handlers.push(handler);
        self
    }

    /// Send every state change to `events`.
    pub fn events(mut self, events: mpsc::UnboundedSender<FlowEvent>) -> Self {
        self.events = Some(events);
        self
    }

    /// The sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Load every component of `def` (building those with a build command whose file is
    /// missing), in parallel, each distinct component once.
    pub async fn prepare(&self, def: FlowDef, dir: &Path) -> Result<PreparedFlow, PrepareError> {
        for step in crate::flow::build::plan(&def) {
            if step.outputs.iter().any(|o| !o.is_file()) {
                step.run(dir).await?;
            }
        }
        // Each distinct file is read and loaded once, however many tasks use it.
        let task_paths: HashSet<&Path> = def.tasks.iter().map(|t| t.component.as_path()).collect();
        let handler_paths: HashSet<&Path> = def
            .tasks
            .iter()
            .flat_map(|t| t.hooks.all().map(PathBuf::as_path))
            .collect();
        let mut loads = JoinSet::new();
        for path in task_paths.union(&handler_paths) {
            let sandbox = self.sandbox.clone();
            let is_task = task_paths.contains(path);
            let is_handler = handler_paths.contains(path);
            let path = path.to_path_buf();
            loads.spawn(async move {
                let task = match is_task {
                    true => Some(sandbox.load_file(&path).await),
                    false => None,
                };
                let handler = match is_handler {
                    true => Some(sandbox.load_handler_file(&path).await),
                    false => None,
                };
                (path, task, handler)
            });
        }
        let mut tasks_by_path = HashMap::new();
        let mut handlers_by_path = HashMap::new();
        let mut failures = HashMap::new();
        while let Some(joined) = loads.join_next().await {
            let Ok((path, task, handler)) = joined else {
                continue;
            };
            match task {
                Some(Ok(c)) => {
                    tasks_by_path.insert(path.clone(), c);
                }
                Some(Err(e)) => {
                    failures.insert(path.clone(), e);
                }
                None => {}
            }
            match handler {
                Some(Ok(h)) => {
                    handlers_by_path.insert(path, h);
                }
                Some(Err(e)) => {
                    failures.insert(path, e);
                }
                None => {}
            }
        }
        let mut components = Vec::with_capacity(def.tasks.len());
        let mut hooks = Vec::with_capacity(def.tasks.len());
        for t in &def.tasks {
            let fail =
                |path: &PathBuf, failures: &mut HashMap<PathBuf, LoadError>| PrepareError::Load {
                    task: t.name.clone(),
                    source: failures.remove(path).unwrap_or_else(|| {
                        LoadError::Sandbox(format!("`{}` did not load", path.display()))
                    }),
                };
            match tasks_by_path.get(&t.component) {
                Some(c) => components.push(c.clone()),
                None => return Err(fail(&t.component, &mut failures)),
            }
            let mut h = TaskHooks::default();
            for (list, paths) in [
                (&mut h.on_completion, &t.hooks.on_completion),
                (&mut h.on_failure, &t.hooks.on_failure),
                (&mut h.on_retry, &t.hooks.on_retry),
                (&mut h.on_state, &t.hooks.on_state),
            ] {
                for p in paths {
                    match handlers_by_path.get(p) {
                        Some(c) => list.push(c.clone()),
                        None => return Err(fail(p, &mut failures)),
                    }
                }
            }
            let empty = h.on_completion.is_empty()
                && h.on_failure.is_empty()
                && h.on_retry.is_empty()
                && h.on_state.is_empty();
            hooks.push((!empty).then(|| Arc::new(h)));
        }
        Ok(PreparedFlow {
            def: Arc::new(def),
            components,
            hooks,
        })
    }

    /// Run `flow` from the start.
    pub async fn run(
        &self,
        flow: &PreparedFlow,
        options: RunOptions,
    ) -> Result<FlowRun, PrepareError> {
        let now = self.clock.now();
        let parameters = merge_parameters(&flow.def, options.parameters)?;
        let mut context = flow.def.context.clone();
        context.extend(options.context);
        let run = FlowRun {
            id: FlowRunId::new(),
            flow: flow.def.name.clone(),
            state: State::new(StateName::Pending, now),
            history: vec![Transition {
                from: None,
                to: StateName::Pending,
                time: now,
                message: None,
            }],
            parameters,
            context,
            tasks: flow
                .def
                .tasks
                .iter()
                .map(|t| TaskRun::new(&t.name, None, now))
                .collect(),
        };
        let lease = match &self.store {
            Some(store) => {
                let lease = store.lease(run.id)?;
                // The run and its task runs in one write: never a run without its tasks.
                let tasks = run
                    .tasks
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        task_write(
                            run.id,
                            (i, Arc::from(t.name.as_str())),
                            None,
                            t,
                            t.history.clone(),
                        )
                    })
                    .collect();
                store.submit(Write::RunCreated(Box::new(RunHeader {
                    id: run.id,
                    flow: run.flow.clone(),
                    state: run.state.clone(),
                    transition: run.history[0].clone(),
                    parameters: run.parameters.clone(),
                    context: run.context.clone(),
                    manifest: options.manifest,
                    pid: std::process::id(),
                    tasks,
                })));
                Some(lease)
            }
            None => None,
        };
        let run = Exec::new(self, flow, run, &[], options.cancel)
            .execute()
            .await;
        self.recorded(run, lease).await
    }

    /// Wait until the store has everything of `run`, then let other processes see it is over.
    /// When the store cannot write it all, the run is recorded (if the store can still write
    /// anything) as Crashed, not fully recorded, resumable from its last recorded write; the
    /// returned run says the same.
    async fn recorded(
        &self,
        mut run: FlowRun,
        lease: Option<Box<dyn RunLease>>,
    ) -> Result<FlowRun, PrepareError> {
        let Some(store) = self.store.clone() else {
            return Ok(run);
        };
        let flusher = store.clone();
        let flushed = tokio::task::spawn_blocking(move || flusher.flush())
            .await
            .unwrap_or_else(|e| Err(StoreError::io("flush", e)));
        let result = match flushed {
            Ok(()) => Ok(run),
            Err(source) => {
                let (id, now) = (run.id, self.clock.now());
                let marked = tokio::task::spawn_blocking(move || store.abandon(id, now)).await;
                if let Ok(Ok(Some(state))) = marked {
                    run.history.push(Transition {
                        from: Some(run.state.name),
                        to: state.name,
                        time: state.timestamp,
                        message: state.message.clone(),
                    });
                    run.state = state;
                }
                Err(PrepareError::NotRecorded {
                    run: Box::new(run),
                    source,
                })
            }
        };
        // Only now: until the record says how the run ended, no other process may take it for
        // dead (or resume it).
        drop(lease);
        result
    }

    /// Resume `previous` (a Paused or Failed run): tasks that completed keep their results and
    /// do not run again; `start_tasks` run as roots, without their trigger check, using the
    /// inputs cached on their state; every other unfinished task runs when its upstream tasks
    /// finish.
    pub async fn resume(
        &self,
        flow: &PreparedFlow,
        previous: FlowRun,
        start_tasks: &[&str],
        cancel: CancelToken,
    ) -> Result<FlowRun, PrepareError> {
        let names: Vec<&str> = flow.def.tasks.iter().map(|t| t.name.as_str()).collect();
        let recorded: Vec<&str> = previous.tasks.iter().map(|t| t.name.as_str()).collect();
        if names != recorded || previous.flow != flow.def.name {
            return Err(PrepareError::RecordMismatch {
                flow: flow.def.name.clone(),
                detail: format!(
                    "the record is of `{}` with tasks {recorded:?}, the flow has {names:?}",
                    previous.flow
                ),
            });
        }
        let mut starts = Vec::new();
        for s in start_tasks {
            let i = flow
                .def
                .tasks
                .iter()
                .position(|t| t.name == *s)
                .ok_or_else(|| PrepareError::UnknownStartTask((*s).to_owned()))?;
            starts.push(i);
        }
        let lease = match &self.store {
            Some(store) => {
                let lease = store.lease(previous.id)?;
                // Another process may have resumed the run between our read and our lease.
                let now = store.load_run(previous.id)?.run;
                if now.history.len() != previous.history.len() || now.state != previous.state {
                    return Err(PrepareError::RecordMismatch {
                        flow: flow.def.name.clone(),
                        detail: format!(
                            "flow run {} changed since it was read (now {}); read it again",
                            previous.id, now.state.name
                        ),
                    });
                }
                Some(lease)
            }
            None => None,
        };
        let run = Exec::new(self, flow, previous, &starts, cancel)
            .execute()
            .await;
        self.recorded(run, lease).await
    }
}

fn merge_parameters(
    def: &FlowDef,
    given: BTreeMap<String, Value>,
) -> Result<BTreeMap<String, Value>, PrepareError> {
    let mut params = def.parameters.clone();
    for (k, v) in given {
        if !params.contains_key(&k) {
            return Err(PrepareError::UnknownParameter {
                hint: crate::flow::Hint::closest(&k, def.parameters.keys().map(String::as_str)),
                name: k,
            });
        }
        params.insert(k, v);
    }
    Ok(params)
}

/// One schedulable unit: a task, or one child of a mapped task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Unit {
    task: usize,
    child: Option<u32>,
}

type Edges = smallvec::SmallVec<[usize; 2]>;

/// What the executor tracks per task (beside its record).
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

#[derive(Debug, Default)]
struct MapRun {
    children_left: usize,
    inputs: Vec<Arc<Value>>,
    outputs: Vec<Option<Arc<Value>>>,
    /// Attempts each child made before this run (when resuming).
    base_attempts: Vec<u32>,
}

struct Done {
    unit: Unit,
    outcome: RunOutcome,
}

struct Exec<'a> {
    runner: &'a FlowRunner,
    flow: &'a PreparedFlow,
    index: HashMap<&'a str, usize>,
    run: FlowRun,
    nodes: Vec<Node>,
    starts: HashSet<usize>,
    ready: VecDeque<Unit>,
    tag_blocked: HashMap<String, VecDeque<Unit>>,
    running: usize,
    running_by_tag: HashMap<String, usize>,
    inflight: JoinSet<Done>,
    inflight_units: HashMap<tokio::task::Id, Unit>,
    timers: JoinSet<Unit>,
    parameters: Arc<str>,
    context: Arc<BTreeMap<String, String>>,
    cancel: CancelToken,
    cancelled: bool,
    /// Task names, shared by every record sent to the store.
    names: Vec<Arc<str>>,
    /// Cache keys of units that missed the cache: their output is cached when they complete.
    cache_keys: HashMap<Unit, CacheKey>,
    /// Per cached task, its valid cache entries by key, loaded on first use.
    cache_index: HashMap<usize, HashMap<String, CachedOutput>>,
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

impl<'a> Exec<'a> {
    fn new(
        runner: &'a FlowRunner,
        flow: &'a PreparedFlow,
        run: FlowRun,
        starts: &[usize],
        cancel: CancelToken,
    ) -> Self {
        let def = &flow.def;
        let index: HashMap<&str, usize> = def
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut nodes: Vec<Node> = (0..def.tasks.len()).map(|_| Node::default()).collect();
        for (i, t) in def.tasks.iter().enumerate() {
            for u in t.upstream() {
                let j = index[u];
                nodes[i].upstream.push(j);
                nodes[j].downstream.push(i);
            }
            let mut data: Edges = t.input.task_refs().iter().map(|u| index[u]).collect();
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
        Self {
            runner,
            flow,
            index,
            nodes,
            starts: starts.iter().copied().collect(),
            ready: VecDeque::new(),
            tag_blocked: HashMap::new(),
            running: 0,
            running_by_tag: HashMap::new(),
            inflight: JoinSet::new(),
            inflight_units: HashMap::new(),
            timers: JoinSet::new(),
            parameters: Value::Object(parameters).to_string().into(),
            context: Arc::new(context),
            cancel,
            cancelled: false,
            names: def
                .tasks
                .iter()
                .map(|t| Arc::from(t.name.as_str()))
                .collect(),
            cache_keys: HashMap::new(),
            cache_index: HashMap::new(),
            unwritten: HashSet::new(),
            cache_scope,
            skip_cache: HashSet::new(),
            mapped_children,
            run,
        }
    }

    fn def(&self) -> &FlowDef {
        &self.flow.def
    }

    fn record(&mut self, u: Unit) -> &mut TaskRun {
        let t = &mut self.run.tasks[u.task];
        match u.child {
            Some(c) => &mut t.children[c as usize],
            None => t,
        }
    }

    /// Send an event, built only when someone listens.
    fn emit(&self, event: impl FnOnce() -> FlowEvent) {
        if let Some(tx) = &self.runner.events {
            let _ = tx.send(event());
        }
    }

    async fn execute(mut self) -> FlowRun {
        let watcher = self.runner.store.clone().map(|store| {
            let (run, cancel) = (self.run.id, self.cancel.clone());
            // Requests are stamped with the wall clock by `sluice cancel`.
            tokio::spawn(watch_store(store, run, cancel, Utc::now()))
        });
        self.flow_transition(State::new(StateName::Running, self.now()))
            .await;
        self.restore();
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            if node.waiting_on == 0 && !node.evaluated && !self.run.tasks[i].state.is_terminal() {
                self.evaluate(i).await;
            }
        }
        loop {
            self.start_ready().await;
            if self.inflight.is_empty() && self.timers.is_empty() {
                break;
            }
            tokio::select! {
                Some(done) = self.inflight.join_next_with_id() => {
                    let done = match done {
                        Ok((id, done)) => {
                            self.inflight_units.remove(&id);
                            Some(done)
                        }
                        Err(e) => self.inflight_units.remove(&e.id()).map(|unit| Done {
                            unit,
                            outcome: RunOutcome {
                                ending: Ending::HostFault {
                                    message: format!("the task run failed in the host: {e}"),
                                },
                                logs: Vec::new(),
                                logs_dropped_bytes: 0,
                                usage: Default::default(),
                            },
                        }),
                    };
                    if let Some(done) = done {
                        self.finish_attempt(done).await;
                    }
                }
                Some(unit) = self.timers.join_next() => {
                    if let Ok(unit) = unit {
                        self.ready.push_back(unit);
                    }
                }
                () = self.cancel.cancelled(), if !self.cancelled => self.begin_cancel().await,
            }
        }
        if let Some(w) = watcher {
            w.abort();
        }
        self.finish().await
    }

    fn now(&self) -> DateTime<Utc> {
        self.runner.clock.now()
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
                self.persist(
                    Unit {
                        task: i,
                        child: None,
                    },
                    None,
                );
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
            let ups = self.nodes[i].upstream.clone();
            self.nodes[i].waiting_on = ups
                .iter()
                .filter(|&&u| !self.run.tasks[u].state.is_terminal())
                .count();
        }
        for i in 0..self.nodes.len() {
            let ups = &self.nodes[i].data_upstream;
            self.nodes[i].input_unchanged = ups
                .iter()
                .all(|&u| self.run.tasks[u].state.state_type() == StateType::Completed);
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
    async fn evaluate(&mut self, i: usize) {
        if std::mem::replace(&mut self.nodes[i].evaluated, true) {
            return;
        }
        let task = &self.flow.def.tasks[i];
        let upstream_states: Vec<StateName> = self.nodes[i]
            .upstream
            .iter()
            .map(|&u| self.run.tasks[u].state.name)
            .collect();
        let unit = Unit {
            task: i,
            child: None,
        };
        if self.cancelled {
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            self.transition(unit, s).await;
            return self.task_finished(i).await;
        }
        if !self.starts.contains(&i) {
            if task.skip_on_upstream_skip
                && let Some(&u) = self.nodes[i]
                    .upstream
                    .iter()
                    .find(|&&u| self.run.tasks[u].state.name == StateName::Skipped)
            {
                let msg = format!("upstream task `{}` was skipped", self.def().tasks[u].name);
                let s = State::new(StateName::Skipped, self.now()).with_message(msg);
                self.transition(unit, s).await;
                return self.task_finished(i).await;
            }
            match task.trigger.decide(&upstream_states) {
                TriggerDecision::Run => {}
                TriggerDecision::Fail => {
                    let detail: Vec<String> = self.nodes[i]
                        .upstream
                        .iter()
                        .map(|&u| {
                            format!(
                                "`{}` is {}",
                                self.def().tasks[u].name,
                                self.run.tasks[u].state.name
                            )
                        })
                        .collect();
                    let msg = format!(
                        "trigger `{}` did not pass: {}",
                        task.trigger.as_str(),
                        detail.join(", ")
                    );
                    let s = State::new(StateName::TriggerFailed, self.now()).with_message(msg);
                    self.transition(unit, s).await;
                    return self.task_finished(i).await;
                }
                TriggerDecision::Pause => {
                    self.resolve_input(i);
                    let s = State::new(StateName::Paused, self.now()).with_message(
                        "manual_only: waiting to be resumed with this task as a start task",
                    );
                    self.transition(unit, s).await;
                    return;
                }
            }
        }
        self.resolve_input(i);
        self.schedule(i).await;
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
        let task = &self.flow.def.tasks[i];
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
    async fn schedule(&mut self, i: usize) {
        let task = &self.flow.def.tasks[i];
        let input = self.nodes[i].input.clone().unwrap_or_default();
        if task.map == MapOver::No {
            self.ready.push_front(Unit {
                task: i,
                child: None,
            });
            return;
        }
        // The cap on mapped children, checked before any child is created.
        let others = self
            .mapped_children
            .saturating_sub(self.run.tasks[i].children.len());
        if let Some(n) = map_len(&input, &task.map) {
            let cap = self.def().max_mapped_children;
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
                let unit = Unit {
                    task: i,
                    child: None,
                };
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                self.transition(unit, s).await;
                return self.task_finished(i).await;
            }
        }
        let children = match &task.map {
            MapOver::No => Ok(Vec::new()),
            MapOver::Input => match &*input {
                Value::Array(items) => Ok(items.iter().cloned().map(Arc::new).collect()),
                other => Err(format!(
                    "`map = true` needs a list as input, got {}",
                    kind_of(other)
                )),
            },
            MapOver::Fields(fields) => zip_fields(&input, fields),
        };
        let children: Vec<Arc<Value>> = match children {
            Ok(c) => {
                self.mapped_children = others.saturating_add(c.len());
                c
            }
            Err(msg) => {
                let unit = Unit {
                    task: i,
                    child: None,
                };
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                self.transition(unit, s).await;
                return self.task_finished(i).await;
            }
        };
        let now = self.now();
        let n = children.len();
        let name = task.name.clone();
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
                    TaskRun::new(&name, Some(c as u32), now)
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
            return self.complete_mapped(i).await;
        }
        for c in todo.into_iter().rev() {
            self.ready.push_front(Unit {
                task: i,
                child: Some(c as u32),
            });
        }
    }

    /// Start queued units while the global and per-tag limits allow.
    async fn start_ready(&mut self) {
        while self.running < self.def().concurrency {
            let Some(unit) = self.ready.pop_front() else {
                return;
            };
            if self.record(unit).state.is_terminal() {
                // Cancelled while it waited for its retry timer.
                continue;
            }
            if self.cancelled {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task started");
                self.transition(unit, s).await;
                self.unit_finished(unit).await;
                continue;
            }
            let task = &self.flow.def.tasks[unit.task];
            if let Some(tag) = task.tags.iter().find(|t| {
                self.def().tag_limits.get(*t).is_some_and(|&limit| {
                    self.running_by_tag.get(*t).copied().unwrap_or(0) >= limit
                })
            }) {
                self.tag_blocked
                    .entry(tag.clone())
                    .or_default()
                    .push_back(unit);
                continue;
            }
            self.start(unit).await;
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

    /// Output caching: on the unit's first attempt in this run, look its key up in the store. A
    /// hit completes the unit as Cached without instantiating the component (returns true); a
    /// miss records why and remembers the key, so the output is cached when the unit completes.
    async fn try_cache(&mut self, unit: Unit) -> bool {
        let task: &TaskDef = &self.flow.def.tasks[unit.task];
        let (Some(policy), Some(store)) = (&task.cache, self.runner.store.clone()) else {
            return false;
        };
        if self.record_ref(unit).attempts > self.base_attempts(unit)
            || self.skip_cache.remove(&unit)
        {
            return false;
        }
        let input = self.unit_input(unit);
        let component = self.flow.components[unit.task].digest();
        let identity = TaskIdentity {
            scope: &self.cache_scope,
            task: &task.name,
            component: &component,
            budget: &task.budget,
            map_index: unit.child,
        };
        let Some(key) = CacheKey::new(policy, identity, &input, &self.run.parameters) else {
            return false;
        };
        let now = self.now();
        let index = self.cache_index.entry(unit.task).or_insert_with(|| {
            match store.cache_preload(&task.name, now, CACHE_PRELOAD_BYTES) {
                Ok(entries) => entries
                    .into_iter()
                    .map(|c| (c.entry.key.clone(), c))
                    .collect(),
                Err(e) => {
                    tracing::warn!(task = %task.name, "cannot preload the cache: {e}");
                    HashMap::new()
                }
            }
        });
        let preloaded = index.get(&key.key).and_then(|c| {
            let value = c.value.clone()?;
            (c.entry.expires_at > now).then(|| CacheLookup::Hit {
                output: value,
                blob: c.entry.blob.clone(),
                entry: Box::new(c.entry.clone()),
            })
        });
        let miss = |key: &CacheKey, reason: String| CacheInfo {
            status: CacheStatus::Miss,
            key: key.key.clone(),
            validator: key.validator.clone(),
            reason,
            source_flow_run: None,
            source_task_run: None,
            expires_at: None,
        };
        // Not preloaded (or expired since): the store is authoritative, and explains a miss.
        let lookup = match preloaded {
            Some(hit) => Ok(hit),
            None => store.cache_lookup(&key, now),
        };
        match lookup {
            Ok(CacheLookup::Hit {
                output,
                blob,
                entry,
            }) => {
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
                let state = self
                    .transition_after_attempt(unit, state, Some(Blob::Stored(blob)))
                    .await;
                if state.state_type() == StateType::Scheduled {
                    // A handler asked to run it again: this time the component runs.
                    self.skip_cache.insert(unit);
                }
                self.proceed(unit, &state, Some(output)).await;
                true
            }
            Ok(CacheLookup::Miss(reason)) => {
                self.record(unit).cache = Some(miss(&key, reason));
                self.cache_keys.insert(unit, key);
                false
            }
            Err(e) => {
                tracing::warn!(task = %task.name, "cache lookup failed: {e}");
                self.record(unit).cache = Some(miss(&key, format!("the lookup failed: {e}")));
                false
            }
        }
    }

    /// The unit completed with `out`: hand the output on and wake what waits for it.
    async fn completed(&mut self, unit: Unit, out: Arc<Value>) {
        match (unit.child, &mut self.nodes[unit.task].map) {
            (Some(c), Some(map)) => map.outputs[c as usize] = Some(out),
            _ => self.nodes[unit.task].output = Some(out),
        }
        self.unit_finished(unit).await;
    }

    async fn start(&mut self, unit: Unit) {
        if self.try_cache(unit).await {
            return;
        }
        let task: &TaskDef = &self.flow.def.tasks[unit.task];
        self.running += 1;
        for tag in &task.tags {
            *self.running_by_tag.entry(tag.clone()).or_default() += 1;
        }
        let attempt = self.record(unit).attempts.saturating_add(1);
        let base = self.base_attempts(unit);
        let name = if attempt > base + 1 {
            StateName::Retrying
        } else {
            StateName::Running
        };
        let msg = (attempt > base + 1).then(|| format!("attempt {attempt}"));
        let mut s = State::new(name, self.now());
        s.message = msg;
        // Counted before the transition is recorded, so a crash mid-attempt still counts it.
        self.record(unit).attempts = attempt;
        self.transition(unit, s).await;
        let input = self.unit_input(unit);
        let ctx = TaskContext {
            flow_run_id: self.run.id,
            task_run_id: self.record(unit).id,
            task_name: task.name.as_str().into(),
            attempt,
            map_index: unit.child,
            parameters: self.parameters.clone(),
            values: self.context.clone(),
        };
        let sandbox = self.runner.sandbox.clone();
        let component = self.flow.components[unit.task].clone();
        let budget = task.budget;
        let cancel = self.cancel.clone();
        let handle = self.inflight.spawn(async move {
            let outcome = sandbox
                .run(&component, &input, &ctx, &budget, Some(&cancel))
                .await;
            Done { unit, outcome }
        });
        self.inflight_units.insert(handle.id(), unit);
    }

    async fn finish_attempt(&mut self, done: Done) {
        let Done { unit, outcome } = done;
        let task: &TaskDef = &self.flow.def.tasks[unit.task];
        self.running -= 1;
        for tag in &task.tags {
            if let Some(n) = self.running_by_tag.get_mut(tag) {
                *n = n.saturating_sub(1);
            }
            if let Some(blocked) = self.tag_blocked.get_mut(tag) {
                while let Some(u) = blocked.pop_back() {
                    self.ready.push_front(u);
                }
            }
        }
        let base = self.base_attempts(unit);
        let attempts = self.record(unit).attempts - base.min(self.record(unit).attempts);
        let retry = if self.cancelled || self.cancel.is_cancelled() {
            Retry::Exhausted
        } else if attempts <= task.retries {
            let delay =
                TimeDelta::from_std(task.retry_delay_for(attempts)).unwrap_or(TimeDelta::MAX);
            let max_delay = TimeDelta::from_std(task.retry_delay_cap()).unwrap_or(TimeDelta::MAX);
            Retry::Remaining { delay, max_delay }
        } else {
            Retry::Exhausted
        };
        let mut state = State::after_run(&outcome.ending, retry, self.now());
        let output = (state.state_type() == StateType::Completed)
            .then(|| Arc::new(state.result.take().unwrap_or(Value::Null)));
        self.persist_logs(unit, &outcome.logs);
        let record = self.record(unit);
        record.run_time += outcome.usage.duration;
        record.fuel_consumed += outcome.usage.fuel_consumed;
        record.logs.extend(outcome.logs);
        let state = self
            .transition_after_attempt(unit, state, output.clone().map(Blob::Value))
            .await;
        if state.is_terminal()
            && let Some(key) = self.cache_keys.remove(&unit)
            && state.name == StateName::Completed
            && let (Some(store), Some(policy), Some(out)) = (
                &self.runner.store,
                &self.flow.def.tasks[unit.task].cache,
                &output,
            )
        {
            let expires_at = TimeDelta::from_std(policy.cache_for)
                .ok()
                .and_then(|d| state.timestamp.checked_add_signed(d))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            store.submit(Write::Cache(Box::new(CacheWrite {
                key,
                output: out.clone(),
                created_at: state.timestamp,
                expires_at,
                flow_run: self.run.id,
                task_run: self.record_ref(unit).id,
            })));
        }
        if matches!(outcome.ending, Ending::Cancelled) && !self.cancelled {
            // The guest saw the cancel before this loop did.
            self.begin_cancel().await;
        }
        self.proceed(unit, &state, output).await;
    }

    /// After an attempt (or a cache hit) ended in `state`: wait for the retry, hand the output
    /// on, or finish the unit.
    async fn proceed(&mut self, unit: Unit, state: &State, output: Option<Arc<Value>>) {
        match state.state_type() {
            StateType::Scheduled => {
                let at = state.scheduled_for.unwrap_or_else(|| self.now());
                let sleep = self.runner.clock.sleep_until(at);
                self.timers.spawn(async move {
                    sleep.await;
                    unit
                });
            }
            StateType::Completed => {
                let out = output.unwrap_or_else(|| Arc::new(Value::Null));
                self.completed(unit, out).await;
            }
            _ if state.is_terminal() => self.unit_finished(unit).await,
            // Paused: waits to be resumed with its cached input.
            _ => {}
        }
    }

    async fn unit_finished(&mut self, unit: Unit) {
        match unit.child {
            None => self.task_finished(unit.task).await,
            Some(_) => {
                let left = self.nodes[unit.task].map.as_mut().map_or(0, |m| {
                    m.children_left = m.children_left.saturating_sub(1);
                    m.children_left
                });
                if left == 0 {
                    self.complete_mapped(unit.task).await;
                }
            }
        }
    }

    /// Every child of a mapped task finished: the parent is Mapped with the list of outputs, or
    /// Failed when any child did not succeed.
    async fn complete_mapped(&mut self, i: usize) {
        let unit = Unit {
            task: i,
            child: None,
        };
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
        self.transition_with(unit, state, output).await;
        self.task_finished(i).await;
    }

    /// The task reached a terminal state: release what it held and wake its downstream tasks.
    async fn task_finished(&mut self, i: usize) {
        self.nodes[i].input = None;
        if self.run.tasks[i].state.state_type() == StateType::Completed {
            self.run.tasks[i].cached_input = None;
        }
        let mut woken = Vec::new();
        for d in self.nodes[i].downstream.clone() {
            let node = &mut self.nodes[d];
            node.waiting_on = node.waiting_on.saturating_sub(1);
            if node.waiting_on == 0 && !node.evaluated && !self.run.tasks[d].state.is_terminal() {
                woken.push(d);
            }
        }
        for d in woken {
            Box::pin(self.evaluate(d)).await;
        }
    }

    async fn begin_cancel(&mut self) {
        self.cancelled = true;
        self.flow_transition(
            State::new(StateName::Cancelling, self.now())
                .with_message("cancel requested: interrupting running tasks"),
        )
        .await;
        // Retries waiting on a timer will not run.
        self.timers.abort_all();
        let waiting: Vec<Unit> = (0..self.run.tasks.len())
            .flat_map(|i| {
                let t = &self.run.tasks[i];
                let own = (t.state.state_type() == StateType::Scheduled).then_some(Unit {
                    task: i,
                    child: None,
                });
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
            self.transition(unit, s).await;
            self.unit_finished(unit).await;
        }
    }

    async fn finish(mut self) -> FlowRun {
        if self.cancelled {
            // Nothing will run any more: paused tasks and those waiting on them end Cancelled.
            let waiting: Vec<Unit> = (0..self.run.tasks.len())
                .filter(|&i| !self.run.tasks[i].state.is_terminal())
                .map(|task| Unit { task, child: None })
                .collect();
            for unit in waiting {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task ran");
                self.transition(unit, s).await;
            }
        }
        let now = self.now();
        // Outputs still held go into the record.
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(out) = node.output.take() {
                self.run.tasks[i].output = Some(Arc::unwrap_or_clone(out));
            }
        }
        let unfinished: Vec<&str> = self
            .run
            .tasks
            .iter()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.name.as_str())
            .collect();
        let state = if self.cancelled {
            State::new(StateName::Cancelled, now).with_message("the flow run was cancelled")
        } else if !unfinished.is_empty() {
            State::new(StateName::Paused, now).with_message(format!(
                "waiting on paused tasks: {}",
                unfinished.join(", ")
            ))
        } else {
            let refs: Vec<usize> = if self.def().reference_tasks.is_empty() {
                (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].downstream.is_empty())
                    .collect()
            } else {
                self.def()
                    .reference_tasks
                    .iter()
                    .filter_map(|r| self.def().tasks.iter().position(|t| &t.name == r))
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
        };
        self.flow_transition(state).await;
        self.run
    }

    /// Move a unit to `new`, through the state handlers; returns the state it ends in.
    async fn transition(&mut self, unit: Unit, new: State) -> State {
        self.transition_with(unit, new, None).await
    }

    /// [`Exec::transition`] for a state that carries `output` (recorded when the unit ends in a
    /// Completed-type state).
    async fn transition_with(&mut self, unit: Unit, new: State, output: Option<Blob>) -> State {
        self.transition_inner(unit, new, output, false).await
    }

    /// [`Exec::transition_with`] for the state an attempt (or a cache hit) ends in: what the
    /// state handlers replace it with goes through the task's retry policy
    /// ([`Exec::police_replacement`]).
    async fn transition_after_attempt(
        &mut self,
        unit: Unit,
        new: State,
        output: Option<Blob>,
    ) -> State {
        self.transition_inner(unit, new, output, true).await
    }

    async fn transition_inner(
        &mut self,
        unit: Unit,
        new: State,
        output: Option<Blob>,
        after_attempt: bool,
    ) -> State {
        let task = &self.flow.def.tasks[unit.task];
        let old = self.record(unit).state.clone();
        let proposed = after_attempt.then_some((new.name, new.scheduled_for));
        let mut state = new;
        if let Some(hs) = self.runner.task_handlers.get(&task.name) {
            for h in hs {
                state = h(&task.name, &old, state);
            }
        }
        for h in &self.runner.all_task_handlers {
            state = h(&task.name, &old, state);
        }
        state = self.run_hooks(unit, &old, state).await;
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
        self.emit(|| FlowEvent::Task {
            name: task.name.clone(),
            map_index: unit.child,
            state: state.name,
        });
        state
    }

    /// A state handler replaced the state an attempt ended in (`proposed`) with `state`. A
    /// Scheduled-type replacement asks to run the task again: it is a retry like any other, so
    /// it needs a retry left (attempts never exceed `retries + 1`), and it starts within the
    /// task's retry delay cap; otherwise the task is Failed, saying why. A replacement that
    /// would leave the task neither finished, paused nor scheduled (Running, Pending,
    /// Cancelling) would wait for ever, and fails too.
    fn police_replacement(&self, unit: Unit, proposed: StateName, mut state: State) -> State {
        let task = &self.flow.def.tasks[unit.task];
        let now = self.now();
        match state.state_type() {
            StateType::Scheduled => {
                let rec = self.record_ref(unit);
                let used = rec.attempts.saturating_sub(self.base_attempts(unit));
                if self.cancelled || self.cancel.is_cancelled() {
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

    fn record_ref(&self, u: Unit) -> &TaskRun {
        let t = &self.run.tasks[u.task];
        match u.child {
            Some(c) => &t.children[c as usize],
            None => t,
        }
    }

    /// Send the unit's state and its last transition to the store. Its input is stored when it
    /// will be needed later (a retry, or a paused task), its output when it completed.
    fn persist(&mut self, unit: Unit, output: Option<Blob>) {
        let Some(store) = &self.runner.store else {
            return;
        };
        let first = self.unwritten.remove(&unit);
        let parent = unit.child.map(|c| (self.run.tasks[unit.task].id, c));
        let rec = self.record_ref(unit);
        let transitions = match first {
            true => rec.history.clone(),
            false => rec.history.last().cloned().into_iter().collect(),
        };
        let mut write = task_write(
            self.run.id,
            (unit.task, self.names[unit.task].clone()),
            parent,
            rec,
            transitions,
        );
        let ty = rec.state.state_type();
        if ty == StateType::Completed {
            write.output = output;
        }
        store.submit(Write::Task(Box::new(write)));
    }

    /// Send a unit's log records to the store.
    fn persist_logs(&self, unit: Unit, records: &[LogRecord]) {
        let Some(store) = &self.runner.store else {
            return;
        };
        if records.is_empty() {
            return;
        }
        store.submit(Write::Logs {
            run: self.run.id,
            task_run: self.record_ref(unit).id,
            task: self.names[unit.task].clone(),
            map_index: unit.child,
            records: records.to_vec(),
        });
    }

    /// Run the task's handler components that apply to this transition, in order.
    async fn run_hooks(&mut self, unit: Unit, old: &State, mut state: State) -> State {
        let Some(hooks) = &self.flow.hooks[unit.task] else {
            return state;
        };
        let ty = state.state_type();
        let applicable: Vec<HandlerComponent> = hooks
            .on_state
            .iter()
            .chain(if ty == StateType::Completed {
                &hooks.on_completion[..]
            } else {
                &[]
            })
            .chain(if matches!(ty, StateType::Failed | StateType::Crashed) {
                &hooks.on_failure[..]
            } else {
                &[]
            })
            .chain(if state.name == StateName::Retrying {
                &hooks.on_retry[..]
            } else {
                &[]
            })
            .cloned()
            .collect();
        if applicable.is_empty() {
            return state;
        }
        let task = &self.flow.def.tasks[unit.task];
        let ctx = TaskContext {
            flow_run_id: self.run.id,
            task_run_id: self.record(unit).id,
            task_name: task.name.as_str().into(),
            attempt: self.record(unit).attempts.max(1),
            map_index: unit.child,
            parameters: self.parameters.clone(),
            values: self.context.clone(),
        };
        for handler in applicable {
            let result = self
                .runner
                .sandbox
                .run_handler(
                    &handler,
                    &task.name,
                    old,
                    &state,
                    &ctx,
                    &self.runner.handler_budget,
                )
                .await;
            let logs = result.logs;
            match result.result {
                Ok(Some(replacement)) => state = replacement,
                Ok(None) => {}
                Err(problem) => {
                    let message = format!("state handler `{}` failed: {problem}", handler.name());
                    tracing::warn!(task = %task.name, "{message}");
                    let time = self.runner.clock.now();
                    let record = LogRecord {
                        time,
                        source: crate::sandbox::LogSource::Log,
                        level: crate::sandbox::LogLevel::Error,
                        message,
                    };
                    self.persist_logs(unit, std::slice::from_ref(&record));
                    self.record(unit).logs.push(record);
                }
            }
            self.persist_logs(unit, &logs);
            self.record(unit).logs.extend(logs);
        }
        state
    }

    async fn flow_transition(&mut self, new: State) {
        let old = self.run.state.clone();
        let mut state = new;
        for h in &self.runner.flow_handlers {
            state = h(&self.run.flow, &old, state);
        }
        self.run.history.push(Transition {
            from: Some(old.name),
            to: state.name,
            time: state.timestamp,
            message: state.message.clone(),
        });
        self.emit(|| FlowEvent::Flow(state.name));
        if let (Some(store), Some(transition)) = (&self.runner.store, self.run.history.last()) {
            store.submit(Write::FlowState {
                run: self.run.id,
                state: state.clone(),
                transition: transition.clone(),
            });
        }
        self.run.state = state;
    }
}

/// The store record of task run `rec` (task `index`; `parent` for a mapped child) with its whole
/// history; the caller trims what was already written.
fn task_write(
    run: FlowRunId,
    (index, name): (usize, Arc<str>),
    parent: Option<(TaskRunId, u32)>,
    rec: &TaskRun,
    transitions: Vec<Transition>,
) -> TaskWrite {
    let ty = rec.state.state_type();
    TaskWrite {
        run,
        id: rec.id,
        index: u32::try_from(index).unwrap_or(u32::MAX),
        name,
        parent,
        state: rec.state.clone(),
        transitions,
        attempts: rec.attempts,
        run_time: rec.run_time,
        fuel_consumed: rec.fuel_consumed,
        output: None,
        cached_input: match (ty, parent) {
            (StateType::Scheduled | StateType::Paused, None) => {
                rec.cached_input.clone().map(Blob::Value)
            }
            _ => None,
        },
        clear_input: ty == StateType::Completed,
        cache: rec.cache.clone(),
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

/// Most bytes of cached values a run preloads per task; the rest are read on a hit.
const CACHE_PRELOAD_BYTES: u64 = 64 << 20;

/// How often a run checks the store for a cancel requested from another process.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Cancel the run when another process asks for it (`sluice cancel`), or when the store can no
/// longer record it.
async fn watch_store(
    store: Arc<dyn Store>,
    run: FlowRunId,
    cancel: CancelToken,
    since: DateTime<Utc>,
) {
    loop {
        tokio::time::sleep(CANCEL_POLL).await;
        if let Some(e) = store.write_error() {
            // Said once, here; the store holds its writes and the run stops.
            tracing::warn!("flow run {run}: cancelling, the store cannot record it: {e}");
            cancel.cancel();
            return;
        }
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.cancel_requested(run)).await {
            // Only requests made since this execution began: an earlier one cancelled an
            // earlier execution (the run may have been resumed since).
            Ok(Ok(Some(at))) if at >= since => {
                cancel.cancel();
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("flow run {run}: cannot check for cancellation: {e}"),
            Err(_) => return,
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// How many children mapping `input` makes, when it can be mapped (the errors are reported when
/// the children are made).
fn map_len(input: &Value, map: &MapOver) -> Option<usize> {
    match (map, input) {
        (MapOver::No, _) => None,
        (MapOver::Input, Value::Array(items)) => Some(items.len()),
        (MapOver::Fields(fields), Value::Object(obj)) => match obj.get(fields.first()?)? {
            Value::Array(a) => Some(a.len()),
            _ => None,
        },
        _ => None,
    }
}

/// Split an object input into child inputs by zipping the list-valued `fields`.
fn zip_fields(input: &Value, fields: &[String]) -> Result<Vec<Arc<Value>>, String> {
    let Value::Object(obj) = input else {
        return Err(format!(
            "mapping over fields needs an object input, got {}",
            kind_of(input)
        ));
    };
    let mut len = None;
    for f in fields {
        match obj.get(f) {
            Some(Value::Array(a)) => match len {
                None => len = Some(a.len()),
                Some(n) if n != a.len() => {
                    return Err(format!(
                        "mapped fields have different lengths: `{f}` has {}, others {n}",
                        a.len()
                    ));
                }
                Some(_) => {}
            },
            other => {
                return Err(format!(
                    "mapped field `{f}` must be a list, got {}",
                    other.map_or("nothing", kind_of)
                ));
            }
        }
    }
    Ok((0..len.unwrap_or(0))
        .map(|i| {
            let mut child = obj.clone();
            for f in fields {
                if let Some(Value::Array(a)) = obj.get(f) {
                    child.insert(f.clone(), a[i].clone());
                }
            }
            Arc::new(Value::Object(child))
        })
        .collect())
}
