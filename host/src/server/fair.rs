//! The server's one queue of task runs waiting for a slot, shared by every flow run of every
//! tenant, and its dispatch. A task run waits here Pending and is Running from when it is
//! given a slot (the runner asks with `Executor::acquire` and hands the slot back with the
//! attempt); the slot goes back when the attempt ends. The dispatch: start-time fair queuing over tenants, round robin over each tenant's flow
//! runs. Every tenant with work has a virtual time: the sandbox time its task runs used,
//! divided by its weight. A free run slot goes to the eligible tenant with the smallest virtual
//! time (ties: the one that waited longest), so a tenant's share of the slots follows its
//! weight whatever it queues, and a tenant that has been idle starts level with the busiest
//! one (it cannot bank credit, and is never behind): its task waits for at most the next free
//! slot. Running guests share the cores by epoch interruption: each reaches a yield point every
//! tick, where [`super::cpu`] gives its core to the guest of the least-served tenant waiting for
//! one, so a CPU-bound guest never holds a core against another tenant.
//!
//! While tenants share the server, guests run in a runtime of their own (one worker thread per
//! core), apart from the one that serves requests and drives flow runs: a request or a driver
//! never waits behind a guest's time slice on a shared worker thread (a noisy neighbour's B p99
//! went from 14.6× to 6.6× its solo latency with this). Its threads run below the server's own
//! ([`super::priority`]), so the kernel gives the cores to serving requests, driving runs and
//! writing the store first, and to guests what those leave: the control path of every tenant
//! stays fast however busy the guests are. While one tenant is alone, its attempts start
//! beside their drivers, without the hand-overs between runtimes, and go on on the guests'
//! runtime from their second pause ([`super::placement`]).
//!
//! A tenant is eligible while it runs fewer task runs than its `max_running_tasks` quota and
//! the fuel its task runs used over the last minute is below its `fuel_per_minute` quota; its
//! task runs wait in the queue otherwise. Task runs of a cancelled flow run leave the queue at
//! once (they end Cancelled without a slot).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::cpu::{BodyPacer, CpuGate, TurnPacer};
use crate::ids::{FlowRunId, TenantId};
use crate::runner::executor::{BodyRun, Executor, Finished, Grant, Job, LocalExecutor, Slot};
use crate::runner::machine::Unit;
use crate::sandbox::{CancelToken, Ending, RunOutcome, Sandbox, paced};

/// The window of the per-minute quotas.
pub const WINDOW: Duration = Duration::from_secs(60);

/// The server's default number of run slots (`sluice server --task-slots`). A slot is the
/// pipeline between a flow run's driver and the guest threads: a task run holding one is Running
/// and, until its guest gets a turn of a core ([`super::cpu`]), costs only its queued job (no
/// instance). Each slot handed back goes to a driver on the server's runtime and comes back as
/// the next job on the guests' (two wake-ups across threads): with few slots, short tasks leave
/// the guest threads idle while that happens (a 10,000-task map of trivial tasks on 2 cores:
/// 2.2× its embedded time with 4 slots, 1.6× with 16, 1.35× with 64, no better past it, before a
/// tenant alone had its attempts start beside their drivers, [`super::placement`]), and
/// a tenant's backlog beside another's short runs is as fair with 64 as with 4 (the turns decide
/// who executes). At most half the sandbox's default run slots (128), as embedded runs may
/// take them all.
pub const DEFAULT_TASK_SLOTS: usize = 64;

/// The virtual time charged when a task run is dispatched; corrected by what it used when it
/// ends. Dispatching many at once so costs something before any ends.
const NOMINAL: Duration = Duration::from_millis(1);

/// What a tenant may use of the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Its weight (≥ 1): its share of the slots against other busy tenants.
    pub weight: u32,
    /// At most this many task runs at once.
    pub max_running: Option<u64>,
    /// At most this much fuel used by task runs that ended in the last minute.
    pub fuel_per_minute: Option<u64>,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            weight: 1,
            max_running: None,
            fuel_per_minute: None,
        }
    }
}

/// A tenant's use of the queue now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Task runs waiting.
    pub queued: u64,
    /// Task runs running.
    pub running: u64,
    /// Fuel used by its task runs that ended in the last minute.
    pub fuel_last_minute: u64,
}

