//! The driver of one flow run in this process: it feeds the flow state machine its events and
//! carries out its commands. Attempts go to the executor, retry timers sleep on the injected
//! clock, handler components run on their own tokio tasks (a slow handler holds only its own
//! task, and cancellation drops it), cache reads run on blocking threads (each task's valid
//! entries preloaded once, so a hit is answered at once), writes go to the store's queue and
//! events to the listener. It also watches the store for a cancel requested by another process.
//! A code flow's body runs on a task of its own; its calls come to the driver as messages
//! (see [`super::body`]) and are answered from the machine.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::body::{BodyCall, DriverOrchestrator, Waiting};
use super::executor::{Executor, Finished, Grant, Job, LocalExecutor, Slot};
use super::machine::{Command, Event, FlowMachine, HookRequest, Settings, Unit};
use super::record::FlowRun;
use super::{FlowRunner, PreparedFlow};
use crate::cache::CacheKey;
use crate::clock::ClockRef;
use crate::ids::FlowRunId;
use crate::json::Json;
use crate::sandbox::{
    CancelToken, FlowBody, HandlerComponent, LogLevel, LogRecord, LogSource, RunOutcome, Sandbox,
};
use crate::state::{Retry, State, StateName};
use crate::store::{CacheLookup, CachedOutput, Store, StoreError};

/// Run `run` (fresh, or resumed with `starts` as start tasks, its logs so far costing
/// `logs_before`, its tasks' retries counted from their first attempt when `keep_retry_budget`)
/// of `flow` to its end.
pub(super) async fn drive(
    runner: &FlowRunner,
    flow: &PreparedFlow,
    (run, logs_before, keep_retry_budget): (FlowRun, u64, bool),
    starts: &[usize],
    cancel: CancelToken,
) -> FlowRun {
    let settings = Settings {
        clock: runner.clock.clone(),
        handlers: runner.handlers.clone(),
        record: runner.store.is_some(),
        events: runner.events.is_some(),
        digests: flow.components.iter().map(super::Runs::digest).collect(),
        grants: flow
            .grants
            .iter()
            .map(|g| (g.digest.clone(), g.secrets_digest.clone()))
            .collect(),
        logs_before,
        tenant: runner.tenant,
        keep_retry_budget,
        acquire: runner.executor.as_ref().is_some_and(|e| e.queues()),
    };
    let run_id = run.id;
    let machine = FlowMachine::new(flow.def.clone(), run, starts, settings);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (grants_tx, grants_rx) = mpsc::unbounded_channel();
    let (calls_tx, calls_rx) = mpsc::unbounded_channel();
    let (chunks_tx, chunks) = mpsc::unbounded_channel();
    let mut driver = Driver {
        machine,
        runner,
        flow,
        executor: LocalExecutor::new(runner.sandbox.clone()),
        shared: runner.executor.clone(),
        run_id,
        done_tx,
        grants_tx,
        granted: HashMap::new(),
        timers: JoinSet::new(),
        hooks: JoinSet::new(),
        hook_ids: HashMap::new(),
        here: None,
        in_flight: 0,
        deferred: VecDeque::new(),
        cache: runner
            .store
            .clone()
            .map(|store| CacheReads::new(store, chunks_tx)),
        chunks,
        reads: JoinSet::new(),
        cancel,
        body: None,
        waiting: Waiting::default(),
    };
    let watcher = runner.store.clone().map(|store| {
        let (run, cancel) = (driver.machine.run().id, driver.cancel.clone());
        // Requests are stamped with the wall clock by `sluice cancel`.
        tokio::spawn(watch_store(store, run, cancel, Utc::now()))
    });
    driver.machine.start();
    if let Some(component) = &flow.body {
        driver.body = Some(driver.start_body(component, calls_tx));
    }
    driver.run(done_rx, grants_rx, calls_rx).await;
    if let Some(w) = watcher {
        w.abort();
    }
    driver.machine.finish();
    driver.pump();
    driver.machine.into_run()
}

