//! The flow runner: the public face of the engine. `FlowRunner` is configured with the builder
//! methods (sandbox, store, clock, state handlers, event listener), prepares flows (every
//! component loaded once) and runs or resumes flow runs, each to its end and fully recorded.
//!
//! Decisions and execution are apart: [`machine`] is the flow state machine (Prefect's execution
//! model, no I/O), [`driver`] carries out its commands in this process, and [`executor`] runs
//! task runs behind an interface the server's queue and remote workers implement too. The run's
//! records are in [`record`], mapping's pure helpers in `mapping`.

mod body;
pub mod driver;
pub mod executor;
pub mod machine;
mod mapping;
pub mod record;
pub mod resumable;
mod subflow;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::clock::{ClockRef, SystemClock};
use crate::flow::FlowDef;
use crate::grants::{GrantError, ResolvedGrants, SecretSource};
use crate::ids::{FlowRunId, TaskRunId, TenantId};
use crate::sandbox::{
    CancelToken, FlowComponent, HandlerComponent, LoadError, RunBudget, Sandbox, TaskComponent,
};
use crate::state::{State, StateType};
use crate::store::{Blob, RunHeader, RunLease, Store, StoreError, TaskWrite, Write};

pub use record::{FlowEvent, FlowRun, JournalEntry, TaskRun, Transition};
pub use subflow::{PARENT_FLOW_RUN, PARENT_TASK_RUN};

/// A state handler: `(name, old, new) -> new`. Handlers are chained; each one's result is the
/// next one's `new` (Prefect's state handlers).
pub type StateHandler = Arc<dyn Fn(&str, &State, State) -> State + Send + Sync>;

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
    /// A task's grants cannot be given (a missing secret, an unusable directory).
    #[error(transparent)]
    Grants(#[from] GrantError),
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
    /// A context value (given, or in the manifest's `[context]`) under a key Sluice sets itself.
    #[error(
        "context key `{0}` is Sluice's own (it sets it for subflows' and deployments' runs): \
         choose another name"
    )]
    ReservedContext(String),
    /// Start tasks given to resume a flow written as code (its body decides what runs).
    #[error(
        "flow run {0} is of a flow written as code: it resumes by replaying its body, which \
         decides what runs; it takes no start tasks"
    )]
    CodeFlowStartTasks(FlowRunId),
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
    /// Per task: what its task runs run.
    components: Vec<Runs>,
    /// Per task; `None` when the task has no handler components.
    hooks: Vec<Option<Arc<TaskHooks>>>,
    /// Per task: what its runs are granted, and the digests its cache key includes.
    grants: Vec<ResolvedGrants>,
    /// A code flow's body.
    body: Option<FlowComponent>,
}

impl fmt::Debug for PreparedFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PreparedFlow")
            .field("flow", &self.def.name)
            .finish_non_exhaustive()
    }
}

/// What a declared task's runs run: its component, or (a code flow's subflow) a child flow run
/// of another prepared flow.
#[derive(Clone)]
enum Runs {
    Task(TaskComponent),
    Subflow(Arc<PreparedFlow>, Arc<crate::flow::SubflowDef>),
}

impl Runs {
    /// The digest a cache key includes (a subflow's task runs are never cached).
    fn digest(&self) -> String {
        match self {
            Runs::Task(c) => c.digest().to_owned(),
            Runs::Subflow(..) => String::new(),
        }
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

/// The in-process state handlers of a runner.
#[derive(Clone, Default)]
pub struct StateHandlers {
    /// Per task name, in the order added.
    pub task: HashMap<String, Vec<StateHandler>>,
    /// For every task, after its own.
    pub every_task: Vec<StateHandler>,
    /// For the flow run's own state.
    pub flow: Vec<StateHandler>,
}

impl fmt::Debug for StateHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateHandlers")
            .field("task", &self.task.keys().collect::<Vec<_>>())
            .field("every_task", &self.every_task.len())
            .field("flow", &self.flow.len())
            .finish()
    }
}

/// Runs flows. Configure with the builder methods; every setting has a default.
#[derive(Clone)]
pub struct FlowRunner {
    sandbox: Sandbox,
    clock: ClockRef,
    handlers: Arc<StateHandlers>,
    handler_budget: RunBudget,
    events: Option<mpsc::UnboundedSender<FlowEvent>>,
    store: Option<Arc<dyn Store>>,
    secrets: SecretSource,
    tenant: Option<TenantId>,
    executor: Option<Arc<dyn executor::Executor>>,
}

