//! The writer thread and its health: queued writes are committed in batches, one transaction
//! each (group commit), a task run's changes within a batch merged into one row write, values
//! stored as content-addressed blobs. Writes fail stop: a batch that cannot be committed is
//! held, with every later one, until a flush commits them all; damage stops writing for good.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, Transaction, params};

use super::super::rows::{Batch, history_lines, i64_of, micros, state_json, task_state_json};
use super::liveness::{not_recorded, process_start};
use super::schema::next_change;
use super::{classify, lock};
use crate::cache::CacheInfo;
use crate::ids::FlowRunId;
use crate::json::Json;
use crate::runner::Transition;
use crate::state::State;
use crate::store::{Blob, CacheWrite, RunHeader, StoreError, TaskWrite, Write};

/// Most writes one batch (one transaction) applies.
const MAX_BATCH: usize = 20_000;

/// Group commit: a commit starts no sooner than this after the previous one started, unless a
/// flush (or an abandon) waits for it or the batch is full ([`MAX_BATCH`]). Every commit costs an fsync, and the disk is shared: a
/// run that ends a task every few hundred µs would otherwise fsync as often, and another
/// tenant's flush (the answer to starting a run, the end of a run) would queue behind those.
/// Writes nobody waits for become durable up to this much later; flushes are not delayed.
pub(super) const GROUP_WINDOW: Duration = Duration::from_millis(5);

pub(super) enum Msg {
    Write(Write),
    Flush(Reply),
    Abandon {
        run: FlowRunId,
        now: DateTime<Utc>,
        done: mpsc::SyncSender<Result<Option<State>, StoreError>>,
    },
}

/// Where a flush's answer goes: a thread waiting for it, or a task's future.
pub(super) enum Reply {
    Thread(mpsc::SyncSender<Result<(), StoreError>>),
    Task(tokio::sync::oneshot::Sender<Result<(), StoreError>>),
}

impl Reply {
    /// Answer; a caller that stopped waiting is not an error.
    fn send(self, result: Result<(), StoreError>) {
        match self {
            Reply::Thread(tx) => drop(tx.send(result)),
            Reply::Task(tx) => drop(tx.send(result)),
        }
    }
}

/// The store's health, shared by the writer thread and readers.
pub(super) struct Health {
    /// Notes damage for other processes: `<database>.damaged`.
    marker: PathBuf,
    /// Why writes are held back: the first failure since everything was last committed (or the
    /// damage).
    error: Mutex<Option<StoreError>>,
    /// SQLite reported the database damaged: nothing is written to it any more.
    damaged: AtomicBool,
    /// What the writes submitted and not yet committed (or discarded) cost ([`cost`]): the
    /// backlog a runner waits on before starting more attempts.
    queued: AtomicU64,
    /// Counts the transactions that changed runs, for readers waiting for changes
    /// ([`super::SqliteStore::watch_changes`]).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Health {
    pub(super) fn new(path: &Path) -> Health {
        Health {
            marker: damage_marker(path),
            error: Mutex::new(None),
            damaged: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A transaction that changed runs was committed.
    pub(super) fn changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Counts the transactions that changed runs committed by this process.
    pub(super) fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Writes of `bytes` (their cost) were queued.
    pub(super) fn queued(&self, bytes: u64) {
        self.queued.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Writes of `bytes` left the queue: committed or discarded.
    fn done(&self, bytes: u64) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(bytes))
            });
    }

    /// What the writes queued and not yet committed cost.
    pub(super) fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    pub(super) fn error(&self) -> Option<StoreError> {
        lock(&self.error).clone()
    }

    pub(super) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::SeqCst)
    }

    /// Note a failure: damage replaces any other reason, for good; another failure is kept
    /// unless one is already.
    pub(super) fn note(&self, e: &StoreError) {
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
    pub(super) fn clear(&self) {
        if !self.is_damaged() {
            *lock(&self.error) = None;
        }
    }
}

/// The file noting that the database at `path` was found damaged.
pub(super) fn damage_marker(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".damaged");
    PathBuf::from(p)
}

