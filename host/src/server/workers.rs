//! Task runs executed by `sluice worker` processes (`sluice server --database URL --workers`):
//! the executor side of the server's fair queue. An attempt given a slot by the fair queue
//! ([`super::fair`], which still decides who goes next, within every tenant's quotas) becomes a
//! row of the database's queue ([`PgQueue`]), with its job serialized ([`WireJob`]); workers
//! claim rows through the server's worker API (`/api/v1/worker/…`, [`super::worker_api`]),
//! extend their claims while they run, and report results, each call carrying the claim's
//! fence, so a worker whose claim lapsed changes nothing. This module keeps, per attempt in the
//! queue, who waits for its result; it enqueues in batches (one statement per batch, from a
//! thread of its own), wakes waiting claims on the database's `NOTIFY` (a `LISTEN` connection,
//! re-opened when it drops; claims poll every [`POLL`] as a fallback), and takes back lapsed
//! claims: the attempt is recorded Crashed and retried while its task has retries left
//! ([`Ending::Lost`]). Attempts of a cancelled flow run that no worker claimed leave the queue
//! Cancelled. The fair queue's slots follow the workers: the concurrency of every worker heard
//! from within two leases, summed. Secrets granted to a job travel with its claim, never in the
//! queue's rows. One server per database gives task runs to workers: its `LISTEN` connection
//! holds the queue's owner lock, and a server that starts takes back what a predecessor left.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant, SystemTime};

use crate::ids::{TaskRunId, TenantId};
use crate::runner::executor::{Finished, Job};
use crate::runner::machine::Unit;
use crate::sandbox::{CancelToken, Ending, RunOutcome};
use crate::store::{Lease, NewAttempt, PgQueue, PgRegistry, StoreError};
use crate::worker::wire::{
    ClaimRef, ClaimRequest, ClaimResponse, ClaimedJob, ExtendResponse, FinishedJob, QueueStats,
    WireContext, WireJob,
};

/// How often a waiting claim looks at the queue when no notification came (the `LISTEN`
/// connection is down, or a notification was lost).
pub const POLL: Duration = Duration::from_secs(2);

/// The longest a claim waits for work.
pub const MAX_CLAIM_WAIT: Duration = Duration::from_secs(30);

/// The most attempts one claim takes.
pub const MAX_CLAIM: u32 = 256;

/// The default lease of a claim (`sluice server --worker-lease`): a worker extends its claims
/// every third of it, at most every second; one that has not for this long is taken to be gone.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// The shortest lease: a worker's first extension of a claim may come a second after it.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

/// What to do with an attempt's result: account for it, hand its slot back, tell its flow run.
pub type Done = Box<dyn FnOnce(Finished) + Send>;

/// An attempt in the database's queue, or on its way there.
struct Pending {
    unit: Unit,
    cancel: CancelToken,
    done: Done,
    /// The secrets its job is given: sent with its claim, never written to the queue's rows.
    secrets: Vec<(String, String)>,
    /// Its flow run's parameters: sent once per claim, not in every row.
    parameters: std::sync::Arc<str>,
}

