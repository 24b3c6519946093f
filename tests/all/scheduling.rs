//! The executor's promises that no state shows: newly ready work runs first (depth first), an
//! output is shared with its consumers instead of copied and dropped once the last has it, and
//! a cancel requested through the store is noticed within the poll interval.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sluice::cache::CacheKey;
use sluice::flow::{FlowBuilder, Input, TaskDef};
use sluice::ids::{FlowRunId, TaskRunId};
use sluice::runner::{FlowEvent, FlowRunner, RunOptions};
use sluice::sandbox::RunBudget;
use sluice::state::{State, StateName};
use sluice::store::{
    CacheEntry, CacheLookup, CachedOutput, CancelOutcome, LogTail, RunFilter, RunLease, RunSummary,
    SqliteStore, Store, StoreError, StoredLog, StoredRun, TailLimits, Write,
};

use crate::alloc_meter::Meter;
use crate::support::{guest, sandbox};

/// With one task at a time, each consumer runs as soon as its producer completed, before the
/// other producers that were ready earlier.
#[tokio::test]
async fn newly_ready_work_runs_first() {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = FlowRunner::new(sandbox().clone()).events(events);
    let mut b = FlowBuilder::new("depth-first").concurrency(1);
    for i in 0..3 {
        let mut p = TaskDef::new(format!("p{i}"), guest("add_one"));
        p.input = Input::Literal(json!(i).into());
        let mut c = TaskDef::new(format!("c{i}"), guest("add_one"));
        c.input = Input::from_json(json!(format!("$tasks.p{i}")));
        b = b.task(p).task(c);
    }
    let flow = runner
        .prepare(b.build().expect("flow"), Path::new("."))
        .await
        .expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    drop(runner);
    assert_eq!(run.state.name, StateName::Completed);
    let mut started = Vec::new();
    while let Some(e) = rx.recv().await {
        if let FlowEvent::Task {
            name,
            state: StateName::Running,
            ..
        } = e
        {
            started.push(name);
        }
    }
    assert_eq!(started.len(), 6, "{started:?}");
    for pair in started.chunks(2) {
        assert!(
            pair[0].starts_with('p') && pair[1] == pair[0].replacen('p', "c", 1),
            "a consumer did not run right after its producer: {started:?}"
        );
    }
}

/// The only consumer of a large output shares it, and the run then drops its own share: the
/// run never holds a third copy of it.
#[tokio::test]
async fn a_consumer_shares_an_output_instead_of_copying_it() {
    const N: u64 = 1 << 19;
    let runner = FlowRunner::new(sandbox().clone());
    let mut list = TaskDef::new("list", guest("hostile"));
    list.input = Input::Literal(json!({"do": "list", "n": N}).into());
    let mut len = TaskDef::new("len", guest("hostile"));
    len.input = Input::from_json(json!({"do": "len", "of": "$tasks.list"}));
    let def = FlowBuilder::new("hand-over")
        .task(list)
        .task(len)
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    // The executor, its task runs and the sandbox all run on this (current-thread) runtime, so
    // this thread's allocations are the run's.
    let meter = Meter::start();
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let peak = meter.peak();
    let expected_len = serde_json::to_string(&(0..N).collect::<Vec<_>>())
        .expect("json")
        .len();
    // The output as the host holds it: its text (3.8 MiB).
    let text = expected_len;
    assert_eq!(
        run.task("len").and_then(|t| t.output.clone()),
        Some(json!(expected_len).into())
    );
    assert!(run.task("list").is_some_and(|t| t.output_released));
    // The list's text is held at most twice at once (as the guest returned it and in canonical
    // form; then as the output and inside `len`'s input); one more copy would make it three
    // times. Parsed into a `serde_json::Value` it would be 16 MiB.
    assert!(peak >= text, "the meter missed the run: peak {peak} B");
    assert!(
        peak < text * 5 / 2,
        "peak {:.1} MiB: the output ({:.1} MiB) was copied",
        peak as f64 / f64::from(1 << 20),
        text as f64 / f64::from(1 << 20)
    );
}

/// A store that records when the runner asks it for cancel requests, and counts the cache
/// lookups it is asked for.
#[derive(Debug)]
pub(crate) struct PollRecorder {
    inner: SqliteStore,
    polls: Mutex<Vec<Instant>>,
    lookups: std::sync::atomic::AtomicUsize,
}