struct Driver<'a> {
    machine: FlowMachine,
    runner: &'a FlowRunner,
    flow: &'a PreparedFlow,
    executor: LocalExecutor,
    /// The runner's shared executor (a server's fair queue), when it has one: every attempt
    /// goes there, none runs on the driver's task.
    shared: Option<Arc<dyn Executor>>,
    run_id: FlowRunId,
    done_tx: mpsc::UnboundedSender<Finished>,
    grants_tx: mpsc::UnboundedSender<Grant>,
    /// Executor slots granted to units whose attempts have not been handed over yet.
    granted: HashMap<Unit, Slot>,
    /// The attempt running on the driver's own task (one that had nothing beside it).
    here: Option<Pin<Box<dyn Future<Output = Finished> + Send>>>,
    /// Attempts submitted and not answered.
    in_flight: usize,
    /// Attempts decided while the store's backlog of writes was over [`WRITE_BACKLOG`], in
    /// order: they start as it drains.
    deferred: VecDeque<Job>,
    timers: JoinSet<Unit>,
    hooks: JoinSet<HooksAnswer>,
    /// What each handler task answers for, so a task that dies still gets an answer.
    hook_ids: HashMap<tokio::task::Id, (Unit, u64, State)>,
    cache: Option<CacheReads>,
    /// Chunks of the cache's preloads, as they are read.
    chunks: mpsc::UnboundedReceiver<Chunk>,
    reads: JoinSet<ReadDone>,
    cancel: CancelToken,
    /// A code flow's body, while it runs.
    body: Option<Pin<Box<dyn Future<Output = RunOutcome> + Send>>>,
    /// The body's calls waiting for task runs.
    waiting: Waiting,
}

struct HooksAnswer {
    unit: Unit,
    seq: u64,
    state: State,
    logs: Vec<LogRecord>,
}

