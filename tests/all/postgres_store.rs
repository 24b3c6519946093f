//! The PostgreSQL store beyond the store suite: a flow run by the runner recorded, cached and
//! read back through it; leases seen by every store of the schema (as by processes on other
//! machines), a lapsed one recovered; writes held while PostgreSQL is down and committed once
//! it is back.

use std::path::Path;
use std::sync::Arc;

use serde_json::json;
use sluice::cache::{CachePolicy, CacheStatus, CacheValidator};
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::ids::FlowRunId;
use sluice::runner::{FlowRunner, RunOptions};
use sluice::state::{State, StateName};
use sluice::store::{
    CancelOutcome, PgDatabase, PgStore, RunFilter, Store, StoreError, TaskWrite, Write,
};

use crate::postgres::pg::PgCluster;
use crate::postgres::sql;
use crate::store_suite::task;
use crate::support::{guest, sandbox};

fn open(url: &str, schema: &str) -> Arc<PgStore> {
    let db = PgDatabase::connect(url).expect("connect");
    Arc::new(PgStore::open(&db, schema).expect("store"))
}

/// A 200-child mapped flow run by the runner on a PostgreSQL store: Completed, every output
/// read back as the run returned it; run again, every child a cache hit.
#[tokio::test(flavor = "multi_thread")]
async fn a_mapped_flow_is_recorded_cached_and_read_back() {
    let url = PgCluster::shared().database("runner");
    let store = open(&url, "tenant_a");
    let mut items = TaskDef::new("items", guest("identity"));
    items.input = Input::Literal(json!((0..200).collect::<Vec<i64>>()).into());
    let mut m = TaskDef::new("m", guest("add_one"));
    m.input = Input::from_json(json!("$tasks.items"));
    m.map = MapOver::Input;
    m.cache = Some(CachePolicy {
        cache_for: std::time::Duration::from_secs(3600),
        validator: CacheValidator::AllInputs,
    });
    let def = FlowBuilder::new("mapped")
        .task(items)
        .task(m)
        .build()
        .expect("flow");
    let runner = FlowRunner::new(sandbox().clone()).store(store.clone() as Arc<dyn Store>);
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let first = runner.run(&flow, RunOptions::default()).await.expect("run");
    assert_eq!(first.state.name, StateName::Completed, "{first:#?}");
    let stored = store.load_run(first.id).expect("load").run;
    assert_eq!(stored.state, first.state);
    assert_eq!(stored.history, first.history);
    let outputs = |run: &sluice::runner::FlowRun| -> Vec<String> {
        run.tasks[1]
            .children
            .iter()
            .map(|c| c.output.as_ref().map_or("-".into(), |o| o.to_string()))
            .collect()
    };
    let expected: Vec<String> = (1..=200).map(|i: i64| i.to_string()).collect();
    // (The run's own record hands outputs on; the store keeps them.)
    assert_eq!(outputs(&stored), expected);
    for (read, ran) in stored.tasks[1]
        .children
        .iter()
        .zip(&first.tasks[1].children)
    {
        assert_eq!(read.history, ran.history);
        assert_eq!(read.state, ran.state);
    }

    let second = runner
        .run(&flow, RunOptions::default())
        .await
        .expect("run again");
    assert_eq!(second.state.name, StateName::Completed);
    let again = store.load_run(second.id).expect("load").run;
    assert_eq!(outputs(&again), expected);
    for c in &second.tasks[1].children {
        assert_eq!(c.state.name, StateName::Cached, "{c:#?}");
        let cache = c.cache.as_ref().expect("cache info");
        assert_eq!(cache.status, CacheStatus::Hit);
    }
    let runs = store.list_runs(&RunFilter::default()).expect("list");
    assert_eq!(
        runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        [second.id, first.id]
    );
    assert_eq!(runs[0].tasks.get("Mapped"), Some(&1));
    // Another tenant's store, in the same database, sees none of it.
    let other = open(&url, "tenant_b");
    assert!(
        other
            .list_runs(&RunFilter::default())
            .expect("list")
            .is_empty()
    );
    assert!(matches!(
        other.load_run(first.id),
        Err(StoreError::UnknownRun(_))
    ));
    assert!(other.cache_entries(None).expect("entries").is_empty());
}

fn running(store: &dyn Store) -> (FlowRunId, TaskWrite) {
    let run = FlowRunId::new();
    let a = task(run, 0, "a");
    store.submit(Write::RunCreated(Box::new(sluice::store::RunHeader {
        id: run,
        flow: "f".into(),
        state: State::new(StateName::Running, chrono::Utc::now()),
        history: Vec::new(),
        parameters: Default::default(),
        context: Default::default(),
        manifest: None,
        files: None,
        pid: 0,
        tasks: vec![a.clone()],
    })));
    store.flush().expect("flush");
    (run, a)
}

