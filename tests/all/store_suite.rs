//! The store suite: what every [`Store`] backend must do, through the trait alone (writes
//! submitted, flushed, read back), so one set of cases holds each backend to the same meaning.
//! Each case takes a fresh store; [`backends!`] runs every case on each backend: SQLite, and
//! PostgreSQL (a database of its own per case on the binary's throwaway cluster).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sluice::cache::CacheKey;
use sluice::ids::{FlowRunId, TaskRunId};
use sluice::json::Json;
use sluice::runner::Transition;
use sluice::sandbox::{LogLevel, LogRecord, LogSource};
use sluice::state::{State, StateName};
use sluice::store::{
    Blob, CacheLookup, CacheWrite, CancelOutcome, ChangeCursor, PgDatabase, PgStore, RunFilter,
    RunHeader, RunSummary, SqliteStore, Store, StoreError, TailLimits, TaskWrite, Write,
};

use crate::postgres::pg::PgCluster;

/// A fresh store of one backend, with what keeps it alive.
struct Fixture {
    store: Arc<dyn Store>,
    _home: Option<tempfile::TempDir>,
}

impl Fixture {
    fn sqlite() -> Fixture {
        let home = tempfile::tempdir().expect("home");
        let store = Arc::new(SqliteStore::open(home.path()).expect("store"));
        Fixture {
            store,
            _home: Some(home),
        }
    }

    fn postgres(case: &str) -> Fixture {
        let url = PgCluster::shared().database(case);
        let db = PgDatabase::connect(&url).expect("connect");
        let store = Arc::new(PgStore::open(&db, "store").expect("store"));
        Fixture { store, _home: None }
    }
}

/// Every case, on every backend: `backend::case` tests.
macro_rules! backends {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $case() { super::$case(&*super::Fixture::sqlite().store) })*
        }
        mod postgres {
            $(#[test] fn $case() {
                super::$case(&*super::Fixture::postgres(stringify!($case)).store)
            })*
        }
    };
}

backends!(
    a_run_reads_back_as_written,
    a_task_runs_writes_merge_and_keep_every_transition,
    the_flow_runs_changes_append_to_its_history,
    logs_page_in_order_by_task_and_tail,
    the_change_feed_returns_what_changed_after_a_cursor,
    the_cache_hits_until_expiry_and_explains_misses,
    run_ids_resolve_from_prefixes,
    cancel_asks_a_live_run_and_records_a_dead_one,
    a_run_whose_process_died_is_recovered_crashed,
    runs_list_in_pages_by_a_cursor,
);

const T0: i64 = 1_780_000_000;

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(T0 + seconds, 0).expect("time")
}

fn transition(from: Option<StateName>, to: StateName, time: DateTime<Utc>) -> Transition {
    Transition {
        from,
        to,
        time,
        message: None,
    }
}

/// A dead process's pid (above the largest `pid_max` Linux allows, 2^22).
const DEAD_PID: u32 = 1_000_000_000;

fn header(id: FlowRunId, flow: &str, state: StateName, tasks: Vec<TaskWrite>) -> RunHeader {
    RunHeader {
        id,
        flow: flow.into(),
        state: State::new(state, at(0)),
        history: vec![transition(None, state, at(0))],
        parameters: BTreeMap::from([("n".to_owned(), json!(3))]),
        context: BTreeMap::from([("env".to_owned(), "test".to_owned())]),
        manifest: Some((PathBuf::from("flow.toml"), "name = \"f\"\n".into())),
        files: Some("{\"files\":1}".into()),
        pid: DEAD_PID,
        tasks,
    }
}

/// Record run `id` of flow `f` in `state` with `tasks`.
fn create(store: &dyn Store, id: FlowRunId, state: StateName, tasks: &[&TaskWrite]) {
    let tasks = tasks.iter().map(|&t| t.clone()).collect();
    store.submit(Write::RunCreated(Box::new(header(id, "f", state, tasks))));
}

pub(crate) fn task(run: FlowRunId, index: u32, name: &str) -> TaskWrite {
    TaskWrite {
        run,
        id: TaskRunId::new(),
        index,
        name: Arc::from(name),
        parent: None,
        map_index: None,
        state: State::new(StateName::Pending, at(0)),
        transitions: vec![transition(None, StateName::Pending, at(0))],
        attempts: 0,
        run_time: Duration::ZERO,
        fuel_consumed: 0,
        memory_peak_bytes: 0,
        output: None,
        cached_input: None,
        clear_input: false,
        cache: None,
    }
}

