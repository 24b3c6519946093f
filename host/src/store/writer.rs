//! The writer thread every store backend shares, and its health: queued writes are committed in
//! batches, one transaction each (group commit), at most one per [`GROUP_WINDOW`] unless a
//! flush waits, each task run's changes within a batch merged into one row write
//! ([`rows::Batch`]). Writes fail stop: a batch that cannot be committed is held, with every
//! later one, until a flush commits them all; damage stops writing for good. A backend says how
//! a batch is committed ([`Commit`]); [`Writer`] is the handle its store keeps.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::rows::{self, Batch};
use super::{Flushing, StoreError, Write};
use crate::ids::FlowRunId;
use crate::state::State;

/// How a backend commits what the writer thread gives it. Called on the writer thread only.
pub(crate) trait Commit: Send + 'static {
    /// Commit `batch` in one transaction: all of it or none.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;

    /// Record, in one transaction, that `run` is not fully recorded (Crashed with `reason`, its
    /// running task runs Crashed); `None` when the run has no record
    /// ([`Store::abandon`](super::Store::abandon)).
    fn not_recorded(
        &mut self,
        run: FlowRunId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<State>, StoreError>;

    /// How long a commit that failed retriably is tried again before its writes are held (a
    /// database server restarting). Default: not at all.
    fn patience(&self) -> Duration {
        Duration::ZERO
    }

    /// The writer is stopping (`damaged`: the database was found damaged).
    fn close(self, damaged: bool)
    where
        Self: Sized,
    {
        let _ = damaged;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A store's writer thread: writes go in, flushes wait for them. Dropping it stops the thread
/// and waits for it (its connection closed before the store is gone).
pub(crate) struct Writer {
    tx: Mutex<mpsc::Sender<Msg>>,
    health: Arc<Health>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Start the writer thread `name`, committing through `db`, at most one commit per
    /// `window` that nobody waits for.
    pub(crate) fn start(
        name: &str,
        db: impl Commit,
        health: Arc<Health>,
        window: Duration,
    ) -> std::io::Result<Writer> {
        let (tx, rx) = mpsc::channel();
        let writer_health = health.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer(db, &rx, &writer_health, window))?;
        Ok(Writer {
            tx: Mutex::new(tx),
            health,
            thread: Some(thread),
        })
    }

    /// The store's health.
    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// [`Store::submit`](super::Store::submit).
    pub(crate) fn submit(&self, write: Write) {
        self.health.queued(rows::cost(&write));
        // The writer lives as long as the store; a send fails only if it panicked.
        if lock(&self.tx).send(Msg::Write(write)).is_err() {
            self.health
                .note(&StoreError::io("write", "the writer thread stopped"));
        }
    }

    /// [`Store::flush`](super::Store::flush).
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        let (done, wait) = mpsc::sync_channel(1);
        lock(&self.tx)
            .send(Msg::Flush(Reply::Thread(done)))
            .map_err(|_| StoreError::io("flush", "the writer thread stopped"))?;
        wait.recv()
            .map_err(|_| StoreError::io("flush", "the writer thread stopped"))?
    }

    /// [`Store::flush_async`](super::Store::flush_async).
    pub(crate) fn flush_async(&self) -> Flushing {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = lock(&self.tx).send(Msg::Flush(Reply::Task(done)));
        Box::pin(async move {
            sent.map_err(|_| StoreError::io("flush", "the writer thread stopped"))?;
            wait.await
                .map_err(|_| StoreError::io("flush", "the writer thread stopped"))?
        })
    }

    /// [`Store::abandon`](super::Store::abandon).
    pub(crate) fn abandon(
        &self,
        run: FlowRunId,
        now: DateTime<Utc>,
    ) -> Result<Option<State>, StoreError> {
        let (done, wait) = mpsc::sync_channel(1);
        lock(&self.tx)
            .send(Msg::Abandon { run, now, done })
            .map_err(|_| StoreError::io("write", "the writer thread stopped"))?;
        wait.recv()
            .map_err(|_| StoreError::io("write", "the writer thread stopped"))?
    }

    /// Stop the thread and wait for it (once).
    pub(crate) fn stop(&mut self) {
        *lock(&self.tx) = mpsc::channel().0;
        if let Some(w) = self.thread.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Most writes one batch (one transaction) applies.
const MAX_BATCH: usize = 20_000;

/// Group commit: a commit starts no sooner than this after the previous one started, unless a
/// flush (or an abandon) waits for it or the batch is full ([`MAX_BATCH`]). Every commit costs an fsync, and the disk is shared: a
/// run that ends a task every few hundred µs would otherwise fsync as often, and another
/// tenant's flush (the answer to starting a run, the end of a run) would queue behind those.
/// Writes nobody waits for become durable up to this much later; flushes are not delayed.
pub(crate) const GROUP_WINDOW: Duration = Duration::from_millis(5);

enum Msg {
    Write(Write),
    Flush(Reply),
    Abandon {
        run: FlowRunId,
        now: DateTime<Utc>,
        done: mpsc::SyncSender<Result<Option<State>, StoreError>>,
    },
}

/// Where a flush's answer goes: a thread waiting for it, or a task's future.
enum Reply {
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
pub(crate) struct Health {
    /// Where damage is noted for other processes (SQLite's `<database>.damaged`), if anywhere.
    marker: Option<PathBuf>,
    /// Why writes are held back: the first failure since everything was last committed (or the
    /// damage).
    error: Mutex<Option<StoreError>>,
    /// The database was found damaged (SQLite's corruption): nothing is written to it any more.
    damaged: AtomicBool,
    /// What the writes submitted and not yet committed (or discarded) cost ([`rows::cost`]): the
    /// backlog a runner waits on before starting more attempts.
    queued: AtomicU64,
    /// Counts the transactions that changed runs, for readers waiting for changes
    /// (`watch_changes` of each store).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Health {
    /// Damage noted in `marker`, when given.
    pub(crate) fn new(marker: Option<PathBuf>) -> Health {
        Health {
            marker,
            error: Mutex::new(None),
            damaged: AtomicBool::new(false),
            queued: AtomicU64::new(0),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    /// A transaction that changed runs was committed.
    pub(crate) fn changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Counts the transactions that changed runs committed by this process.
    pub(crate) fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Writes of `bytes` (their cost) were queued.
    pub(crate) fn queued(&self, bytes: u64) {
        self.queued.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Writes of `bytes` left the queue: committed or discarded.
    pub(crate) fn done(&self, bytes: u64) {
        let _ = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_sub(bytes))
            });
    }

    /// What the writes queued and not yet committed cost.
    pub(crate) fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::SeqCst)
    }

    pub(crate) fn error(&self) -> Option<StoreError> {
        lock(&self.error).clone()
    }

    pub(crate) fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::SeqCst)
    }

    /// Note a failure: damage replaces any other reason, for good; another failure is kept
    /// unless one is already.
    pub(crate) fn note(&self, e: &StoreError) {
        let mut error = lock(&self.error);
        if let StoreError::Damaged { detail, .. } = e {
            if !self.damaged.swap(true, Ordering::SeqCst) {
                *error = Some(e.clone());
                // Best effort: other processes refuse to open the store while this exists.
                if let Some(marker) = &self.marker {
                    let _ = std::fs::write(marker, format!("{detail}\n"));
                }
            }
        } else if error.is_none() {
            *error = Some(e.clone());
        }
    }

    /// Everything was committed.
    pub(crate) fn clear(&self) {
        if !self.is_damaged() {
            *lock(&self.error) = None;
        }
    }
}