impl fmt::Debug for FlowRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowRunner")
            .field("sandbox", &self.sandbox)
            .finish_non_exhaustive()
    }
}

/// A run created by [`FlowRunner::start`], not executed yet.
#[derive(Debug)]
pub struct StartedRun {
    run: FlowRun,
    lease: Option<Box<dyn RunLease>>,
    cancel: CancelToken,
}

impl StartedRun {
    /// The run's id.
    pub fn id(&self) -> FlowRunId {
        self.run.id
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
    /// What else rebuilding the flow needs, as the caller writes it (a server: the uploaded
    /// components' digests and the subflows' texts): recorded with the run in the same write,
    /// so a run is never recorded without it. Read back as [`StoredRun::files`].
    pub files: Option<String>,
    /// The run's id (default: a new one).
    pub id: Option<FlowRunId>,
    /// For a deployment's scheduled run: what it went through before Pending.
    pub scheduled: Option<ScheduledStart>,
    /// For a subflow's child run: the parent flow run and the task run standing for it there
    /// (recorded in the context as [`PARENT_FLOW_RUN`] and [`PARENT_TASK_RUN`], keys nothing
    /// else may set, so a resumed parent finds this run again).
    pub parent: Option<(FlowRunId, TaskRunId)>,
}

/// A deployment's run, recorded Scheduled before it starts (see [`crate::schedule`]).
#[derive(Debug, Clone)]
pub struct ScheduledStart {
    /// The slot's time: the run's `scheduled_start` context value.
    pub at: DateTime<Utc>,
    /// Its transitions before Pending: Scheduled, and Late when it was.
    pub history: Vec<Transition>,
    /// The deployment whose slot it is: the run's `deployment` context value (per run, as
    /// `scheduled_start` is: no part of a cache key).
    pub deployment: Option<String>,
}

impl FlowRunner {
    /// A runner using `sandbox`, the system clock and no handlers.
    pub fn new(sandbox: Sandbox) -> Self {
        Self {
            sandbox,
            clock: Arc::new(SystemClock),
            handlers: Arc::default(),
            handler_budget: RunBudget {
                timeout: Duration::from_secs(10),
                ..RunBudget::default()
            },
            events: None,
            store: None,
            secrets: SecretSource::none(),
            tenant: None,
            executor: None,
        }
    }

    /// Where granted secrets get their values. Default: nowhere ([`SecretSource::none`]), so a
    /// flow that grants a secret fails to prepare, naming it.
    pub fn secrets(mut self, secrets: SecretSource) -> Self {
        self.secrets = secrets;
        self
    }

    /// Record every run in `store` (runs, transitions, logs, outputs), use its output cache, and
    /// watch it for cancellation requested from outside. Without a store nothing is persisted
    /// and output caching is off.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Run flows for the server tenant `tenant`: their cache keys are within it (see
    /// [`CacheScope::within`](crate::cache::CacheScope::within)). Default: none (embedded).
    pub fn tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = Some(tenant);
        self
    }

    /// Run every attempt on `executor` (a server's shared fair queue) instead of this
    /// process's sandbox directly. Default: none (the local executor, and an attempt with
    /// nothing beside it runs on the driver's own task).
    pub fn executor(mut self, executor: Arc<dyn executor::Executor>) -> Self {
        self.executor = Some(executor);
        self
    }

    /// Use `clock` for timestamps and retry delays.
    pub fn clock(mut self, clock: ClockRef) -> Self {
        self.clock = clock;
        self
    }

    /// Add a state handler for the task `task`.
    pub fn task_handler(mut self, task: impl Into<String>, handler: StateHandler) -> Self {
        Arc::make_mut(&mut self.handlers)
            .task
            .entry(task.into())
            .or_default()
            .push(handler);
        self
    }

    /// Add a state handler for every task (after the task's own handlers).
    pub fn every_task_handler(mut self, handler: StateHandler) -> Self {
        Arc::make_mut(&mut self.handlers).every_task.push(handler);
        self
    }

