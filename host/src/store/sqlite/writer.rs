//! How the SQLite store commits: a batch of writes in one transaction (the shared writer thread,
//! [`crate::store::writer`], decides when), values stored as content-addressed blobs; the
//! writer's connection closed without a checkpoint when the database was found damaged.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, Transaction, params};

use super::checkpoint::Checkpointer;
use super::classify;
use super::liveness::{not_recorded, process_start};
use super::schema::next_change;
use crate::cache::CacheInfo;
use crate::ids::FlowRunId;
use crate::json::Json;
use crate::runner::Transition;
use crate::state::State;
use crate::store::rows::{Batch, history_lines, i64_of, micros, state_json, task_state_json};
use crate::store::writer::Commit;
use crate::store::{Blob, CacheWrite, RunHeader, StoreError, TaskWrite, Write};

/// The file noting that the database at `path` was found damaged.
pub(super) fn damage_marker(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".damaged");
    PathBuf::from(p)
}

/// The writer thread's side of the SQLite store: its connection, and the checkpoint thread its
/// WAL hook wakes (stopped after the connection closed).
pub(super) struct SqliteCommit {
    pub(super) conn: Connection,
    pub(super) path: PathBuf,
    pub(super) checkpoints: Option<Checkpointer>,
}

impl Commit for SqliteCommit {
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        commit(&mut self.conn, batch, &self.path)
    }

    fn not_recorded(
        &mut self,
        run: FlowRunId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<State>, StoreError> {
        not_recorded(&mut self.conn, run, now, reason, &self.path)
    }

    fn close(self, damaged: bool) {
        if damaged {
            let _ = self.conn.set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                true,
            );
        }
        // The connection (whose WAL hook wakes the checkpoints) closes first.
        drop(self.conn);
        drop(self.checkpoints);
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
        "INSERT INTO task_runs (id, flow_run, task_index, name, parent, map_index, state, state_json, attempts, run_time_us, fuel, output, cached_input, cache, history, memory_peak, changed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?16, ?17, (SELECT seq FROM changes WHERE id = 0))
         ON CONFLICT (id) DO UPDATE SET
            history = history || excluded.history, changed = excluded.changed,
            state = excluded.state, state_json = excluded.state_json, attempts = excluded.attempts,
            run_time_us = excluded.run_time_us, fuel = excluded.fuel,
            memory_peak = excluded.memory_peak,
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
        history_lines(&t.transitions),
        i64_of(t.memory_peak_bytes)
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
