//! Liveness of runs in a PostgreSQL store: the process executing a run holds its lease, a row
//! of `leases` naming the holder (host, pid, a nonce) with an expiry on the database's clock,
//! renewed every [`RENEW_EVERY`] while the store is open and deleted when the lease is dropped.
//! A run whose lease lapsed ([`LEASE_TTL`] after its holder last renewed it: the process died,
//! or lost the database) is dead: crash recovery records it Crashed with its running task runs.
//! Processes on any machine see the same leases, unlike SQLite's lock files. Taking a lease,
//! recovery and cancellation take the schema's write lock, so a run is never recorded Crashed or
//! Cancelled by one process just after another took it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::PgDatabase;
use super::commit::{begin_write, crash_run, set_tasks};
use super::store::{Failure, LEASE_TTL, NOW_US, PgStore, Sql, col};
use crate::ids::FlowRunId;
use crate::runner::Transition;
use crate::state::{State, StateName};
use crate::store::rows::{from_micros, history_lines, micros, parse_id, parse_name, state_json};
use crate::store::{CancelOutcome, RunLease, StoreError};

/// How often a store renews its leases.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// This store's name as a lease holder: `[owner/]host/pid/nonce`.
pub(super) fn holder_name(owner: Option<&str>) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let owner = owner.map(|o| format!("{o}/")).unwrap_or_default();
    format!("{owner}{host}/{}/{}", std::process::id(), ulid::Ulid::new())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where each lease this store took stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// Held and renewed.
    Live,
    /// Found lapsed (or taken over) at a renewal: no longer renewed, never brought back; its
    /// run may be executed elsewhere now.
    Lost,
    /// Dropped: its row is deleted, and the deletion tried again at each renewal until it is.
    Releasing,
}

/// The leases of one store, by run.
pub(super) type Leases = Arc<Mutex<HashMap<FlowRunId, Held>>>;

/// Every [`RENEW_EVERY`], on the database's runtime, until aborted: renew the leases of
/// `holder` that are held and still valid (a lapsed one is never brought back: it is marked
/// lost), and delete the rows of those given back whose deletion failed.
pub(super) fn renew_leases(
    db: &PgDatabase,
    sql: &Sql,
    holder: Arc<str>,
    leases: Leases,
) -> Option<tokio::task::AbortHandle> {
    let renew = sql.q(&format!(
        "UPDATE {{s}}.leases SET until = {NOW_US} + $3
         WHERE holder = $1 AND flow_run = ANY($2) AND until > {NOW_US}
         RETURNING flow_run"
    ));
    let release = sql.q("DELETE FROM {s}.leases WHERE holder = $1 AND flow_run = ANY($2)");
    let pool = db.inner.pool.clone();
    let ttl = i64::try_from(LEASE_TTL.as_micros()).unwrap_or(i64::MAX);
    let rt = db.inner.runtime.as_ref()?;
    let task = rt.spawn(async move {
        let mut every = tokio::time::interval(RENEW_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let in_state = |state: Held| -> Vec<String> {
                lock(&leases)
                    .iter()
                    .filter(|(_, s)| **s == state)
                    .map(|(r, _)| r.to_string())
                    .collect()
            };
            let (live, releasing) = (in_state(Held::Live), in_state(Held::Releasing));
            if live.is_empty() && releasing.is_empty() {
                continue;
            }
            let client = match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("cannot renew {} run leases: {e}", live.len());
                    continue;
                }
            };
            if !live.is_empty() {
                match client.query(&renew, &[&&*holder, &live, &ttl]).await {
                    Ok(rows) => {
                        let renewed: HashSet<String> =
                            rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
                        let mut leases = lock(&leases);
                        for run in live.iter().filter(|r| !renewed.contains(*r)) {
                            tracing::error!(
                                "the lease of flow run {run} lapsed before it was renewed: another process may execute it now"
                            );
                            if let Ok(id) = run.parse()
                                && let Some(state) = leases.get_mut(&id)
                                && *state == Held::Live
                            {
                                *state = Held::Lost;
                            }
                        }
                    }
                    Err(e) => tracing::warn!("cannot renew {} run leases: {e}", live.len()),
                }
            }
            if !releasing.is_empty()
                && client
                    .execute(&release, &[&&*holder, &releasing])
                    .await
                    .is_ok()
            {
                let mut leases = lock(&leases);
                for run in releasing.iter().filter_map(|r| r.parse().ok()) {
                    if leases.get(&run) == Some(&Held::Releasing) {
                        leases.remove(&run);
                    }
                }
            }
        }
    });
    Some(task.abort_handle())
}