/// The writer thread: commits queued writes in batches, one transaction each, at most one per
/// `window` ([`GROUP_WINDOW`]) unless a flush or an abandon waits or the batch is full. A batch that
/// cannot be committed is held, with every later one, in order, until a flush commits them all;
/// nothing is committed past it. Damage stops writing for good.
pub(super) fn writer(
    mut conn: Connection,
    rx: &mpsc::Receiver<Msg>,
    health: &Health,
    path: &Path,
    window: Duration,
) {
    let mut held: VecDeque<Batch> = VecDeque::new();
    // When the last commit started.
    let mut last: Option<Instant> = None;
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
                // What is queued now; then what comes before the window ends.
                rx.try_recv().ok().or_else(|| {
                    let left = window.checked_sub(last?.elapsed())?;
                    rx.recv_timeout(left).ok()
                })
            } else {
                None
            };
        }
        if !batch.is_empty() && !health.is_damaged() {
            if held.is_empty() {
                last = Some(Instant::now());
                match commit(&mut conn, &batch, path) {
                    Ok(()) => {
                        health.done(batch.bytes);
                        health.changed();
                    }
                    Err(e) => {
                        health.note(&e);
                        held.push_back(batch);
                    }
                }
            } else {
                held.push_back(batch);
            }
        } else {
            health.done(batch.bytes);
        }
        if health.is_damaged() {
            discard(&mut held, health);
        }
        match control {
            None | Some(Msg::Write(_)) => {}
            Some(Msg::Flush(done)) => {
                done.send(retry(&mut conn, &mut held, health, path));
            }
            Some(Msg::Abandon { run, now, done }) => {
                for b in &mut held {
                    let before = b.bytes;
                    b.drop_run(run);
                    health.done(before - b.bytes);
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
                if result.is_ok() {
                    health.changed();
                }
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
                discard(held, health);
            }
            return Err(e);
        }
        health.done(b.bytes);
        health.changed();
        held.pop_front();
    }
    health.clear();
    Ok(())
}

/// Drop the held batches (the database is damaged: nothing more is written).
fn discard(held: &mut VecDeque<Batch>, health: &Health) {
    for b in held.drain(..) {
        health.done(b.bytes);
    }
}

/// Commit one batch in one transaction.
fn commit(conn: &mut Connection, batch: &Batch, path: &Path) -> Result<(), StoreError> {
    let io = |e: rusqlite::Error| classify(path, "write", &e);
    let tx = conn.transaction().map_err(io)?;
    next_change(&tx).map_err(io)?;
    for w in &batch.others {
        apply_one(&tx, w).map_err(io)?;
    }
    for (t, _) in batch.tasks.values() {
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
                let result = state
                    .result
                    .as_ref()
                    .map(|v| put_value(tx, v))
                    .transpose()?;
                tx.prepare_cached(
                    "UPDATE flow_runs SET state = ?2, state_json = ?3, updated_at = ?4, history = history || ?5, result = coalesce(?6, result), changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        run.to_string(),
                        state.name.as_str(),
                        state_json(state),
                        micros(state.timestamp),
                        history_lines(std::slice::from_ref(transition)),
                        result
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
            Write::Journal { run, seq, entry } => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO journal (flow_run, seq, entry) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![run.to_string(), i64_of(*seq), entry])?;
            }
        }
    }
    Ok(())
}

fn run_created(tx: &Transaction<'_>, h: &RunHeader) -> rusqlite::Result<()> {
    let (path, text) = match &h.manifest {
        Some((p, t)) => (Some(p.to_string_lossy().into_owned()), Some(t.as_str())),
        None => (None, None),
    };
    tx.prepare_cached(
        "INSERT INTO flow_runs (id, flow, state, state_json, created_at, updated_at, parameters, context, manifest_path, manifest, pid, history, pid_start, parent_task_run, files, changed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, (SELECT seq FROM changes WHERE id = 0))",
    )?
    .execute(params![
        h.id.to_string(),
        h.flow,
        h.state.name.as_str(),
        state_json(&h.state),
        micros(h.history.first().map_or(h.state.timestamp, |t| t.time)),
        micros(h.state.timestamp),
        serde_json::to_string(&h.parameters).unwrap_or_default(),
        serde_json::to_string(&h.context).unwrap_or_default(),
        path,
        text,
        h.pid,
        history_lines(&h.history),
        process_start(h.pid).and_then(|s| i64::try_from(s).ok()),
        h.context.get(crate::runner::PARENT_TASK_RUN),
        h.files
    ])?;
    Ok(())
}

