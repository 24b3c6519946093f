//! The embedded store: one SQLite database (`<home>/sluice.db`, WAL, `synchronous=FULL`) with
//! versioned migrations, blobs in a content-addressed table, and a writer thread that commits
//! queued writes in batches (group commit). Liveness of a run is an advisory lock on
//! `<home>/runs/<id>.lock`, held by the process executing it and released by the kernel when that
//! process dies, however it dies; the run also records that process's pid and start time
//! (Linux: `/proc/<pid>/stat` field 22), so a run whose lock file was deleted is still live while
//! its process is. Both need the home on a local file system, shared by processes of one
//! machine.
//!
//! Writes fail stop: a batch that cannot be committed is held, with every later batch, in order,
//! and nothing is committed past it until a flush commits them all (see [`Store::abandon`] for
//! a run that ends first). An error SQLite reports as corruption stops all writing for good.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use serde_json::Value;

use super::{
    Blob, CacheEntry, CacheLookup, CacheWrite, CachedOutput, CancelOutcome, RunFilter, RunHeader,
    RunLease, RunSummary, Store, StoreError, StoredLog, StoredRun, TaskWrite, Write,
};
use crate::cache::{CacheKey, canonical};
use crate::ids::{FlowRunId, TaskRunId};
use crate::runner::{FlowRun, TaskRun, Transition};
use crate::sandbox::LogRecord;
use crate::state::{State, StateName};

/// Identifies a Sluice database (`PRAGMA application_id`): "SLCE".
const APPLICATION_ID: i64 = 0x534C_4345;

/// Schema migrations; `PRAGMA user_version` is how many have been applied. Never edit one that
/// has shipped: add the next.
const MIGRATIONS: &[&str] = &[
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
];

/// The newest cache entry matching `filter` (one of [`SAME_CONFIG`], [`SAME_TASK`]), for
/// explaining a miss.
fn newest_entry_sql(filter: &str) -> String {
    format!(
        "SELECT key, component, config, inputs, parameters, validator, expires_at, flow_run
         FROM cache WHERE {filter} ORDER BY created_at DESC, seq DESC LIMIT 1"
    )
}

const SAME_CONFIG: &str = "task = ?1 AND config = ?2";
const SAME_TASK: &str = "task = ?1";

/// Most writes one batch (one transaction) applies.
const MAX_BATCH: usize = 20_000;

enum Msg {
    Write(Write),
    Flush(mpsc::SyncSender<Result<(), StoreError>>),
    Abandon {
        run: FlowRunId,
        now: DateTime<Utc>,
        done: mpsc::SyncSender<Result<Option<State>, StoreError>>,
    },
}

/// The store's health, shared by the writer thread and readers.
struct Health {
    /// Notes damage for other processes: `<database>.damaged`.
    marker: PathBuf,
    /// Why writes are held back: the first failure since everything was last committed (or the
    /// damage).
    error: Mutex<Option<StoreError>>,
    /// SQLite reported the database damaged: nothing is written to it any more.
    damaged: AtomicBool,
}

impl Health {
    fn new(path: &Path) -> Health {
        Health {
            marker: damage_marker(path),
            error: Mutex::new(None),
            damaged: AtomicBool::new(false),
        }
    }

    fn error(&self) -> Option<StoreError> {
        lock(&self.error).clone()
    }

    fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::SeqCst)
    }

    /// Note a failure: damage replaces any other reason, for good; another failure is kept
    /// unless one is already.
    fn note(&self, e: &StoreError) {
        let mut error = lock(&self.error);
        if let StoreError::Damaged { detail, .. } = e {
            if !self.damaged.swap(true, Ordering::SeqCst) {
                *error = Some(e.clone());
                // Best effort: other processes refuse to open the store while this exists.
                let _ = std::fs::write(&self.marker, format!("{detail}\n"));
            }
        } else if error.is_none() {
            *error = Some(e.clone());
        }
    }

    /// Everything was committed.
    fn clear(&self) {
        if !self.is_damaged() {
            *lock(&self.error) = None;
        }
    }
}