/// The attempts executed by workers. See the module documentation.
pub struct Remote {
    queue: PgQueue,
    registry: PgRegistry,
    /// Worker tokens checked lately: hash → (its name, or none: not valid; when checked).
    tokens: Mutex<HashMap<String, (Option<String>, Instant)>>,
    lease: Duration,
    pending: Mutex<HashMap<(TaskRunId, u32), Pending>>,
    to_enqueue: Mutex<std_mpsc::Sender<NewAttempt>>,
    /// Woken when attempts are enqueued: claims waiting for work.
    wakeup: tokio::sync::Notify,
    /// Workers seen: when last, and their concurrency.
    seen: Mutex<HashMap<String, (Instant, u32)>>,
    capacity: Mutex<Option<usize>>,
    set_slots: Box<dyn Fn(usize) + Send + Sync>,
    stats: Mutex<Stats>,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

/// How long a checked worker token is trusted before it is read again (a removed token stops
/// working within this).
const TOKEN_TTL: Duration = Duration::from_secs(5);

/// Samples kept for the percentiles of [`QueueStats`].
const SAMPLES: usize = 100_000;

#[derive(Default)]
struct Stats {
    counts: QueueStats,
    waits: Vec<u64>,
    claims: Vec<u64>,
}

fn sample(samples: &mut Vec<u64>, v: u64) {
    if samples.len() >= SAMPLES {
        let i = fastrand::usize(..samples.len());
        samples[i] = v;
    } else {
        samples.push(v);
    }
}

fn percentile(samples: &[u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Now, in µs since the epoch: the queue's times.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn ended(ending: Ending) -> RunOutcome {
    RunOutcome {
        ending,
        logs: Vec::new(),
        logs_dropped_bytes: 0,
        usage: Default::default(),
    }
}

fn lost(message: String) -> RunOutcome {
    ended(Ending::Lost { message })
}

fn host_fault(message: String) -> RunOutcome {
    RunOutcome {
        ending: Ending::HostFault { message },
        logs: Vec::new(),
        logs_dropped_bytes: 0,
        usage: Default::default(),
    }
}

impl Remote {
    /// Attempts executed by workers through `queue`, each claim leased for `lease`; `set_slots`
    /// sets the fair queue's slots. Takes back first whatever a previous server left in the
    /// queue ([`PgQueue::reset`]). Starts its threads (enqueuing, listening, expiring) with
    /// `runtime` entered.
    pub fn start(
        queue: PgQueue,
        registry: PgRegistry,
        lease: Duration,
        set_slots: Box<dyn Fn(usize) + Send + Sync>,
        runtime: tokio::runtime::Handle,
    ) -> Result<std::sync::Arc<Remote>, StoreError> {
        let (wakeups, owned) = queue.listen_owning(true)?;
        if !owned {
            return Err(StoreError::Database {
                database: registry.name().to_owned(),
                detail: "another server already gives this database's task runs to workers \
                         (one server per database may: a second would take back the first's \
                         attempts)"
                    .into(),
                retriable: false,
            });
        }
        let left = queue.reset()?;
        if left > 0 {
            tracing::info!("took back {left} attempts a previous server left to workers");
        }
        let (tx, rx) = std_mpsc::channel();
        let remote = std::sync::Arc::new(Remote {
            queue,
            registry,
            tokens: Mutex::default(),
            lease,
            pending: Mutex::default(),
            to_enqueue: Mutex::new(tx),
            wakeup: tokio::sync::Notify::new(),
            seen: Mutex::default(),
            capacity: Mutex::new(None),
            set_slots,
            stats: Mutex::default(),
            runtime,
        });
        set_slots_now(&remote, 0);
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| StoreError::io("starting the worker queue's threads", e.to_string()))
        };
        let r = remote.clone();
        spawn("sluice-enqueue", Box::new(move || r.enqueue_loop(rx)))?;
        let r = remote.clone();
        spawn("sluice-listen", Box::new(move || r.listen_loop(wakeups)))?;
        let r = remote.clone();
        spawn("sluice-expire", Box::new(move || r.expire_loop()))?;
        Ok(remote)
    }