impl Driver<'_> {
    async fn run(
        &mut self,
        mut done: mpsc::UnboundedReceiver<Finished>,
        mut grants: mpsc::UnboundedReceiver<Grant>,
        mut calls: mpsc::UnboundedReceiver<BodyCall>,
    ) {
        loop {
            self.pump();
            if self.machine.is_idle() && self.body.is_none() {
                return;
            }
            let event = tokio::select! {
                Some(call) = calls.recv() => {
                    // A cancel is taken in before the call: nothing is submitted after it.
                    if self.cancel.is_cancelled() && !self.machine.is_cancelled() {
                        self.machine.handle(Event::CancelRequested);
                    }
                    let now = self.runner.clock.now();
                    self.waiting.call(&mut self.machine, call, now);
                    continue;
                }
                ended = async {
                    match self.body.as_mut() {
                        Some(body) => body.await,
                        None => std::future::pending().await,
                    }
                }, if self.body.is_some() => {
                    self.body = None;
                    // Handles it dropped last are released; nothing else it sent counts.
                    while let Ok(call) = calls.try_recv() {
                        if let BodyCall::Release(i) = call {
                            self.machine.release(i);
                        }
                    }
                    self.body_ended(ended);
                    continue;
                }
                f = async { self.here.as_mut()?.await.into() }, if self.here.is_some() => {
                    let Some(f): Option<Finished> = f else { continue };
                    self.here = None;
                    self.in_flight -= 1;
                    Event::AttemptEnded { unit: f.unit, outcome: f.outcome }
                }
                Some(f) = done.recv() => {
                    self.in_flight -= 1;
                    Event::AttemptEnded { unit: f.unit, outcome: f.outcome }
                }
                Some(g) = grants.recv() => {
                    self.granted.insert(g.unit, g.slot);
                    Event::SlotGranted(g.unit)
                }
                Some(Ok(unit)) = self.timers.join_next() => Event::TimerFired(unit),
                Some(joined) = self.hooks.join_next_with_id() => match joined {
                    Ok((id, a)) => {
                        self.hook_ids.remove(&id);
                        Event::HooksDone { unit: a.unit, seq: a.seq, state: a.state, logs: a.logs }
                    }
                    Err(e) => match self.hook_ids.remove(&e.id()) {
                        // Aborted by the machine's request: nobody waits for it.
                        None => continue,
                        Some((unit, seq, state)) => Event::HooksDone {
                            unit,
                            seq,
                            logs: vec![self.error_record(format!("state handlers failed: {e}"))],
                            state,
                        },
                    },
                },
                Some(chunk) = self.chunks.recv() => {
                    self.chunk_read(chunk);
                    continue;
                }
                Some(joined) = self.reads.join_next_with_id() => {
                    self.read_done(joined);
                    continue;
                }
                () = self.cancel.cancelled(), if !self.machine.is_cancelled() => Event::CancelRequested,
                () = tokio::time::sleep(BACKLOG_POLL), if !self.deferred.is_empty() => {
                    self.launch_deferred();
                    continue;
                }
            };
            self.take(event);
            // Every other end and grant already here is taken in too before the commands are
            // carried out: one pump (and one wait) for a batch of them, not one each.
            loop {
                let event = match done.try_recv() {
                    Ok(f) => {
                        self.in_flight -= 1;
                        Event::AttemptEnded {
                            unit: f.unit,
                            outcome: f.outcome,
                        }
                    }
                    Err(_) => match grants.try_recv() {
                        Ok(g) => {
                            self.granted.insert(g.unit, g.slot);
                            Event::SlotGranted(g.unit)
                        }
                        Err(_) => break,
                    },
                };
                self.take(event);
            }
        }
    }

    /// Hand `event` to the machine; a cancel is taken in before anything that happened after it.
    fn take(&mut self, event: Event) {
        if self.cancel.is_cancelled() && !self.machine.is_cancelled() {
            self.machine.handle(Event::CancelRequested);
        }
        self.machine.handle(event);
    }

    fn error_record(&self, message: String) -> LogRecord {
        LogRecord {
            time: self.runner.clock.now(),
            source: LogSource::Log,
            level: LogLevel::Error,
            message,
        }
    }

    /// Carry out every command the machine has decided on.
    fn pump(&mut self) {
        // An attempt decided alone, with nothing else in flight, runs on this task; the rest go
        // to the executor. Held back one command so that a second attempt spawns both.
        let mut held: Option<Job> = None;
        while let Some(command) = self.machine.next_command() {
            match command {
                Command::Run(a) => {
                    let component = match &self.flow.components[a.template] {
                        super::Runs::Task(c) => c.clone(),
                        super::Runs::Subflow(child, sub) => {
                            // The child's own task runs take slots: this one holds none while
                            // it waits for them (held, a body running as many subflows as
                            // there are slots would wait for ever).
                            drop(self.granted.remove(&a.unit));
                            self.in_flight += 1;
                            let run = super::subflow::run(
                                self.runner,
                                (child.clone(), sub.clone()),
                                a,
                                self.cancel.clone(),
                            );
                            let done = self.done_tx.clone();
                            tokio::spawn(async move {
                                let _ = done.send(run.await);
                            });
                            continue;
                        }
                    };
                    let job = Job {
                        run: self.run_id,
                        unit: a.unit,
                        component,
                        input: a.input,
                        ctx: a.ctx,
                        budget: self.flow.def.tasks[a.template].budget,
                        grants: self.flow.grants[a.template].run.clone(),
                        cancel: self.cancel.clone(),
                        slot: self.granted.remove(&a.unit),
                        tags: self.flow.def.tasks[a.template].worker_tags.clone(),
                    };
                    self.in_flight += 1;
                    if !self.deferred.is_empty() || !self.store_has_room() {
                        self.deferred.push_back(job);
                    } else if self.in_flight == 1 && self.here.is_none() && self.shared.is_none() {
                        held = Some(job);
                    } else {
                        if let Some(first) = held.take() {
                            self.submit(first);
                        }
                        self.submit(job);
                    }
                }
                Command::Timer { unit, at } => {
                    let sleep = self.runner.clock.sleep_until(at);
                    self.timers.spawn(async move {
                        sleep.await;
                        unit
                    });
                }
                Command::LookupCache { unit, key } => {
                    let now = self.runner.clock.now();
                    let answer = match &mut self.cache {
                        Some(cache) => cache.answer(unit, key, now),
                        None => Some(Err("no store".into())),
                    };
                    if let Some(answer) = answer {
                        self.machine.handle(Event::CacheAnswered { unit, answer });
                    }
                }
                Command::RunHooks(request) => self.run_hooks(request),
                Command::Write(write) => {
                    if let Some(store) = &self.runner.store {
                        store.submit(write);
                    }
                }
                Command::Event(event) => {
                    if let Some(tx) = &self.runner.events {
                        let _ = tx.send(event);
                    }
                }
                Command::Acquire(unit) => match &self.shared {
                    Some(shared) => shared.acquire(
                        self.run_id,
                        unit,
                        self.cancel.clone(),
                        self.grants_tx.clone(),
                    ),
                    None => self.machine.handle(Event::SlotGranted(unit)),
                },
                Command::Release(unit) => drop(self.granted.remove(&unit)),
                Command::Settled(i) => self.waiting.settled(&mut self.machine, i),
                Command::AbortTimers => self.timers.abort_all(),
                Command::AbortHooks => {
                    self.hook_ids.clear();
                    self.hooks.abort_all();
                }
            }
        }
        if let Some(job) = held {
            self.here = Some(Box::pin(self.executor.run_here(job)));
        }
        self.launch_deferred();
        if let Some(cache) = &mut self.cache {
            cache.start_reads(&mut self.reads, self.runner.clock.now());
        }
    }

    /// A code flow's body, polled on the driver's own task (its calls and their answers never
    /// cross threads) unless the shared executor runs it with its guests: deterministic (keyed by the run, its
    /// clock at the run's start), granted nothing, its calls sent to this driver, interrupted
    /// when the run is cancelled.
    fn start_body(
        &self,
        component: &crate::sandbox::FlowComponent,
        calls: mpsc::UnboundedSender<BodyCall>,
    ) -> Pin<Box<dyn Future<Output = RunOutcome> + Send>> {
        let run = self.machine.run();
        let body = FlowBody {
            orchestrator: DriverOrchestrator::new(calls),
            seed: *blake3::hash(run.id.to_string().as_bytes()).as_bytes(),
            started: run.history.first().map_or(run.state.timestamp, |h| h.time),
            max_handles: self.flow.def.max_task_runs,
        };
        let parameters = Json::from_value(&serde_json::Value::Object(
            run.parameters
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ));
        let ctx = self.machine.body_context();
        let budget = self
            .flow
            .def
            .body
            .as_ref()
            .map(|b| b.budget)
            .unwrap_or_default();
        let (sandbox, component, cancel) = (
            self.runner.sandbox.clone(),
            component.clone(),
            self.cancel.clone(),
        );
        let body = Box::pin(async move {
            sandbox
                .run_flow(&component, &parameters, &ctx, &budget, &body, Some(&cancel))
                .await
        });
        match &self.shared {
            Some(shared) => shared.body(run.id, body),
            None => body,
        }
    }

    /// The body ended: the flow run ends by how, once its task runs are final.
    fn body_ended(&mut self, outcome: RunOutcome) {
        let now = self.runner.clock.now();
        let mut state = State::after_run(&outcome.ending, Retry::Exhausted, now);
        if !state.is_terminal() {
            state = State::new(StateName::Failed, now).with_message(format!(
                "the flow body raised {}: a flow body cannot pause or be retried (its task runs \
                 can)",
                state.name
            ));
        }
        self.machine.body_ended(state, outcome.logs);
    }

    /// Hand `job` to the shared executor, or else to this process's.
    fn submit(&self, job: Job) {
        match &self.shared {
            Some(shared) => shared.submit(job, self.done_tx.clone()),
            None => self.executor.submit(job, self.done_tx.clone()),
        }
    }

    /// Whether the store's backlog of logs leaves room for more attempts. A run that is being
    /// cancelled, or whose store cannot write, does not wait for it.
    fn store_has_room(&self) -> bool {
        let Some(store) = &self.runner.store else {
            return true;
        };
        store.queued_write_bytes() <= WRITE_BACKLOG
            || self.cancel.is_cancelled()
            || store.write_error().is_some()
    }

    /// Start deferred attempts, in order, while the store has room.
    fn launch_deferred(&mut self) {
        while !self.deferred.is_empty() && self.store_has_room() {
            if let Some(job) = self.deferred.pop_front() {
                self.submit(job);
            }
        }
    }

    /// A read ended. A preload sent its chunks before it ended: they are taken in first.
    fn read_done(&mut self, read: Result<(tokio::task::Id, ReadDone), tokio::task::JoinError>) {
        while let Ok(chunk) = self.chunks.try_recv() {
            self.chunk_read(chunk);
        }
        let Some(cache) = &mut self.cache else {
            return;
        };
        for (unit, answer) in cache.take(read) {
            self.machine.handle(Event::CacheAnswered { unit, answer });
        }
    }

    /// A chunk of a preload arrived: the hits it answers.
    fn chunk_read(&mut self, chunk: Chunk) {
        let Some(cache) = &mut self.cache else {
            return;
        };
        let now = self.runner.clock.now();
        for (unit, answer) in cache.chunk(chunk, now) {
            self.machine.handle(Event::CacheAnswered { unit, answer });
        }
    }

    /// Run the applicable handler components of the task, in order, on their own task.
    fn run_hooks(&mut self, request: HookRequest) {
        let HookRequest {
            unit,
            template,
            seq,
            old,
            new,
            kinds,
            ctx,
        } = request;
        let Some(hooks) = &self.flow.hooks[template] else {
            self.machine.handle(Event::HooksDone {
                unit,
                seq,
                state: new,
                logs: Vec::new(),
            });
            return;
        };
        let mut handlers: Vec<HandlerComponent> = Vec::new();
        for (on, list) in [
            (kinds.on_state, &hooks.on_state),
            (kinds.on_completion, &hooks.on_completion),
            (kinds.on_failure, &hooks.on_failure),
            (kinds.on_retry, &hooks.on_retry),
        ] {
            if on {
                handlers.extend(list.iter().cloned());
            }
        }
        let sandbox = self.runner.sandbox.clone();
        let budget = self.runner.handler_budget;
        let clock = self.runner.clock.clone();
        let task = self.flow.def.tasks[template].name.clone();
        let fallback = new.clone();
        let handle = self.hooks.spawn(async move {
            let (state, logs) =
                run_handlers(&sandbox, &handlers, &task, &old, new, &ctx, &budget, &clock).await;
            HooksAnswer {
                unit,
                seq,
                state,
                logs,
            }
        });
        self.hook_ids.insert(handle.id(), (unit, seq, fallback));
    }
}