/// The embedded SQLite store. Cheap to clone; clones share the database and the writer.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    home: PathBuf,
    path: PathBuf,
    read_only: bool,
    read: Mutex<Connection>,
    tx: Mutex<mpsc::Sender<Msg>>,
    health: Arc<Health>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// Stop the writer and wait for it: its connection is closed (and the WAL checkpointed and
    /// removed by the last connection) before the process can exit, so a clean exit never leaves
    /// a `-wal` without its `-shm` (which a read-only home could not open).
    fn drop(&mut self) {
        *lock(&self.tx) = mpsc::channel().0;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if self.health.is_damaged() {
            // Not even a checkpoint goes into a damaged file.
            let _ = lock(&self.read).set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            );
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Open (creating when absent) the store in `home`: the database `home/sluice.db`.
    /// Refuses a file that is not a Sluice database, or one from a newer Sluice, and leaves it
    /// untouched.
    /// A home (or database) that cannot be written is [`StoreError::ReadOnly`]; see
    /// [`SqliteStore::open_read_only`] to read its history anyway.
    pub fn open(home: &Path) -> Result<SqliteStore, StoreError> {
        let path = home.join("sluice.db");
        // Damage found earlier (by any process): nothing is written to it again.
        if let Ok(detail) = std::fs::read_to_string(damage_marker(&path)) {
            return Err(StoreError::Damaged {
                path,
                detail: detail.trim().to_owned(),
            });
        }
        let runs = home.join("runs");
        if let Err(e) = std::fs::create_dir_all(&runs) {
            let detail = format!("cannot create {}: {e}", runs.display());
            return Err(match e.kind() {
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                    StoreError::ReadOnly { path, detail }
                }
                _ => StoreError::Open { path, detail },
            });
        }
        if path.exists()
            && let Err(e) = std::fs::OpenOptions::new().append(true).open(&path)
            && matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            )
        {
            return Err(StoreError::ReadOnly {
                path,
                detail: format!("the database file cannot be written: {e}"),
            });
        }
        let write = connect(&path, false)?;
        if write.is_readonly("main").unwrap_or(true) {
            return Err(StoreError::ReadOnly {
                path,
                detail: "the database file cannot be opened for writing".into(),
            });
        }
        migrate(&write, &path)?;
        let read = connect(&path, false)?;
        Self::start(home, path, write, read, false)
    }

    /// Open an existing store only to read it (history of a read-only home). Writes fail.
    pub fn open_read_only(home: &Path) -> Result<SqliteStore, StoreError> {
        let path = home.join("sluice.db");
        if !path.is_file() {
            return Err(StoreError::Open {
                detail: "there is no store there".into(),
                path,
            });
        }
        // A WAL database whose `-shm` is gone cannot be opened in a directory that cannot be
        // written: it is read as immutable. Its `-wal`, if any, was checkpointed before the
        // `-shm` went (SQLite removes the `-shm` first, only after a complete checkpoint), so
        // nothing committed is missed.
        let conn = match connect(&path, true) {
            Ok(c) => c,
            Err(e) => connect_immutable(&path).map_err(|_| e)?,
        };
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| classify_open(&path, &e))?;
        if version == 0 {
            return Err(StoreError::Open {
                path,
                detail: "the store was never initialized, and the home is read-only".into(),
            });
        }
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::TooNew {
                path,
                found: version,
                supported: MIGRATIONS.len() as i64,
            });
        }
        let read = match connect(&path, true) {
            Ok(c) => c,
            Err(e) => connect_immutable(&path).map_err(|_| e)?,
        };
        Self::start(home, path, conn, read, true)
    }

    fn start(
        home: &Path,
        path: PathBuf,
        write: Connection,
        read: Connection,
        read_only: bool,
    ) -> Result<SqliteStore, StoreError> {
        let open_err = |detail: String| StoreError::Open {
            path: path.clone(),
            detail,
        };
        let health = Arc::new(Health::new(&path));
        let (tx, rx) = mpsc::channel();
        let writer_health = health.clone();
        let writer_path = path.clone();
        let writer = std::thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || writer(write, &rx, &writer_health, &writer_path))
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                path,
                read_only,
                read: Mutex::new(read),
                tx: Mutex::new(tx),
                health,
                writer: Some(writer),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        lock(&self.inner.read)
    }

    fn lock_path(&self, run: FlowRunId) -> PathBuf {
        self.inner.home.join("runs").join(format!("{run}.lock"))
    }

    /// A conversion of SQLite errors of `operation`: corruption is [`StoreError::Damaged`] (and
    /// stops all writing), anything else [`StoreError::Io`].
    fn io_err<'a>(&'a self, operation: &'a str) -> impl Fn(rusqlite::Error) -> StoreError + 'a {
        move |e| {
            let e = classify(&self.inner.path, operation, &e);
            if matches!(e, StoreError::Damaged { .. }) {
                self.inner.health.note(&e);
            }
            e
        }
    }

    /// Refuse to write when the database is damaged.
    fn writable(&self) -> Result<(), StoreError> {
        match self.inner.health.error() {
            Some(e @ StoreError::Damaged { .. }) => Err(e),
            _ => Ok(()),
        }
    }

    /// The process recorded as running `run`, when the record says the run is active and that
    /// process (same pid, same start time) is alive.
    fn recorded_process(&self, conn: &Connection, run: FlowRunId) -> Option<u32> {
        let row: Option<(String, u32, Option<i64>)> = conn
            .prepare_cached("SELECT state, pid, pid_start FROM flow_runs WHERE id = ?1")
            .and_then(|mut s| {
                s.query_row([run.to_string()], |r| TryFrom::try_from(r))
                    .optional()
            })
            .ok()
            .flatten();
        let (state, pid, start) = row?;
        let active = matches!(state.as_str(), "Pending" | "Running" | "Cancelling");
        let alive = start.is_some_and(|s| process_start(pid) == u64::try_from(s).ok());
        (active && alive).then_some(pid)
    }

    /// Whether `run` is live, reading the record through `conn`.
    fn live_in(&self, conn: &Connection, run: FlowRunId) -> bool {
        lock_held(&self.lock_path(run)) || self.recorded_process(conn, run).is_some()
    }

    /// The pid of the process holding the lease of `run`: from its lock file (the holder writes
    /// it just after locking, so an empty file is read again briefly), else from the record.
    fn holder(&self, path: &Path, run: FlowRunId) -> Option<u32> {
        for _ in 0..20 {
            if let Some(pid) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|&p| p != 0)
            {
                return Some(pid);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.recorded_process(&self.read(), run)
    }

    /// After taking the lock of `run`: refuse when the record names another live process (its
    /// lock file was deleted), else record this process as the one running it.
    fn claim(&self, run: FlowRunId) -> Result<(), StoreError> {
        self.writable()?;
        let conn = self.read();
        let recorded: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM flow_runs WHERE id = ?1")
            .and_then(|mut s| s.query_row([run.to_string()], |r| r.get(0)).optional())
            .map_err(self.io_err("lease"))?;
        if recorded.is_none() {
            // A new run: its first write records this process.
            return Ok(());
        }
        let me = std::process::id();
        if let Some(pid) = self.recorded_process(&conn, run)
            && pid != me
        {
            return Err(StoreError::Live {
                run,
                pid: Some(pid),
            });
        }
        conn.prepare_cached("UPDATE flow_runs SET pid = ?2, pid_start = ?3 WHERE id = ?1")
            .and_then(|mut s| {
                s.execute(params![
                    run.to_string(),
                    me,
                    process_start(me).and_then(|s| i64::try_from(s).ok())
                ])
            })
            .map_err(self.io_err("lease"))?;
        Ok(())
    }
}

/// The file noting that the database at `path` was found damaged.
fn damage_marker(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".damaged");
    PathBuf::from(p)
}

/// Whether some process holds the lock on `path`.
fn lock_held(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            false
        }
        Err(_) => true,
    }
}

/// The start time of process `pid` (clock ticks since boot: `/proc/<pid>/stat` field 22) while
/// it runs (a zombie has ended); `None` when it does not, or where there is no `/proc`.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is the command name in parentheses, which may itself hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// SQLite's error of `operation` as a store error: corruption (`SQLITE_CORRUPT`,
/// `SQLITE_NOTADB`) is [`StoreError::Damaged`].
fn classify(path: &Path, operation: &str, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase) => {
            StoreError::Damaged {
                path: path.to_owned(),
                detail: format!("{operation}: {e}"),
            }
        }
        _ => StoreError::io(operation, e),
    }
}

