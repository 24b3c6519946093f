//! The embedded store: one SQLite database (`<home>/sluice.db`, WAL, `synchronous=FULL`) with
//! versioned migrations, blobs in a content-addressed table, and a writer thread that commits
//! queued writes in batches (group commit), checkpointed by a thread of its own. Liveness of a run is an advisory lock on
//! `<home>/runs/<id>.lock`, held by the process executing it and released by the kernel when that
//! process dies, however it dies; the run also records that process's pid and start time
//! (Linux: `/proc/<pid>/stat` field 22), so a run whose lock file was deleted is still live while
//! its process is. Both need the home on a local file system, shared by processes of one
//! machine.
//!
//! Writes fail stop: a batch that cannot be committed is held, with every later batch, in order,
//! and nothing is committed past it until a flush commits them all (see [`Store::abandon`] for
//! a run that ends first). An error SQLite reports as corruption stops all writing for good.

mod cache;
mod checkpoint;
mod liveness;
mod runs;
mod schema;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;

use super::writer::{GROUP_WINDOW, Health, Writer};
use super::{
    CacheEntry, CacheLookup, CachedOutput, CancelOutcome, ChangeCursor, LogTail, RunChanges,
    RunFilter, RunLease, RunSummary, Store, StoreError, StoredLog, StoredRun, TailLimits, Write,
};
use crate::cache::CacheKey;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::state::State;
use checkpoint::Checkpointer;
use schema::{MIGRATIONS, classify_open, connect, connect_immutable, migrate};
use writer::{SqliteCommit, damage_marker};

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
    writer: Writer,
}

impl Drop for Inner {
    /// Stop the writer and wait for it: its connection is closed (and the WAL checkpointed and
    /// removed by the last connection) before the process can exit, so a clean exit never leaves
    /// a `-wal` without its `-shm` (which a read-only home could not open).
    fn drop(&mut self) {
        self.writer.stop();
        if self.writer.health().is_damaged() {
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

impl SqliteStore {
    /// Open (creating when absent) the store in `home`: the database `home/sluice.db`.
    /// Refuses a file that is not a Sluice database, or one from a newer Sluice, and leaves it
    /// untouched.
    /// A home (or database) that cannot be written is [`StoreError::ReadOnly`]; see
    /// [`SqliteStore::open_read_only`] to read its history anyway.
    pub fn open(home: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(home, GROUP_WINDOW)
    }

    /// [`SqliteStore::open`], committing writes nobody waits for at most every `window`.
    fn open_with(home: &Path, window: Duration) -> Result<SqliteStore, StoreError> {
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
        Self::start(home, path, write, read, false, window)
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
        Self::start(home, path, conn, read, true, GROUP_WINDOW)
    }

    fn start(
        home: &Path,
        path: PathBuf,
        mut write: Connection,
        read: Connection,
        read_only: bool,
        window: Duration,
    ) -> Result<SqliteStore, StoreError> {
        let open_err = |detail: String| StoreError::Open {
            path: path.clone(),
            detail,
        };
        let health = Arc::new(Health::new(Some(damage_marker(&path))));
        let checkpoints = (!read_only)
            .then(|| Checkpointer::start(&path, &mut write, health.clone()))
            .transpose()?;
        let db = SqliteCommit {
            conn: write,
            path: path.clone(),
            checkpoints,
        };
        let writer = Writer::start("sluice-store", db, health.clone(), window)
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                path,
                read_only,
                read: Mutex::new(read),
                writer,
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
                self.inner.writer.health().note(&e);
            }
            e
        }
    }

    /// Refuse to write when the database is damaged.
    fn writable(&self) -> Result<(), StoreError> {
        match self.inner.writer.health().error() {
            Some(e @ StoreError::Damaged { .. }) => Err(e),
            _ => Ok(()),
        }
    }
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

impl Store for SqliteStore {
    fn submit(&self, write: Write) {
        self.inner.writer.submit(write);
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.writer.flush()
    }

    fn flush_async(&self) -> crate::store::Flushing {
        self.inner.writer.flush_async()
    }

    fn write_error(&self) -> Option<StoreError> {
        self.inner.writer.health().error()
    }

    fn queued_write_bytes(&self) -> u64 {
        self.inner.writer.health().queued_bytes()
    }

    fn abandon(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<Option<State>, StoreError> {
        self.inner.writer.abandon(run, now)
    }

    fn lease(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
        self.lease_impl(run)
    }

    fn is_live(&self, run: FlowRunId) -> bool {
        self.live_in(&self.read(), run)
    }

    fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.writer.health().watch_changes()
    }

    /// The database, its WAL and shared-memory index.
    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(["", "-wal", "-shm"]
            .iter()
            .filter_map(|suffix| {
                let mut p = self.inner.path.as_os_str().to_owned();
                p.push(suffix);
                std::fs::metadata(p).ok()
            })
            .map(|m| m.len())
            .sum())
    }

    fn cache_lookup(&self, key: &CacheKey, now: DateTime<Utc>) -> Result<CacheLookup, StoreError> {
        self.cache_lookup_impl(key, now)
    }

    fn cache_preload(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError> {
        self.cache_preload_impl(task, now, max_bytes, each)
    }

    fn cache_entries(&self, task: Option<&str>) -> Result<Vec<CacheEntry>, StoreError> {
        self.cache_entries_impl(task)
    }

    fn cache_entry(&self, prefix: &str) -> Result<(CacheEntry, Json), StoreError> {
        self.cache_entry_impl(prefix)
    }

    fn clear_cache(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        self.clear_cache_impl(task, expired_before)
    }

    fn resolve_run(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        self.resolve_run_impl(id_or_prefix)
    }

    fn load_run(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        self.load_run_impl(run)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.list_runs_impl(filter)
    }

    fn child_run(&self, parent: TaskRunId) -> Result<Option<FlowRunId>, StoreError> {
        self.child_run_impl(parent)
    }

    fn changes(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<RunChanges, StoreError> {
        self.changes_impl(run, task, after)
    }

    fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.logs_impl(run, task, after, limit)
    }

    fn task_run_logs(
        &self,
        run: FlowRunId,
        task_run: TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.task_run_logs_impl(run, task_run, after, limit)
    }

    fn newest_log_seq(&self, run: FlowRunId) -> Result<i64, StoreError> {
        self.newest_log_seq_impl(run)
    }

    fn log_cost(&self, run: FlowRunId) -> Result<u64, StoreError> {
        self.log_cost_impl(run)
    }

    fn task_names(&self, run: FlowRunId) -> Result<Vec<String>, StoreError> {
        self.task_names_impl(run)
    }

    fn log_tails(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        self.log_tails_impl(run, limits)
    }

    fn recover_dead(&self, now: DateTime<Utc>) -> Result<Vec<FlowRunId>, StoreError> {
        self.recover_dead_impl(now)
    }

    fn cancel(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.cancel_impl(run, now)
    }

    fn cancel_requested(&self, run: FlowRunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.cancel_requested_impl(run)
    }
}
