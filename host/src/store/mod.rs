//! Durable storage of flow runs: runs, task runs, every state transition, logs, parameters and
//! context, results in a content-addressed blob store, and the output cache. Everything goes
//! through the [`Store`] trait; [`SqliteStore`] is the embedded implementation, [`PgStore`] the
//! one in a schema of a PostgreSQL database ([`PgDatabase`], which also holds the queue of
//! attempts given to workers, [`PgQueue`]).
//!
//! Writes are queued ([`Store::submit`]) and committed in batches by the store (group commit), so
//! recording a run costs the runner a channel send per transition. Reads are synchronous.
//!
//! The record never runs ahead of a lost write: when a batch cannot be committed (a database
//! locked by another process beyond the busy timeout, a full disk), the store stops committing
//! and holds that batch and every later write, in order; [`Store::flush`] tries them again, and a
//! run that ends while they still cannot be written is recorded, when the store can still write
//! anything, as Crashed with `not fully recorded: <reason>` ([`Store::abandon`]), so it stays
//! resumable from the last write that succeeded. A damaged database (SQLite reports corruption)
//! stops all writing at once, for good: [`StoreError::Damaged`] names the file and what to do.
//!
//! Liveness (is a process executing this run?) rests, with SQLite, on an advisory lock, backed by
//! the pid and start time of the process recorded with the run: the home must be on a local file
//! system, used by processes of one machine (advisory locks on network file systems are
//! unreliable, and a pid means nothing on another machine). With PostgreSQL it is a lease row
//! its holder renews, seen from any machine.

mod postgres;
mod rows;
mod sqlite;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use postgres::{
    Claimed, LEASE_TTL, Lapsed, Lease, NewAttempt, PgDatabase, PgQueue, PgRegistry, PgStore,
    RENEW_EVERY, TenantRow, TokenKind, Wakeups, WorkerRow,
};
pub use sqlite::SqliteStore;

use crate::cache::{CacheInfo, CacheKey};
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::runner::{FlowRun, Transition};
use crate::sandbox::LogRecord;
use crate::state::{State, StateName};

/// Why the store could not do something. Every variant names what it was working on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (missing directory, permissions, read-only file
    /// system, …).
    #[error("cannot open the store at {}: {detail}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// The home or the database cannot be written: runs cannot be recorded there (history can
    /// still be read).
    #[error("the store at {} is read-only ({detail}); runs cannot be recorded there: choose a writable --home", path.display())]
    ReadOnly {
        /// The database file.
        path: PathBuf,
        /// What refused the write.
        detail: String,
    },
    /// The file is not a Sluice database (another application's, or not SQLite at all). It is
    /// left untouched.
    #[error("{} is not a Sluice database: {detail}; it was left untouched (move it aside or choose another --home)", path.display())]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// What was found.
        detail: String,
    },
    /// The database was written by a newer Sluice.
    #[error("{} has schema version {found}, newer than this Sluice understands ({supported}); upgrade Sluice", path.display())]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// The schema version found.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A query or write failed.
    #[error("store {operation} failed: {detail}")]
    Io {
        /// What was being done.
        operation: String,
        /// Why.
        detail: String,
    },
    /// The PostgreSQL database could not be reached or refused a statement.
    #[error("the PostgreSQL database {database}: {detail}")]
    Database {
        /// The database, as `postgres://user@host:port/name` (never its password).
        database: String,
        /// What failed.
        detail: String,
        /// Whether it may succeed later (the connection failed or broke), as opposed to an
        /// error the server answered with.
        retriable: bool,
    },
    /// No flow run has this id (or id prefix).
    #[error("no flow run `{0}` in the store")]
    UnknownRun(String),
    /// An id prefix matches more than one run.
    #[error("`{prefix}` matches {count} flow runs; give more of the id")]
    AmbiguousRun {
        /// The prefix given.
        prefix: String,
        /// How many runs it matches.
        count: usize,
    },
    /// A blob the database refers to is missing or does not match its hash.
    #[error("blob {hash} ({what}) is {problem}")]
    Blob {
        /// The blob's hash.
        hash: String,
        /// What it holds, e.g. "output of task `a`".
        what: String,
        /// Missing, or corrupt.
        problem: String,
    },
    /// No cache entry has this key (or key prefix), or more than one does.
    #[error("{0}")]
    CacheKey(String),
    /// A stored record could not be read back.
    #[error("flow run {run}: stored record is unreadable: {detail}")]
    Corrupt {
        /// The run.
        run: String,
        /// What is wrong.
        detail: String,
    },
    /// The run is being executed by a live process.
    #[error("flow run {run} is live in another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Live {
        /// The run.
        run: FlowRunId,
        /// The process, when it could be told.
        pid: Option<u32>,
    },
    /// SQLite found the database damaged (corrupt pages, not a database any more). Nothing more
    /// is written to it, by this process or, while `<database>.damaged` (which notes it) exists,
    /// by any other.
    #[error("the store at {} is damaged ({detail}); Sluice stopped writing to it. Keep a copy of it and of its -wal file, recover what you can with `sqlite3 {} .recover`, then move them aside with {}.damaged (or choose another --home)", path.display(), path.display(), path.display())]
    Damaged {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
}