/// `t` moved on to `to` at second `s`.
fn moved(t: &TaskWrite, to: StateName, s: i64) -> TaskWrite {
    TaskWrite {
        state: State::new(to, at(s)),
        transitions: vec![transition(Some(t.state.name), to, at(s))],
        ..t.clone()
    }
}

fn record(message: &str) -> LogRecord {
    LogRecord {
        time: at(1),
        source: LogSource::Log,
        level: LogLevel::Info,
        message: message.into(),
    }
}

fn logs(t: &TaskWrite, messages: impl IntoIterator<Item = String>) -> Write {
    Write::Logs {
        run: t.run,
        task_run: t.id,
        task: t.name.clone(),
        map_index: None,
        records: messages.into_iter().map(|m| record(&m)).collect(),
    }
}

fn states(history: &[Transition]) -> Vec<StateName> {
    history.iter().map(|t| t.to).collect()
}

fn a_run_reads_back_as_written(store: &dyn Store) {
    let id = FlowRunId::new();
    let (a, b) = (task(id, 0, "a"), task(id, 1, "b"));
    create(store, id, StateName::Running, &[&a, &b]);
    let running = TaskWrite {
        attempts: 1,
        ..moved(&a, StateName::Running, 1)
    };
    store.submit(Write::Task(Box::new(running.clone())));
    let done = TaskWrite {
        output: Some(Blob::Value(Json::from_value(
            &json!({"sum": 6, "big": 12345678901234567890_u64}),
        ))),
        run_time: Duration::from_micros(1_500),
        fuel_consumed: 42,
        memory_peak_bytes: 3 << 20,
        ..moved(&running, StateName::Completed, 2)
    };
    store.submit(Write::Task(Box::new(done)));
    store.flush().expect("flush");

    let stored = store.load_run(id).expect("load");
    let run = &stored.run;
    assert_eq!((run.id, run.flow.as_str()), (id, "f"));
    assert_eq!(run.state.name, StateName::Running);
    assert_eq!(run.parameters["n"], json!(3));
    assert_eq!(run.context["env"], "test");
    assert_eq!(stored.created_at, at(0));
    assert_eq!(
        stored.manifest,
        Some((PathBuf::from("flow.toml"), "name = \"f\"\n".into()))
    );
    assert_eq!(stored.files.as_deref(), Some("{\"files\":1}"));
    assert!(stored.problems.is_empty(), "{:?}", stored.problems);
    let names: Vec<&str> = run.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let ta = &run.tasks[0];
    assert_eq!(ta.id, a.id);
    assert_eq!(ta.state.name, StateName::Completed);
    assert_eq!(ta.state.timestamp, at(2));
    assert_eq!(
        states(&ta.history),
        [StateName::Pending, StateName::Running, StateName::Completed]
    );
    assert_eq!((ta.attempts, ta.fuel_consumed), (1, 42));
    assert_eq!(ta.memory_peak_bytes, 3 << 20);
    assert_eq!(ta.run_time, Duration::from_micros(1_500));
    assert_eq!(
        ta.output.as_ref().map(Json::as_str),
        Some(r#"{"big":12345678901234567890,"sum":6}"#)
    );
    assert_eq!(run.tasks[1].state.name, StateName::Pending);
    assert_eq!(store.task_names(id).expect("names"), ["a", "b"]);

    let listed = store
        .list_runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, id);
    assert_eq!(listed[0].tasks.get("Completed"), Some(&1));
    assert_eq!(listed[0].tasks.get("Pending"), Some(&1));
    let none = store
        .list_runs(&RunFilter {
            state: Some(StateName::Completed),
            limit: 10,
            ..RunFilter::default()
        })
        .expect("list");
    assert!(none.is_empty(), "{none:?}");
}