impl PollRecorder {
    pub(crate) fn new(inner: SqliteStore) -> Self {
        Self {
            inner,
            polls: Mutex::new(Vec::new()),
            lookups: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many cache lookups it was asked for.
    pub(crate) fn lookups(&self) -> usize {
        self.lookups.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Store for PollRecorder {
    fn submit(&self, write: Write) {
        self.inner.submit(write);
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn flush_async(&self) -> sluice::store::Flushing {
        self.inner.flush_async()
    }
    fn write_error(&self) -> Option<StoreError> {
        self.inner.write_error()
    }
    fn abandon(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<Option<State>, StoreError> {
        self.inner.abandon(run, now)
    }
    fn lease(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
        self.inner.lease(run)
    }
    fn cache_lookup(&self, key: &CacheKey, now: DateTime<Utc>) -> Result<CacheLookup, StoreError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.cache_lookup(key, now)
    }
    fn cache_preload(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError> {
        self.inner.cache_preload(task, now, max_bytes, each)
    }
    fn cache_entries(&self, task: Option<&str>) -> Result<Vec<CacheEntry>, StoreError> {
        self.inner.cache_entries(task)
    }
    fn cache_entry(&self, prefix: &str) -> Result<(CacheEntry, sluice::json::Json), StoreError> {
        self.inner.cache_entry(prefix)
    }
    fn clear_cache(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        self.inner.clear_cache(task, expired_before)
    }
    fn resolve_run(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        self.inner.resolve_run(id_or_prefix)
    }
    fn load_run(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        self.inner.load_run(run)
    }
    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.inner.list_runs(filter)
    }
    fn child_run(&self, parent: TaskRunId) -> Result<Option<FlowRunId>, StoreError> {
        self.inner.child_run(parent)
    }
    fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.inner.logs(run, task, after, limit)
    }
    fn task_run_logs(
        &self,
        run: FlowRunId,
        task_run: sluice::ids::TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.inner.task_run_logs(run, task_run, after, limit)
    }
    fn newest_log_seq(&self, run: FlowRunId) -> Result<i64, StoreError> {
        self.inner.newest_log_seq(run)
    }
    fn changes(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: sluice::store::ChangeCursor,
    ) -> Result<sluice::store::RunChanges, StoreError> {
        self.inner.changes(run, task, after)
    }
    fn log_cost(&self, run: FlowRunId) -> Result<u64, StoreError> {
        self.inner.log_cost(run)
    }
    fn task_names(&self, run: FlowRunId) -> Result<Vec<String>, StoreError> {
        self.inner.task_names(run)
    }
    fn log_tails(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        self.inner.log_tails(run, limits)
    }
    fn queued_write_bytes(&self) -> u64 {
        self.inner.queued_write_bytes()
    }
    fn is_live(&self, run: FlowRunId) -> bool {
        self.inner.is_live(run)
    }
    fn recover_dead(&self, now: DateTime<Utc>) -> Result<Vec<FlowRunId>, StoreError> {
        self.inner.recover_dead(now)
    }
    fn cancel(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.inner.cancel(run, now)
    }
    fn cancel_requested(&self, run: FlowRunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        let answer = self.inner.cancel_requested(run);
        if let Ok(mut polls) = self.polls.lock() {
            polls.push(Instant::now());
        }
        answer
    }
}

/// `sluice cancel` writes a request to the store; a live run polls for it every 100 ms and stops
/// at the first poll after the request. Counted in polls, not in wall time, so a loaded machine
/// cannot make it flaky: polling once a second would leave fewer than three polls in 700 ms.
// Several worker threads, as the CLI has: on a current-thread runtime a spinning guest (which
// yields every epoch tick) delays the timer driver, and with it every poll, to ~300 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_through_the_store_is_noticed_at_the_next_poll() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(PollRecorder::new(
        SqliteStore::open(dir.path()).expect("store"),
    ));
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = FlowRunner::new(sandbox().clone())
        .store(store.clone() as Arc<dyn Store>)
        .events(events);
    let mut spin = TaskDef::new("spin", guest("hostile"));
    spin.input = Input::from_json(json!({"do": "loop"}));
    spin.budget = RunBudget {
        fuel: None,
        ..RunBudget::default()
    };
    let def = FlowBuilder::new("polled").task(spin).build().expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let running =
        tokio::spawn(async move { runner.run(&flow, RunOptions::default()).await.expect("run") });
    while let Some(e) = rx.recv().await {
        if let FlowEvent::Task {
            state: StateName::Running,
            ..
        } = e
        {
            break;
        }
    }
    let began = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    store.flush().expect("flush");
    let id = store
        .list_runs(&RunFilter {
            state: None,
            flow: Some("polled".into()),
            limit: 1,
            before: None,
            since: None,
            until: None,
            deployment: None,
        })
        .expect("runs")[0]
        .id;
    let asked = Instant::now();
    assert_eq!(
        store.cancel(id, Utc::now()).expect("cancel"),
        CancelOutcome::Requested
    );
    let run = running.await.expect("join");
    assert_eq!(run.state.name, StateName::Cancelled);
    let polls = store.polls.lock().expect("polls").clone();
    let before = polls.iter().filter(|t| **t >= began && **t < asked).count();
    let after = polls.iter().filter(|t| **t >= asked).count();
    assert!(
        before >= 3,
        "{before} polls in the 700 ms before the request"
    );
    assert_eq!(
        after, 1,
        "polls after the request: the first one must stop the run"
    );
}