fn connect(path: &Path, read_only: bool) -> Result<Connection, StoreError> {
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
    let _ = conn.pragma_update(None, "mmap_size", 256_i64 << 20);
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

/// Open `path` as an immutable database (no locks, no `-shm`): only for reading a store that
/// nothing can write.
fn connect_immutable(path: &Path) -> Result<Connection, StoreError> {
    let mut uri = String::from("file:");
    for c in path.to_string_lossy().chars() {
        match c {
            '?' | '#' | '%' => uri.push_str(&format!("%{:02X}", c as u32)),
            c => uri.push(c),
        }
    }
    uri.push_str("?immutable=1");
    Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open {
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

fn classify_open(path: &Path, e: &rusqlite::Error) -> StoreError {
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

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
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

/// The writer thread: commits queued writes in batches, one transaction each. A batch that
/// cannot be committed is held, with every later one, in order, until a flush commits them all;
/// nothing is committed past it. Damage stops writing for good.
fn writer(mut conn: Connection, rx: &mpsc::Receiver<Msg>, health: &Health, path: &Path) {
    let mut held: VecDeque<Batch> = VecDeque::new();
    while let Ok(first) = rx.recv() {
        let mut batch = Batch::default();
        let mut control = None;
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Write(w) => batch.push(w),
                other => {
                    control = Some(other);
                    break;
                }
            }
            next = if batch.writes < MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !batch.is_empty() && !health.is_damaged() {
            if held.is_empty() {
                if let Err(e) = commit(&mut conn, &batch, path) {
                    health.note(&e);
                    held.push_back(batch);
                }
            } else {
                held.push_back(batch);
            }
        }
        if health.is_damaged() {
            held.clear();
        }
        match control {
            None | Some(Msg::Write(_)) => {}
            Some(Msg::Flush(done)) => {
                let _ = done.send(retry(&mut conn, &mut held, health, path));
            }
            Some(Msg::Abandon { run, now, done }) => {
                for b in &mut held {
                    b.drop_run(run);
                }
                held.retain(|b| !b.is_empty());
                let result = match health.error() {
                    Some(e @ StoreError::Damaged { .. }) => Err(e),
                    reason => {
                        let reason = reason.map_or_else(
                            || "the store could not commit its last writes".to_owned(),
                            |e| e.to_string(),
                        );
                        not_recorded(&mut conn, run, now, &reason, path)
                    }
                };
                match &result {
                    Ok(_) if held.is_empty() => health.clear(),
                    Ok(_) => {}
                    Err(e) => health.note(e),
                }
                let _ = done.send(result);
            }
        }
    }
    if health.is_damaged() {
        let _ = conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        );
    }
}

/// Commit the held batches in order; the store is healthy again once all are committed.
fn retry(
    conn: &mut Connection,
    held: &mut VecDeque<Batch>,
    health: &Health,
    path: &Path,
) -> Result<(), StoreError> {
    if let Some(e @ StoreError::Damaged { .. }) = health.error() {
        return Err(e);
    }
    while let Some(b) = held.front() {
        if let Err(e) = commit(conn, b, path) {
            health.note(&e);
            if health.is_damaged() {
                held.clear();
            }
            return Err(e);
        }
        held.pop_front();
    }
    health.clear();
    Ok(())
}

/// Record, in one transaction, that `run` is not fully recorded: Crashed with the reason, and its
/// running task runs Crashed (they run again on resume). `None` when the run has no record.
fn not_recorded(
    conn: &mut Connection,
    run: FlowRunId,
    now: DateTime<Utc>,
    reason: &str,
    path: &Path,
) -> Result<Option<State>, StoreError> {
    let io = |e: rusqlite::Error| classify(path, "write", &e);
    let tx = conn.transaction().map_err(io)?;
    let id = run.to_string();
    let old: Option<String> = tx
        .query_row("SELECT state FROM flow_runs WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .optional()
        .map_err(io)?;
    let Some(old) = old else {
        return Ok(None);
    };
    let state = State::new(StateName::Crashed, now).with_message(format!(
        "not fully recorded: {reason}; the record stops at the last write that succeeded, and `sluice resume` continues from there"
    ));
    crash_run(
        &tx,
        (run, &old),
        &state,
        "its end was not recorded (the store could not write); it will run again on resume",
        io,
    )?;
    tx.commit().map_err(io)?;
    Ok(Some(state))
}

/// Record flow run `run`, last seen in state `old`, as `state` (Crashed) with its transition, and
/// its running task runs Crashed with `task_message`; false when the run is no longer in `old`.
fn crash_run(
    tx: &Transaction<'_>,
    (run, old): (FlowRunId, &str),
    state: &State,
    task_message: &str,
    io: impl Fn(rusqlite::Error) -> StoreError,
) -> Result<bool, StoreError> {
    let id = run.to_string();
    let changed = tx
        .execute(
            "UPDATE flow_runs SET state = 'Crashed', state_json = ?2, updated_at = ?3 WHERE id = ?1 AND state = ?4",
            params![id, state_json(state), micros(state.timestamp), old],
        )
        .map_err(&io)?;
    if changed == 0 {
        return Ok(false);
    }
    let transition = Transition {
        from: Some(parse_name(&id, old)?),
        to: StateName::Crashed,
        time: state.timestamp,
        message: state.message.clone(),
    };
    insert_transition(tx, run, None, &transition).map_err(&io)?;
    crash_tasks(tx, run, state.timestamp, task_message).map_err(&io)?;
    Ok(true)
}

/// Writes ready to commit as one transaction: writes other than task-run changes, in order, then
/// each task run's changes merged into one write (a task that went Pending → Running → Completed
/// within a batch costs one row write). Kept as it is when it cannot be committed, to be
/// committed later in order.
#[derive(Default)]
struct Batch {
    others: Vec<Write>,
    tasks: indexmap::IndexMap<TaskRunId, TaskWrite>,
    writes: usize,
}

impl Batch {
    fn push(&mut self, w: Write) {
        self.writes += 1;
        match w {
            Write::Task(t) => match self.tasks.get_mut(&t.id) {
                Some(existing) => merge(existing, *t),
                None => {
                    self.tasks.insert(t.id, *t);
                }
            },
            other => self.others.push(other),
        }
    }

    fn is_empty(&self) -> bool {
        self.others.is_empty() && self.tasks.is_empty()
    }

    /// Drop the writes of `run`.
    fn drop_run(&mut self, run: FlowRunId) {
        self.others.retain(|w| write_run(w) != run);
        self.tasks.retain(|_, t| t.run != run);
    }
}

/// The flow run a write belongs to.
fn write_run(w: &Write) -> FlowRunId {
    match w {
        Write::RunCreated(h) => h.id,
        Write::FlowState { run, .. } | Write::Logs { run, .. } => *run,
        Write::Task(t) => t.run,
        Write::Cache(c) => c.flow_run,
    }
}

/// Merge `next` (a later write of the same task run) into `into`: the latest state and counters,
/// every transition in order, the latest output, input and cache information.
fn merge(into: &mut TaskWrite, next: TaskWrite) {
    into.state = next.state;
    into.transitions.extend(next.transitions);
    into.attempts = next.attempts;
    into.run_time = next.run_time;
    into.fuel_consumed = next.fuel_consumed;
    if next.output.is_some() {
        into.output = next.output;
    }
    if next.clear_input {
        into.cached_input = None;
        into.clear_input = true;
    } else if next.cached_input.is_some() {
        into.cached_input = next.cached_input;
        into.clear_input = false;
    }
    if next.cache.is_some() {
        into.cache = next.cache;
    }
}

/// Commit one batch in one transaction.
fn commit(conn: &mut Connection, batch: &Batch, path: &Path) -> Result<(), StoreError> {
    let io = |e: rusqlite::Error| classify(path, "write", &e);
    let tx = conn.transaction().map_err(io)?;
    for w in &batch.others {
        apply_one(&tx, w).map_err(io)?;
    }
    for t in batch.tasks.values() {
        task_write(&tx, t).map_err(io)?;
    }
    tx.commit().map_err(io)
}

fn apply_one(tx: &Transaction<'_>, w: &Write) -> rusqlite::Result<()> {
    {
        match w {
            Write::RunCreated(h) => {
                run_created(tx, h)?;
                for t in &h.tasks {
                    task_write(tx, t)?;
                }
            }
            Write::FlowState {
                run,
                state,
                transition,
            } => {
                tx.prepare_cached(
                    "UPDATE flow_runs SET state = ?2, state_json = ?3, updated_at = ?4, history = history || ?5 WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        run.to_string(),
                        state.name.as_str(),
                        state_json(state),
                        micros(state.timestamp),
                        history_lines(std::slice::from_ref(transition))
                    ])
                })?;
            }
            Write::Task(t) => task_write(tx, t)?,
            Write::Logs {
                run,
                task_run,
                task,
                map_index,
                records,
            } => {
                let mut s = tx.prepare_cached(
                        "INSERT INTO logs (flow_run, task_run, task, map_index, record) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    ?;
                let (run, task_run) = (run.to_string(), task_run.to_string());
                for r in records {
                    let record = serde_json::to_string(r).unwrap_or_default();
                    s.execute(params![run, task_run, &**task, map_index, record])?;
                }
            }
            Write::Cache(c) => cache_write(tx, c)?,
        }
    }
    Ok(())
}

fn state_json(s: &State) -> String {
    let mut s = s.clone();
    s.result = None;
    serde_json::to_string(&s).unwrap_or_default()
}

fn run_created(tx: &Transaction<'_>, h: &RunHeader) -> rusqlite::Result<()> {
    let (path, text) = match &h.manifest {
        Some((p, t)) => (Some(p.to_string_lossy().into_owned()), Some(t.as_str())),
        None => (None, None),
    };
    tx.prepare_cached(
        "INSERT INTO flow_runs (id, flow, state, state_json, created_at, updated_at, parameters, context, manifest_path, manifest, pid, history, pid_start)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        h.id.to_string(),
        h.flow,
        h.state.name.as_str(),
        state_json(&h.state),
        micros(h.state.timestamp),
        serde_json::to_string(&h.parameters).unwrap_or_default(),
        serde_json::to_string(&h.context).unwrap_or_default(),
        path,
        text,
        h.pid,
        history_lines(std::slice::from_ref(&h.transition)),
        process_start(h.pid).and_then(|s| i64::try_from(s).ok())
    ])?;
    Ok(())
}