impl StoreError {
    pub(crate) fn io(operation: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            operation: operation.into(),
            detail: e.to_string(),
        }
    }

    /// Whether trying again later may succeed (a busy or locked database, a full disk), as
    /// opposed to a problem that needs the user (a foreign file, a missing blob, a damaged
    /// database).
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Io { .. } | StoreError::Live { .. } => true,
            StoreError::Database { retriable, .. } => *retriable,
            _ => false,
        }
    }
}

/// A write, queued with [`Store::submit`] and applied in order.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new flow run with its task runs, committed together (a run is never recorded without
    /// its tasks). Later changes of its task runs are [`Write::Task`].
    RunCreated(Box<RunHeader>),
    /// The flow run changed state.
    FlowState {
        /// The run.
        run: FlowRunId,
        /// The new state.
        state: State,
        /// The transition into it.
        transition: Transition,
    },
    /// A task run's latest state, with the transitions since the last write.
    Task(Box<TaskWrite>),
    /// Log records of a task run.
    Logs {
        /// The run.
        run: FlowRunId,
        /// The task run.
        task_run: TaskRunId,
        /// The task's name.
        task: Arc<str>,
        /// Its map index.
        map_index: Option<u32>,
        /// The records.
        records: Vec<LogRecord>,
    },
    /// A task's output, cached under `key` until `expires_at`.
    Cache(Box<CacheWrite>),
    /// Entry `seq` of a code flow's journal (see [`JournalEntry`](crate::runner::JournalEntry)).
    Journal {
        /// The run.
        run: FlowRunId,
        /// Its place in the journal, from 0.
        seq: u64,
        /// The entry, as JSON.
        entry: String,
    },
}

/// What a new flow run records.
#[derive(Debug, Clone)]
pub struct RunHeader {
    /// The run.
    pub id: FlowRunId,
    /// The flow's name.
    pub flow: String,
    /// The initial state.
    pub state: State,
    /// Its transitions so far, oldest first (one, or for a deployment's run, Scheduled and
    /// maybe Late before Pending); the run's creation time is the first one's.
    pub history: Vec<Transition>,
    /// The parameters in effect.
    pub parameters: BTreeMap<String, Value>,
    /// The context in effect.
    pub context: BTreeMap<String, String>,
    /// The manifest it was defined by (path and text), so a new process can resume it.
    pub manifest: Option<(PathBuf, String)>,
    /// What else rebuilding its flow needs ([`crate::runner::RunOptions::files`]).
    pub files: Option<String>,
    /// The process running it (its start time is recorded with it, for liveness).
    pub pid: u32,
    /// The flow's task runs as they start (top-level tasks, in the flow's order).
    pub tasks: Vec<TaskWrite>,
}

/// A task run's state after a transition.
#[derive(Debug, Clone)]
pub struct TaskWrite {
    /// The flow run.
    pub run: FlowRunId,
    /// The task run.
    pub id: TaskRunId,
    /// The task's position in the flow (a code flow's task run: its place in submission
    /// order).
    pub index: u32,
    /// The task's name.
    pub name: Arc<str>,
    /// For a child of a mapped task: the parent's task run.
    pub parent: Option<TaskRunId>,
    /// A mapped child's index (or, in a code flow, the element of the body's map it runs).
    pub map_index: Option<u32>,
    /// The state now (without its result: that is `output`).
    pub state: State,
    /// Transitions since the last write of this task run.
    pub transitions: Vec<Transition>,
    /// Attempts so far.
    pub attempts: u32,
    /// Time spent running, over all attempts.
    pub run_time: Duration,
    /// Fuel consumed, over all attempts.
    pub fuel_consumed: u64,
    /// The most memory one attempt held, in bytes.
    pub memory_peak_bytes: u64,
    /// The output, when the task completed.
    pub output: Option<Blob>,
    /// The resolved input (input caching): `Some` to store it, `None` to keep what is stored.
    pub cached_input: Option<Blob>,
    /// Drop the stored input (the task completed and will not need it).
    pub clear_input: bool,
    /// Whether and why the output cache was used.
    pub cache: Option<CacheInfo>,
}