/// The lease of a run in a PostgreSQL store; dropping it deletes its row (without waiting; until
/// the row is gone, this store neither renews it nor takes the run again).
#[derive(Debug)]
struct PgLease {
    run: FlowRunId,
    store: PgStore,
}

impl RunLease for PgLease {}

impl Drop for PgLease {
    fn drop(&mut self) {
        let inner = &self.store.inner;
        let statement = inner
            .sql
            .q("DELETE FROM {s}.leases WHERE flow_run = $1 AND holder = $2");
        let (pool, holder, run) = (inner.db.inner.pool.clone(), inner.holder.clone(), self.run);
        let leases = inner.leases.clone();
        lock(&leases).insert(run, Held::Releasing);
        inner.db.spawn(async move {
            match pool.get().await {
                Ok(c) => match c.execute(&statement, &[&run.to_string(), &&*holder]).await {
                    Ok(_) => {
                        lock(&leases).remove(&run);
                    }
                    Err(e) => tracing::warn!(
                        "cannot give back the lease of run {run} yet (tried again at the next renewal): {e}"
                    ),
                },
                Err(e) => tracing::warn!(
                    "cannot give back the lease of run {run} yet (tried again at the next renewal): {e}"
                ),
            }
        });
    }
}

impl PgStore {
    /// Delete the leases held by earlier processes of `owner` (this store holds none yet).
    pub(super) fn give_up_leases_of(&self, owner: &str) -> Result<(), StoreError> {
        let (prefix, me) = (format!("{owner}/"), self.inner.holder.to_string());
        self.read(move |mut client, sql| async move {
            let (tx, _) = begin_write(&mut client, &sql).await?;
            tx.execute(
                &tx.prepare_cached(
                    &sql.q("DELETE FROM {s}.leases WHERE starts_with(holder, $1) AND holder <> $2"),
                )
                .await?,
                &[&prefix, &me],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    pub(super) fn lease_impl(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
        {
            let mut leases = lock(&self.inner.leases);
            if leases.contains_key(&run) {
                return Err(StoreError::Live { run, pid: None });
            }
            leases.insert(run, Held::Live);
        }
        let holder = self.inner.holder.clone();
        let ttl = i64::try_from(LEASE_TTL.as_micros()).unwrap_or(i64::MAX);
        let taken = self.read(move |mut client, sql| async move {
            let (tx, _) = begin_write(&mut client, &sql).await?;
            let taken = tx
                .query_opt(
                    &tx.prepare_cached(&sql.q(&format!(
                        "INSERT INTO {{s}}.leases (flow_run, holder, until)
                         VALUES ($1, $2, {NOW_US} + $3)
                         ON CONFLICT (flow_run) DO UPDATE
                             SET holder = excluded.holder, until = excluded.until
                             WHERE {{s}}.leases.until <= {NOW_US}
                         RETURNING holder"
                    )))
                    .await?,
                    &[&run.to_string(), &&*holder, &ttl],
                )
                .await?;
            tx.commit().await?;
            Ok(taken.is_some())
        });
        match taken {
            Ok(true) => Ok(Box::new(PgLease {
                run,
                store: self.clone(),
            })),
            Ok(false) => {
                lock(&self.inner.leases).remove(&run);
                Err(StoreError::Live { run, pid: None })
            }
            Err(e) => {
                lock(&self.inner.leases).remove(&run);
                Err(e)
            }
        }
    }

    /// A run whose lease cannot be read is reported live: nothing takes it for dead on a
    /// database it cannot reach.
    pub(super) fn is_live_impl(&self, run: FlowRunId) -> bool {
        if lock(&self.inner.leases).get(&run) == Some(&Held::Live) {
            return true;
        }
        self.read(move |client, sql| async move {
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(&sql.q(&format!(
                            "SELECT 1 FROM {{s}}.leases WHERE flow_run = $1 AND until > {NOW_US}"
                        )))
                        .await?,
                    &[&run.to_string()],
                )
                .await?;
            Ok(row.is_some())
        })
        .unwrap_or(true)
    }

    pub(super) fn recover_dead_impl(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<FlowRunId>, StoreError> {
        self.read(move |mut client, sql| async move {
            let (tx, change) = begin_write(&mut client, &sql).await?;
            let rows = tx
                .query(
                    &tx.prepare_cached(&sql.q(&format!(
                        "SELECT r.id, r.state FROM {{s}}.flow_runs r
                         WHERE r.state IN ('Pending', 'Running', 'Cancelling')
                           AND NOT EXISTS (SELECT 1 FROM {{s}}.leases l
                                           WHERE l.flow_run = r.id AND l.until > {NOW_US})
                         ORDER BY r.id"
                    )))
                    .await?,
                    &[],
                )
                .await?;
            let mut marked = Vec::new();
            for row in rows {
                let (id, old): (String, String) = (col("", &row, 0)?, col("", &row, 1)?);
                let run: FlowRunId = parse_id(&id, &id)?;
                let state = State::new(StateName::Crashed, now)
                    .with_message("the process running this flow run is gone (its lease lapsed)");
                if crash_run(
                    &tx,
                    &sql,
                    change,
                    (run, &old),
                    &state,
                    "the process running this task is gone; it will run again on resume",
                )
                .await?
                {
                    marked.push(run);
                }
            }
            tx.commit().await?;
            Ok(marked)
        })
        .inspect(|marked| {
            if !marked.is_empty() {
                self.inner.writer.health().changed();
            }
        })
    }

    pub(super) fn cancel_impl(
        &self,
        run: FlowRunId,
        now: DateTime<Utc>,
    ) -> Result<CancelOutcome, StoreError> {
        let open: Vec<&'static str> = StateName::ALL
            .iter()
            .filter(|n| !n.state_type().is_terminal())
            .map(|n| n.as_str())
            .collect();
        self.read(move |mut client, sql| async move {
            let id = run.to_string();
            let (tx, change) = begin_write(&mut client, &sql).await?;
            let Some(row) = tx
                .query_opt(
                    &tx.prepare_cached(&sql.q(&format!(
                        "SELECT r.state, EXISTS (SELECT 1 FROM {{s}}.leases l
                                                  WHERE l.flow_run = r.id AND l.until > {NOW_US})
                         FROM {{s}}.flow_runs r WHERE r.id = $1 FOR UPDATE OF r"
                    )))
                    .await?,
                    &[&id],
                )
                .await?
            else {
                return Err(Failure::Store(StoreError::UnknownRun(id)));
            };
            let (state, live): (String, bool) = (col(&id, &row, 0)?, col(&id, &row, 1)?);
            let state = parse_name(&id, &state)?;
            if live {
                tx.execute(
                    &tx.prepare_cached(
                        &sql.q("UPDATE {s}.flow_runs SET cancel_requested_at = $2 WHERE id = $1"),
                    )
                    .await?,
                    &[&id, &micros(now)],
                )
                .await?;
                tx.commit().await?;
                return Ok(CancelOutcome::Requested);
            }
            if matches!(
                state.state_type(),
                crate::state::StateType::Completed
                    | crate::state::StateType::Failed
                    | crate::state::StateType::Cancelled
            ) {
                return Ok(CancelOutcome::AlreadyFinished(state));
            }
            // Nothing runs it (paused, or its process is gone): recorded here.
            let flow_state = State::new(StateName::Cancelled, now)
                .with_message("cancelled by `sluice cancel` while no process ran it");
            let transition = Transition {
                from: Some(state),
                to: StateName::Cancelled,
                time: now,
                message: flow_state.message.clone(),
            };
            tx.execute(
                &tx.prepare_cached(&sql.q(
                    "UPDATE {s}.flow_runs SET state = 'Cancelled', state_json = $2,
                        updated_at = $3, history = history || $4, changed = $5 WHERE id = $1",
                ))
                .await?,
                &[
                    &id,
                    &state_json(&flow_state),
                    &micros(now),
                    &history_lines(std::slice::from_ref(&transition)),
                    &change,
                ],
            )
            .await?;
            set_tasks(
                &tx,
                &sql,
                change,
                run,
                &open,
                &State::new(StateName::Cancelled, now)
                    .with_message("the flow run was cancelled before this task finished"),
            )
            .await?;
            tx.commit().await?;
            Ok(CancelOutcome::Cancelled)
        })
        .inspect(|outcome| {
            if *outcome == CancelOutcome::Cancelled {
                self.inner.writer.health().changed();
            }
        })
    }

    pub(super) fn cancel_requested_impl(
        &self,
        run: FlowRunId,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.read(move |client, sql| async move {
            let id = run.to_string();
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            &sql.q("SELECT cancel_requested_at FROM {s}.flow_runs WHERE id = $1"),
                        )
                        .await?,
                    &[&id],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let at: Option<i64> = col(&id, &row, 0)?;
            Ok(at.map(from_micros))
        })
    }
}
