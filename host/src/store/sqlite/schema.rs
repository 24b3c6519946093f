//! The database schema: its versioned migrations (`PRAGMA user_version` counts those
//! applied), opening a connection to the database (read-write, read-only, or immutable), and
//! bringing its schema up to date.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::classify;
use crate::store::StoreError;

/// Identifies a Sluice database (`PRAGMA application_id`): "SLCE".
const APPLICATION_ID: i64 = 0x534C_4345;

/// Schema migrations; `PRAGMA user_version` is how many have been applied. Never edit one that
/// has shipped: add the next.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: runs, task runs, transitions, logs, blobs, cache.
    r"
CREATE TABLE flow_runs (
    id TEXT PRIMARY KEY,
    flow TEXT NOT NULL,
    state TEXT NOT NULL,
    state_json TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    parameters TEXT NOT NULL,
    context TEXT NOT NULL,
    manifest_path TEXT,
    manifest TEXT,
    pid INTEGER NOT NULL,
    cancel_requested_at INTEGER
);
CREATE INDEX flow_runs_created ON flow_runs(created_at);
CREATE INDEX flow_runs_state ON flow_runs(state);
CREATE TABLE task_runs (
    id TEXT PRIMARY KEY,
    flow_run TEXT NOT NULL,
    task_index INTEGER NOT NULL,
    name TEXT NOT NULL,
    parent TEXT,
    map_index INTEGER,
    state TEXT NOT NULL,
    state_json TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    run_time_us INTEGER NOT NULL,
    fuel INTEGER NOT NULL,
    output TEXT,
    cached_input TEXT,
    cache TEXT
);
CREATE INDEX task_runs_run ON task_runs(flow_run, task_index, map_index);
CREATE TABLE transitions (
    seq INTEGER PRIMARY KEY,
    flow_run TEXT NOT NULL,
    task_run TEXT,
    from_state TEXT,
    to_state TEXT NOT NULL,
    time INTEGER NOT NULL,
    message TEXT
);
CREATE INDEX transitions_run ON transitions(flow_run, seq);
CREATE TABLE logs (
    seq INTEGER PRIMARY KEY,
    flow_run TEXT NOT NULL,
    task_run TEXT NOT NULL,
    task TEXT NOT NULL,
    map_index INTEGER,
    record TEXT NOT NULL
);
CREATE INDEX logs_run ON logs(flow_run, seq);
CREATE TABLE blobs (
    hash TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE cache (
    seq INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    task TEXT NOT NULL,
    validator TEXT NOT NULL,
    component TEXT NOT NULL,
    config TEXT NOT NULL,
    inputs TEXT,
    parameters TEXT,
    blob TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    flow_run TEXT NOT NULL,
    task_run TEXT NOT NULL
);
CREATE INDEX cache_key ON cache(key, expires_at);
CREATE INDEX cache_task ON cache(task, created_at);
",
    // 2: histories move into their run's row (one write per task run per batch instead of one
    // per transition); existing transitions are carried over in order.
    r"
ALTER TABLE flow_runs ADD COLUMN history TEXT NOT NULL DEFAULT '';
ALTER TABLE task_runs ADD COLUMN history TEXT NOT NULL DEFAULT '';
UPDATE task_runs SET history = coalesce((
    SELECT group_concat(
        json_object('from', t.from_state, 'to', t.to_state,
                    'time', strftime('%Y-%m-%dT%H:%M:%fZ', t.time / 1000000.0, 'unixepoch'),
                    'message', t.message) || char(10),
        '' ORDER BY t.seq)
    FROM transitions t WHERE t.task_run = task_runs.id), '');
UPDATE flow_runs SET history = coalesce((
    SELECT group_concat(
        json_object('from', t.from_state, 'to', t.to_state,
                    'time', strftime('%Y-%m-%dT%H:%M:%fZ', t.time / 1000000.0, 'unixepoch'),
                    'message', t.message) || char(10),
        '' ORDER BY t.seq)
    FROM transitions t WHERE t.flow_run = flow_runs.id AND t.task_run IS NULL), '');
DROP TABLE transitions;
",
    // 3: the start time of the process running a run (liveness does not rest on its lock file
    // alone).
    r"
ALTER TABLE flow_runs ADD COLUMN pid_start INTEGER;
",
    // 4: a cache miss is explained against the newest entry of the same configuration, or of
    // the task: both found through an index, not by scanning the task's entries.
    r"
CREATE INDEX cache_task_config ON cache(task, config, created_at, seq);
CREATE INDEX cache_task_newest ON cache(task, created_at, seq);
DROP INDEX cache_task;
",
    // 5: the digests of a cached task's grants and of its granted secrets' values, so a miss
    // can say that the grants, or a secret's value, changed.
    r"
ALTER TABLE cache ADD COLUMN grants TEXT NOT NULL DEFAULT '';
ALTER TABLE cache ADD COLUMN secrets TEXT NOT NULL DEFAULT '';
",
    // 6: no schema change; the rows are written more compactly, which older versions cannot
    // read: a task run's `state_json` is empty when the state is its last history line, and a
    // cache hit's information omits its reason (derived from the entry it names).
    "",
    // 7: a change feed. Every transaction that writes runs takes the next number of `changes`
    // and marks the rows it writes with it (`changed`), so a reader asks a run for what changed
    // after the number it last saw (server-sent events, live views) without reading the rest.
    r"
ALTER TABLE flow_runs ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_runs ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX task_runs_changed ON task_runs(flow_run, changed);
CREATE TABLE changes (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
INSERT INTO changes VALUES (0, 0);
",
    // 8: a flow run's result (a blob's hash): what a code flow's body returned.
    r"
ALTER TABLE flow_runs ADD COLUMN result TEXT;
",
    // 9: a code flow's journal: each call of its body and what it observed, in order, so a
    // resumed run replays its body without running a completed task run again.
    r"
CREATE TABLE journal (
    flow_run TEXT NOT NULL,
    seq INTEGER NOT NULL,
    entry TEXT NOT NULL,
    PRIMARY KEY (flow_run, seq)
) WITHOUT ROWID;
",
    // 10: a subflow's child flow run names the task run standing for it in its parent, so a
    // resumed parent resumes that child instead of starting another (earlier children: from
    // their context).
    r"
ALTER TABLE flow_runs ADD COLUMN parent_task_run TEXT;
UPDATE flow_runs SET parent_task_run = json_extract(context, '$.parent_task_run_id')
    WHERE json_valid(context) AND json_type(context, '$.parent_task_run_id') = 'text';
CREATE INDEX flow_runs_parent ON flow_runs(parent_task_run) WHERE parent_task_run IS NOT NULL;
",
    // 11: what else rebuilding a run's flow needs besides its manifest, as its starter wrote it
    // (a server: the uploaded components' digests and the subflows' texts), in the run's own
    // first write.
    r"
ALTER TABLE flow_runs ADD COLUMN files TEXT;
",
    // 12: a task run's peak memory (the most one attempt held), and the runs list's order as an
    // index: newest first by (created_at, id), so a page after a cursor is a range of it; a
    // deployment's runs (their context's `deployment`) in that order too.
    r"
ALTER TABLE task_runs ADD COLUMN memory_peak INTEGER NOT NULL DEFAULT 0;
CREATE INDEX flow_runs_created_id ON flow_runs(created_at, id);
DROP INDEX flow_runs_created;
CREATE INDEX flow_runs_deployment ON flow_runs(json_extract(context, '$.deployment'), created_at, id)
    WHERE json_extract(context, '$.deployment') IS NOT NULL;
",
];

/// The number a transaction that writes runs marks its rows with: take it first in the
/// transaction (it also takes the write lock, so numbers follow commit order across processes),
/// then write `changed = (SELECT seq FROM changes WHERE id = 0)` in every row of `flow_runs`
/// and `task_runs` it writes.
pub(super) fn next_change(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    tx.prepare_cached("UPDATE changes SET seq = seq + 1 WHERE id = 0 RETURNING seq")?
        .query_row([], |r| r.get(0))
}

/// How much of the database a connection memory-maps.
pub(super) const MMAP_SIZE: i64 = 256 << 20;

pub(super) fn connect(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
    let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    // Read-only: opened read-write without create, which SQLite downgrades to read-only when the
    // files cannot be written, and which still reads a WAL database whose `-shm` it cannot
    // write (a strict read-only open cannot).
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(|e| open_err(&e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| open_err(&e))?;
    stable_plans(&conn);
    // The first statement reads the header: a file that is not SQLite fails here.
    // One statement, one snapshot: a store being created by another process is seen either
    // empty or complete.
    let (app, tables): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT application_id FROM pragma_application_id()), (SELECT count(*) FROM sqlite_master)",
            [],
            |r| TryFrom::try_from(r),
        )
        .map_err(|e| classify_open(path, &e))?;
    if app != APPLICATION_ID && !(app == 0 && tables == 0) {
        return Err(StoreError::Foreign {
            path: path.to_owned(),
            detail: format!(
                "it is an SQLite database of another application (application_id {app:#x}, {tables} schema objects)"
            ),
        });
    }
    // Reads go through a memory map (no read syscalls for hot pages) and a 32 MiB page cache:
    // a cache lookup touches a few index pages of a database that may be large.
    let _ = conn.pragma_update(None, "mmap_size", MMAP_SIZE);
    let _ = conn.pragma_update(None, "cache_size", -32_768_i64);
    if read_only || conn.is_readonly("main").unwrap_or(true) {
        return Ok(conn);
    }
    // WAL is persistent: set it once. Changing the mode needs an exclusive lock that the busy
    // handler does not wait for, so a store being created by another process is retried.
    let mut tries = 0;
    loop {
        let mode: rusqlite::Result<String> =
            conn.query_row("PRAGMA journal_mode", [], |r| r.get(0));
        let result = match mode {
            Ok(m) if m.eq_ignore_ascii_case("wal") => break,
            Ok(_) => conn.pragma_update(None, "journal_mode", "WAL"),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && tries < 200 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => return Err(open_err(&e)),
        }
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| open_err(&e))?;
    Ok(conn)
}