/// A value to store as a blob: a value to hash, or one whose blob is already stored.
#[derive(Debug, Clone)]
pub enum Blob {
    /// A value to store (the store hashes its canonical form).
    Value(Json),
    /// A blob already stored, by hash.
    Stored(String),
}

/// An output to cache.
#[derive(Debug, Clone)]
pub struct CacheWrite {
    /// The key and its parts.
    pub key: CacheKey,
    /// The output.
    pub output: Json,
    /// When it was produced.
    pub created_at: DateTime<Utc>,
    /// Until when it is valid.
    pub expires_at: DateTime<Utc>,
    /// The run that produced it.
    pub flow_run: FlowRunId,
    /// The task run that produced it.
    pub task_run: TaskRunId,
}

/// The result of a cache lookup.
#[derive(Debug, Clone)]
pub enum CacheLookup {
    /// A valid entry.
    Hit {
        /// The cached output.
        output: Json,
        /// The output's blob.
        blob: String,
        /// The entry.
        entry: Box<CacheEntry>,
    },
    /// None: why (what differs from the newest entry of the task, or that none exists).
    Miss(String),
}

/// A stored cache entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The key.
    pub key: String,
    /// The task's name.
    pub task: String,
    /// The validator.
    pub validator: String,
    /// blake3 of the component.
    pub component: String,
    /// The output's blob.
    pub blob: String,
    /// The output's size in bytes (canonical JSON).
    pub size: u64,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
    /// Until when it is valid.
    pub expires_at: DateTime<Utc>,
    /// The flow run that produced it.
    pub flow_run: String,
    /// The task run that produced it.
    pub task_run: String,
}

/// Most entries one chunk of [`Store::cache_preload`] holds.
pub const PRELOAD_CHUNK: usize = 256;

/// A cache entry with its value, as preloaded.
#[derive(Debug, Clone)]
pub struct CachedOutput {
    /// The entry.
    pub entry: CacheEntry,
    /// Its value, unless the preload's size limit was reached.
    pub value: Option<Json>,
}

/// Which runs to list.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    /// Only runs in this state.
    pub state: Option<StateName>,
    /// Only runs of this flow.
    pub flow: Option<String>,
    /// At most this many (newest first).
    pub limit: usize,
    /// Only runs older than this one (created before it; at the same microsecond, of a smaller
    /// id): the next page after a page that ended with it.
    pub before: Option<(DateTime<Utc>, FlowRunId)>,
    /// Only runs created at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only runs created before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only runs a server's deployment of this name started (their context's `deployment`).
    pub deployment: Option<String>,
}

impl RunFilter {
    /// Where the runs listed stop, newest first, as (created_at µs, id): before the cursor and
    /// before `until` (a run created at `until` has an id after the empty one). A range of the
    /// `(created_at, id)` index in both stores.
    pub(crate) fn upper(&self) -> Option<(i64, String)> {
        let cursor = self
            .before
            .as_ref()
            .map(|(at, id)| (at.timestamp_micros(), id.to_string()));
        let until = self.until.map(|t| (t.timestamp_micros(), String::new()));
        match (cursor, until) {
            (Some(c), Some(u)) => Some(c.min(u)),
            (c, u) => c.or(u),
        }
    }
}

/// One line of `sluice runs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// The run.
    pub id: FlowRunId,
    /// The flow.
    pub flow: String,
    /// Its state.
    pub state: State,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// Task runs (top-level) by state name.
    pub tasks: BTreeMap<String, u64>,
}

/// A stored run, as a new process sees it.
#[derive(Debug, Clone)]
pub struct StoredRun {
    /// The record (outputs and cached inputs loaded from their blobs).
    pub run: FlowRun,
    /// The manifest it was defined by, when it came from one.
    pub manifest: Option<(PathBuf, String)>,
    /// What else rebuilding its flow needs, as its starter recorded it
    /// ([`crate::runner::RunOptions::files`]).
    pub files: Option<String>,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When cancellation was requested from outside, if it was.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// Blobs that could not be read (missing or corrupt): the record shows the run without
    /// them, and resuming it is refused.
    pub problems: Vec<StoreError>,
}

