//! The PostgreSQL database (issue 14, first slice): connecting, and each store's schema and its
//! migrations, against a throwaway cluster of this test binary ([`PgCluster`]).

#[path = "../common/pg.rs"]
mod pg;

use pg::PgCluster;
use sluice::store::{PgDatabase, StoreError};

/// What migration 1 creates.
const TABLES: &[&str] = &[
    "blobs",
    "cache",
    "flow_runs",
    "journal",
    "logs",
    "migrations",
    "task_runs",
];

#[test]
fn a_fresh_database_is_migrated_once_and_reopened_as_it_is() {
    let url = PgCluster::shared().database("fresh");
    let db = PgDatabase::connect(&url).expect("connect");
    assert_eq!(db.migrate_store("sluice").expect("migrate"), 1);
    assert_eq!(db.tables("sluice").expect("tables"), TABLES);
    assert!(db.name().starts_with("postgres://sluice@"), "{}", db.name());
    assert!(db.name().contains("/fresh_"), "{}", db.name());
    drop(db);
    // Again: nothing to apply, nothing applied twice.
    let again = PgDatabase::connect(&url).expect("connect again");
    assert_eq!(again.migrate_store("sluice").expect("migrate again"), 1);
    assert_eq!(migrations(&url, "sluice"), vec![1]);
    // Another store (a tenant's) is a schema of its own, the first untouched.
    assert_eq!(again.migrate_store("tenant_b").expect("migrate b"), 1);
    assert_eq!(again.tables("tenant_b").expect("tables"), TABLES);
    assert_eq!(migrations(&url, "sluice"), vec![1]);
}

#[test]
fn servers_starting_together_apply_each_migration_once() {
    let url = PgCluster::shared().database("together");
    let versions: Vec<Result<i64, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| PgDatabase::connect(&url).and_then(|d| d.migrate_store("sluice"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    for v in versions {
        assert_eq!(v.expect("each connects"), 1);
    }
    assert_eq!(migrations(&url, "sluice"), vec![1]);
}

#[test]
fn a_database_migrated_by_a_newer_sluice_is_refused_and_left_as_it_is() {
    let url = PgCluster::shared().database("newer");
    let db = PgDatabase::connect(&url).expect("connect");
    db.migrate_store("sluice").expect("migrate");
    sql(
        &url,
        "INSERT INTO sluice.migrations (version) VALUES (2), (3)",
    );
    let err = db.migrate_store("sluice").expect_err("refused");
    assert!(
        matches!(
            err,
            StoreError::TooNew {
                found: 3,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("(schema sluice) has schema version 3") && text.contains("upgrade Sluice"),
        "{text}"
    );
    assert_eq!(migrations(&url, "sluice"), vec![1, 2, 3]);
}

#[test]
fn a_database_shared_with_another_application_is_touched_only_in_its_schema() {
    let url = PgCluster::shared().database("shared");
    sql(
        &url,
        "CREATE TABLE flow_runs (theirs integer); INSERT INTO flow_runs VALUES (7)",
    );
    let db = PgDatabase::connect(&url).expect("connect");
    db.migrate_store("sluice").expect("migrate");
    // Names that are not a schema of Sluice's own are refused before any statement.
    let long = "a".repeat(64);
    for bad in [
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

fn sql(url: &str, statements: &str) {
    let statements = statements.to_owned();
    with_client(url, |client| async move {
        client.batch_execute(&statements).await.expect("statements");
    });
}

/// Run `work` with a client of its own connected to `url`.
fn with_client<T, F: Future<Output = T>>(
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
