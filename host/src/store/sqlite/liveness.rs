//! Liveness of runs: a run's lease is an advisory lock on `<home>/runs/<id>.lock`, and the
//! run records the pid and start time of the process running it. A run neither held nor
//! recorded as running in a live process is dead: crash recovery records it Crashed, with
//! its running task runs. Cancelling a run that is not live is recorded here too.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Transaction, params};

use super::super::rows::{from_micros, micros, parse_id, parse_name, state_json};
use super::schema::next_change;
use super::writer::insert_transition;
use super::{SqliteStore, classify};
use crate::ids::FlowRunId;
use crate::runner::Transition;
use crate::state::{State, StateName};
use crate::store::{CancelOutcome, RunLease, Store, StoreError};

impl SqliteStore {
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
    pub(super) fn live_in(&self, conn: &Connection, run: FlowRunId) -> bool {
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
pub(super) fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 is the command name in parentheses, which may itself hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Record, in one transaction, that `run` is not fully recorded: Crashed with the reason, and its
/// running task runs Crashed (they run again on resume). `None` when the run has no record.
pub(super) fn not_recorded(
    conn: &mut Connection,
    run: FlowRunId,
    now: DateTime<Utc>,
    reason: &str,
    path: &Path,
) -> Result<Option<State>, StoreError> {
    let io = |e: rusqlite::Error| classify(path, "write", &e);
    let tx = conn.transaction().map_err(io)?;
    next_change(&tx).map_err(io)?;
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
            "UPDATE flow_runs SET state = 'Crashed', state_json = ?2, updated_at = ?3, changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1 AND state = ?4",
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

impl SqliteStore {
    pub(super) fn lease_impl(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
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

    pub(super) fn recover_dead_impl(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<FlowRunId>, StoreError> {
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
            next_change(&tx).map_err(self.io_err("recovery"))?;
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
            self.inner.writer.health().changed();
            marked.push(run);
        }
        Ok(marked)
    }

    pub(super) fn cancel_impl(
        &self,
        run: FlowRunId,
        now: DateTime<Utc>,
    ) -> Result<CancelOutcome, StoreError> {
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
        next_change(&tx).map_err(self.io_err("cancel"))?;
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
            "UPDATE flow_runs SET state = 'Cancelled', state_json = ?2, updated_at = ?3, changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1 AND state = ?4",
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
        self.inner.writer.health().changed();
        Ok(CancelOutcome::Cancelled)
    }

    pub(super) fn cancel_requested_impl(
        &self,
        run: FlowRunId,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
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
        "UPDATE task_runs SET state = ?2, state_json = ?3, changed = (SELECT seq FROM changes WHERE id = 0) WHERE id = ?1",
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
