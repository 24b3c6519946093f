//! Checkpoints off the writer thread. The writer's commits only append to the WAL; a thread of
//! its own (`sluice-checkpoint`, on a connection of its own) copies the WAL into the database
//! once it holds [`CHECKPOINT_FRAMES`] pages (SQLite's own automatic threshold), passively, while
//! the writer goes on committing. The WAL stays bounded: a commit that leaves more than
//! [`WAL_LIMIT_FRAMES`] in it (the checkpoints fall behind) checkpoints on the writer itself.
//! A damaged database is not checkpointed at all.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;
use rusqlite::config::DbConfig;
use rusqlite::wal::CheckpointMode;

use super::classify;
use super::schema::connect;
use crate::store::StoreError;
use crate::store::writer::Health;

/// WAL pages after a commit that ask for a checkpoint.
const CHECKPOINT_FRAMES: i32 = 1000;

/// WAL pages after a commit beyond which the writer checkpoints itself (16 MiB of 4 KiB
/// pages). While the writer commits without a pause, a checkpoint beside it never catches up
/// with the WAL's end, so the WAL would never start again from its beginning: this one copies
/// what the thread's last checkpoint did not (little when the thread keeps up) and lets it.
const WAL_LIMIT_FRAMES: i32 = 4 * CHECKPOINT_FRAMES;

/// The checkpoint thread; dropping it stops the thread and waits for it.
pub(super) struct Checkpointer {
    wake: SyncSender<()>,
    /// Tells the thread to stop, whatever becomes of the writer's connection.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Start the thread for the database at `path`, and hand the writer's connection `write`
    /// its WAL hook (which replaces SQLite's automatic checkpoints on that connection).
    pub(super) fn start(
        path: &Path,
        write: &mut Connection,
        health: Arc<Health>,
    ) -> Result<Checkpointer, StoreError> {
        let conn = connect(path, false)?;
        let (wake, rx) = sync_channel(1);
        let hook = wake.clone();
        let (writer_health, writer_path) = (health.clone(), path.to_owned());
        // The WAL's length when a checkpoint was last asked for (it starts again from the
        // beginning once a checkpoint has copied all of it).
        let mut asked = 0;
        write
            .wal_hook(Some(move |wal: &mut rusqlite::hooks::Wal, frames: i32| {
                if frames < asked {
                    asked = 0;
                }
                if writer_health.is_damaged() {
                    return Ok(());
                }
                if frames > WAL_LIMIT_FRAMES {
                    // Behind: this commit waits for a checkpoint (busy when the thread is
                    // running one, which is as good).
                    match wal.checkpoint_v2(CheckpointMode::PASSIVE) {
                        Err(e)
                            if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) =>
                        {
                            noted(&writer_health, &writer_path, &e);
                        }
                        _ => {}
                    }
                } else if frames >= asked + CHECKPOINT_FRAMES {
                    asked = frames;
                    // Full: one is asked for already.
                    let _ = hook.try_send(());
                }
                Ok(())
            }))
            .map_err(|e| StoreError::io("setting up checkpoints", &e))?;
        let path = path.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-checkpoint".into())
            .spawn(move || checkpoints(&conn, &rx, &stopped, &health, &path))
            .map_err(|e| StoreError::io("starting the checkpoint thread", &e))?;
        Ok(Checkpointer {
            wake,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Note a failed checkpoint: damage stops all writing; anything else loses nothing (the pages
/// stay in the WAL for the next checkpoint).
fn noted(health: &Health, path: &Path, e: &rusqlite::Error) {
    match classify(path, "checkpoint", e) {
        e @ StoreError::Damaged { .. } => health.note(&e),
        e => tracing::warn!("{e}"),
    }
}

/// Checkpoint each time the writer asks, until told to stop.
fn checkpoints(
    conn: &Connection,
    wake: &Receiver<()>,
    stop: &AtomicBool,
    health: &Health,
    path: &Path,
) {
    while wake.recv().is_ok() && !stop.load(Ordering::SeqCst) && !health.is_damaged() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            noted(health, path, &e);
        }
    }
    if health.is_damaged() {
        let _ = conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{SqliteStore, Store};

    /// Commit `n` cache entries of 100 KB (25 pages) one after another, calling `after` after
    /// each commit.
    fn commit_big_entries(store: &SqliteStore, n: usize, mut after: impl FnMut()) {
        for i in 0..n {
            let value = format!("{i}{}", "x".repeat(100_000));
            let entry =
                super::super::cache::tests::entry(&format!("k{i}"), value, chrono::Utc::now());
            store.submit(entry);
            store.flush().expect("flush");
            after();
        }
    }

    /// Commits one after another still find the WAL started again from its beginning: it never
    /// holds much more than `WAL_LIMIT_FRAMES`, and what it held is in the database file.
    #[test]
    fn the_wal_starts_over_while_commits_keep_coming() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        let frame = 4096 + 24;
        let mut largest = 0;
        // 400 commits of 25 pages: 10,000 pages, 2.5 times the limit.
        commit_big_entries(&store, 400, || {
            let wal = std::fs::metadata(dir.path().join("sluice.db-wal")).map_or(0, |m| m.len());
            largest = largest.max(wal);
        });
        assert!(
            largest <= 2 * WAL_LIMIT_FRAMES as u64 * frame,
            "the WAL grew to {largest} bytes"
        );
        let db = std::fs::metadata(dir.path().join("sluice.db"))
            .expect("db")
            .len();
        assert!(db > 20_000_000, "the database file holds {db} bytes");
        drop(store);
        let store = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(store.cache_entries(Some("t")).expect("entries").len(), 400);
    }

    /// Below the writer's own limit, the thread checkpoints: the WAL's pages reach the
    /// database file while the writer does nothing.
    #[test]
    fn the_thread_checkpoints_what_the_writer_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        // 60 commits of 25 pages: past one checkpoint's worth, well short of the writer's limit.
        commit_big_entries(&store, 60, || {});
        let db = dir.path().join("sluice.db");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::fs::metadata(&db).expect("db").len() < 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "nothing was checkpointed"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
