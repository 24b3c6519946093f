//! The queue of task-run attempts given to workers (`sluice.queue`, the control schema): the
//! server enqueues an attempt once the fair queue has given it a slot (fairness and quotas are
//! decided before, in one place); workers claim ready rows in batches (`FOR UPDATE SKIP
//! LOCKED`: claimers never wait on each other, and never take the same row), each under a lease
//! they extend while the attempt runs; `NOTIFY sluice_queue`, sent by the insert's trigger,
//! wakes claimers when rows arrive.
//! Every call a worker makes after its claim carries the row and the fence it was given, and
//! counts only while both match, so a worker whose lease lapsed (its attempt taken back,
//! Crashed, maybe run again by another) changes nothing. Times are the caller's (µs), so
//! leases are tested on a simulated clock.

use tokio_postgres::Client;

use super::{PgDatabase, database_error, schema};
use crate::ids::{FlowRunId, TaskRunId};
use crate::store::StoreError;

/// The channel `NOTIFY`ed when rows are enqueued.
pub const CHANNEL: &str = "sluice_queue";

/// An attempt to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAttempt {
    /// The tenant whose run it is.
    pub tenant: String,
    /// The flow run.
    pub flow_run: FlowRunId,
    /// The task run.
    pub task_run: TaskRunId,
    /// Its attempt (from 1).
    pub attempt: u32,
    /// Only a worker carrying every one of these claims it.
    pub tags: Vec<String>,
    /// What the worker needs to run it (the job, serialized by the server).
    pub payload: Vec<u8>,
}

/// A claimed attempt: the row, its fence, and what to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The row and the fence of this claim: every later call carries both.
    pub lease: Lease,
    /// The attempt.
    pub attempt: NewAttempt,
    /// When it was enqueued (the caller's µs).
    pub enqueued_at: i64,
}

/// A claim's token: the row and its fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The queue row.
    pub id: i64,
    /// The fence of the claim.
    pub fence: i64,
}

/// An attempt whose lease lapsed, taken back from its worker ([`PgQueue::expire`]) and not yet
/// settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lapsed {
    /// The worker that held it.
    pub worker: String,
    /// The tenant, flow run, task run and attempt.
    pub tenant: String,
    /// The flow run.
    pub flow_run: FlowRunId,
    /// The task run.
    pub task_run: TaskRunId,
    /// The attempt.
    pub attempt: u32,
}

/// Notifications that attempts were enqueued ([`PgQueue::listen`]).
#[derive(Debug)]
pub struct Wakeups {
    rx: std::sync::mpsc::Receiver<()>,
    /// Set when the listening connection ended.
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Keeps the listening connection open.
    _client: Client,
}

impl Wakeups {
    /// Whether the listening connection ended (listen again: notifications are lost meanwhile).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until attempts are enqueued (true; every notification that came meanwhile taken
    /// with it) or `timeout` passes (false; also when the listening connection is gone: listen
    /// again).
    pub fn wait(&self, timeout: std::time::Duration) -> bool {
        match self.rx.recv_timeout(timeout) {
            Ok(()) => {
                while self.rx.try_recv().is_ok() {}
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
            // The listening connection is gone: the caller falls back to claiming every
            // `timeout`, not in a loop that never waits.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(timeout);
                false
            }
        }
    }
}

/// `leases` as two columns (ids, fences), as statements take them (`unnest`).
fn columns(leases: &[Lease]) -> (Vec<i64>, Vec<i64>) {
    leases.iter().map(|l| (l.id, l.fence)).unzip()
}

/// Column `i` of `row`, text parsed as an id (`None`: the row is unreadable).
fn column<T: std::str::FromStr>(row: &tokio_postgres::Row, i: usize) -> Option<T> {
    row.get::<_, String>(i).parse().ok()
}

/// The leases of rows returned as `(id, fence)`.
fn leases_of(rows: &[tokio_postgres::Row]) -> std::collections::HashSet<Lease> {
    rows.iter()
        .map(|r| Lease {
            id: r.get(0),
            fence: r.get(1),
        })
        .collect()
}

/// The queue, in the control schema of a [`PgDatabase`].
#[derive(Debug, Clone)]
pub struct PgQueue {
    db: PgDatabase,
}