    /// How long a claim lasts unless extended.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<(TaskRunId, u32), Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Give `job`, an attempt of `tenant`'s holding a slot of the fair queue, to the workers;
    /// `done` is called once with its result, whatever happens.
    pub fn submit(&self, tenant: TenantId, job: Job, done: Done) {
        let Job {
            unit,
            component,
            input,
            ctx,
            budget,
            grants,
            cancel,
            run,
            tags,
            ..
        } = job;
        let mut grants = grants.to_wire();
        let secrets = std::mem::take(&mut grants.secrets);
        let mut wire_ctx = WireContext::from(&ctx);
        wire_ctx.parameters = String::new();
        let wire = WireJob {
            tenant,
            component: component.digest(),
            name: component.name().to_owned(),
            input: input.as_str().to_owned(),
            ctx: wire_ctx,
            budget,
            grants,
        };
        let payload = match serde_json::to_vec(&wire) {
            Ok(p) => p,
            Err(e) => {
                done(Finished {
                    unit,
                    outcome: host_fault(format!("the job could not be serialized: {e}")),
                });
                return;
            }
        };
        let key = (ctx.task_run_id, ctx.attempt);
        let earlier = self.pending().insert(
            key,
            Pending {
                unit,
                cancel,
                done,
                secrets,
                parameters: ctx.parameters.clone(),
            },
        );
        if let Some(p) = earlier {
            // Never: a task run's attempt is submitted once. Answered rather than lost.
            tracing::error!("task run {} attempt {} submitted twice", key.0, key.1);
            (p.done)(Finished {
                unit: p.unit,
                outcome: host_fault("the attempt was submitted twice".into()),
            });
        }
        let attempt = NewAttempt {
            tenant: tenant.to_string(),
            flow_run: run,
            task_run: ctx.task_run_id,
            attempt: ctx.attempt,
            tags,
            payload,
        };
        let sent = self
            .to_enqueue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(attempt);
        if sent.is_err() {
            self.settle(
                key,
                host_fault("the server's queue of worker attempts stopped".into()),
            );
        }
    }