/// Transitions as history lines: one JSON object per line, appended to a run's `history`.
fn history_lines(ts: &[Transition]) -> String {
    let mut out = String::new();
    for t in ts {
        out.push_str(&serde_json::to_string(t).unwrap_or_default());
        out.push('\n');
    }
    out
}

/// Append `t` to the history of the flow run (`task_run` none) or of the task run.
fn insert_transition(
    tx: &Transaction<'_>,
    run: FlowRunId,
    task_run: Option<&str>,
    t: &Transition,
) -> rusqlite::Result<()> {
    let line = history_lines(std::slice::from_ref(t));
    match task_run {
        None => tx.execute(
            "UPDATE flow_runs SET history = history || ?2 WHERE id = ?1",
            params![run.to_string(), line],
        )?,
        Some(id) => tx.execute(
            "UPDATE task_runs SET history = history || ?2 WHERE id = ?1",
            params![id, line],
        )?,
    };
    Ok(())
}

/// Store `blob` (when it is a value) and return its hash.
fn put_blob(tx: &Transaction<'_>, blob: &Blob) -> rusqlite::Result<String> {
    match blob {
        Blob::Stored(hash) => Ok(hash.clone()),
        Blob::Value(v) => put_value(tx, v),
    }
}

fn put_value(tx: &Transaction<'_>, v: &Value) -> rusqlite::Result<String> {
    let mut bytes = Vec::new();
    canonical(v, &mut bytes);
    let hash = blake3::hash(&bytes).to_hex().to_string();
    tx.prepare_cached("INSERT OR IGNORE INTO blobs (hash, size, data) VALUES (?1, ?2, ?3)")?
        .execute(params![hash, bytes.len() as i64, bytes])?;
    Ok(hash)
}

fn task_write(tx: &Transaction<'_>, t: &TaskWrite) -> rusqlite::Result<()> {
    let output = t.output.as_ref().map(|b| put_blob(tx, b)).transpose()?;
    let input = t
        .cached_input
        .as_ref()
        .map(|b| put_blob(tx, b))
        .transpose()?;
    let cache = t
        .cache
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default());
    tx.prepare_cached(
        "INSERT INTO task_runs (id, flow_run, task_index, name, parent, map_index, state, state_json, attempts, run_time_us, fuel, output, cached_input, cache, history)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?16)
         ON CONFLICT (id) DO UPDATE SET
            history = history || excluded.history,
            state = excluded.state, state_json = excluded.state_json, attempts = excluded.attempts,
            run_time_us = excluded.run_time_us, fuel = excluded.fuel,
            output = coalesce(excluded.output, output),
            cached_input = CASE WHEN ?15 THEN NULL ELSE coalesce(excluded.cached_input, cached_input) END,
            cache = coalesce(excluded.cache, cache)",
    )?
    .execute(params![
        t.id.to_string(),
        t.run.to_string(),
        t.index,
        &*t.name,
        t.parent.map(|(p, _)| p.to_string()),
        t.parent.map(|(_, i)| i),
        t.state.name.as_str(),
        state_json(&t.state),
        t.attempts,
        i64::try_from(t.run_time.as_micros()).unwrap_or(i64::MAX),
        i64_of(t.fuel_consumed),
        output,
        input,
        cache,
        t.clear_input,
        history_lines(&t.transitions)
    ])?;
    Ok(())
}

fn cache_write(tx: &Transaction<'_>, c: &CacheWrite) -> rusqlite::Result<()> {
    let blob = put_value(tx, &c.output)?;
    let k = &c.key;
    tx.prepare_cached(
        "INSERT INTO cache (key, task, validator, component, config, inputs, parameters, blob, created_at, expires_at, flow_run, task_run)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        k.key,
        k.task,
        k.validator,
        k.component,
        k.config,
        k.inputs,
        k.parameters,
        blob,
        micros(c.created_at),
        micros(c.expires_at),
        c.flow_run.to_string(),
        c.task_run.to_string()
    ])?;
    Ok(())
}

/// The lease of a run: an exclusive advisory lock on its lock file.
#[derive(Debug)]
struct FileLease {
    file: File,
    path: PathBuf,
}

impl RunLease for FileLease {}

impl Drop for FileLease {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

/// Whether `file` is the file now at `path`.
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn parse_state(run: &str, json: &str) -> Result<State, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("state {json:?}: {e}"),
    })
}