/// Append `t` to the history of the flow run (`task_run` none) or of the task run.
pub(super) fn insert_transition(
    tx: &Transaction<'_>,
    run: FlowRunId,
    task_run: Option<&str>,
    t: &Transition,
) -> rusqlite::Result<()> {
    let line = history_lines(std::slice::from_ref(t));
    match task_run {
        None => tx.execute(
            "UPDATE flow_runs SET history = history || ?2, changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1",
            params![run.to_string(), line],
        )?,
        Some(id) => tx.execute(
            "UPDATE task_runs SET history = history || ?2, changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1",
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

fn put_value(tx: &Transaction<'_>, v: &Json) -> rusqlite::Result<String> {
    let bytes = v.as_str().as_bytes();
    let hash = v.hash();
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
    let cache = t.cache.as_ref().map(CacheInfo::to_stored);
    tx.prepare_cached(
        "INSERT INTO task_runs (id, flow_run, task_index, name, parent, map_index, state, state_json, attempts, run_time_us, fuel, output, cached_input, cache, history, changed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?16, (SELECT seq FROM changes WHERE id = 0))
         ON CONFLICT (id) DO UPDATE SET
            history = history || excluded.history, changed = excluded.changed,
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
        t.parent.map(|p| p.to_string()),
        t.map_index,
        t.state.name.as_str(),
        task_state_json(&t.state, t.transitions.last()),
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
        "INSERT INTO cache (key, task, validator, component, config, grants, secrets, inputs, parameters, blob, created_at, expires_at, flow_run, task_run)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        k.key,
        k.task,
        k.validator,
        k.component,
        k.config,
        k.grants,
        k.secrets,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::store::sqlite::SqliteStore;
    use crate::store::sqlite::cache::tests::entry;
    use crate::store::{Store, Write};

    fn cached(i: usize) -> Write {
        entry(&format!("k{i}"), format!("v{i}"), chrono::Utc::now())
    }

    /// Writes nobody waits for, arriving within the window after a commit, wait for the window
    /// (or a flush) and are committed together, in one transaction; a flush is not held back by
    /// the window.
    #[test]
    fn writes_within_the_window_commit_together_and_a_flush_does_not_wait_for_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open_with(dir.path(), Duration::from_secs(3600)).expect("store");
        let commits = store.watch_changes();
        store.submit(cached(0));
        store.flush().expect("flush");
        let first = *commits.borrow();
        assert_eq!(first, 1, "the first write after idle commits at once");
        for i in 1..=3 {
            store.submit(cached(i));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(*commits.borrow(), first, "committed inside the window");
        let (done, flushed) = std::sync::mpsc::channel();
        let flusher = store.clone();
        std::thread::spawn(move || done.send(flusher.flush()));
        flushed
            .recv_timeout(Duration::from_secs(60))
            .expect("the flush waited for the window")
            .expect("flush");
        assert_eq!(
            *commits.borrow(),
            first + 1,
            "one transaction for the three"
        );
        assert_eq!(store.cache_entries(None).expect("entries").len(), 4);
    }

    /// An async flush makes what was submitted before it durable, as a flush does: a store
    /// opened afresh reads it.
    #[tokio::test]
    async fn an_async_flush_makes_earlier_writes_durable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open_with(dir.path(), Duration::from_secs(3600)).expect("store");
        let flush = async |store: &SqliteStore| {
            tokio::time::timeout(Duration::from_secs(60), store.flush_async())
                .await
                .expect("the flush waited for the window")
                .expect("flush");
        };
        store.submit(cached(0));
        flush(&store).await;
        // Within the window of the first commit.
        store.submit(cached(1));
        flush(&store).await;
        let other = SqliteStore::open_read_only(dir.path()).expect("reader");
        assert_eq!(other.cache_entries(None).expect("entries").len(), 2);
    }
}