/// The shared queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FairQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    local: LocalExecutor,
    /// Workers that run the attempts instead of this process (`sluice server --workers`).
    remote: std::sync::OnceLock<Arc<super::workers::Remote>>,
    /// The guest threads' turns, shared fairly between the running guests ([`super::cpu`]).
    cpu: CpuGate,
    state: Mutex<State>,
    /// Where guests run while tenants share the server: a runtime of their own, so the
    /// server's control plane (requests, drivers, timers) never waits behind a guest's time
    /// slice on a shared worker thread; the kernel shares the cores between the two. While one
    /// tenant is alone its guests run beside their drivers ([`super::placement`]).
    guests: Option<tokio::runtime::Runtime>,
    /// Where each attempt starts: beside its driver or with the guests.
    placement: super::placement::Placement,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped from async code when the server is: its guests are abandoned, not awaited.
        if let Some(rt) = self.guests.take() {
            rt.shutdown_background();
        }
    }
}

#[derive(Debug)]
struct State {
    slots: usize,
    running: usize,
    tenants: HashMap<TenantId, TenantQueue>,
    /// Increases with every dispatch: the tie-break (who was served least recently).
    ticket: u64,
    /// A wake-up is scheduled for when a fuel window frees (at this instant).
    wake_at: Option<Instant>,
    /// Flow runs in flight, by tenant (only tenants with some).
    live: HashMap<TenantId, usize>,
}

#[derive(Debug, Default)]
struct TenantQueue {
    share: Share,
    /// Seconds of sandbox time used, divided by the weight.
    vtime: f64,
    /// Flow runs with task runs waiting for a slot, in round-robin order.
    runs: VecDeque<(FlowRunId, VecDeque<Request>)>,
    queued: usize,
    running: usize,
    /// When its last task run was dispatched (a ticket).
    served: u64,
    /// Fuel of task runs that ended, by when they ended.
    fuel: VecDeque<(Instant, u64)>,
    fuel_sum: u64,
}

/// A flow run in flight ([`FairQueue::run_in_flight`]), until dropped.
#[derive(Debug)]
pub struct InFlight {
    queue: FairQueue,
    tenant: TenantId,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.queue.state();
        if let Some(n) = state.live.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                state.live.remove(&self.tenant);
            }
        }
        self.queue.inner.cpu.set_shared(state.live.len() > 1);
    }
}

/// A task run waiting for a slot (Pending).
#[derive(Debug)]
struct Request {
    unit: Unit,
    cancel: CancelToken,
    granted: mpsc::UnboundedSender<Grant>,
}

/// A slot dispatched to a task run: counted as running until dropped (its attempt ended, or
/// it was never used: the flow run was cancelled meanwhile, or its driver is gone).
#[derive(Debug)]
struct SlotGuard {
    queue: FairQueue,
    tenant: TenantId,
    /// The tenant's weight when it was dispatched, for its guest's turns.
    weight: u32,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        {
            let mut state = self.queue.state();
            state.running = state.running.saturating_sub(1);
            if let Some(q) = state.tenants.get_mut(&self.tenant) {
                q.running = q.running.saturating_sub(1);
            }
        }
        self.queue.pump();
    }
}

impl TenantQueue {
    fn busy(&self) -> bool {
        self.queued > 0 || self.running > 0
    }

    fn expire_fuel(&mut self, now: Instant) {
        while let Some(&(at, fuel)) = self.fuel.front() {
            if now.duration_since(at) < WINDOW {
                break;
            }
            self.fuel.pop_front();
            self.fuel_sum = self.fuel_sum.saturating_sub(fuel);
        }
    }

    /// When the fuel quota holds it back: the instant it frees, else `None` (not held).
    fn fuel_held_until(&self) -> Option<Instant> {
        let quota = self.share.fuel_per_minute?;
        if self.fuel_sum < quota {
            return None;
        }
        // Frees when enough old entries leave the window.
        let mut sum = self.fuel_sum;
        for &(at, fuel) in &self.fuel {
            sum = sum.saturating_sub(fuel);
            if sum < quota {
                return Some(at + WINDOW);
            }
        }
        self.fuel.back().map(|&(at, _)| at + WINDOW)
    }

    fn below_running(&self) -> bool {
        self.share
            .max_running
            .is_none_or(|max| (self.running as u64) < max)
    }
}