    /// The attempt `key` ended with `outcome`: tell whoever waits (once).
    /// Called from the queue's own threads (enqueue, expire) as from requests: a panic in
    /// what waits is contained here, so it never stops a thread every other attempt needs.
    fn settle(&self, key: (TaskRunId, u32), outcome: RunOutcome) -> bool {
        let Some(p) = self.pending().remove(&key) else {
            return false;
        };
        let finished = Finished {
            unit: p.unit,
            outcome,
        };
        let done = p.done;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || done(finished))).is_err() {
            tracing::error!(
                "task run {} attempt {}: handing its result on panicked",
                key.0,
                key.1
            );
        }
        true
    }

    /// Enqueue what [`Remote::submit`] sends, in batches (all that came meanwhile, one
    /// statement each), retrying while the database is unreachable. An attempt whose flow run
    /// was cancelled before it was enqueued ends Cancelled here.
    fn enqueue_loop(&self, rx: std_mpsc::Receiver<NewAttempt>) {
        let _entered = self.runtime.enter();
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < 1024
                && let Ok(more) = rx.try_recv()
            {
                batch.push(more);
            }
            batch.retain(|a| {
                let key = (a.task_run, a.attempt);
                let cancelled = self
                    .pending()
                    .get(&key)
                    .is_some_and(|p| p.cancel.is_cancelled());
                if cancelled {
                    self.settle(key, ended(Ending::Cancelled));
                }
                !cancelled
            });
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.queue.enqueue(&batch, now_us()) {
                    Ok(_) => {
                        self.stats().counts.enqueued += batch.len() as u64;
                        self.wakeup.notify_waiters();
                        break;
                    }
                    Err(e) if e.is_retriable() => {
                        tracing::warn!("enqueuing {} attempts for workers: {e}", batch.len());
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        for a in &batch {
                            self.settle(
                                (a.task_run, a.attempt),
                                host_fault(format!("the attempt could not be enqueued: {e}")),
                            );
                        }
                        break;
                    }
                }
            }
        }
    }

    /// Wake waiting claims on every `NOTIFY` of the queue, listening again whenever the
    /// connection drops.
    /// The connection also holds the queue's owner lock; when it drops (PostgreSQL restarted)
    /// the lock is taken again with the new one.
    fn listen_loop(&self, first: crate::store::Wakeups) {
        let mut wakeups = Some(first);
        loop {
            if let Some(w) = wakeups.take() {
                while !w.is_closed() {
                    if w.wait(POLL) {
                        self.wakeup.notify_waiters();
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(500));
            match self.queue.listen_owning(true) {
                Ok((w, owned)) => {
                    if !owned {
                        tracing::error!(
                            "another server took this database's queue of worker attempts while \
                             the connection was down: this server's attempts may be taken back"
                        );
                    }
                    wakeups = Some(w);
                }
                Err(e) => tracing::warn!("listening for the queue's notifications: {e}"),
            }
        }
    }

    /// The name of the worker token whose hash is `hash`, if it is one (trusted for
    /// [`TOKEN_TTL`] once checked, either way).
    pub async fn worker_for(&self, hash: &str) -> Result<Option<String>, StoreError> {
        if let Some((name, at)) = self
            .tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            && at.elapsed() < TOKEN_TTL
        {
            return Ok(name.clone());
        }
        let (registry, h) = (self.registry.clone(), hash.to_owned());
        let found = blocking(move || registry.worker_by_token(&h)).await?;
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= 10_000 {
            // Bounded: bad tokens sent in a loop cost one lookup each, not memory.
            tokens.retain(|_, (name, at)| name.is_some() && at.elapsed() < TOKEN_TTL);
        }
        tokens.insert(hash.to_owned(), (found.clone(), Instant::now()));
        Ok(found)
    }

    /// Every quarter of a lease (at most every second): take back the claims that lapsed and
    /// record their attempts lost; forget workers not seen for two leases. After the database
    /// was unreachable, every claim is first extended by a lease: workers could not extend
    /// theirs meanwhile.
    fn expire_loop(&self) {
        let _entered = self.runtime.enter();
        let every = (self.lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut reachable = true;
        loop {
            std::thread::sleep(every);
            self.forget_gone_workers();
            self.withdraw_cancelled();
            if !reachable {
                match self.queue.extend_all(now_us(), micros(self.lease)) {
                    Ok(_) => reachable = true,
                    Err(e) => {
                        tracing::warn!("extending workers' claims after an outage: {e}");
                        continue;
                    }
                }
            }
            let lapsed = match self.queue.expire(now_us()) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("taking back lapsed claims: {e}");
                    reachable = false;
                    continue;
                }
            };
            if lapsed.is_empty() {
                continue;
            }
            let leases: Vec<Lease> = lapsed.iter().map(|(l, _)| *l).collect();
            for (_, l) in &lapsed {
                let message = format!(
                    "the attempt was lost: worker `{}` stopped renewing its claim on attempt {} \
                     (it lapsed after {})",
                    l.worker,
                    l.attempt,
                    humantime::format_duration(self.lease)
                );
                if self.settle((l.task_run, l.attempt), lost(message)) {
                    self.stats().counts.lapsed += 1;
                }
            }
            if let Err(e) = self.queue.settle(&leases) {
                // Found again at the next round (they stay lapsed): settled then.
                tracing::warn!("settling lapsed claims: {e}");
            }
        }
    }

    /// Attempts of cancelled flow runs that no worker claimed yet leave the queue and end
    /// Cancelled (with no worker free, they would wait for one to hear of the cancel).
    fn withdraw_cancelled(&self) {
        let cancelled: Vec<(TaskRunId, u32)> = self
            .pending()
            .iter()
            .filter(|(_, p)| p.cancel.is_cancelled())
            .map(|(k, _)| *k)
            .collect();
        if cancelled.is_empty() {
            return;
        }
        match self.queue.withdraw(&cancelled) {
            Ok(taken) => {
                for key in taken {
                    self.settle(key, ended(Ending::Cancelled));
                }
            }
            Err(e) => tracing::warn!("taking back cancelled attempts: {e}"),
        }
    }

    /// `worker` was heard from: it is not gone, whatever it is busy with.
    fn touch(&self, worker: &str) {
        if let Some((at, _)) = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(worker)
        {
            *at = Instant::now();
        }
    }

    fn forget_gone_workers(&self) {
        let gone = Instant::now().checked_sub(self.lease * 2);
        let total = {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(gone) = gone {
                seen.retain(|_, (at, _)| *at > gone);
            }
            seen.values().map(|(_, c)| *c as usize).sum()
        };
        set_slots_now(self, total);
    }

    /// Worker `worker` (its token's name and its process) asks for work: claim at most
    /// `req.max` attempts its tags allow, waiting up to `req.wait_ms` for some.
    pub async fn claim(
        &self,
        worker: String,
        req: ClaimRequest,
    ) -> Result<ClaimResponse, StoreError> {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.insert(worker.clone(), (Instant::now(), req.concurrency.max(1)));
        }
        self.forget_gone_workers();
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_CLAIM_WAIT);
        let max = req.max.clamp(1, MAX_CLAIM) as usize;
        loop {
            let notified = self.wakeup.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let started = Instant::now();
            let (queue, w, tags, lease) = (
                self.queue.clone(),
                worker.clone(),
                req.tags.clone(),
                micros(self.lease),
            );
            let claimed = blocking(move || queue.claim(&w, &tags, max, now_us(), lease)).await?;
            let took = started.elapsed();
            let now = now_us();
            {
                let mut stats = self.stats();
                stats.counts.claims += 1;
                sample(
                    &mut stats.claims,
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                );
                for c in &claimed {
                    sample(
                        &mut stats.waits,
                        u64::try_from(now.saturating_sub(c.enqueued_at)).unwrap_or(0),
                    );
                }
                stats.counts.claimed += claimed.len() as u64;
            }
            if !claimed.is_empty() {
                let mut jobs = Vec::with_capacity(claimed.len());
                let mut parameters = std::collections::BTreeMap::new();
                for c in claimed {
                    match serde_json::from_slice::<WireJob>(&c.attempt.payload) {
                        Ok(mut job) => jobs.push(ClaimedJob {
                            claim: ClaimRef {
                                id: c.lease.id,
                                fence: c.lease.fence,
                                task_run: c.attempt.task_run,
                                attempt: c.attempt.attempt,
                            },
                            job: {
                                if let Some(p) =
                                    self.pending().get(&(c.attempt.task_run, c.attempt.attempt))
                                {
                                    job.grants.secrets = p.secrets.clone();
                                    parameters
                                        .entry(job.ctx.flow_run_id)
                                        .or_insert_with(|| p.parameters.to_string());
                                }
                                job
                            },
                        }),
                        // Only this server writes payloads: left claimed, it lapses and is
                        // recorded lost (and retried while retries remain).
                        Err(e) => tracing::error!(
                            "task run {} attempt {}: an unreadable job in the queue: {e}",
                            c.attempt.task_run,
                            c.attempt.attempt
                        ),
                    }
                }
                return Ok(ClaimResponse {
                    jobs,
                    lease_ms: u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
                    parameters,
                });
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(ClaimResponse {
                        jobs: Vec::new(),
                        lease_ms: u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
                        parameters: Default::default(),
                    });
                }
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Extend `worker`'s `claims`; say which it still holds and which were cancelled.
    pub async fn extend(
        &self,
        worker: String,
        claims: Vec<ClaimRef>,
    ) -> Result<ExtendResponse, StoreError> {
        let leases: Vec<Lease> = claims
            .iter()
            .map(|c| Lease {
                id: c.id,
                fence: c.fence,
            })
            .collect();
        self.touch(&worker);
        let (queue, lease) = (self.queue.clone(), micros(self.lease));
        let held = blocking(move || queue.extend(&worker, &leases, now_us(), lease)).await?;
        let pending = self.pending();
        let cancel = claims
            .iter()
            .map(|c| {
                pending
                    .get(&(c.task_run, c.attempt))
                    .is_some_and(|p| p.cancel.is_cancelled())
            })
            .collect();
        Ok(ExtendResponse { held, cancel })
    }

    /// `worker` reports `results`: each counts if its claim is still the worker's (then its
    /// flow run hears of it); the answer says which did.
    pub async fn finish(
        &self,
        worker: String,
        results: Vec<FinishedJob>,
    ) -> Result<Vec<bool>, StoreError> {
        let leases: Vec<Lease> = results
            .iter()
            .map(|r| Lease {
                id: r.claim.id,
                fence: r.claim.fence,
            })
            .collect();
        self.touch(&worker);
        let queue = self.queue.clone();
        let mut accepted = blocking(move || queue.finish_many(&worker, &leases)).await?;
        // A result refused whose row is gone while its attempt is still awaited was taken by
        // an earlier report whose answer was lost (the worker reports again): taking back a
        // lapsed claim ends the wait before its row goes, and a row is never claimed twice.
        let gone: Vec<i64> = {
            let pending = self.pending();
            results
                .iter()
                .zip(&accepted)
                .filter(|(r, ok)| {
                    !**ok && pending.contains_key(&(r.claim.task_run, r.claim.attempt))
                })
                .map(|(r, _)| r.claim.id)
                .collect()
        };
        if !gone.is_empty() {
            let queue = self.queue.clone();
            let ids = gone.clone();
            let present = blocking(move || queue.present(&ids)).await?;
            for (r, ok) in results.iter().zip(accepted.iter_mut()) {
                if !*ok && gone.contains(&r.claim.id) && !present.contains(&r.claim.id) {
                    *ok = true;
                }
            }
        }
        let (mut taken, mut refused) = (0, 0);
        for (r, ok) in results.into_iter().zip(&accepted) {
            if !ok {
                refused += 1;
                continue;
            }
            taken += 1;
            let key = (r.claim.task_run, r.claim.attempt);
            let mut outcome = r.outcome.into_outcome().unwrap_or_else(|e| {
                host_fault(format!("the worker's result could not be read: {e}"))
            });
            // What a worker says it used is summed into the run's totals: kept within sense.
            let usage = &mut outcome.usage;
            usage.duration = usage.duration.min(Duration::from_secs(7 * 24 * 3600));
            usage.fuel_consumed = usage.fuel_consumed.min(1 << 50);
            if !self.settle(key, outcome) {
                tracing::warn!(
                    "task run {} attempt {}: a result nobody waits for",
                    key.0,
                    key.1
                );
            }
        }
        let mut stats = self.stats();
        stats.counts.finished += taken;
        stats.counts.refused += refused;
        Ok(accepted)
    }

    /// What the queue has done since the server started.
    pub fn queue_stats(&self) -> QueueStats {
        let (workers, capacity) = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            (
                seen.len() as u64,
                seen.values().map(|(_, c)| u64::from(*c)).sum(),
            )
        };
        let stats = self.stats();
        QueueStats {
            wait_p50_us: percentile(&stats.waits, 0.5),
            wait_p99_us: percentile(&stats.waits, 0.99),
            claim_p50_us: percentile(&stats.claims, 0.5),
            claim_p99_us: percentile(&stats.claims, 0.99),
            workers,
            capacity,
            ..stats.counts.clone()
        }
    }
}

/// Set the fair queue's slots to the workers' capacity `total` (at least one: an attempt waits
/// in the database's queue for the first worker), when it changed.
fn set_slots_now(remote: &Remote, total: usize) {
    let mut capacity = remote.capacity.lock().unwrap_or_else(|p| p.into_inner());
    if *capacity != Some(total) {
        *capacity = Some(total);
        (remote.set_slots)(total.max(1));
    }
}

/// Run `f`, blocking on the database, from async code.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| StoreError::io("a PostgreSQL query", e.to_string()))?,
    }
}