/// Run `handlers` on a transition from `old` to `state`, each one's result the next one's input;
/// a handler that fails keeps the state and logs why.
#[allow(clippy::too_many_arguments)]
async fn run_handlers(
    sandbox: &Sandbox,
    handlers: &[HandlerComponent],
    task: &str,
    old: &State,
    mut state: State,
    ctx: &crate::context::TaskContext,
    budget: &crate::sandbox::RunBudget,
    clock: &ClockRef,
) -> (State, Vec<LogRecord>) {
    let mut logs = Vec::new();
    for handler in handlers {
        let result = sandbox
            .run_handler(handler, task, old, &state, ctx, budget)
            .await;
        match result.result {
            Ok(Some(replacement)) => state = replacement,
            Ok(None) => {}
            Err(problem) => {
                let message = format!("state handler `{}` failed: {problem}", handler.name());
                tracing::warn!(task = %task, "{message}");
                logs.push(LogRecord {
                    time: clock.now(),
                    source: LogSource::Log,
                    level: LogLevel::Error,
                    message,
                });
            }
        }
        logs.extend(result.logs);
    }
    (state, logs)
}

/// The most bytes of writes (as [`Store::queued_write_bytes`] counts them: logs, task runs'
/// changes, journal entries) a run lets wait in the store's queue: beyond it, new attempts wait
/// until the store has committed them, so what a run records streams through memory instead of
/// piling up in it when its task runs end (or guests log) faster than the store writes.
const WRITE_BACKLOG: u64 = 16 << 20;