/// One stored log line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLog {
    /// Its position in the store (increasing), for `--follow`.
    pub seq: i64,
    /// The task.
    pub task: String,
    /// The child index, for mapped children.
    pub map_index: Option<u32>,
    /// The record.
    #[serde(flatten)]
    pub record: LogRecord,
}

/// How much of each task run's logs [`Store::log_tails`] reads: its newest records, as many as
/// fit every limit (a record that does not fit ends its task run's tail: a tail is never a
/// selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailLimits {
    /// Most records per task run.
    pub records: usize,
    /// Most bytes of records (as stored) per task run.
    pub bytes: u64,
    /// Most bytes of records (as stored) over the whole run; the newest records of the run are
    /// read first.
    pub total_bytes: u64,
}

impl Default for TailLimits {
    /// 100 records and 64 KiB per task run, 4 MiB in all.
    fn default() -> Self {
        Self {
            records: 100,
            bytes: 64 << 10,
            total_bytes: 4 << 20,
        }
    }
}

/// The newest log records of one task run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogTail {
    /// The records, oldest first.
    pub records: Vec<LogRecord>,
    /// How many older records of the task run were left out.
    pub omitted: u64,
    /// The store's position (`seq`) of the newest record: lines after it follow the tail.
    #[serde(default)]
    pub last_seq: i64,
}

/// Where a reader of a run's changes ([`Store::changes`]) is. Start at [`ChangeCursor::START`];
/// read on from the cursor each answer returns. Written as `flow.change.row.log` (an SSE event
/// id a client sends back as `Last-Event-ID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeCursor {
    /// The change number of the flow run's row last read.
    pub flow: i64,
    /// The change number of the last task run read.
    pub change: i64,
    /// Its row (task runs of one change are read in row order).
    pub row: i64,
    /// The last log line read (its `seq`).
    pub log: i64,
}

impl ChangeCursor {
    /// Before everything: the first read returns the run as it is.
    pub const START: ChangeCursor = ChangeCursor {
        flow: -1,
        change: -1,
        row: 0,
        log: 0,
    };
}

impl ChangeCursor {
    /// Past every task run and line: a read from here returns the flow run alone (its state
    /// and history).
    pub const FLOW_ONLY: ChangeCursor = ChangeCursor {
        flow: -1,
        change: i64::MAX,
        row: i64::MAX,
        log: i64::MAX,
    };

    /// Past the flow run and every task run: reads return only log lines after `seq`.
    pub const fn lines_after(seq: i64) -> ChangeCursor {
        ChangeCursor {
            flow: i64::MAX,
            change: i64::MAX,
            row: i64::MAX,
            log: seq,
        }
    }

    /// Past every log line: reads return only states (the run as it is, then its changes).
    pub const STATES_ONLY: ChangeCursor = ChangeCursor {
        log: i64::MAX,
        ..ChangeCursor::START
    };
}

impl Default for ChangeCursor {
    fn default() -> Self {
        Self::START
    }
}

impl std::fmt::Display for ChangeCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}.{}", self.flow, self.change, self.row, self.log)
    }
}

impl std::str::FromStr for ChangeCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a change cursor (`flow.change.row.log`, four integers)");
        let mut parts = s
            .trim()
            .split('.')
            .map(|p| p.parse::<i64>().map_err(|_| bad()));
        let mut next = || parts.next().unwrap_or_else(|| Err(bad()));
        let cursor = ChangeCursor {
            flow: next()?,
            change: next()?,
            row: next()?,
            log: next()?,
        };
        match parts.next() {
            None => Ok(cursor),
            Some(_) => Err(bad()),
        }
    }
}

/// A task run as it is after a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskChange {
    /// The task run.
    pub id: TaskRunId,
    /// The task's name.
    pub task: String,
    /// For a child of a mapped task, its index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_index: Option<u32>,
    /// The state now (without its result).
    pub state: State,
    /// Attempts so far.
    pub attempts: u32,
    /// Every transition, in order.
    pub history: Vec<Transition>,
    /// Time spent running, over all attempts.
    pub run_time: Duration,
    /// Fuel consumed, over all attempts.
    pub fuel_consumed: u64,
}