fn parse_history(run: &str, text: &str) -> Result<Vec<Transition>, StoreError> {
    text.lines()
        .map(|l| {
            serde_json::from_str(l).map_err(|e| StoreError::Corrupt {
                run: run.to_owned(),
                detail: format!("history line {l:?}: {e}"),
            })
        })
        .collect()
}

fn parse_name(run: &str, s: &str) -> Result<StateName, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("unknown state name {s:?}"),
    })
}

fn parse_id<T: std::str::FromStr>(run: &str, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("bad id {s:?}"),
    })
}

/// Read blob `hash`, checking it against its hash.
fn get_blob(
    store: &SqliteStore,
    conn: &Connection,
    hash: &str,
    what: &str,
) -> Result<Value, StoreError> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM blobs WHERE hash = ?1")
        .and_then(|mut s| s.query_row([hash], |r| r.get(0)).optional())
        .map_err(store.io_err("blob read"))?;
    let blob_err = |problem: String| StoreError::Blob {
        hash: hash.to_owned(),
        what: what.to_owned(),
        problem,
    };
    let data = data.ok_or_else(|| blob_err("missing from the store".into()))?;
    if blake3::hash(&data).to_hex().as_str() != hash {
        return Err(blob_err(
            "corrupt: its content does not match its hash".into(),
        ));
    }
    serde_json::from_slice(&data).map_err(|e| blob_err(format!("not valid JSON: {e}")))
}

impl Store for SqliteStore {
    fn submit(&self, write: Write) {
        // The writer lives as long as the store; a send fails only if it panicked.
        if lock(&self.inner.tx).send(Msg::Write(write)).is_err() {
            self.inner
                .health
                .note(&StoreError::io("write", "the writer thread stopped"));
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = mpsc::sync_channel(1);
        lock(&self.inner.tx)
            .send(Msg::Flush(done))
            .map_err(|_| StoreError::io("flush", "the writer thread stopped"))?;
        wait.recv()
            .map_err(|_| StoreError::io("flush", "the writer thread stopped"))?
    }

    fn write_error(&self) -> Option<StoreError> {
        self.inner.health.error()
    }

    fn abandon(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<Option<State>, StoreError> {
        let (done, wait) = mpsc::sync_channel(1);
        lock(&self.inner.tx)
            .send(Msg::Abandon { run, now, done })
            .map_err(|_| StoreError::io("write", "the writer thread stopped"))?;
        wait.recv()
            .map_err(|_| StoreError::io("write", "the writer thread stopped"))?
    }

    fn lease(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
        use std::os::unix::fs::FileExt as _;
        if self.inner.read_only {
            return Err(StoreError::ReadOnly {
                path: self.inner.path.clone(),
                detail: "opened read-only".into(),
            });
        }
        let path = self.lock_path(run);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("lease of run {run} ({})", path.display()), e))?;
        match file.try_lock() {
            // The holder before us may have deleted the file between our open and our lock:
            // then we hold a lock nobody else can see. Lock the file that is at the path.
            Ok(()) if !same_file(&file, &path) => {
                drop(file);
                return self.lease(run);
            }
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Live {
                    run,
                    pid: self.holder(&path, run),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(StoreError::io(format!("lease of run {run}"), e));
            }
        }
        // Overwritten in place, then trimmed: a reader never sees it empty once written.
        let pid = std::process::id().to_string();
        let _ = file.write_all_at(pid.as_bytes(), 0);
        let _ = file.set_len(pid.len() as u64);
        let lease = FileLease { file, path };
        self.claim(run)?;
        Ok(Box::new(lease))
    }

    fn is_live(&self, run: FlowRunId) -> bool {
        self.live_in(&self.read(), run)
    }