/// How often deferred attempts check the store's backlog.
const BACKLOG_POLL: Duration = Duration::from_millis(5);

/// Most bytes of cached values a run preloads per task; the rest are read on a hit.
const CACHE_PRELOAD_BYTES: u64 = 64 << 20;

/// Most batches of cache lookups read at once (per flow run); later misses wait for one.
const LOOKUP_READS: usize = 2;

/// The output cache as this run reads it: per cached task, its valid entries preloaded once (on
/// a blocking thread, in chunks that are taken in as they arrive), so a hit is answered without
/// a store read, most of them before the preload has ended; keys not found there are looked up
/// in the store in batches, which also explains a miss.
struct CacheReads {
    store: Arc<dyn Store>,
    /// By task name (a code flow's task runs of one task share it).
    tasks: HashMap<String, TaskIndex>,
    /// Keys to look up in the store.
    misses: Vec<(Unit, CacheKey)>,
    /// Tasks whose preload is to start.
    preloads: Vec<String>,
    /// Where preloads send their chunks (the driver's `chunks`).
    chunks: mpsc::UnboundedSender<Chunk>,
    /// What each read in progress answers for.
    reading: HashMap<tokio::task::Id, Reading>,
}

/// Entries of a task's preload, in the order read (each key in one chunk only).
struct Chunk {
    task: String,
    entries: Vec<CachedOutput>,
}