    /// Add a state handler for the flow run's own state.
    pub fn flow_handler(mut self, handler: StateHandler) -> Self {
        Arc::make_mut(&mut self.handlers).flow.push(handler);
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
        // Grants first: a missing secret is reported before anything is built or compiled.
        let grants = def
            .tasks
            .iter()
            .map(|t| t.grants.resolve(&t.name, &self.secrets, &self.sandbox))
            .collect::<Result<Vec<_>, _>>()?;
        // A code flow's subflows, each prepared as a flow of its own (in its own directory).
        let mut subflows = HashMap::new();
        for t in &def.tasks {
            if let Some(sub) = &t.subflow {
                let child_dir = sub.manifest.parent().unwrap_or(Path::new(".")).to_owned();
                let prepared = self.prepare_boxed(sub.def.clone(), child_dir).await?;
                subflows.insert(t.name.clone(), Arc::new(prepared));
            }
        }
        for step in crate::flow::build::plan(&def) {
            if step.outputs.iter().any(|o| !o.is_file()) {
                step.run(dir).await?;
            }
        }
        // Each distinct file is read and loaded once, however many tasks use it.
        let task_paths: HashSet<&Path> = def
            .tasks
            .iter()
            .filter(|t| t.subflow.is_none())
            .map(|t| t.component.as_path())
            .collect();
        let handler_paths: HashSet<&Path> = def
            .tasks
            .iter()
            .flat_map(|t| t.hooks.all().map(PathBuf::as_path))
            .collect();
        // A code flow's body loads beside the tasks (as world `flow`).
        let body_load = def.body.as_ref().map(|b| {
            let (sandbox, path) = (self.sandbox.clone(), b.component.clone());
            tokio::spawn(async move { sandbox.load_flow_file(&path).await })
        });
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
        let body = match body_load {
            Some(load) => Some(
                load.await
                    .unwrap_or_else(|e| Err(LoadError::Sandbox(format!("loading stopped: {e}"))))
                    .map_err(|e| PrepareError::Load {
                        task: "(flow body)".into(),
                        source: e,
                    })?,
            ),
            None => None,
        };
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
            if let (Some(prepared), Some(sub)) = (subflows.remove(&t.name), &t.subflow) {
                components.push(Runs::Subflow(prepared, sub.clone()));
                hooks.push(None);
                continue;
            }
            match tasks_by_path.get(&t.component) {
                Some(c) => components.push(Runs::Task(c.clone())),
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
            grants,
            body,
        })
    }

    /// [`FlowRunner::prepare`], boxed: a flow prepares its subflows.
    fn prepare_boxed(
        &self,
        def: FlowDef,
        dir: PathBuf,
    ) -> Pin<Box<dyn Future<Output = Result<PreparedFlow, PrepareError>> + Send + '_>> {
        Box::pin(async move { self.prepare(def, &dir).await })
    }

    /// Run `flow` from the start.
    pub async fn run(
        &self,
        flow: &PreparedFlow,
        options: RunOptions,
    ) -> Result<FlowRun, PrepareError> {
        let started = self.start(flow, options)?;
        self.finish(flow, started).await
    }

    /// Create a run of `flow` (recorded in the store: the write is queued) without executing
    /// it yet: [`FlowRunner::finish`] does. The run has its id, and with a store it is leased
    /// to this process, from here on.
    pub fn start(
        &self,
        flow: &PreparedFlow,
        options: RunOptions,
    ) -> Result<StartedRun, PrepareError> {
        let now = self.clock.now();
        let parameters = merge_parameters(&flow.def, options.parameters)?;
        let mut context = flow.def.context.clone();
        context.extend(options.context);
        // A user's `scheduled_start` would also be left out of cache keys, as Sluice's is.
        if let Some(key) = [
            PARENT_FLOW_RUN,
            PARENT_TASK_RUN,
            crate::cache::SCHEDULED_START,
            crate::cache::DEPLOYMENT,
        ]
        .into_iter()
        .find(|k| context.contains_key(*k))
        {
            return Err(PrepareError::ReservedContext(key.to_owned()));
        }
        if let Some((flow_run, task_run)) = options.parent {
            context.insert(PARENT_FLOW_RUN.to_owned(), flow_run.to_string());
            context.insert(PARENT_TASK_RUN.to_owned(), task_run.to_string());
        }
        let mut run = FlowRun::new(&flow.def, parameters, context, now);
        if let Some(id) = options.id {
            run.id = id;
        }
        if let Some(scheduled) = options.scheduled {
            run.context.insert(
                crate::cache::SCHEDULED_START.into(),
                scheduled.at.to_rfc3339(),
            );
            if let Some(deployment) = &scheduled.deployment {
                run.context
                    .insert(crate::cache::DEPLOYMENT.into(), deployment.clone());
            }
            if let Some(last) = scheduled.history.last() {
                run.history[0].from = Some(last.to);
                run.history.splice(0..0, scheduled.history);
            }
        }
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
                    history: run.history.clone(),
                    parameters: run.parameters.clone(),
                    context: run.context.clone(),
                    manifest: options.manifest,
                    files: options.files,
                    pid: std::process::id(),
                    tasks,
                })));
                Some(lease)
            }
            None => None,
        };
        Ok(StartedRun {
            run,
            lease,
            cancel: options.cancel,
        })
    }

    /// Execute a run made by [`FlowRunner::start`] to its end.
    pub async fn finish(
        &self,
        flow: &PreparedFlow,
        started: StartedRun,
    ) -> Result<FlowRun, PrepareError> {
        let StartedRun { run, lease, cancel } = started;
        let run = driver::drive(self, flow, (run, 0, false), &[], cancel).await;
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
        let result = match store.flush_async().await {
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
    /// finish. Each task that runs again has its `retries` afresh (a user resuming a run asks
    /// for new attempts).
    pub async fn resume(
        &self,
        flow: &PreparedFlow,
        previous: FlowRun,
        start_tasks: &[&str],
        cancel: CancelToken,
    ) -> Result<FlowRun, PrepareError> {
        self.resume_with(flow, previous, start_tasks, cancel, false)
            .await
    }

    /// [`FlowRunner::resume`] of a run that Crashed (its process died), as a server does by
    /// itself: retries continue from the attempts already made, so a task whose attempts keep
    /// crashing their process still runs at most `1 + retries` times.
    pub async fn resume_crashed(
        &self,
        flow: &PreparedFlow,
        previous: FlowRun,
        cancel: CancelToken,
    ) -> Result<FlowRun, PrepareError> {
        self.resume_with(flow, previous, &[], cancel, true).await
    }

    async fn resume_with(
        &self,
        flow: &PreparedFlow,
        previous: FlowRun,
        start_tasks: &[&str],
        cancel: CancelToken,
        keep_retry_budget: bool,
    ) -> Result<FlowRun, PrepareError> {
        if flow.def.body.is_some() && !start_tasks.is_empty() {
            return Err(PrepareError::CodeFlowStartTasks(previous.id));
        }
        let names: Vec<&str> = flow.def.tasks.iter().map(|t| t.name.as_str()).collect();
        let recorded: Vec<&str> = previous.tasks.iter().map(|t| t.name.as_str()).collect();
        // A code flow's task runs are its body's submissions, checked as it replays them.
        let same = flow.def.body.is_some() || names == recorded;
        if !same || previous.flow != flow.def.name {
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
        let mut logs_before = 0;
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
                // The flow's `max_log_bytes` holds for the run, not for each execution of it.
                let (store, id) = (store.clone(), previous.id);
                logs_before = tokio::task::spawn_blocking(move || store.log_cost(id))
                    .await
                    .map_err(|e| StoreError::io("log read", e))??;
                Some(lease)
            }
            None => None,
        };
        let run = driver::drive(
            self,
            flow,
            (previous, logs_before, keep_retry_budget),
            &starts,
            cancel,
        )
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

/// The store record of task run `rec` (task `index`; `parent` for a mapped child) with its whole
/// history; the caller trims what was already written.
pub(crate) fn task_write(
    run: FlowRunId,
    (index, name): (usize, Arc<str>),
    parent: Option<TaskRunId>,
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
        map_index: rec.map_index,
        state: rec.state.clone(),
        transitions,
        attempts: rec.attempts,
        run_time: rec.run_time,
        fuel_consumed: rec.fuel_consumed,
        memory_peak_bytes: rec.memory_peak_bytes,
        output: None,
        cached_input: match ty {
            StateType::Scheduled | StateType::Paused if parent.is_none() => {
                rec.cached_input.clone().map(Blob::Value)
            }
            _ => None,
        },
        clear_input: ty == StateType::Completed,
        cache: rec.cache.clone(),
    }
}