impl PgDatabase {
    /// The queue of attempts given to workers (the control schema brought up to date first).
    pub fn queue(&self) -> Result<PgQueue, StoreError> {
        self.migrate(schema::CONTROL, schema::CONTROL_MIGRATIONS)?;
        Ok(PgQueue { db: self.clone() })
    }
}

impl PgQueue {
    /// Enqueue `attempts` (ready at once) and wake claimers; the rows made, in order. An
    /// attempt already enqueued (same task run and attempt) is left as it is: enqueuing again
    /// after a commit whose answer was lost changes nothing.
    pub fn enqueue(&self, attempts: &[NewAttempt], now: i64) -> Result<Vec<i64>, StoreError> {
        if let Some((a, tag)) = attempts.iter().find_map(|a| {
            a.tags
                .iter()
                .find(|t| t.is_empty() || t.contains('\n'))
                .map(|t| (a, t))
        }) {
            return Err(StoreError::Database {
                database: self.db.name().to_owned(),
                detail: format!(
                    "task run {} has the tag {tag:?}: a tag is not empty and has no line break",
                    a.task_run
                ),
                retriable: false,
            });
        }
        let mut cols = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for a in attempts {
            cols.0.push(a.tenant.clone());
            cols.1.push(a.flow_run.to_string());
            cols.2.push(a.task_run.to_string());
            cols.3.push(i32::try_from(a.attempt).unwrap_or(i32::MAX));
            // One text per row (arrays of arrays must be rectangular): the tags, `\n`-joined.
            cols.4.push(a.tags.join("\n"));
            cols.5.push(a.payload.clone());
        }
        self.db.run(move |client| async move {
            // One statement (atomic: all or none; its trigger notifies claimers on commit), rows
            // in the order given.
            let rows = client
                .query(
                    "INSERT INTO sluice.queue (tenant, flow_run, task_run, attempt, tags, payload, enqueued_at)
                     SELECT t, f, r, a, CASE WHEN g = '' THEN '{}'::text[] ELSE string_to_array(g, E'\\n') END, p, $7
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::text[], $6::bytea[])
                         WITH ORDINALITY AS x(t, f, r, a, g, p, n)
                     ORDER BY n
                     ON CONFLICT (task_run, attempt) DO NOTHING
                     RETURNING id",
                    &[&cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &now],
                )
                .await?;
            let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
            // Identity values follow the insertion order.
            ids.sort_unstable();
            Ok(ids)
        })
    }

    /// Claim at most `max` ready attempts for `worker`, which carries `tags`, oldest first, each
    /// leased until `now + lease_us`.
    pub fn claim(
        &self,
        worker: &str,
        tags: &[String],
        max: usize,
        now: i64,
        lease_us: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        let (worker, tags) = (worker.to_owned(), tags.to_vec());
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        self.db.run(move |client| async move {
            // `sluice.claim` (the control schema's migration 1) says how and why.
            let rows = client
                .query(
                    "SELECT id, fence, tenant, flow_run, task_run, attempt, tags, payload, enqueued_at
                     FROM sluice.claim($1, $2, $3, $4)",
                    &[&worker, &now.saturating_add(lease_us), &tags, &max],
                )
                .await?;
            let mut claimed: Vec<Claimed> = rows
                .iter()
                .filter_map(|r| {
                    let parsed = (|| {
                        Some(Claimed {
                            lease: Lease {
                                id: r.get(0),
                                fence: r.get(1),
                            },
                            attempt: NewAttempt {
                                tenant: r.get(2),
                                flow_run: column(r, 3)?,
                                task_run: column(r, 4)?,
                                attempt: u32::try_from(r.get::<_, i32>(5)).ok()?,
                                tags: r.get(6),
                                payload: r.get(7),
                            },
                            enqueued_at: r.get(8),
                        })
                    })();
                    if parsed.is_none() {
                        // Only Sluice writes the queue: a row it cannot read is damage. Left
                        // leased, it lapses and is reported by `expire`.
                        tracing::warn!(row = r.get::<_, i64>(0), "an unreadable queue row");
                    }
                    parsed
                })
                .collect();
            claimed.sort_by_key(|c| c.lease.id);
            Ok(claimed)
        })
    }

    /// Extend `worker`'s leases to `now + lease_us`; for each, whether it is still held (false:
    /// it lapsed and was taken back, or was claimed again).
    pub fn extend(
        &self,
        worker: &str,
        leases: &[Lease],
        now: i64,
        lease_us: i64,
    ) -> Result<Vec<bool>, StoreError> {
        let worker = worker.to_owned();
        let (ids, fences) = columns(leases);
        let held = self.db.run(move |client| async move {
            let rows = client
                .query(
                    "UPDATE sluice.queue q SET lease_until = $2
                     FROM unnest($3::bigint[], $4::bigint[]) AS l(id, fence)
                     WHERE q.id = l.id AND q.fence = l.fence AND q.worker = $1 AND NOT q.lapsed
                     RETURNING q.id, q.fence",
                    &[&worker, &now.saturating_add(lease_us), &ids, &fences],
                )
                .await?;
            Ok(leases_of(&rows))
        })?;
        Ok(leases.iter().map(|l| held.contains(l)).collect())
    }

    /// `worker` finished the attempt of `lease`: its row leaves the queue. False when the lease
    /// is no longer `worker`'s (it lapsed and was taken back): the result must not be recorded.
    pub fn finish(&self, worker: &str, lease: Lease) -> Result<bool, StoreError> {
        Ok(self.finish_many(worker, &[lease])?.first() == Some(&true))
    }

    /// [`PgQueue::finish`] for many attempts in one statement (a worker reports its results in
    /// batches, as it claims them): for each lease, whether it was still `worker`'s.
    pub fn finish_many(&self, worker: &str, leases: &[Lease]) -> Result<Vec<bool>, StoreError> {
        let worker = worker.to_owned();
        let (ids, fences) = columns(leases);
        let done = self.db.run(move |client| async move {
            let rows = client
                .query(
                    "DELETE FROM sluice.queue q
                     USING unnest($2::bigint[], $3::bigint[]) AS l(id, fence)
                     WHERE q.id = l.id AND q.fence = l.fence AND q.worker = $1 AND NOT q.lapsed
                     RETURNING q.id, q.fence",
                    &[&worker, &ids, &fences],
                )
                .await?;
            Ok(leases_of(&rows))
        })?;
        Ok(leases.iter().map(|l| done.contains(l)).collect())
    }

    /// Take back every attempt whose lease lapsed before `now` (its fence moves on: its worker's
    /// later calls change nothing) and return every attempt taken back and not yet settled,
    /// earlier ones included: the server records each Crashed, then [`PgQueue::settle`]s it,
    /// so a server that dies in between finds them again.
    pub fn expire(&self, now: i64) -> Result<Vec<(Lease, Lapsed)>, StoreError> {
        self.db.run(move |client| async move {
            client
                .execute(
                    "UPDATE sluice.queue SET lapsed = true, fence = fence + 1
                     WHERE worker IS NOT NULL AND NOT lapsed AND lease_until < $1",
                    &[&now],
                )
                .await?;
            let rows = client
                .query(
                    "SELECT id, fence, worker, tenant, flow_run, task_run, attempt
                     FROM sluice.queue WHERE lapsed ORDER BY id",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    Some((
                        Lease {
                            id: r.get(0),
                            fence: r.get(1),
                        },
                        Lapsed {
                            worker: r.get(2),
                            tenant: r.get(3),
                            flow_run: column(r, 4)?,
                            task_run: column(r, 5)?,
                            attempt: u32::try_from(r.get::<_, i32>(6)).ok()?,
                        },
                    ))
                })
                .collect())
        })
    }

    /// The attempts of `leases` (from [`PgQueue::expire`]) are recorded Crashed: they leave the
    /// queue. Returns how many did.
    pub fn settle(&self, leases: &[Lease]) -> Result<u64, StoreError> {
        let (ids, fences) = columns(leases);
        self.db.run(move |client| async move {
            client
                .execute(
                    "DELETE FROM sluice.queue q
                     USING unnest($1::bigint[], $2::bigint[]) AS l(id, fence)
                     WHERE q.id = l.id AND q.fence = l.fence AND q.lapsed",
                    &[&ids, &fences],
                )
                .await
        })
    }

    /// Extend every claim that is not lapsed to at least `now + lease_us`: after the database
    /// was unreachable, workers could not extend their claims, and a server must not take
    /// back for that what they still run. Returns how many were extended.
    pub fn extend_all(&self, now: i64, lease_us: i64) -> Result<u64, StoreError> {
        let until = now.saturating_add(lease_us);
        self.db.run(move |client| async move {
            client
                .execute(
                    "UPDATE sluice.queue SET lease_until = $1
                     WHERE worker IS NOT NULL AND NOT lapsed AND lease_until < $1",
                    &[&until],
                )
                .await
        })
    }

    /// Empty the queue: a server starting over the database takes back every attempt its
    /// predecessor enqueued (it records their runs Crashed and resumes them itself; a worker
    /// still running one is refused when it reports). Returns how many rows there were.
    pub fn reset(&self) -> Result<u64, StoreError> {
        self.db
            .run(|client| async move { client.execute("DELETE FROM sluice.queue", &[]).await })
    }

    /// Take back `attempts` (task run, attempt) that no worker claimed yet (their flow run was
    /// cancelled); those taken back.
    pub fn withdraw(
        &self,
        attempts: &[(TaskRunId, u32)],
    ) -> Result<Vec<(TaskRunId, u32)>, StoreError> {
        let runs: Vec<String> = attempts.iter().map(|(r, _)| r.to_string()).collect();
        let numbers: Vec<i32> = attempts
            .iter()
            .map(|(_, a)| i32::try_from(*a).unwrap_or(i32::MAX))
            .collect();
        self.db.run(move |client| async move {
            let rows = client
                .query(
                    "DELETE FROM sluice.queue q
                     USING unnest($1::text[], $2::int[]) AS w(r, a)
                     WHERE q.task_run = w.r AND q.attempt = w.a AND q.worker IS NULL
                     RETURNING q.task_run, q.attempt",
                    &[&runs, &numbers],
                )
                .await?;
            Ok(rows
                .iter()
                .filter_map(|r| Some((column(r, 0)?, u32::try_from(r.get::<_, i32>(1)).ok()?)))
                .collect())
        })
    }

    /// Which of the rows `ids` are in the queue.
    pub fn present(&self, ids: &[i64]) -> Result<std::collections::HashSet<i64>, StoreError> {
        let ids = ids.to_vec();
        self.db.run(move |client| async move {
            let rows = client
                .query("SELECT id FROM sluice.queue WHERE id = ANY($1)", &[&ids])
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Wake-ups when attempts are enqueued: a connection of its own `LISTEN`ing on
    /// [`CHANNEL`]. A claimer waits on it between claims that found nothing, and claims again
    /// after a timeout however it ends (a notification is lost while the connection is down).
    pub fn listen(&self) -> Result<Wakeups, StoreError> {
        Ok(self.listen_owning(false)?.0)
    }

    /// [`PgQueue::listen`], the connection also trying to take the queue's owner lock (a
    /// session advisory lock, held while the connection lives): whether it has it. One server
    /// gives a database's task runs to workers; a second would take back the first's attempts.
    pub fn listen_owning(&self, own: bool) -> Result<(Wakeups, bool), StoreError> {
        let (config, name) = (self.db.inner.config.clone(), self.db.name().to_owned());
        let (tx, rx) = std::sync::mpsc::channel();
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closing = closed.clone();
        let listening = self.db.call(move |_| async move {
            let (client, mut connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| database_error(&name, &e))?;
            // The connection's messages: notifications forwarded, the rest drive the client.
            tokio::spawn(async move {
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                    match message {
                        Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                            if tx.send(()).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("the queue's listening connection ended: {e}");
                            break;
                        }
                    }
                }
                closing.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let owned = match own {
                true => client
                    .query_one(
                        "SELECT pg_try_advisory_lock(hashtext('sluice:queue-owner'))",
                        &[],
                    )
                    .await
                    .map_err(|e| database_error(&name, &e))?
                    .get::<_, bool>(0),
                false => false,
            };
            client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .map_err(|e| database_error(&name, &e))?;
            Ok((client, owned))
        })?;
        let (client, owned) = listening?;
        Ok((
            Wakeups {
                rx,
                closed,
                _client: client,
            },
            owned,
        ))
    }

    /// How many attempts are ready (not claimed).
    pub fn ready(&self) -> Result<u64, StoreError> {
        self.db.run(|client| async move {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM sluice.queue WHERE worker IS NULL",
                    &[],
                )
                .await?
                .get(0);
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}