/// The runs list pages from the newest by the cursor of a page's last run, each run once,
/// also among runs created at the same moment (ordered by id), and with a filter.
fn runs_list_in_pages_by_a_cursor(store: &dyn Store) {
    // Created at 0, 0, 1, 1, 2 s: pages cross both a change of time and a tie.
    let ids: Vec<FlowRunId> = (0..5).map(|_| FlowRunId::new()).collect();
    let created = |i: usize| at(i as i64 / 2);
    for (i, id) in ids.iter().enumerate() {
        let a = task(*id, 0, "a");
        let mut h = header(*id, "f", StateName::Completed, vec![a]);
        h.history[0].time = created(i);
        h.state.timestamp = created(i);
        store.submit(Write::RunCreated(Box::new(h)));
    }
    store.flush().expect("flush");
    let page = |before: Option<&RunSummary>, state: Option<StateName>| {
        store
            .list_runs(&RunFilter {
                state,
                limit: 2,
                before: before.map(|s| (s.created_at, s.id)),
                ..RunFilter::default()
            })
            .expect("list")
    };
    let mut seen = Vec::new();
    let mut last: Option<RunSummary> = None;
    // Bounded: a cursor that is ignored would page for ever.
    for _ in 0..=ids.len() {
        let got = page(last.as_ref(), None);
        assert!(got.len() <= 2);
        if got.is_empty() {
            break;
        }
        seen.extend(got.iter().map(|s| s.id));
        last = got.last().cloned();
    }
    let mut newest_first: Vec<(usize, FlowRunId)> = ids.iter().copied().enumerate().collect();
    newest_first.sort_by_key(|(i, id)| std::cmp::Reverse((created(*i), id.to_string())));
    let newest_first: Vec<FlowRunId> = newest_first.into_iter().map(|(_, id)| id).collect();
    assert_eq!(
        seen, newest_first,
        "every run once, newest (then greatest id) first"
    );
    let first = page(None, Some(StateName::Completed));
    let rest = page(first.last(), Some(StateName::Completed));
    assert_eq!(rest.len(), 2);
    assert!(page(None, Some(StateName::Failed)).is_empty());

    // A time window: created at or after `since`, before `until`; with a cursor, both hold.
    let window = |since: Option<i64>, until: Option<i64>, before: Option<&RunSummary>| {
        store
            .list_runs(&RunFilter {
                limit: 10,
                since: since.map(at),
                until: until.map(at),
                before: before.map(|s| (s.created_at, s.id)),
                ..RunFilter::default()
            })
            .expect("list")
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        window(Some(1), None, None),
        newest_first[..3],
        "created at 1 s or later"
    );
    assert_eq!(
        window(None, Some(1), None),
        newest_first[3..],
        "created before 1 s"
    );
    assert_eq!(
        window(Some(1), Some(2), None),
        newest_first[1..3],
        "created in [1 s, 2 s)"
    );
    let top = page(None, None);
    assert_eq!(
        window(None, Some(2), top.first()),
        newest_first[1..],
        "the cursor and `until` together: the tighter holds"
    );
    assert_eq!(
        window(None, Some(1), top.first()),
        newest_first[3..],
        "the cursor and `until` together: the tighter holds"
    );
    // A deployment's runs: by their context's `deployment`, newest first, paged too.
    let deployed: Vec<FlowRunId> = (0..3).map(|_| FlowRunId::new()).collect();
    for (i, id) in deployed.iter().enumerate() {
        let mut h = header(*id, "f", StateName::Completed, vec![task(*id, 0, "a")]);
        h.context.insert("deployment".into(), "nightly".into());
        h.history[0].time = at(10 + i as i64);
        h.state.timestamp = at(10 + i as i64);
        store.submit(Write::RunCreated(Box::new(h)));
    }
    store.flush().expect("flush");
    let by_deployment = |before: Option<&FlowRunId>| {
        store
            .list_runs(&RunFilter {
                limit: 2,
                deployment: Some("nightly".into()),
                before: before.map(|id| {
                    let i = deployed.iter().position(|d| d == id).expect("deployed");
                    (at(10 + i as i64), *id)
                }),
                ..RunFilter::default()
            })
            .expect("list")
            .into_iter()
            .map(|s| s.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(by_deployment(None), [deployed[2], deployed[1]]);
    assert_eq!(by_deployment(Some(&deployed[1])), [deployed[0]]);
    let other = store
        .list_runs(&RunFilter {
            limit: 10,
            deployment: Some("other".into()),
            ..RunFilter::default()
        })
        .expect("list");
    assert!(other.is_empty(), "{other:?}");
    let second = page(top.first(), None);
    assert_eq!(
        window(None, Some(2), second.first()),
        newest_first[2..],
        "the cursor tighter than `until`"
    );
}

fn a_task_runs_writes_merge_and_keep_every_transition(store: &dyn Store) {
    let id = FlowRunId::new();
    let a = task(id, 0, "a");
    create(store, id, StateName::Running, &[&a]);
    // No flush between: a backend may merge them, and must keep every transition in order.
    let mut t = a.clone();
    for (s, to) in [
        StateName::Running,
        StateName::Failed,
        StateName::AwaitingRetry,
        StateName::Retrying,
        StateName::Completed,
    ]
    .into_iter()
    .enumerate()
    {
        t = moved(&t, to, s as i64 + 1);
        store.submit(Write::Task(Box::new(t.clone())));
    }
    store.flush().expect("flush");
    let run = store.load_run(id).expect("load").run;
    assert_eq!(
        states(&run.tasks[0].history),
        [
            StateName::Pending,
            StateName::Running,
            StateName::Failed,
            StateName::AwaitingRetry,
            StateName::Retrying,
            StateName::Completed
        ]
    );
    assert_eq!(run.tasks[0].state.timestamp, at(5));
}

fn the_flow_runs_changes_append_to_its_history(store: &dyn Store) {
    let id = FlowRunId::new();
    create(store, id, StateName::Pending, &[]);
    let mut finished = State::new(StateName::Failed, at(3));
    finished.message = Some("task `a` failed".into());
    for (from, state) in [
        (StateName::Pending, State::new(StateName::Running, at(1))),
        (StateName::Running, finished.clone()),
    ] {
        let mut tr = transition(Some(from), state.name, state.timestamp);
        tr.message = state.message.clone();
        store.submit(Write::FlowState {
            run: id,
            state,
            transition: tr,
        });
    }
    store.flush().expect("flush");
    let run = store.load_run(id).expect("load").run;
    assert_eq!(run.state.name, StateName::Failed);
    assert_eq!(run.state.message, finished.message);
    assert_eq!(
        states(&run.history),
        [StateName::Pending, StateName::Running, StateName::Failed]
    );
    assert_eq!(run.history[2].message.as_deref(), Some("task `a` failed"));
}

fn logs_page_in_order_by_task_and_tail(store: &dyn Store) {
    let id = FlowRunId::new();
    let (a, b) = (task(id, 0, "a"), task(id, 1, "b"));
    create(store, id, StateName::Running, &[&a, &b]);
    store.submit(logs(&a, (0..1500).map(|i| format!("a {i}"))));
    // A guest's line may hold any character, NUL and multi-byte ones too.
    store.submit(logs(&b, (0..700).map(|i| format!("b {i}\u{0}é"))));
    store.submit(logs(&a, (1500..1600).map(|i| format!("a {i}"))));
    store.flush().expect("flush");

    // Pages of at most LOG_PAGE_LINES, in the order written, read on from the last `seq`.
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = store.logs(id, None, after, usize::MAX).expect("logs");
        assert!(page.len() <= sluice::store::LOG_PAGE_LINES);
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    assert_eq!(all.len(), 2300);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(all[0].record.message, "a 0");
    assert_eq!(all[1500].record.message, "b 0\u{0}é");
    assert_eq!(all[2299].record.message, "a 1599");
    let only_b = store.logs(id, Some("b"), 0, 10).expect("logs of b");
    assert_eq!(only_b.len(), 10);
    assert!(only_b.iter().all(|l| l.task == "b"));

    let cost: u64 = all.iter().map(|l| l.record.cost()).sum();
    assert_eq!(store.log_cost(id).expect("cost"), cost);

    let tails = store
        .log_tails(
            id,
            &TailLimits {
                records: 3,
                ..TailLimits::default()
            },
        )
        .expect("tails");
    let tail_a: Vec<&str> = tails[&a.id]
        .records
        .iter()
        .map(|r| r.message.as_str())
        .collect();
    assert_eq!(tail_a, ["a 1597", "a 1598", "a 1599"]);
    assert_eq!(tails[&a.id].omitted, 1597);
    assert_eq!(tails[&b.id].omitted, 697);
}

fn the_change_feed_returns_what_changed_after_a_cursor(store: &dyn Store) {
    let id = FlowRunId::new();
    let (a, b) = (task(id, 0, "a"), task(id, 1, "b"));
    create(store, id, StateName::Running, &[&a, &b]);
    store.submit(logs(&a, ["one".to_owned()]));
    store.flush().expect("flush");

    let first = store
        .changes(id, None, ChangeCursor::START)
        .expect("changes");
    assert_eq!(
        first.flow.as_ref().map(|f| f.state.name),
        Some(StateName::Running)
    );
    assert_eq!(first.tasks.len(), 2);
    assert_eq!(first.logs.len(), 1);
    let nothing = store.changes(id, None, first.cursor).expect("changes");
    assert!(nothing.is_empty(), "{nothing:?}");

    store.submit(Write::Task(Box::new(moved(&b, StateName::Running, 1))));
    store.submit(logs(&b, ["two".to_owned()]));
    store.flush().expect("flush");
    let next = store.changes(id, None, first.cursor).expect("changes");
    assert!(next.flow.is_none(), "{next:?}");
    let changed: Vec<TaskRunId> = next.tasks.iter().map(|t| t.id).collect();
    assert_eq!(changed, [b.id]);
    assert_eq!(next.tasks[0].state.name, StateName::Running);
    assert_eq!(next.logs.len(), 1);
    assert_eq!(next.logs[0].record.message, "two");
    // Of one task only.
    let of_a = store.changes(id, Some("a"), first.cursor).expect("changes");
    assert!(of_a.tasks.is_empty() && of_a.logs.is_empty(), "{of_a:?}");
}

fn cache_key(key: &str, task: &str, config: &str) -> CacheKey {
    CacheKey {
        key: key.into(),
        task: task.into(),
        component: "c0ffee".into(),
        config: config.into(),
        grants: String::new(),
        secrets: String::new(),
        inputs: Some("{\"x\":1}".into()),
        parameters: None,
        validator: "all_inputs".into(),
    }
}

fn the_cache_hits_until_expiry_and_explains_misses(store: &dyn Store) {
    let id = FlowRunId::new();
    let a = task(id, 0, "a");
    create(store, id, StateName::Running, &[&a]);
    let key = cache_key("k1", "a", "cfg1");
    store.submit(Write::Cache(Box::new(CacheWrite {
        key: key.clone(),
        output: Json::from_value(&json!([1, 2, 3])),
        created_at: at(0),
        expires_at: at(60),
        flow_run: id,
        task_run: a.id,
    })));
    store.flush().expect("flush");

    match store.cache_lookup(&key, at(59)).expect("lookup") {
        CacheLookup::Hit { output, entry, .. } => {
            assert_eq!(output.as_str(), "[1,2,3]");
            assert_eq!(entry.task_run, a.id.to_string());
            assert_eq!(entry.expires_at, at(60));
        }
        miss => panic!("expected a hit, got {miss:?}"),
    }
    let CacheLookup::Miss(expired) = store.cache_lookup(&key, at(61)).expect("lookup") else {
        panic!("expired: a miss")
    };
    assert!(expired.contains("expired"), "{expired}");
    // Misses explained against the newest entry of the same configuration, else of the task.
    let other = cache_key("k2", "a", "cfg2");
    let same_config = CacheKey {
        inputs: Some("{\"x\":2}".into()),
        ..cache_key("k3", "a", "cfg1")
    };
    let unknown = cache_key("k4", "b", "cfg1");
    let reason = |key: &CacheKey| match store.cache_lookup(key, at(1)).expect("lookup") {
        CacheLookup::Miss(why) => why,
        hit => panic!("{}: expected a miss, got {hit:?}", key.key),
    };
    assert!(
        reason(&other).contains("limits or map index"),
        "{}",
        reason(&other)
    );
    assert!(
        reason(&same_config).contains("inputs differ"),
        "{}",
        reason(&same_config)
    );
    assert!(
        reason(&unknown).contains("no cached output of task `b`"),
        "{}",
        reason(&unknown)
    );
    // Looked up together: the same answers, in order.
    let many = store
        .cache_lookup_many(
            &[
                other.clone(),
                key.clone(),
                unknown.clone(),
                same_config.clone(),
            ],
            at(1),
        )
        .expect("lookups");
    let seen: Vec<String> = many
        .iter()
        .map(|l| match l {
            CacheLookup::Hit { output, .. } => format!("hit {}", output.as_str()),
            CacheLookup::Miss(why) => why.clone(),
        })
        .collect();
    assert_eq!(
        seen,
        [
            reason(&other),
            "hit [1,2,3]".into(),
            reason(&unknown),
            reason(&same_config)
        ]
    );

    let mut preloaded = Vec::new();
    store
        .cache_preload("a", at(1), u64::MAX, &mut |chunk| {
            preloaded.extend(chunk);
            true
        })
        .expect("preload");
    assert_eq!(preloaded.len(), 1);
    assert_eq!(preloaded[0].entry.key, "k1");
    assert_eq!(
        preloaded[0].value.as_ref().map(Json::as_str),
        Some("[1,2,3]")
    );

    assert_eq!(store.cache_entries(Some("a")).expect("entries").len(), 1);
    assert!(store.cache_entries(Some("b")).expect("entries").is_empty());
    let (entry, value) = store.cache_entry("k1").expect("entry");
    assert_eq!((entry.key.as_str(), value.as_str()), ("k1", "[1,2,3]"));
    assert!(matches!(
        store.cache_entry("zz"),
        Err(StoreError::CacheKey(_))
    ));
    assert_eq!(store.clear_cache(None, Some(at(30))).expect("clear"), 0);
    assert_eq!(store.clear_cache(None, Some(at(61))).expect("clear"), 1);
    assert!(store.cache_entries(None).expect("entries").is_empty());
}

fn run_ids_resolve_from_prefixes(store: &dyn Store) {
    let ids: Vec<FlowRunId> = (0..3).map(|_| FlowRunId::new()).collect();
    for &id in &ids {
        create(store, id, StateName::Completed, &[]);
    }
    store.flush().expect("flush");
    let full = ids[0].to_string();
    assert_eq!(store.resolve_run(&full).expect("full id"), ids[0]);
    // Ids made in the same millisecond share their first 10 characters or more.
    let mut prefix = full.clone();
    while ids
        .iter()
        .filter(|i| i.to_string().starts_with(&prefix))
        .count()
        == 1
    {
        prefix.pop();
    }
    assert!(matches!(
        store.resolve_run(&prefix),
        Err(StoreError::AmbiguousRun { .. })
    ));
    assert!(matches!(
        store.resolve_run("0000000000"),
        Err(StoreError::UnknownRun(_))
    ));
}

fn cancel_asks_a_live_run_and_records_a_dead_one(store: &dyn Store) {
    let (live, dead) = (FlowRunId::new(), FlowRunId::new());
    let (a, b) = (task(live, 0, "a"), task(dead, 0, "a"));
    for (id, t) in [(live, &a), (dead, &b)] {
        create(store, id, StateName::Running, &[t]);
        store.submit(Write::Task(Box::new(moved(t, StateName::Running, 1))));
    }
    store.flush().expect("flush");

    // Leased: live, the lease exclusive, a cancel asks it (and is recorded as asked).
    let lease = store.lease(live).expect("lease");
    assert!(store.is_live(live));
    assert!(matches!(store.lease(live), Err(StoreError::Live { .. })));
    assert_eq!(store.cancel_requested(live).expect("requested"), None);
    assert_eq!(
        store.cancel(live, at(5)).expect("cancel"),
        CancelOutcome::Requested
    );
    assert_eq!(
        store.cancel_requested(live).expect("requested"),
        Some(at(5))
    );
    assert_eq!(
        store.load_run(live).expect("load").run.state.name,
        StateName::Running
    );
    drop(lease);

    // Never leased, its process gone: recorded Cancelled here, its task runs too.
    assert!(!store.is_live(dead));
    assert_eq!(
        store.cancel(dead, at(6)).expect("cancel"),
        CancelOutcome::Cancelled
    );
    let run = store.load_run(dead).expect("load").run;
    assert_eq!(run.state.name, StateName::Cancelled);
    assert_eq!(run.tasks[0].state.name, StateName::Cancelled);
    assert_eq!(
        store.cancel(dead, at(7)).expect("cancel"),
        CancelOutcome::AlreadyFinished(StateName::Cancelled)
    );
}

fn a_run_whose_process_died_is_recovered_crashed(store: &dyn Store) {
    let (dead, done) = (FlowRunId::new(), FlowRunId::new());
    let a = task(dead, 0, "a");
    create(store, dead, StateName::Running, &[&a]);
    store.submit(Write::Task(Box::new(moved(&a, StateName::Running, 1))));
    create(store, done, StateName::Completed, &[]);
    store.flush().expect("flush");
    let recovered = store.recover_dead(at(9)).expect("recover");
    assert_eq!(recovered, [dead]);
    let run = store.load_run(dead).expect("load").run;
    assert_eq!(run.state.name, StateName::Crashed);
    assert_eq!(run.tasks[0].state.name, StateName::Crashed);
    assert_eq!(
        store.load_run(done).expect("load").run.state.name,
        StateName::Completed
    );
    assert!(store.recover_dead(at(10)).expect("again").is_empty());
}