/// The writer thread: commits queued writes in batches, one transaction each, at most one per
/// `window` ([`GROUP_WINDOW`]) unless a flush or an abandon waits or the batch is full. A batch that
/// cannot be committed is held, with every later one, in order, until a flush commits them all;
/// nothing is committed past it. Damage stops writing for good.
fn writer(mut db: impl Commit, rx: &mpsc::Receiver<Msg>, health: &Health, window: Duration) {
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
                match commit_patiently(&mut db, &batch) {
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
                done.send(retry(&mut db, &mut held, health));
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
                        db.not_recorded(run, now, &reason)
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
    db.close(health.is_damaged());
}

/// Commit `batch`, trying again while it fails retriably, for the store's patience
/// ([`Commit::patience`]), pausing 50 ms, doubling to 1 s.
fn commit_patiently(db: &mut impl Commit, batch: &Batch) -> Result<(), StoreError> {
    let (patience, started) = (db.patience(), Instant::now());
    let mut pause = Duration::from_millis(50);
    loop {
        match db.commit(batch) {
            Err(e) if e.is_retriable() && started.elapsed() + pause <= patience => {
                if pause == Duration::from_millis(50) {
                    tracing::warn!("a commit failed, trying again for up to {patience:?}: {e}");
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            result => return result,
        }
    }
}

/// Commit the held batches in order; the store is healthy again once all are committed.
fn retry(
    db: &mut impl Commit,
    held: &mut VecDeque<Batch>,
    health: &Health,
) -> Result<(), StoreError> {
    if let Some(e @ StoreError::Damaged { .. }) = health.error() {
        return Err(e);
    }
    // Tried once each: the batch that failed first had its patience already.
    while let Some(b) = held.front() {
        if let Err(e) = db.commit(b) {
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