/// Two stores of one schema stand for two processes (on any machines): a run one of them
/// leased is live to the other, which can neither lease it nor record it Cancelled, only ask;
/// a lease whose holder stopped renewing it (lapsed) leaves the run dead, recovered Crashed by
/// the other, which may then lease it.
#[test]
fn a_lease_is_seen_by_every_store_and_a_lapsed_one_is_recovered() {
    let url = PgCluster::shared().database("leases");
    let (a, b) = (open(&url, "tenant"), open(&url, "tenant"));
    let (run, _) = running(&*a);
    let lease = a.lease(run).expect("lease");
    assert!(b.is_live(run));
    assert!(matches!(b.lease(run), Err(StoreError::Live { .. })));
    assert!(
        b.recover_dead(chrono::Utc::now())
            .expect("recover")
            .is_empty()
    );
    assert_eq!(
        b.cancel(run, chrono::Utc::now()).expect("cancel"),
        CancelOutcome::Requested
    );
    assert!(a.cancel_requested(run).expect("asked").is_some());
    drop(lease);

    // A process that died holding a lease: its row stays, no longer renewed.
    let (dead, _) = running(&*a);
    sql(
        &url,
        &format!("INSERT INTO tenant.leases VALUES ('{dead}', 'elsewhere/1/gone', 0)"),
    );
    assert!(!b.is_live(dead));
    let recovered = b.recover_dead(chrono::Utc::now()).expect("recover");
    assert!(recovered.contains(&dead), "{recovered:?}");
    let stored = b.load_run(dead).expect("load").run;
    assert_eq!(stored.state.name, StateName::Crashed);
    let _taken = b.lease(dead).expect("a lapsed lease is taken over");
    assert!(a.is_live(dead));
}

/// While PostgreSQL is down past the store's patience (none here), writes are held (a flush
/// fails, retriable, and says why); once it is back, a flush commits them all, in order, and
/// nothing is lost.
#[test]
fn writes_are_held_while_postgresql_is_down_and_committed_once_it_is_back() {
    let cluster = PgCluster::start();
    let db = PgDatabase::connect(&cluster.database("outage")).expect("connect");
    db.set_outage_patience(std::time::Duration::ZERO);
    let store = Arc::new(PgStore::open(&db, "tenant").expect("store"));
    let (run, a) = running(&*store);
    cluster.stop();
    let moved = |t: &TaskWrite, to: StateName| TaskWrite {
        state: State::new(to, chrono::Utc::now()),
        transitions: vec![sluice::runner::Transition {
            from: Some(t.state.name),
            to,
            time: chrono::Utc::now(),
            message: None,
        }],
        ..t.clone()
    };
    let running_a = moved(&a, StateName::Running);
    store.submit(Write::Task(Box::new(running_a.clone())));
    let err = store.flush().expect_err("PostgreSQL is down");
    assert!(err.is_retriable(), "{err}");
    assert!(store.write_error().is_some());
    // Written after the failure: held behind it, never committed before it.
    store.submit(Write::Task(Box::new(moved(
        &running_a,
        StateName::Completed,
    ))));
    cluster.resume();
    store.flush().expect("flush once PostgreSQL is back");
    assert!(store.write_error().is_none());
    let stored = store.load_run(run).expect("load").run;
    let states: Vec<StateName> = stored.tasks[0].history.iter().map(|t| t.to).collect();
    assert_eq!(
        states,
        [StateName::Pending, StateName::Running, StateName::Completed]
    );
}

/// Within the store's patience, an outage passes unnoticed: a flush while PostgreSQL is down
/// waits for it to come back and commits (without patience it fails, as above).
#[test]
fn a_commit_waits_out_a_short_outage() {
    let cluster = PgCluster::start();
    let store = open(&cluster.database("patience"), "tenant");
    let (run, a) = running(&*store);
    cluster.stop();
    let done = TaskWrite {
        state: State::new(StateName::Completed, chrono::Utc::now()),
        transitions: vec![sluice::runner::Transition {
            from: Some(a.state.name),
            to: StateName::Completed,
            time: chrono::Utc::now(),
            message: None,
        }],
        ..a.clone()
    };
    store.submit(Write::Task(Box::new(done)));
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            cluster.resume();
        });
        store
            .flush()
            .expect("the flush waits for PostgreSQL to come back");
    });
    assert!(store.write_error().is_none());
    let stored = store.load_run(run).expect("load").run;
    assert_eq!(stored.tasks[0].state.name, StateName::Completed);
}