enum Reading {
    Preload(String),
    Lookups(Vec<Unit>),
}

/// A cached task's entries as this run has read them.
struct TaskIndex {
    /// The newest valid entry of each key read so far; `None` once a unit took it (a second
    /// lookup of a key goes to the store, which answers the same).
    entries: HashMap<String, Option<CachedOutput>>,
    /// While the preload is read: the keys asked for and not read yet.
    waiting: Option<HashMap<String, Vec<(Unit, CacheKey)>>>,
}

enum ReadDone {
    /// A preload has sent its last chunk.
    Preloaded {
        task: String,
        result: Result<(), StoreError>,
    },
    Looked(Vec<(Unit, Result<CacheLookup, String>)>),
}

/// A hit on preloaded entry `c` at `now`: none when it expired or its value was not preloaded.
fn preloaded_hit(c: CachedOutput, now: DateTime<Utc>) -> Option<CacheLookup> {
    let value = c.value?;
    (c.entry.expires_at > now).then(|| CacheLookup::Hit {
        output: value,
        blob: c.entry.blob.clone(),
        entry: Box::new(c.entry),
    })
}

impl CacheReads {
    fn new(store: Arc<dyn Store>, chunks: mpsc::UnboundedSender<Chunk>) -> Self {
        Self {
            store,
            tasks: HashMap::new(),
            misses: Vec::new(),
            preloads: Vec::new(),
            chunks,
            reading: HashMap::new(),
        }
    }

    /// The answer, when it is known without reading the store.
    fn answer(
        &mut self,
        unit: Unit,
        key: CacheKey,
        now: DateTime<Utc>,
    ) -> Option<Result<CacheLookup, String>> {
        let Some(index) = self.tasks.get_mut(&key.task) else {
            self.preloads.push(key.task.clone());
            let waiting = HashMap::from_iter([(key.key.clone(), vec![(unit, key.clone())])]);
            let index = TaskIndex {
                entries: HashMap::new(),
                waiting: Some(waiting),
            };
            self.tasks.insert(key.task, index);
            return None;
        };
        match (index.entries.get_mut(&key.key), &mut index.waiting) {
            // Taken, not copied: a key is looked up once per unit.
            (Some(entry), _) => match entry.take().and_then(|c| preloaded_hit(c, now)) {
                Some(hit) => return Some(Ok(hit)),
                // Not preloaded (or expired since, or taken): the store is authoritative, and
                // explains a miss.
                None => self.misses.push((unit, key)),
            },
            (None, Some(waiting)) => waiting
                .entry(key.key.clone())
                .or_default()
                .push((unit, key)),
            (None, None) => self.misses.push((unit, key)),
        }
        None
    }

