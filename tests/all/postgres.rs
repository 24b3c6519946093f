//! The PostgreSQL database (issue 14, first slice): connecting, and each store's schema and its
//! migrations, against a throwaway cluster of this test binary ([`PgCluster`]).

#[path = "../common/pg.rs"]
pub(crate) mod pg;

use std::time::Duration;

use pg::PgCluster;
use sluice::ids::{FlowRunId, TaskRunId};
use sluice::store::{Claimed, Lease, NewAttempt, PgDatabase, PgQueue, StoreError};

/// What migration 1 creates.
const TABLES: &[&str] = &[
    "blobs",
    "cache",
    "commits",
    "flow_runs",
    "journal",
    "leases",
    "logs",
    "migrations",
    "task_runs",
];

#[test]
fn a_fresh_database_is_migrated_once_and_reopened_as_it_is() {
    let url = PgCluster::shared().database("fresh");
    let db = PgDatabase::connect(&url).expect("connect");
    assert_eq!(db.migrate_store("store_a").expect("migrate"), 2);
    assert_eq!(db.tables("store_a").expect("tables"), TABLES);
    assert!(db.name().starts_with("postgres://sluice@"), "{}", db.name());
    assert!(db.name().contains("/fresh_"), "{}", db.name());
    drop(db);
    // Again: nothing to apply, nothing applied twice.
    let again = PgDatabase::connect(&url).expect("connect again");
    assert_eq!(again.migrate_store("store_a").expect("migrate again"), 2);
    assert_eq!(migrations(&url, "store_a"), vec![1, 2]);
    // Another store (a tenant's) is a schema of its own, the first untouched.
    assert_eq!(again.migrate_store("tenant_b").expect("migrate b"), 2);
    assert_eq!(again.tables("tenant_b").expect("tables"), TABLES);
    assert_eq!(migrations(&url, "store_a"), vec![1, 2]);
}