/// The flow run as it is after a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowChange {
    /// The state now.
    pub state: State,
    /// Every transition, in order.
    pub history: Vec<Transition>,
}

/// What changed in a run after a cursor ([`Store::changes`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunChanges {
    /// The flow run, when it changed.
    pub flow: Option<FlowChange>,
    /// Task runs that changed, in the order of their changes (at most [`CHANGE_PAGE_TASKS`]).
    pub tasks: Vec<TaskChange>,
    /// New log lines (one page of [`Store::logs`]).
    pub logs: Vec<StoredLog>,
    /// Where the next read starts.
    pub cursor: ChangeCursor,
}

impl RunChanges {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.flow.is_none() && self.tasks.is_empty() && self.logs.is_empty()
    }
}

/// How many task runs one answer of [`Store::changes`] holds at most.
pub const CHANGE_PAGE_TASKS: usize = 1000;

/// How many log lines one page of [`Store::logs`] returns at most.
pub const LOG_PAGE_LINES: usize = 1000;

/// About how many bytes of records one page of [`Store::logs`] holds at most: the page ends with
/// the record that reaches it (a page always holds at least one record when any remains).
pub const LOG_PAGE_BYTES: u64 = 4 << 20;

/// What [`Store::cancel`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The run is live: its process was asked to cancel and will record Cancelled.
    Requested,
    /// The run was not live (paused, or its process died): it was recorded Cancelled here.
    Cancelled,
    /// The run had already finished.
    AlreadyFinished(StateName),
}

/// Held while a process executes a run; other processes see the run as live until it is dropped
/// (or the process dies).
pub trait RunLease: Send + Sync + std::fmt::Debug {}

/// The future of [`Store::flush_async`].
pub type Flushing =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StoreError>> + Send>>;