    /// Start the reads asked for since the last call.
    fn start_reads(&mut self, reads: &mut JoinSet<ReadDone>, now: DateTime<Utc>) {
        for task in self.preloads.drain(..) {
            let store = self.store.clone();
            let chunks = self.chunks.clone();
            let name = task.clone();
            let handle = reads.spawn_blocking(move || {
                let result = store.cache_preload(&name, now, CACHE_PRELOAD_BYTES, &mut |entries| {
                    let task = name.clone();
                    // The run ended: nobody reads the rest.
                    chunks.send(Chunk { task, entries }).is_ok()
                });
                ReadDone::Preloaded { task: name, result }
            });
            self.reading.insert(handle.id(), Reading::Preload(task));
        }
        let looking = self
            .reading
            .values()
            .filter(|r| matches!(r, Reading::Lookups(_)))
            .count();
        // Misses found while lookups are read wait for one to end and go together: a store
        // whose reads are round trips answers a batch in about the time of one key.
        if !self.misses.is_empty() && looking < LOOKUP_READS {
            let misses = std::mem::take(&mut self.misses);
            let units = misses.iter().map(|(u, _)| *u).collect();
            let store = self.store.clone();
            let handle = reads.spawn_blocking(move || {
                let (units, keys): (Vec<Unit>, Vec<CacheKey>) = misses.into_iter().unzip();
                let answers = match store.cache_lookup_many(&keys, now) {
                    Ok(answers) if answers.len() == units.len() => {
                        answers.into_iter().map(Ok).collect()
                    }
                    Ok(answers) => {
                        let e = format!(
                            "the store answered {} of {} cache lookups",
                            answers.len(),
                            units.len()
                        );
                        vec![Err(e); units.len()]
                    }
                    Err(e) => vec![Err(e.to_string()); units.len()],
                };
                ReadDone::Looked(units.into_iter().zip(answers).collect())
            });
            self.reading.insert(handle.id(), Reading::Lookups(units));
        }
    }

    /// Take in a chunk of a preload; returns the hits it answers.
    fn chunk(
        &mut self,
        chunk: Chunk,
        now: DateTime<Utc>,
    ) -> Vec<(Unit, Result<CacheLookup, String>)> {
        let mut answers = Vec::new();
        let Some(index) = self.tasks.get_mut(&chunk.task) else {
            return answers;
        };
        for c in chunk.entries {
            let std::collections::hash_map::Entry::Vacant(slot) =
                index.entries.entry(c.entry.key.clone())
            else {
                continue;
            };
            let asked = index.waiting.as_mut().and_then(|w| w.remove(&c.entry.key));
            let Some(asked) = asked else {
                slot.insert(Some(c));
                continue;
            };
            // Taken by the unit that asked first.
            slot.insert(None);
            let mut asked = asked.into_iter();
            if let Some((unit, key)) = asked.next() {
                match preloaded_hit(c, now) {
                    Some(hit) => answers.push((unit, Ok(hit))),
                    None => self.misses.push((unit, key)),
                }
            }
            self.misses.extend(asked);
        }
        answers
    }