#[test]
fn servers_starting_together_apply_each_migration_once() {
    let url = PgCluster::shared().database("together");
    let versions: Vec<Result<i64, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| PgDatabase::connect(&url).and_then(|d| d.migrate_store("store_a"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for v in versions {
        assert_eq!(v.expect("each connects"), 2);
    }
    assert_eq!(migrations(&url, "store_a"), vec![1, 2]);
}

#[test]
fn a_database_migrated_by_a_newer_sluice_is_refused_and_left_as_it_is() {
    let url = PgCluster::shared().database("newer");
    let db = PgDatabase::connect(&url).expect("connect");
    db.migrate_store("store_a").expect("migrate");
    sql(
        &url,
        "INSERT INTO store_a.migrations (version) VALUES (3), (4)",
    );
    let err = db.migrate_store("store_a").expect_err("refused");
    assert!(
        matches!(
            err,
            StoreError::TooNew {
                found: 4,
                supported: 2,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("(schema store_a) has schema version 4") && text.contains("upgrade Sluice"),
        "{text}"
    );
    assert_eq!(migrations(&url, "store_a"), vec![1, 2, 3, 4]);
}

#[test]
fn a_database_shared_with_another_application_is_touched_only_in_its_schema() {
    let url = PgCluster::shared().database("shared");
    sql(
        &url,
        "CREATE TABLE flow_runs (theirs integer); INSERT INTO flow_runs VALUES (7)",
    );
    let db = PgDatabase::connect(&url).expect("connect");
    db.migrate_store("store_a").expect("migrate");
    // Names that are not a schema of Sluice's own are refused before any statement.
    // A reserved word is a valid name: quoted in every statement.
    assert_eq!(db.migrate_store("user").expect("user"), 2);
    let long = "a".repeat(64);
    for bad in [
        "sluice",
        "public",
        "information_schema",
        "pg_temp",
        "Sluice",
        "a-b",
        "x; DROP TABLE flow_runs",
        "",
        &long,
    ] {
        let err = db.migrate_store(bad).expect_err(bad);
        assert!(
            err.to_string().contains("cannot name a store's schema"),
            "{err}"
        );
    }
    let theirs: i32 = query(&url, "SELECT theirs FROM public.flow_runs")[0];
    assert_eq!(theirs, 7);
}

#[test]
fn a_restarted_postgresql_is_connected_to_again() {
    let cluster = PgCluster::start();
    let db = PgDatabase::connect(&cluster.database("restart")).expect("connect");
    db.migrate_store("store_a").expect("migrate");
    cluster.restart();
    // The call that finds the connection gone may fail (retriable); the next connects again.
    let mut tries = Vec::new();
    let tables = loop {
        match db.tables("store_a") {
            Ok(t) => break t,
            Err(e) => {
                assert!(e.is_retriable(), "{e}");
                tries.push(e);
                assert!(tries.len() < 3, "not connected again: {tries:?}");
            }
        }
    };
    assert_eq!(tables, TABLES);
}

#[test]
fn errors_name_the_database_and_never_its_password() {
    // Nothing listens there: retriable, named, no password.
    let dir = tempfile::tempdir().expect("dir");
    let url = format!(
        "host={} user=someone password=hunter2 dbname=nowhere connect_timeout=2",
        dir.path().display()
    );
    let err = PgDatabase::connect(&url).expect_err("nothing listens");
    let text = err.to_string();
    assert!(err.is_retriable(), "{err:?}");
    assert!(
        text.contains(&format!(
            "postgres://someone@{}:5432/nowhere",
            dir.path().display()
        )),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    // A database that does not exist: the server's answer, not retriable.
    let cluster = PgCluster::shared();
    let err = PgDatabase::connect(&cluster.url("missing")).expect_err("no such database");
    let text = err.to_string();
    assert!(!err.is_retriable(), "{err:?}");
    assert!(
        text.contains("/missing") && text.contains("does not exist"),
        "{text}"
    );

    // Not an address at all.
    let err = PgDatabase::connect("postgres://[::1").expect_err("not an address");
    assert!(
        err.to_string().contains("not a PostgreSQL address"),
        "{err}"
    );
}

/// The migrations recorded in store schema `schema` of the database at `url`.
fn migrations(url: &str, schema: &str) -> Vec<i32> {
    query(
        url,
        &format!("SELECT version FROM {schema}.migrations ORDER BY version"),
    )
}

fn query(url: &str, statement: &str) -> Vec<i32> {
    let statement = statement.to_owned();
    with_client(url, |client| async move {
        let rows = client.query(&statement, &[]).await.expect("query");
        rows.iter().map(|r| r.get(0)).collect()
    })
}

pub(crate) fn sql(url: &str, statements: &str) {
    let statements = statements.to_owned();
    with_client(url, |client| async move {
        client.batch_execute(&statements).await.expect("statements");
    });
}

/// Run `work` with a client of its own connected to `url`.
pub(crate) fn with_client<T, F: Future<Output = T>>(
    url: &str,
    work: impl FnOnce(tokio_postgres::Client) -> F,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        work(client).await
    })
}

// ---------------------------------------------------------------------------------------------
// The queue of attempts given to workers

fn attempt(tags: &[&str], n: u32) -> NewAttempt {
    NewAttempt {
        tenant: "t".into(),
        flow_run: FlowRunId::new(),
        task_run: TaskRunId::new(),
        attempt: 1,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        payload: n.to_le_bytes().to_vec(),
    }
}

/// The queue churns (every attempt inserted, claimed, deleted): it is vacuumed and analyzed
/// after a fixed number of dead rows, not a fraction of its size.
#[test]
fn the_queue_is_vacuumed_as_it_churns() {
    let url = PgCluster::shared().database("vacuum");
    PgDatabase::connect(&url)
        .and_then(|db| db.queue())
        .expect("queue");
    let options = with_client(&url, |client| async move {
        let row = client
            .query_one(
                "SELECT array_to_string(reloptions, ',') FROM pg_class
                 WHERE oid = 'sluice.queue'::regclass",
                &[],
            )
            .await
            .expect("reloptions");
        row.get::<_, String>(0)
    });
    for setting in [
        "autovacuum_vacuum_scale_factor=0",
        "autovacuum_vacuum_threshold=1000",
        "autovacuum_analyze_scale_factor=0",
        "autovacuum_vacuum_cost_delay=0",
    ] {
        assert!(
            options.split(',').any(|o| o == setting),
            "{setting}: {options}"
        );
    }
}

fn queue(hint: &str) -> PgQueue {
    let url = PgCluster::shared().database(hint);
    PgDatabase::connect(&url)
        .and_then(|db| db.queue())
        .expect("queue")
}

const SECOND: i64 = 1_000_000;

#[test]
fn concurrent_claimers_take_every_attempt_once() {
    let q = queue("claimers");
    let all: Vec<NewAttempt> = (0..1000).map(|n| attempt(&[], n)).collect();
    let ids = q.enqueue(&all, 0).expect("enqueue");
    assert_eq!(ids.len(), 1000);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "rows in the order given"
    );
    let claimed: Vec<Vec<Claimed>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let q = q.clone();
                s.spawn(move || {
                    let mut mine = Vec::new();
                    loop {
                        let batch = q
                            .claim(&format!("w{w}"), &[], 32, 0, 30 * SECOND)
                            .expect("claim");
                        assert!(batch.len() <= 32, "at most the batch asked for");
                        if batch.is_empty() {
                            return mine;
                        }
                        mine.extend(batch);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("claimer"))
            .collect()
    });
    let mut seen: Vec<i64> = claimed.iter().flatten().map(|c| c.lease.id).collect();
    assert_eq!(seen.len(), 1000, "every attempt claimed");
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 1000, "none claimed twice");
    // What a worker claims is what was enqueued.
    let c = &claimed
        .iter()
        .flatten()
        .find(|c| c.lease.id == ids[7])
        .expect("row 7")
        .attempt;
    assert_eq!(c, &all[7]);
    assert_eq!(q.ready().expect("ready"), 0);
    // Finished by batch: each lease counted once, and only the claimer's.
    let leases: Vec<Lease> = claimed[0].iter().map(|c| c.lease).collect();
    assert!(!leases.is_empty());
    let foreign = q.finish_many("nobody", &leases).expect("finish");
    assert!(foreign.iter().all(|&d| !d));
    let mine = q.finish_many("w0", &leases).expect("finish");
    assert!(mine.iter().all(|&d| d));
    assert!(
        q.finish_many("w0", &leases)
            .expect("again")
            .iter()
            .all(|&d| !d)
    );
}

#[test]
fn a_worker_whose_lease_lapsed_cannot_finish_or_extend() {
    let q = queue("fence");
    let first = attempt(&[], 1);
    q.enqueue(std::slice::from_ref(&first), 0).expect("enqueue");
    let stale = q
        .claim("a", &[], 10, 0, 30 * SECOND)
        .expect("claim")
        .remove(0);
    // Extended while it runs: held at 40 s.
    assert_eq!(
        q.extend("a", &[stale.lease], 20 * SECOND, 30 * SECOND)
            .expect("extend"),
        [true]
    );
    assert!(q.expire(40 * SECOND).expect("expire").is_empty());
    // Then silent past its lease: taken back, and reported until the server settles it (a
    // server dying between the two finds it again).
    let lapsed = q.expire(51 * SECOND).expect("expire");
    assert_eq!(lapsed.len(), 1);
    let (lease, who) = &lapsed[0];
    assert_eq!((who.worker.as_str(), who.task_run), ("a", first.task_run));
    assert_eq!(q.expire(52 * SECOND).expect("again"), lapsed);
    assert!(
        !q.finish("a", stale.lease).expect("finish"),
        "lapsed: the fence moved on"
    );
    assert_eq!(q.settle(&[*lease]).expect("settle"), 1);
    assert!(q.expire(52 * SECOND).expect("settled").is_empty());
    // The attempt runs again (the server enqueues the retry) and another worker claims it.
    let retry = NewAttempt {
        attempt: 2,
        ..first.clone()
    };
    q.enqueue(std::slice::from_ref(&retry), 52 * SECOND)
        .expect("enqueue retry");
    let fresh = q
        .claim("b", &[], 10, 52 * SECOND, 30 * SECOND)
        .expect("claim")
        .remove(0);
    assert_eq!(fresh.attempt.attempt, 2);
    // The stale worker comes back: nothing it says counts.
    assert_eq!(
        q.extend("a", &[stale.lease], 53 * SECOND, 30 * SECOND)
            .expect("extend"),
        [false]
    );
    assert!(!q.finish("a", stale.lease).expect("finish"));
    // Not even with the new row: the fence and the worker are the claim's.
    assert!(!q.finish("a", fresh.lease).expect("finish"));
    let forged = Lease {
        fence: fresh.lease.fence + 1,
        ..fresh.lease
    };
    assert!(!q.finish("b", forged).expect("finish"));
    assert!(q.finish("b", fresh.lease).expect("finish"));
    assert!(!q.finish("b", fresh.lease).expect("once"));
    // The same attempt enqueued again (a commit whose answer was lost) is left as it is; the
    // rest of the batch is enqueued.
    q.enqueue(std::slice::from_ref(&first), 60 * SECOND)
        .expect("attempt 1 again: its row is gone");
    let made = q
        .enqueue(&[attempt(&[], 9), first.clone()], 61 * SECOND)
        .expect("twice");
    assert_eq!(made.len(), 1, "only the new one: {made:?}");
    assert_eq!(q.ready().expect("ready"), 2);
}

#[test]
fn tags_route_attempts_to_workers_carrying_them() {
    let q = queue("tags");
    let gpu = attempt(&["gpu"], 1);
    let both = attempt(&["gpu", "eu"], 2);
    let any = attempt(&[], 3);
    q.enqueue(&[gpu.clone(), both.clone(), any.clone()], 0)
        .expect("enqueue");
    // A tag is a word: an empty one would let every worker claim it.
    for bad in ["", "a\nb"] {
        let err = q.enqueue(&[attempt(&[bad], 9)], 0).expect_err("refused");
        assert!(err.to_string().contains("a tag is not empty"), "{err}");
    }
    let plain = q.claim("plain", &[], 10, 0, SECOND).expect("claim");
    assert_eq!(plain.iter().map(|c| &c.attempt).collect::<Vec<_>>(), [&any]);
    let eu = q
        .claim("eu", &["eu".to_owned()], 10, 0, SECOND)
        .expect("claim");
    assert!(eu.is_empty(), "{eu:?}");
    let g = q
        .claim("g", &["eu".to_owned(), "gpu".to_owned()], 10, 0, SECOND)
        .expect("claim");
    assert_eq!(
        g.iter().map(|c| &c.attempt).collect::<Vec<_>>(),
        [&gpu, &both]
    );
}

#[test]
fn claimers_are_woken_when_attempts_are_enqueued() {
    let q = queue("wake");
    let wakeups = q.listen().expect("listen");
    assert!(
        !wakeups.wait(Duration::from_millis(50)),
        "nothing enqueued yet"
    );
    let other = q.clone();
    let enqueuer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        other
            .enqueue(&[attempt(&[], 1), attempt(&[], 2)], 0)
            .expect("enqueue");
    });
    // Woken, well before the fallback a claimer would poll at.
    assert!(
        wakeups.wait(Duration::from_secs(30)),
        "woken by the enqueue"
    );
    enqueuer.join().expect("enqueuer");
    assert_eq!(q.claim("w", &[], 10, 0, SECOND).expect("claim").len(), 2);
    assert!(
        !wakeups.wait(Duration::from_millis(50)),
        "one enqueue, one wake-up"
    );
}