/// Plans that do not depend on bound values (SQLite's query planner stability guarantee).
/// Without it, a statement whose plan looked at a bound value is marked expired whenever its
/// bindings are cleared, which rusqlite's statement cache does each time it takes a statement
/// back: every use of such a cached statement parsed and planned it again (a cache lookup of a
/// missing key cost ~200 µs, almost all of it re-preparing). The store has no `sqlite_stat4`
/// samples for values to choose between plans anyway.
fn stable_plans(conn: &Connection) {
    let _ = conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    );
}

/// Open `path` as an immutable database (no locks, no `-shm`): only for reading a store that
/// nothing can write.
pub(super) fn connect_immutable(path: &Path) -> Result<Connection, StoreError> {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '?' | '#' | '%' => uri.push_str(&format!("%{:02X}", c as u32)),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    stable_plans(&conn);
    Ok(conn)
}

pub(super) fn classify_open(path: &Path, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase) => StoreError::Foreign {
            path: path.to_owned(),
            detail: format!("it is not an SQLite database ({e})"),
        },
        Some(rusqlite::ErrorCode::DatabaseCorrupt) => classify(path, "open", e),
        _ => StoreError::Open {
            path: path.to_owned(),
            detail: e.to_string(),
        },
    }
}

pub(super) fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let supported = MIGRATIONS.len() as i64;
    loop {
        // The version is read inside the write transaction: two processes opening a new store at
        // once apply each migration once.
        conn.execute_batch("BEGIN IMMEDIATE").map_err(open_err)?;
        let step = || -> Result<bool, StoreError> {
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(open_err)?;
            if version > supported {
                return Err(StoreError::TooNew {
                    path: path.to_owned(),
                    found: version,
                    supported,
                });
            }
            let Some(sql) = MIGRATIONS.get(version as usize) else {
                return Ok(false);
            };
            conn.execute_batch(&format!(
                "{sql}; PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {};",
                version + 1
            ))
            .map_err(open_err)?;
            Ok(true)
        };
        match step() {
            Ok(more) => {
                conn.execute_batch("COMMIT").map_err(open_err)?;
                if !more {
                    return Ok(());
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::params;

    use super::super::SqliteStore;
    use super::*;
    use crate::ids::{FlowRunId, TaskRunId};
    use crate::state::{State, StateName};
    use crate::store::Store;
    use crate::store::rows::{from_micros, state_json};

    /// A store written by schema 1 (transitions in their own table) opens with its history
    /// intact after migration 2.
    #[test]
    fn migration_2_carries_histories_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sluice.db");
        let run = FlowRunId::new();
        let task = TaskRunId::new();
        {
            let conn = Connection::open(&path).expect("db");
            conn.execute_batch(&format!(
                "{}; PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;",
                MIGRATIONS[0]
            ))
            .expect("schema 1");
            let st = |n: StateName| state_json(&State::new(n, from_micros(1_000)));
            conn.execute(
                "INSERT INTO flow_runs (id, flow, state, state_json, created_at, updated_at, parameters, context, pid)
                 VALUES (?1, 'f', 'Completed', ?2, 1000, 3000, '{}', '{}', 1)",
                params![run.to_string(), st(StateName::Completed)],
            )
            .expect("run");
            conn.execute(
                "INSERT INTO task_runs (id, flow_run, task_index, name, state, state_json, attempts, run_time_us, fuel)
                 VALUES (?1, ?2, 0, 'a', 'Completed', ?3, 1, 5, 7)",
                params![task.to_string(), run.to_string(), st(StateName::Completed)],
            )
            .expect("task");
            for (i, (from, to, msg)) in [
                (None, "Pending", None),
                (Some("Pending"), "Running", None),
                (Some("Running"), "Completed", Some("done \"well\"")),
            ]
            .into_iter()
            .enumerate()
            {
                conn.execute(
                    "INSERT INTO transitions (flow_run, task_run, from_state, to_state, time, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![run.to_string(), task.to_string(), from, to, 1_000_000 + i as i64 * 1_500, msg],
                )
                .expect("transition");
            }
            conn.execute(
                "INSERT INTO transitions (flow_run, task_run, from_state, to_state, time) VALUES (?1, NULL, NULL, 'Pending', 1000000)",
                [run.to_string()],
            )
            .expect("flow transition");
        }
        let store = SqliteStore::open(dir.path()).expect("migrated");
        let loaded = store.load_run(run).expect("load");
        let h = &loaded.run.tasks[0].history;
        let names: Vec<StateName> = h.iter().map(|t| t.to).collect();
        assert_eq!(
            names,
            [StateName::Pending, StateName::Running, StateName::Completed]
        );
        assert_eq!(h[1].from, Some(StateName::Pending));
        assert_eq!(h[2].message.as_deref(), Some("done \"well\""));
        // Milliseconds survive (schema 1 kept microseconds).
        assert_eq!(h[2].time.timestamp_millis(), 1_003);
        assert_eq!(loaded.run.history.len(), 1);
        let version: i64 = store
            .read()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, MIGRATIONS.len() as i64);
    }
}