impl State {
    /// Take tenant `id`'s next task run (round robin over its flow runs) and count it running,
    /// charging the tenant the nominal time of a dispatch.
    fn dispatch(&mut self, id: TenantId) -> Option<Request> {
        self.ticket += 1;
        let ticket = self.ticket;
        let q = self.tenants.get_mut(&id)?;
        let (run, mut jobs) = q.runs.pop_front()?;
        let job = jobs.pop_front()?;
        if !jobs.is_empty() {
            q.runs.push_back((run, jobs));
        }
        q.queued -= 1;
        q.running += 1;
        q.served = ticket;
        q.vtime += NOMINAL.as_secs_f64() / f64::from(q.share.weight);
        self.running += 1;
        Some(job)
    }
}

impl FairQueue {
    /// A queue running at most `slots` task runs at once on `sandbox`, in a runtime of
    /// `threads` worker threads of its own.
    pub fn new(sandbox: Sandbox, slots: usize, threads: usize) -> std::io::Result<FairQueue> {
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sluice-guest")
            .on_thread_start(super::priority::lower_priority)
            .enable_all()
            .build()?;
        Ok(FairQueue {
            inner: Arc::new(Inner {
                placement: super::placement::Placement::new(guests.handle().clone()),
                guests: Some(guests),
                cpu: CpuGate::new(threads.max(1), sandbox.epoch_tick()),
                local: LocalExecutor::new(sandbox),
                remote: std::sync::OnceLock::new(),
                state: Mutex::new(State {
                    slots: slots.max(1),
                    running: 0,
                    tenants: HashMap::new(),
                    ticket: 0,
                    wake_at: None,
                    live: HashMap::new(),
                }),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set `tenant`'s share (its quotas may change while it has work queued).
    pub fn configure(&self, tenant: TenantId, share: Share) {
        let changed = {
            let mut state = self.state();
            let q = state.tenants.entry(tenant).or_default();
            let changed = q.share != share;
            q.share = Share {
                weight: share.weight.max(1),
                ..share
            };
            changed
        };
        if changed {
            self.pump();
        }
    }

    /// One of `tenant`'s flow runs is in flight until the returned guard drops. While more than
    /// one tenant has flow runs in flight, guests give way to the server's threads at each tick
    /// ([`super::priority::at_tick`]).
    pub fn run_in_flight(&self, tenant: TenantId) -> InFlight {
        {
            let mut state = self.state();
            *state.live.entry(tenant).or_default() += 1;
            self.inner.cpu.set_shared(state.live.len() > 1);
        }
        InFlight {
            queue: self.clone(),
            tenant,
        }
    }

    /// From now on, attempts given a slot run on `remote`'s workers, not here (once: a later
    /// call changes nothing).
    pub fn use_workers(&self, remote: Arc<super::workers::Remote>) {
        let _ = self.inner.remote.set(remote);
    }

    /// Sets this queue's slots (the workers' capacity), as long as the queue exists; dispatches
    /// at once into new ones.
    pub fn slot_setter(&self) -> Box<dyn Fn(usize) + Send + Sync> {
        let weak = Arc::downgrade(&self.inner);
        Box::new(move |n| {
            if let Some(inner) = weak.upgrade() {
                let queue = FairQueue { inner };
                queue.state().slots = n.max(1);
                queue.pump();
            }
        })
    }

    /// What `tenant` uses now.
    pub fn load(&self, tenant: TenantId) -> Load {
        let mut state = self.state();
        let Some(q) = state.tenants.get_mut(&tenant) else {
            return Load::default();
        };
        q.expire_fuel(Instant::now());
        Load {
            queued: q.queued as u64,
            running: q.running as u64,
            fuel_last_minute: q.fuel_sum,
        }
    }

    /// The executor of `tenant`'s flow runs: their task runs join this queue.
    pub fn executor(&self, tenant: TenantId) -> Arc<dyn Executor> {
        Arc::new(TenantExecutor {
            queue: self.clone(),
            tenant,
        })
    }

    fn enqueue(&self, tenant: TenantId, run: FlowRunId, request: Request) {
        {
            let mut state = self.state();
            // A tenant that had nothing to do starts level with the least-served busy tenant.
            let floor = state
                .tenants
                .values()
                .filter(|q| q.busy())
                .map(|q| q.vtime)
                .fold(f64::INFINITY, f64::min);
            let q = state.tenants.entry(tenant).or_default();
            if !q.busy() && floor.is_finite() && q.vtime < floor {
                q.vtime = floor;
            }
            match q.runs.iter_mut().find(|(r, _)| *r == run) {
                Some((_, requests)) => requests.push_back(request),
                None => q.runs.push_back((run, VecDeque::from([request]))),
            }
            q.queued += 1;
        }
        self.pump();
    }

    /// A flow run was cancelled: its waiting task runs leave the queue now (their flow run
    /// records them Cancelled without a slot).
    pub fn cancelled(&self) {
        self.pump();
    }

    /// Dispatch while slots are free and some tenant is eligible; drop the requests of
    /// cancelled flow runs.
    fn pump(&self) {
        let mut start: Vec<(TenantId, Request)> = Vec::new();
        let mut wake = None;
        let weights: Vec<u32>;
        {
            let mut state = self.state();
            let now = Instant::now();
            // Requests nobody waits for leave: of a cancelled flow run (each request by its own
            // token: a run resumed under the same id asks anew), or whose driver is gone.
            for q in state.tenants.values_mut() {
                let mut dropped = 0;
                q.runs.retain_mut(|(_, requests)| {
                    let before = requests.len();
                    requests.retain(|r| !r.cancel.is_cancelled() && !r.granted.is_closed());
                    dropped += before - requests.len();
                    !requests.is_empty()
                });
                q.queued -= dropped;
            }
            while state.running < state.slots {
                let mut best: Option<(TenantId, f64, u64)> = None;
                let mut held: Option<Instant> = None;
                for (id, q) in state.tenants.iter_mut() {
                    if q.queued == 0 || !q.below_running() {
                        continue;
                    }
                    q.expire_fuel(now);
                    if let Some(until) = q.fuel_held_until() {
                        held = Some(held.map_or(until, |h| h.min(until)));
                        continue;
                    }
                    let better = best.is_none_or(|(_, v, served)| {
                        q.vtime < v || (q.vtime == v && q.served < served)
                    });
                    if better {
                        best = Some((*id, q.vtime, q.served));
                    }
                }
                let Some((id, _, _)) = best else {
                    wake = held;
                    break;
                };
                let Some(request) = state.dispatch(id) else {
                    break;
                };
                start.push((id, request));
            }
            // A tenant with nothing running gets one task run at once even when every slot is
            // taken (by tenants with backlogs): it never waits for another tenant's task run
            // to end, and the cores are shared at the next tick ([`super::cpu`]). At most one
            // per tenant beyond the slots.
            if state.running >= state.slots {
                let idle: Vec<TenantId> = state
                    .tenants
                    .iter_mut()
                    .filter(|(_, q)| q.queued > 0 && q.running == 0 && q.below_running())
                    .filter_map(|(id, q)| {
                        q.expire_fuel(now);
                        q.fuel_held_until().is_none().then_some(*id)
                    })
                    .collect();
                for id in idle {
                    if let Some(request) = state.dispatch(id) {
                        start.push((id, request));
                    }
                }
            }
            // Read under this lock, not again per task run.
            weights = start
                .iter()
                .map(|(id, _)| state.tenants.get(id).map_or(1, |q| q.share.weight))
                .collect();
            if let Some(at) = wake {
                match state.wake_at {
                    Some(w) if w <= at => wake = None,
                    _ => state.wake_at = Some(at),
                }
            }
        }
        for ((tenant, request), weight) in start.into_iter().zip(weights) {
            let guard = SlotGuard {
                queue: self.clone(),
                tenant,
                weight,
            };
            // A driver that is gone drops the grant, and with it the slot.
            let _ = request.granted.send(Grant {
                unit: request.unit,
                slot: Slot(Box::new(guard)),
            });
        }
        if let Some(at) = wake {
            let queue = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                queue.state().wake_at = None;
                queue.pump();
            });
        }
    }

    /// Run the attempt of a task run given a slot; when it ends, account for it (its sandbox
    /// time against the tenant's virtual time, its fuel against the tenant's minute), give the
    /// slot back and dispatch more.
    fn spawn(&self, tenant: TenantId, mut job: Job, done: mpsc::UnboundedSender<Finished>) {
        let guard = job
            .slot
            .take()
            .and_then(|s| s.0.downcast::<SlotGuard>().ok());
        // Never without one: the runner acquires a slot before every attempt. Were it to come
        // without, it would run uncounted rather than be lost.
        debug_assert!(guard.is_some(), "an attempt without a slot of the queue");
        let weight = guard.as_ref().map_or(1, |g| g.weight);
        let queue = self.clone();
        if let Some(remote) = self.inner.remote.get() {
            remote.submit(
                tenant,
                job,
                Box::new(move |finished: Finished| {
                    let usage = &finished.outcome.usage;
                    queue.charge(
                        tenant,
                        usage.duration.saturating_sub(NOMINAL),
                        usage.fuel_consumed,
                    );
                    drop(guard);
                    let _ = done.send(finished);
                }),
            );
            return;
        }
        let network = job.grants.reaches_network();
        let run = self.inner.local.run_here(job);
        let turn = self.inner.cpu.turn(tenant, weight);
        let spawned = async move {
            turn.acquire().await;
            let finished = paced(Arc::new(TurnPacer(turn.clone())), run).await;
            turn.release();
            let usage = &finished.outcome.usage;
            let used = usage.duration.saturating_sub(NOMINAL);
            queue.charge(tenant, used, usage.fuel_consumed);
            // The slot goes back (and the next task run is dispatched) before the flow run
            // hears of the end.
            drop(guard);
            let _ = done.send(finished);
        };
        match &self.inner.guests {
            Some(_) => {
                let shared = self.inner.cpu.is_shared(Instant::now());
                self.inner.placement.spawn(tenant, shared, network, spawned);
            }
            None => drop(tokio::spawn(spawned)),
        }
    }
}

impl FairQueue {
    /// Charge `tenant` for `used` sandbox time (against its virtual time) and `fuel` (against
    /// its minute).
    fn charge(&self, tenant: TenantId, used: Duration, fuel: u64) {
        let mut state = self.state();
        if let Some(q) = state.tenants.get_mut(&tenant) {
            q.vtime += used.as_secs_f64() / f64::from(q.share.weight);
            if fuel > 0 {
                q.fuel.push_back((Instant::now(), fuel));
                q.fuel_sum = q.fuel_sum.saturating_add(fuel);
            }
        }
    }

    /// Run the body of one of `tenant`'s code flow runs with the guests: on their runtime (below
    /// the control path), waiting at each tick for a turn when other guests wait for one
    /// ([`BodyPacer`]), its fuel charged to the tenant's minute when it ends. It holds no slot
    /// and no turn between ticks: it mostly waits for its own task runs.
    fn spawn_body(&self, tenant: TenantId, body: BodyRun) -> BodyRun {
        let weight = self
            .state()
            .tenants
            .get(&tenant)
            .map_or(1, |q| q.share.weight);
        let pacer = BodyPacer::new(self.inner.cpu.turn(tenant, weight), self.inner.cpu.tick());
        let queue = self.clone();
        let spawned = async move {
            let outcome = paced(Arc::new(pacer), body).await;
            // Its time was charged tick by tick.
            queue.charge(tenant, Duration::ZERO, outcome.usage.fuel_consumed);
            outcome
        };
        let task = AbortOnDrop(match &self.inner.guests {
            Some(guests) => guests.spawn(spawned),
            None => tokio::spawn(spawned),
        });
        Box::pin(async move {
            let mut task = task;
            (&mut task.0).await.unwrap_or_else(|e| RunOutcome {
                ending: Ending::HostFault {
                    message: format!("the flow body failed in the host: {e}"),
                },
                logs: Vec::new(),
                logs_dropped_bytes: 0,
                usage: Default::default(),
            })
        })
    }
}

/// A spawned body, stopped when its flow run's driver no longer waits for it.
struct AbortOnDrop(tokio::task::JoinHandle<RunOutcome>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One tenant's view of the queue, as the executor of its runner.
#[derive(Debug)]
struct TenantExecutor {
    queue: FairQueue,
    tenant: TenantId,
}

impl Executor for TenantExecutor {
    fn submit(&self, job: Job, done: mpsc::UnboundedSender<Finished>) {
        self.queue.spawn(self.tenant, job, done);
    }

    fn queues(&self) -> bool {
        true
    }

    fn acquire(
        &self,
        run: FlowRunId,
        unit: Unit,
        cancel: CancelToken,
        granted: mpsc::UnboundedSender<Grant>,
    ) {
        let request = Request {
            unit,
            cancel,
            granted,
        };
        self.queue.enqueue(self.tenant, run, request);
    }

    fn body(&self, _run: FlowRunId, body: BodyRun) -> BodyRun {
        self.queue.spawn_body(self.tenant, body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::priority::guest_nice;

    fn ask(
        queue: &FairQueue,
        tenant: TenantId,
        run: FlowRunId,
        cancel: &CancelToken,
    ) -> mpsc::UnboundedReceiver<Grant> {
        let (tx, rx) = mpsc::unbounded_channel();
        let unit = Unit {
            task: 0,
            child: None,
        };
        queue
            .executor(tenant)
            .acquire(run, unit, cancel.clone(), tx);
        rx
    }

    /// Guests give way to the server's threads at each tick only while more than one tenant has
    /// flow runs in flight.
    #[test]
    fn guests_give_way_only_while_tenants_share_the_server() {
        let sandbox = Sandbox::builder().build().expect("sandbox");
        let queue = FairQueue::new(sandbox, 1, 1).expect("queue");
        let cpu = &queue.inner.cpu;
        let later = |by: Duration| cpu.is_shared(Instant::now() + by);
        let (now, after) = (Duration::ZERO, super::super::cpu::SHARED_LINGER * 2);
        let (a, b) = (TenantId::new(), TenantId::new());
        let (a1, a2) = (queue.run_in_flight(a), queue.run_in_flight(a));
        assert!(!later(now), "one tenant alone, with two runs");
        let b1 = queue.run_in_flight(b);
        assert!(
            later(now) && later(after),
            "two tenants, for as long as they are"
        );
        drop(a1);
        assert!(later(after), "A still has a run in flight");
        drop(b1);
        assert!(later(now), "A alone again: for a while still shared");
        assert!(!later(after), "and then not");
        let b2 = queue.run_in_flight(b);
        assert!(later(after), "two tenants again");
        drop(a2);
        assert!(!later(after), "B alone");
        drop(b2);
        assert!(!later(after));
    }

    /// Guests run at a lower priority than the control path; the server's own threads keep
    /// theirs. (A server already at nice 19 has no lower priority to give.)
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn guest_threads_run_below_the_control_path() {
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let ours = nice().expect("our nice value");
        let sandbox = Sandbox::builder().build().expect("sandbox");
        let queue = FairQueue::new(sandbox, 1, 1).expect("queue");
        let guests = queue.inner.guests.as_ref().expect("the guest runtime");
        let worker = guests.spawn(async move { nice() });
        let blocking = guests.spawn_blocking(nice);
        assert_eq!(
            worker.await.expect("worker").expect("nice"),
            guest_nice(ours)
        );
        assert_eq!(
            blocking.await.expect("blocking").expect("nice"),
            guest_nice(ours)
        );
        assert_eq!(
            nice().expect("our nice value"),
            ours,
            "the caller's own priority"
        );
    }

    /// Requests leave by their own token: a flow run cancelled without the queue being told,
    /// then resumed under the same id, has its new request granted (not dropped with the old
    /// one); a request whose driver is gone leaves without taking a slot.
    #[tokio::test]
    async fn requests_leave_by_their_own_token_and_driver() {
        let sandbox = Sandbox::builder().build().expect("sandbox");
        let queue = FairQueue::new(sandbox, 1, 1).expect("queue");
        let tenant = TenantId::new();
        let mut holder = ask(&queue, tenant, FlowRunId::new(), &CancelToken::new());
        let held = holder.try_recv().expect("the one slot");
        let run = FlowRunId::new();
        let old = CancelToken::new();
        let _stale = ask(&queue, tenant, run, &old);
        old.cancel();
        let mut resumed = ask(&queue, tenant, run, &CancelToken::new());
        drop(ask(&queue, tenant, FlowRunId::new(), &CancelToken::new()));
        assert_eq!(
            queue.load(tenant).queued,
            2,
            "the resumed request and the orphan"
        );
        drop(held);
        let grant = resumed
            .try_recv()
            .expect("the resumed run's request is granted");
        assert_eq!(queue.load(tenant).queued, 0);
        assert_eq!(queue.load(tenant).running, 1);
        drop(grant);
        assert_eq!(queue.load(tenant), Load::default());
    }
}