    fn cache_lookup(&self, key: &CacheKey, now: DateTime<Utc>) -> Result<CacheLookup, StoreError> {
        let conn = self.read();
        let io = self.io_err("cache lookup");
        let found = conn
            .prepare_cached(
                "SELECT c.blob, c.created_at, c.expires_at, c.flow_run, c.task_run, c.task, c.validator, c.component, b.size, b.data
                 FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
                 WHERE c.key = ?1 AND c.expires_at > ?2 ORDER BY c.created_at DESC, c.seq DESC LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![key.key, micros(now)], |r| {
                    Ok((
                        CacheEntry {
                            key: key.key.clone(),
                            blob: r.get(0)?,
                            created_at: from_micros(r.get(1)?),
                            expires_at: from_micros(r.get(2)?),
                            flow_run: r.get(3)?,
                            task_run: r.get(4)?,
                            task: r.get(5)?,
                            validator: r.get(6)?,
                            component: r.get(7)?,
                            size: r.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
                        },
                        r.get::<_, Option<Vec<u8>>>(9)?,
                    ))
                })
                .optional()
            })
            .map_err(io)?;
        if let Some((entry, data)) = found {
            let Some(data) = data else {
                return Ok(CacheLookup::Miss(format!(
                    "the entry from flow run {} refers to blob {} which is missing from the store",
                    entry.flow_run, entry.blob
                )));
            };
            if blake3::hash(&data).to_hex().as_str() != entry.blob {
                return Ok(CacheLookup::Miss(format!(
                    "the entry from flow run {} refers to blob {} whose content does not match its hash",
                    entry.flow_run, entry.blob
                )));
            }
            return match serde_json::from_slice(&data) {
                Ok(v) => Ok(CacheLookup::Hit {
                    output: Arc::new(v),
                    blob: entry.blob.clone(),
                    entry: Box::new(entry),
                }),
                Err(e) => Ok(CacheLookup::Miss(format!(
                    "the entry from flow run {} has an unreadable blob {}: {e}",
                    entry.flow_run, entry.blob
                ))),
            };
        }
        // Explain the miss against the newest entry of the task.
        type Newest = (
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            i64,
            String,
        );
        // The newest entry of the same configuration (the same child of a mapped task), else the
        // newest of the task: two index lookups (migration 4), so explaining every miss of a
        // first run of a large mapped task stays linear in its children.
        let same_config: Option<Newest> = conn
            .prepare_cached(&newest_entry_sql(SAME_CONFIG))
            .and_then(|mut s| {
                s.query_row(params![key.task, key.config], |r| TryFrom::try_from(r))
                    .optional()
            })
            .map_err(self.io_err("cache lookup"))?;
        let newest: Option<Newest> = match same_config {
            Some(n) => Some(n),
            None => conn
                .prepare_cached(&newest_entry_sql(SAME_TASK))
                .and_then(|mut s| {
                    s.query_row(params![key.task], |r| TryFrom::try_from(r))
                        .optional()
                })
                .map_err(self.io_err("cache lookup"))?,
        };
        let Some((k, component, config, inputs, parameters, validator, expires, run)) = newest
        else {
            return Ok(CacheLookup::Miss(format!(
                "no cached output of task `{}` yet",
                key.task
            )));
        };
        let short = |h: &str| h.chars().take(12).collect::<String>();
        let reason = if k == key.key {
            format!(
                "the entry from flow run {run} expired at {}",
                from_micros(expires).to_rfc3339()
            )
        } else if component != key.component {
            format!(
                "the component changed (cached from {}…, now {}…)",
                short(&component),
                short(&key.component)
            )
        } else if validator != key.validator {
            format!(
                "the validator changed (cached under {validator}, now {})",
                key.validator
            )
        } else if config != key.config {
            "the task's limits or map index, the flow (or cache namespace) or the context values \
             changed"
                .to_owned()
        } else if inputs != key.inputs {
            format!(
                "the inputs differ from the newest entry's (flow run {run}; {})",
                key.validator
            )
        } else if parameters != key.parameters {
            format!(
                "the parameters differ from the newest entry's (flow run {run}; {})",
                key.validator
            )
        } else {
            "no valid entry for this key".to_owned()
        };
        Ok(CacheLookup::Miss(reason))
    }

    fn cache_preload(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
    ) -> Result<Vec<CachedOutput>, StoreError> {
        let conn = self.read();
        let io = self.io_err("cache preload");
        let mut s = conn
            .prepare_cached(
                "SELECT c.key, c.blob, c.created_at, c.expires_at, c.flow_run, c.task_run, c.validator, c.component, b.size, b.data
                 FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
                 WHERE c.task = ?1 AND c.expires_at > ?2 ORDER BY c.created_at, c.seq",
            )
            .map_err(&io)?;
        let mut rows = s.query(params![task, micros(now)]).map_err(&io)?;
        let mut out = Vec::new();
        let mut loaded = 0u64;
        while let Some(r) = rows.next().map_err(&io)? {
            let size = r.get::<_, Option<i64>>(8).map_err(&io)?;
            let entry = CacheEntry {
                key: r.get(0).map_err(&io)?,
                blob: r.get(1).map_err(&io)?,
                created_at: from_micros(r.get(2).map_err(&io)?),
                expires_at: from_micros(r.get(3).map_err(&io)?),
                flow_run: r.get(4).map_err(&io)?,
                task_run: r.get(5).map_err(&io)?,
                task: task.to_owned(),
                validator: r.get(6).map_err(&io)?,
                component: r.get(7).map_err(&io)?,
                size: size.map_or(0, |n| u64::try_from(n).unwrap_or(0)),
            };
            let size = size.and_then(|n| u64::try_from(n).ok());
            let value = match size {
                Some(n) if loaded.saturating_add(n) <= max_bytes => {
                    let data = r.get_ref(9).map_err(&io)?;
                    let bytes = data.as_blob().unwrap_or_default();
                    loaded += n;
                    // A corrupt blob is not preloaded; a hit on it goes to `cache_lookup`, which
                    // reports it as a miss.
                    (blake3::hash(bytes).to_hex().as_str() == entry.blob)
                        .then(|| serde_json::from_slice(bytes).ok().map(Arc::new))
                        .flatten()
                }
                _ => None,
            };
            out.push(CachedOutput { entry, value });
        }
        Ok(out)
    }

    fn cache_entries(&self, task: Option<&str>) -> Result<Vec<CacheEntry>, StoreError> {
        let conn = self.read();
        let mut s = conn
            .prepare(
                "SELECT c.key, c.task, c.validator, c.component, c.blob, coalesce(b.size, 0), c.created_at, c.expires_at, c.flow_run, c.task_run
                 FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
                 WHERE ?1 IS NULL OR c.task = ?1 ORDER BY c.created_at DESC, c.seq DESC",
            )
            .map_err(self.io_err("cache list"))?;
        let rows = s
            .query_map([task], |r| {
                Ok(CacheEntry {
                    key: r.get(0)?,
                    task: r.get(1)?,
                    validator: r.get(2)?,
                    component: r.get(3)?,
                    blob: r.get(4)?,
                    size: r.get::<_, i64>(5)? as u64,
                    created_at: from_micros(r.get(6)?),
                    expires_at: from_micros(r.get(7)?),
                    flow_run: r.get(8)?,
                    task_run: r.get(9)?,
                })
            })
            .map_err(self.io_err("cache list"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.io_err("cache list"))
    }

    fn cache_entry(&self, prefix: &str) -> Result<(CacheEntry, Value), StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        let entries: Vec<CacheEntry> = self
            .cache_entries(None)?
            .into_iter()
            .filter(|e| e.key.starts_with(&prefix))
            .collect();
        let mut keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        match keys.len() {
            0 => Err(StoreError::CacheKey(format!(
                "no cache entry with key `{prefix}` (see `sluice cache ls`)"
            ))),
            1 => {
                let entry = entries[0].clone();
                let value = get_blob(
                    self,
                    &self.read(),
                    &entry.blob,
                    &format!("cached output of task `{}`", entry.task),
                )?;
                Ok((entry, value))
            }
            n => Err(StoreError::CacheKey(format!(
                "`{prefix}` matches {n} cache keys; give more of the key"
            ))),
        }
    }

    fn clear_cache(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        self.writable()?;
        let conn = self.read();
        conn.execute(
            "DELETE FROM cache WHERE (?1 IS NULL OR task = ?1) AND (?2 IS NULL OR expires_at <= ?2)",
            params![task, expired_before.map(micros)],
        )
        .map_err(self.io_err("cache clear"))
    }

    fn resolve_run(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        let prefix = id_or_prefix.trim().to_ascii_uppercase();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
        }
        let conn = self.read();
        let mut s = conn
            .prepare_cached("SELECT id FROM flow_runs WHERE id >= ?1 AND id < ?1 || 'ZZZZZZZZZZZZZZZZZZZZZZZZZZ' LIMIT 2")
            .map_err(self.io_err("run lookup"))?;
        let ids: Vec<String> = s
            .query_map([&prefix], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.io_err("run lookup"))?;
        let ids: Vec<&String> = ids.iter().filter(|i| i.starts_with(&prefix)).collect();
        match ids.as_slice() {
            [] => Err(StoreError::UnknownRun(id_or_prefix.to_owned())),
            [one] => parse_id(one, one),
            _ => {
                let count: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM flow_runs WHERE substr(id, 1, length(?1)) = ?1",
                        [&prefix],
                        |r| r.get(0),
                    )
                    .map_err(self.io_err("run lookup"))?;
                Err(StoreError::AmbiguousRun {
                    prefix: id_or_prefix.to_owned(),
                    count: count as usize,
                })
            }
        }
    }

    fn load_run(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        let conn = self.read();
        let id = run.to_string();
        let io = self.io_err("run load");
        type Head = (
            String,
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            String,
        );
        let head: Option<Head> = conn
            .query_row(
                "SELECT flow, state_json, created_at, parameters, context, manifest_path, manifest, cancel_requested_at, history FROM flow_runs WHERE id = ?1",
                [&id],
                |r| TryFrom::try_from(r),
            )
            .optional()
            .map_err(&io)?;
        let Some((flow, state, created, parameters, context, mpath, mtext, cancel, history)) = head
        else {
            return Err(StoreError::UnknownRun(id));
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            run: id.clone(),
            detail,
        };
        let state = parse_state(&id, &state)?;
        let parameters: BTreeMap<String, Value> =
            serde_json::from_str(&parameters).map_err(|e| corrupt(format!("parameters: {e}")))?;
        let context: BTreeMap<String, String> =
            serde_json::from_str(&context).map_err(|e| corrupt(format!("context: {e}")))?;

        let mut logs: HashMap<String, Vec<LogRecord>> = HashMap::new();
        {
            let mut s = conn
                .prepare_cached(
                    "SELECT task_run, record FROM logs WHERE flow_run = ?1 ORDER BY seq",
                )
                .map_err(&io)?;
            let rows = s
                .query_map([&id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(&io)?;
            for row in rows {
                let (task_run, record) = row.map_err(&io)?;
                let record: LogRecord =
                    serde_json::from_str(&record).map_err(|e| corrupt(format!("log: {e}")))?;
                logs.entry(task_run).or_default().push(record);
            }
        }
        type Row = (
            String,
            u32,
            String,
            Option<String>,
            Option<u32>,
            String,
            u32,
            i64,
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            String,
        );
        let rows: Vec<Row> = {
            let mut s = conn
                .prepare_cached(
                    "SELECT id, task_index, name, parent, map_index, state_json, attempts, run_time_us, fuel, output, cached_input, cache, history
                     FROM task_runs WHERE flow_run = ?1 ORDER BY task_index, parent IS NOT NULL, map_index",
                )
                .map_err(&io)?;
            s.query_map([&id], |r| TryFrom::try_from(r))
                .and_then(|rows| rows.collect())
                .map_err(&io)?
        };
        let mut tasks: Vec<TaskRun> = Vec::new();
        let mut problems = Vec::new();
        let mut parents: HashMap<String, usize> = HashMap::new();
        for (
            tid,
            _index,
            name,
            parent,
            map_index,
            state,
            attempts,
            rt,
            fuel,
            out,
            input,
            cache,
            hist,
        ) in rows
        {
            let state = parse_state(&id, &state)?;
            let what = |kind: &str| match map_index {
                Some(i) => format!("{kind} of task `{name}`[{i}]"),
                None => format!("{kind} of task `{name}`"),
            };
            let mut blob = |hash: &Option<String>, kind: &str| {
                let hash = hash.as_deref()?;
                get_blob(self, &conn, hash, &what(kind))
                    .map_err(|e| problems.push(e))
                    .ok()
            };
            let output = match state.state_type() {
                crate::state::StateType::Completed => blob(&out, "output"),
                _ => None,
            };
            let cached_input = blob(&input, "cached input").map(Arc::new);
            let cache = cache
                .map(|c| serde_json::from_str(&c))
                .transpose()
                .map_err(|e| corrupt(format!("cache info: {e}")))?;
            let record = TaskRun {
                name,
                id: parse_id(&id, &tid)?,
                map_index,
                history: parse_history(&id, &hist)?,
                logs: logs.remove(&tid).unwrap_or_default(),
                state,
                attempts,
                output,
                output_released: false,
                cached_input,
                run_time: Duration::from_micros(u64::try_from(rt).unwrap_or(0)),
                fuel_consumed: u64::try_from(fuel).unwrap_or(0),
                cache,
                children: Vec::new(),
            };
            match parent {
                None => {
                    parents.insert(tid, tasks.len());
                    tasks.push(record);
                }
                Some(p) => match parents.get(&p) {
                    Some(&i) => tasks[i].children.push(record),
                    None => {
                        return Err(corrupt(format!("task run {tid} has an unknown parent {p}")));
                    }
                },
            }
        }
        let run_record = FlowRun {
            id: run,
            flow,
            state,
            history: parse_history(&id, &history)?,
            parameters,
            context,
            tasks,
        };
        Ok(StoredRun {
            run: run_record,
            manifest: mpath.zip(mtext).map(|(p, t)| (PathBuf::from(p), t)),
            created_at: from_micros(created),
            cancel_requested_at: cancel.map(from_micros),
            problems,
        })
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let conn = self.read();
        let io = self.io_err("run list");
        let limit = if filter.limit == 0 {
            i64::MAX
        } else {
            filter.limit as i64
        };
        let rows: Vec<(String, String, String, i64, i64)> = {
            let mut s = conn
                .prepare_cached(
                    "SELECT id, flow, state_json, created_at, updated_at FROM flow_runs
                     WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR flow = ?2)
                     ORDER BY created_at DESC, id DESC LIMIT ?3",
                )
                .map_err(&io)?;
            s.query_map(
                params![filter.state.map(StateName::as_str), filter.flow, limit],
                |r| TryFrom::try_from(r),
            )
            .and_then(|rows| rows.collect())
            .map_err(&io)?
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut counts = conn
            .prepare_cached(
                "SELECT state, count(*) FROM task_runs WHERE flow_run = ?1 AND parent IS NULL GROUP BY state",
            )
            .map_err(&io)?;
        for (id, flow, state, created, updated) in rows {
            let tasks: BTreeMap<String, u64> = counts
                .query_map([&id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .and_then(|rows| rows.collect())
                .map_err(&io)?;
            out.push(RunSummary {
                id: parse_id(&id, &id)?,
                flow,
                state: parse_state(&id, &state)?,
                created_at: from_micros(created),
                updated_at: from_micros(updated),
                tasks,
            });
        }
        Ok(out)
    }

    fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
    ) -> Result<Vec<StoredLog>, StoreError> {
        let conn = self.read();
        let io = self.io_err("log read");
        let mut s = conn
            .prepare_cached(
                "SELECT seq, task, map_index, record FROM logs WHERE flow_run = ?1 AND seq > ?2 AND (?3 IS NULL OR task = ?3) ORDER BY seq",
            )
            .map_err(&io)?;
        let rows: Vec<(i64, String, Option<u32>, String)> = s
            .query_map(params![run.to_string(), after, task], |r| {
                TryFrom::try_from(r)
            })
            .and_then(|rows| rows.collect())
            .map_err(&io)?;
        rows.into_iter()
            .map(|(seq, task, map_index, record)| {
                let record = serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
                    run: run.to_string(),
                    detail: format!("log {seq}: {e}"),
                })?;
                Ok(StoredLog {
                    seq,
                    task,
                    map_index,
                    record,
                })
            })
            .collect()
    }

    fn recover_dead(&self, now: DateTime<Utc>) -> Result<Vec<FlowRunId>, StoreError> {
        if self.inner.read_only {
            // Nothing can be recorded; the runs are shown as they were left.
            return Ok(Vec::new());
        }
        let candidates: Vec<(String, String, i64)> = {
            let conn = self.read();
            let mut s = conn
                .prepare_cached(
                    "SELECT id, state, pid FROM flow_runs WHERE state IN ('Pending', 'Running', 'Cancelling')",
                )
                .map_err(self.io_err("recovery"))?;
            s.query_map([], |r| TryFrom::try_from(r))
                .and_then(|rows| rows.collect())
                .map_err(self.io_err("recovery"))?
        };
        let mut marked = Vec::new();
        for (id, old, pid) in candidates {
            let run: FlowRunId = parse_id(&id, &id)?;
            if self.is_live(run) {
                continue;
            }
            self.writable()?;
            let mut conn = self.read();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(self.io_err("recovery"))?;
            // A process may have resumed it since the check above; it leases before writing.
            if self.live_in(&tx, run) {
                continue;
            }
            let flow_state = State::new(StateName::Crashed, now).with_message(format!(
                "the process running this flow run (pid {pid}) died"
            ));
            let crashed = crash_run(
                &tx,
                (run, &old),
                &flow_state,
                "the process running this task died; it will run again on resume",
                self.io_err("recovery"),
            )?;
            if !crashed {
                continue;
            }
            tx.commit().map_err(self.io_err("recovery"))?;
            marked.push(run);
        }
        Ok(marked)
    }

    fn cancel(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.writable()?;
        let id = run.to_string();
        if self.is_live(run) {
            let n = self
                .read()
                .execute(
                    "UPDATE flow_runs SET cancel_requested_at = ?2 WHERE id = ?1",
                    params![id, micros(now)],
                )
                .map_err(self.io_err("cancel"))?;
            if n == 0 {
                return Err(StoreError::UnknownRun(id));
            }
            return Ok(CancelOutcome::Requested);
        }
        // Nothing runs it (paused, or its process died): record the cancellation here, in one
        // write transaction that re-reads the state, so a run that was just resumed or just
        // finished is not overwritten.
        let mut conn = self.read();
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(self.io_err("cancel"))?;
        let state: Option<String> = tx
            .query_row("SELECT state FROM flow_runs WHERE id = ?1", [&id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.io_err("cancel"))?;
        let state = parse_name(
            &id,
            &state.ok_or_else(|| StoreError::UnknownRun(id.clone()))?,
        )?;
        if self.live_in(&tx, run) {
            drop(tx);
            drop(conn);
            return self.cancel(run, now);
        }
        if matches!(
            state.state_type(),
            crate::state::StateType::Completed
                | crate::state::StateType::Failed
                | crate::state::StateType::Cancelled
        ) {
            return Ok(CancelOutcome::AlreadyFinished(state));
        }
        let flow_state = State::new(StateName::Cancelled, now)
            .with_message("cancelled by `sluice cancel` while no process ran it");
        tx.execute(
            "UPDATE flow_runs SET state = 'Cancelled', state_json = ?2, updated_at = ?3 WHERE id = ?1 AND state = ?4",
            params![id, state_json(&flow_state), micros(now), state.as_str()],
        )
        .map_err(self.io_err("cancel"))?;
        insert_transition(
            &tx,
            run,
            None,
            &Transition {
                from: Some(state),
                to: StateName::Cancelled,
                time: now,
                message: flow_state.message.clone(),
            },
        )
        .map_err(self.io_err("cancel"))?;
        let open: Vec<(String, String)> = {
            let mut s = tx
                .prepare("SELECT id, state FROM task_runs WHERE flow_run = ?1")
                .map_err(self.io_err("cancel"))?;
            s.query_map([&id], |r| TryFrom::try_from(r))
                .and_then(|rows| rows.collect())
                .map_err(self.io_err("cancel"))?
        };
        for (tid, s) in open {
            let name = parse_name(&id, &s)?;
            if name.state_type().is_terminal() {
                continue;
            }
            let st = State::new(StateName::Cancelled, now)
                .with_message("the flow run was cancelled before this task finished");
            set_task_state(&tx, run, &tid, name, &st).map_err(self.io_err("cancel"))?;
        }
        tx.commit().map_err(self.io_err("cancel"))?;
        Ok(CancelOutcome::Cancelled)
    }

    fn cancel_requested(&self, run: FlowRunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        let v: Option<Option<i64>> = self
            .read()
            .prepare_cached("SELECT cancel_requested_at FROM flow_runs WHERE id = ?1")
            .and_then(|mut s| s.query_row([run.to_string()], |r| r.get(0)).optional())
            .map_err(self.io_err("cancel check"))?;
        Ok(v.flatten().map(from_micros))
    }
}

/// Task runs that were running when their process died become Crashed.
fn crash_tasks(
    tx: &Transaction<'_>,
    run: FlowRunId,
    now: DateTime<Utc>,
    message: &str,
) -> rusqlite::Result<()> {
    let running: Vec<(String, String)> = {
        let mut s = tx.prepare(
            "SELECT id, state FROM task_runs WHERE flow_run = ?1 AND state IN ('Running', 'Retrying')",
        )?;
        s.query_map([run.to_string()], |r| TryFrom::try_from(r))?
            .collect::<rusqlite::Result<_>>()?
    };
    for (tid, old) in running {
        let old: StateName = old.parse().unwrap_or(StateName::Running);
        let st = State::new(StateName::Crashed, now).with_message(message);
        set_task_state(tx, run, &tid, old, &st)?;
    }
    Ok(())
}

fn set_task_state(
    tx: &Transaction<'_>,
    run: FlowRunId,
    task_run: &str,
    old: StateName,
    st: &State,
) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE task_runs SET state = ?2, state_json = ?3 WHERE id = ?1",
        params![task_run, st.name.as_str(), state_json(st)],
    )?;
    insert_transition(
        tx,
        run,
        Some(task_run),
        &Transition {
            from: Some(old),
            to: st.name,
            time: st.timestamp,
            message: st.message.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Explaining a miss reads one row through an index, never the task's other entries: the
    /// first run of a cached mapped task explains each of its N misses in O(log N), not O(N).
    #[test]
    fn explaining_a_miss_looks_the_newest_entry_up_through_an_index() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        let conn = store.read();
        let both: &[&dyn rusqlite::ToSql] = &[&"t", &"c"];
        for (filter, args) in [(SAME_CONFIG, both), (SAME_TASK, &both[..1])] {
            let sql = format!("EXPLAIN QUERY PLAN {}", newest_entry_sql(filter));
            let mut stmt = conn.prepare(&sql).expect("plan");
            let plan: Vec<String> = stmt
                .query_map(args, |r| r.get::<_, String>(3))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert!(
                plan.iter()
                    .all(|d| d.contains("USING INDEX") && !d.contains("TEMP B-TREE")),
                "{filter}: {plan:?}"
            );
        }
    }
}