/// Durable storage of flow runs and the output cache.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Queue a write. Writes are applied in order and committed in batches; a failure is kept
    /// and reported by [`Store::write_error`] and [`Store::flush`].
    fn submit(&self, write: Write);

    /// Wait until everything submitted so far is durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// [`Store::flush`] for async callers: everything submitted before the call is durable
    /// when the future ends. No thread waits for the commit; the writer wakes the caller's
    /// task (one hand-off fewer each way than a flush on a blocking thread).
    fn flush_async(&self) -> Flushing;

    /// Why writes are held back, if they are: the error of the first write that could not be
    /// committed since the store last committed everything (or that it is damaged).
    fn write_error(&self) -> Option<StoreError>;

    /// Give up on the writes of `run` that could not be committed (its execution has ended and
    /// [`Store::flush`] failed): drop them and record instead, if the store can still write,
    /// that the run is not fully recorded: it becomes Crashed with `not fully recorded:
    /// <reason>`, and its running task runs Crashed, so it can be resumed from the last write
    /// that succeeded. Returns the state recorded, or `None` when the run itself was never
    /// recorded.
    fn abandon(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<Option<State>, StoreError>;

    /// Mark `run` as executed by this process until the lease is dropped. Fails when another live
    /// process holds it.
    fn lease(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError>;

    /// Look up a valid cached output for `key` at `now`.
    fn cache_lookup(&self, key: &CacheKey, now: DateTime<Utc>) -> Result<CacheLookup, StoreError>;

    /// [`Store::cache_lookup`] of each of `keys`, answered in their order. A store whose reads
    /// are round trips (PostgreSQL) answers them all in a few; the default looks each up in turn.
    fn cache_lookup_many(
        &self,
        keys: &[CacheKey],
        now: DateTime<Utc>,
    ) -> Result<Vec<CacheLookup>, StoreError> {
        keys.iter().map(|k| self.cache_lookup(k, now)).collect()
    }

    /// The valid cache entries of `task` at `now`, each key once with the entry
    /// [`Store::cache_lookup`] would find (its newest), oldest first, handed to `each` in chunks
    /// of at most [`PRELOAD_CHUNK`] as they are read (a runner answers the hits of one chunk
    /// while the rest are read), each with its value while the values loaded stay under
    /// `max_bytes` in total (later entries carry none). `each` returns false to stop early; it
    /// runs inside the store's read (so it must not call the store, and should hand the chunk
    /// on rather than work on it). A runner loads these once per task so that a hit costs a
    /// hash-map lookup; anything not found here is still looked up with
    /// [`Store::cache_lookup`].
    fn cache_preload(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError>;

    /// Cache entries, newest first, optionally of one task only.
    fn cache_entries(&self, task: Option<&str>) -> Result<Vec<CacheEntry>, StoreError>;

    /// The cache entry whose key starts with `prefix`, with its value.
    fn cache_entry(&self, prefix: &str) -> Result<(CacheEntry, Json), StoreError>;

    /// Remove cache entries (of one task, or every one; only expired ones when `expired_before`
    /// is set). Returns how many were removed. Blobs stay: runs refer to them.
    fn clear_cache(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError>;

    /// The run whose id is `id_or_prefix` or starts with it.
    fn resolve_run(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError>;

    /// Load a run with its task runs, history, outputs and cached inputs, without logs (its task
    /// runs' `logs` are empty): read those with [`Store::logs`] or [`Store::log_tails`].
    fn load_run(&self, run: FlowRunId) -> Result<StoredRun, StoreError>;

    /// Runs, newest first.
    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError>;

    /// The newest flow run started as the child flow run of task run `parent` (one standing
    /// for a subflow), if any.
    fn child_run(&self, parent: TaskRunId) -> Result<Option<FlowRunId>, StoreError>;

    /// One page of the log lines of `run` (of one task, when given) after position `after`, in
    /// order: at most `limit` lines (and at most [`LOG_PAGE_LINES`]), ending early at the line
    /// that reaches [`LOG_PAGE_BYTES`]. Read the next page after the last line's `seq`; an empty
    /// page is the end.
    fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError>;

    /// A page of task run `task_run`'s log lines in `run` after position `after`, as
    /// [`Store::logs`] pages a task's (one mapped child's, one of a code flow's runs of a task).
    fn task_run_logs(
        &self,
        run: FlowRunId,
        task_run: TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError>;

    /// The position (`seq`) of `run`'s newest log line, 0 without one: lines stored later come
    /// after it.
    fn newest_log_seq(&self, run: FlowRunId) -> Result<i64, StoreError>;

    /// What changed in `run` after `after` (of one task, when given): the flow run's state when
    /// it changed, the task runs that changed (each as it is now), and a page of new log lines.
    /// Every change committed after a read is in a later read; an empty answer means nothing
    /// more has been committed yet.
    fn changes(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<RunChanges, StoreError>;

    /// What the log records stored for `run` cost
    /// ([`LogRecord::cost`](crate::sandbox::LogRecord::cost)): a resumed run counts them against
    /// the flow's `max_log_bytes`.
    fn log_cost(&self, run: FlowRunId) -> Result<u64, StoreError>;

    /// The names of the flow's tasks as recorded with `run`, in the flow's order.
    fn task_names(&self, run: FlowRunId) -> Result<Vec<String>, StoreError>;

    /// The newest log records of each task run of `run` that has any, within `limits`.
    fn log_tails(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError>;

    /// What the writes submitted and not yet committed cost: about the memory they hold (log
    /// records by their [`LogRecord::cost`](crate::sandbox::LogRecord::cost)). A runner starts
    /// no new attempt while this is above its backlog limit, so writes (logs, task runs'
    /// changes, journal entries) never pile up in memory faster than the store commits them.
    /// Default: 0 (a store that writes synchronously).
    fn queued_write_bytes(&self) -> u64 {
        0
    }

    /// Counts the transactions this store committed that changed runs: a reader of
    /// [`Store::changes`] waits for it to move instead of polling. What other processes (or
    /// other stores on the same database) commit is not counted: poll for those too. Default:
    /// never moves.
    fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        tokio::sync::watch::Sender::new(0).subscribe()
    }

    /// About how many bytes the store holds (its database files, or its schema's tables with
    /// their indexes), for the server's `max_stored_bytes`. Default: 0.
    fn stored_bytes(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Whether a process is executing `run` now.
    fn is_live(&self, run: FlowRunId) -> bool;

    /// Runs recorded as active (Pending, Running, Cancelling) whose process is gone: record them
    /// Crashed, with their running task runs. Returns the runs marked.
    fn recover_dead(&self, now: DateTime<Utc>) -> Result<Vec<FlowRunId>, StoreError>;

    /// Cancel `run`: ask its live process, or record it Cancelled when nothing runs it.
    fn cancel(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError>;

    /// When cancellation of `run` was last requested from outside, if ever. A run honours only
    /// requests made after it started executing (so a cancelled run can be resumed).
    fn cancel_requested(&self, run: FlowRunId) -> Result<Option<DateTime<Utc>>, StoreError>;
}