    /// Take in a finished read (every chunk of a preload taken in before); returns the answers
    /// it makes known. A read that died answers its lookups with the error; after a preload, the
    /// keys still waiting for it go to the store.
    fn take(
        &mut self,
        read: Result<(tokio::task::Id, ReadDone), tokio::task::JoinError>,
    ) -> Vec<(Unit, Result<CacheLookup, String>)> {
        let (id, read) = match read {
            Ok((id, read)) => (id, Ok(read)),
            Err(e) => (e.id(), Err(e.to_string())),
        };
        let reading = self.reading.remove(&id);
        match (read, reading) {
            (Ok(ReadDone::Looked(answers)), _) => answers,
            (Ok(ReadDone::Preloaded { task, result }), _) => {
                if let Err(e) = result {
                    tracing::warn!("cannot preload the cache: {e}");
                }
                self.preloaded(&task);
                Vec::new()
            }
            (Err(e), Some(Reading::Lookups(units))) => units
                .into_iter()
                .map(|u| (u, Err(format!("the cache read failed: {e}"))))
                .collect(),
            (Err(e), Some(Reading::Preload(task))) => {
                tracing::warn!("cannot preload the cache: {e}");
                self.preloaded(&task);
                Vec::new()
            }
            (Err(_), None) => Vec::new(),
        }
    }

    /// The task's preload ended: the keys that waited for it and were not read are looked up in
    /// the store.
    fn preloaded(&mut self, task: &str) {
        if let Some(waiting) = self.tasks.get_mut(task).and_then(|i| i.waiting.take()) {
            self.misses.extend(waiting.into_values().flatten());
        }
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CacheEntry, SqliteStore};

    fn key(k: &str) -> CacheKey {
        CacheKey {
            key: k.to_owned(),
            task: "t".to_owned(),
            component: String::new(),
            config: String::new(),
            grants: String::new(),
            secrets: String::new(),
            inputs: None,
            parameters: None,
            validator: "duration_only".to_owned(),
        }
    }

    fn preloaded(k: &str, value: i64, expires_at: DateTime<Utc>) -> CachedOutput {
        CachedOutput {
            entry: CacheEntry {
                key: k.to_owned(),
                task: "t".to_owned(),
                validator: "duration_only".to_owned(),
                component: String::new(),
                blob: String::new(),
                size: 1,
                created_at: expires_at - chrono::TimeDelta::hours(1),
                expires_at,
                flow_run: "r".to_owned(),
                task_run: format!("tr-{k}"),
            },
            value: Some(Json::from_value(&serde_json::json!(value))),
        }
    }

    /// Keys asked for while their task's preload is read are answered by the chunk that brings
    /// them, before the preload ends; a key asked twice is taken once (the second asks the
    /// store); keys the preload never brought go to the store when it ends.
    #[test]
    fn a_chunk_answers_the_keys_that_wait_for_it_before_the_preload_ends() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("store"));
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut reads = CacheReads::new(store, tx);
        let now: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().expect("time");
        let later = now + chrono::TimeDelta::hours(1);
        let unit = |i: u32| Unit {
            task: 0,
            child: Some(i),
        };
        // The first ask starts the preload; nothing is known yet.
        for (i, k) in ["a", "b", "a", "missing"].iter().enumerate() {
            assert!(reads.answer(unit(i as u32), key(k), now).is_none());
        }
        assert_eq!(reads.preloads, ["t"]);
        let answers = reads.chunk(
            Chunk {
                task: "t".to_owned(),
                entries: vec![preloaded("a", 1, later), preloaded("c", 3, later)],
            },
            now,
        );
        // `a`'s first asker has its hit now; its second goes to the store.
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0, unit(0));
        assert!(
            matches!(&answers[0].1, Ok(CacheLookup::Hit { output, .. }) if output.as_str() == "1")
        );
        assert_eq!(
            reads.misses.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
            [unit(2)]
        );
        // A key read before it is asked for is answered at once.
        assert!(matches!(
            reads.answer(unit(9), key("c"), now),
            Some(Ok(CacheLookup::Hit { .. }))
        ));
        // `b` in the next chunk; `missing` never comes: it goes to the store at the end.
        let answers = reads.chunk(
            Chunk {
                task: "t".to_owned(),
                entries: vec![preloaded("b", 2, later)],
            },
            now,
        );
        assert_eq!(
            answers.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
            [unit(1)]
        );
        reads.preloaded("t");
        let mut to_store: Vec<Unit> = reads.misses.iter().map(|(u, _)| *u).collect();
        to_store.sort_by_key(|u| u.child);
        assert_eq!(to_store, [unit(2), unit(3)]);
    }
}
