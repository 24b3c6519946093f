//! The cores, shared between tenants' running guests. The fair queue ([`super::fair`]) decides
//! which task runs hold a run slot; this decides which of them execute now. A guest executes
//! while it holds a *turn*; there are as many turns as guest threads, and a guest gives its turn
//! back at every epoch tick (its yield point, through the sandbox's [`Pacer`]). The next turn
//! goes to the waiting guest of the tenant with the least CPU time used divided by its weight
//! (first come first served within a tenant), and a tenant that had nothing running starts level
//! with the least-served busy tenant (it cannot bank credit). So CPU-bound guests of one tenant
//! filling every core keep another tenant's new guest waiting for about one tick, not for their
//! time slices. While one tenant alone has guests, they do not wait for turns (the runtime
//! shares the threads between them, with no hand-over cost); another tenant's guest then gets
//! the next turn given back, even if that tenant runs more guests than there are turns.
//!
//! A guest that has waited [`MAX_WAIT_TICKS`] ticks runs anyway, beyond the turns: a turn's
//! holder may be waiting in a host call (a socket, a sleep) rather than using its core, and no
//! guest is ever stuck behind one.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::ids::TenantId;
use crate::sandbox::Pacer;

/// How many ticks a guest waits for a turn at most before it runs anyway.
pub const MAX_WAIT_TICKS: u32 = 4;

/// The turns of the guest threads. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct CpuGate {
    gate: Arc<Mutex<Gate>>,
    tick: Duration,
    /// Until when tenants share the server (µs since `since`; `u64::MAX`: while more than one
    /// has flow runs in flight, then [`SHARED_LINGER`] more): guests give way at each tick
    /// ([`super::priority::at_tick`]).
    shared_until: Arc<AtomicU64>,
    since: Instant,
}

/// How long guests go on giving way after tenants stopped sharing the server: a tenant running
/// one short flow run after another is not alone between them, nor is its next request.
pub const SHARED_LINGER: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Gate {
    turns: usize,
    running: usize,
    seq: u64,
    tenants: HashMap<TenantId, Cpu>,
}

#[derive(Debug, Default)]
struct Cpu {
    /// CPU time used, in seconds, divided by the weight.
    vtime: f64,
    running: usize,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl Cpu {
    fn active(&self) -> bool {
        self.running > 0 || !self.waiting.is_empty()
    }
}

impl Gate {
    fn lock(m: &Mutex<Gate>) -> std::sync::MutexGuard<'_, Gate> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand free turns to the best waiters.
    fn grant(&mut self) {
        while self.running < self.turns && self.waiters() {
            self.hand_over();
        }
    }

    /// Give one turn to the best waiter, whatever the count.
    fn hand_over(&mut self) {
        loop {
            let Some((_, cpu)) = self
                .tenants
                .iter_mut()
                .filter(|(_, c)| !c.waiting.is_empty())
                .min_by(|a, b| a.1.vtime.total_cmp(&b.1.vtime))
            else {
                return;
            };
            let Some((_, waiter)) = cpu.waiting.pop_front() else {
                return;
            };
            if waiter.send(()).is_ok() {
                cpu.running += 1;
                self.running += 1;
                return;
            }
        }
    }

    fn waiters(&self) -> bool {
        self.tenants.values().any(|c| !c.waiting.is_empty())
    }
}

impl CpuGate {
    /// `turns` guests execute at once (the guest threads); a guest gives its turn back every
    /// `tick` (the sandbox's epoch tick).
    pub(super) fn new(turns: usize, tick: Duration) -> CpuGate {
        CpuGate {
            gate: Arc::new(Mutex::new(Gate {
                turns: turns.max(1),
                running: 0,
                seq: 0,
                tenants: HashMap::new(),
            })),
            tick,
            shared_until: Arc::new(AtomicU64::new(0)),
            since: Instant::now(),
        }
    }

    /// Whether more than one tenant has flow runs in flight: guests give way at each tick from
    /// now while they do, and for [`SHARED_LINGER`] after.
    pub(super) fn set_shared(&self, shared: bool) {
        match shared {
            true => self.shared_until.store(u64::MAX, Ordering::Relaxed),
            // Sharing ends now: it lingers. (Not sharing already: it stays as it is.)
            false => {
                let until = self.micros(Instant::now() + SHARED_LINGER);
                let _ = self.shared_until.compare_exchange(
                    u64::MAX,
                    until,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
    }

    fn micros(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.since).as_micros()).unwrap_or(u64::MAX - 1)
    }

    /// Whether guests give way at `now`.
    pub(super) fn is_shared(&self, now: Instant) -> bool {
        self.micros(now) < self.shared_until.load(Ordering::Relaxed)
    }

    /// At a yield point: give way to the server's threads while tenants share the server.
    fn give_way(&self) {
        super::priority::at_tick(self.is_shared(Instant::now()));
    }

    /// The epoch tick: how often a guest reaches a yield point.
    pub(super) fn tick(&self) -> Duration {
        self.tick
    }

    /// The turns of one task run of `tenant` (of `weight`).
    pub(super) fn turn(&self, tenant: TenantId, weight: u32) -> Arc<Turn> {
        Arc::new(Turn {
            gate: self.clone(),
            tenant,
            weight: f64::from(weight.max(1)),
            since: Mutex::new(None),
        })
    }
}

/// One task run's turns.
#[derive(Debug)]
pub(super) struct Turn {
    gate: CpuGate,
    tenant: TenantId,
    weight: f64,
    /// When it got its turn, while it holds one.
    since: Mutex<Option<Instant>>,
}

impl Turn {
    /// Wait for a turn (at most [`MAX_WAIT_TICKS`] ticks).
    pub(super) async fn acquire(&self) {
        let (seq, mut rx) = {
            let mut g = Gate::lock(&self.gate.gate);
            let floor = g
                .tenants
                .values()
                .filter(|c| c.active())
                .map(|c| c.vtime)
                .fold(f64::INFINITY, f64::min);
            g.seq += 1;
            // A turn is free, or no other tenant has guests running or waiting: the guests of
            // one tenant share the threads as the runtime schedules them, without hand-overs.
            let alone = g
                .tenants
                .iter()
                .all(|(id, c)| *id == self.tenant || !c.active());
            let (seq, free) = (g.seq, g.running < g.turns || alone);
            let cpu = g.tenants.entry(self.tenant).or_default();
            if !cpu.active() && floor.is_finite() && cpu.vtime < floor {
                cpu.vtime = floor;
            }
            if free {
                cpu.running += 1;
                g.running += 1;
                drop(g);
                self.started();
                return;
            }
            let (tx, rx) = oneshot::channel();
            cpu.waiting.push_back((seq, tx));
            (seq, rx)
        };
        let wait = self.gate.tick * MAX_WAIT_TICKS;
        if tokio::time::timeout(wait, &mut rx).await.is_err() {
            let mut g = Gate::lock(&self.gate.gate);
            let cpu = g.tenants.entry(self.tenant).or_default();
            // Still waiting: it runs anyway, beyond the turns. (Not waiting any more: it was
            // granted just now, and the grant counted it.)
            if let Some(i) = cpu.waiting.iter().position(|(s, _)| *s == seq) {
                cpu.waiting.remove(i);
                cpu.running += 1;
                g.running += 1;
            }
        }
        self.started();
    }

    fn started(&self) {
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Charge the time since the turn began to the tenant; `give_back`: and end the turn.
    fn charge(&self, g: &mut Gate, give_back: bool) {
        let since = {
            let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
            match give_back {
                true => since.take(),
                false => since.replace(Instant::now()),
            }
        };
        let cpu = g.tenants.entry(self.tenant).or_default();
        if let Some(since) = since {
            cpu.vtime += since.elapsed().as_secs_f64() / self.weight;
        }
        if give_back {
            cpu.running = cpu.running.saturating_sub(1);
            g.running = g.running.saturating_sub(1);
        }
    }

    /// Give the turn back (the task run ended).
    pub(super) fn release(&self) {
        let mut g = Gate::lock(&self.gate.gate);
        self.charge(&mut g, true);
        g.grant();
    }

    /// At a yield point: keep the turn when nobody waits for one, else give it back and wait
    /// for the next.
    async fn pause(&self) {
        self.gate.give_way();
        let handed_over = {
            let mut g = Gate::lock(&self.gate.gate);
            if g.waiters() {
                self.charge(&mut g, true);
                // This turn goes to the best waiter even when more guests run than there are
                // turns (one tenant's guests beyond them); then any free turns.
                g.hand_over();
                g.grant();
                true
            } else {
                self.charge(&mut g, false);
                false
            }
        };
        match handed_over {
            true => self.acquire().await,
            // Still let the other tasks of this thread run (as without a pacer).
            false => tokio::task::yield_now().await,
        }
    }
}

/// A task run's [`Pacer`]: its turns.
#[derive(Debug, Clone)]
pub(super) struct TurnPacer(pub(super) Arc<Turn>);

impl Pacer for TurnPacer {
    fn pause(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let turn = self.0.clone();
        Box::pin(async move { turn.pause().await })
    }
}

/// A code flow body's [`Pacer`]. A body holds no turn: it mostly waits for its task runs in
/// host calls, and a turn held there would be a core idle for everyone. At each yield point
/// (it ran for a tick since the last) it charges its tenant the time it ran, at most a tick,
/// and, when guests wait for turns, waits for one as they do and gives it straight back: a
/// CPU-bound body takes its place in the fair order each tick.
#[derive(Debug)]
pub(super) struct BodyPacer {
    turn: Arc<Turn>,
    tick: Duration,
    /// When it last resumed.
    resumed: Arc<Mutex<Instant>>,
}

impl BodyPacer {
    pub(super) fn new(turn: Arc<Turn>, tick: Duration) -> BodyPacer {
        BodyPacer {
            turn,
            tick,
            resumed: Arc::new(Mutex::new(Instant::now())),
        }
    }
}

impl Pacer for BodyPacer {
    fn pause(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        self.turn.gate.give_way();
        let ran = {
            let resumed = self.resumed.lock().unwrap_or_else(|p| p.into_inner());
            resumed.elapsed().min(self.tick)
        };
        let turn = self.turn.clone();
        let waiters = {
            let mut g = Gate::lock(&turn.gate.gate);
            let cpu = g.tenants.entry(turn.tenant).or_default();
            cpu.vtime += ran.as_secs_f64() / turn.weight;
            g.waiters()
        };
        let resumed = self.resumed.clone();
        Box::pin(async move {
            match waiters {
                true => {
                    turn.acquire().await;
                    turn.release();
                }
                false => tokio::task::yield_now().await,
            }
            *resumed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(turns: usize) -> CpuGate {
        CpuGate::new(turns, Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn a_waiting_guest_of_another_tenant_gets_the_next_turn_given_back() {
        let g = gate(1);
        let (a, b) = (TenantId::new(), TenantId::new());
        // Alone, A's guests do not wait for turns: two run on one turn.
        let (a1, a2) = (g.turn(a, 1), g.turn(a, 1));
        a1.acquire().await;
        a2.acquire().await;
        std::thread::sleep(Duration::from_millis(5));
        // B's guest waits: A has the turn (and more).
        let b1 = g.turn(b, 1);
        let b1_wait = tokio::spawn({
            let b1 = b1.clone();
            async move { b1.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!b1_wait.is_finished());
        // A's guest reaches its yield point: its turn goes to B at once.
        a1.pause_for_test();
        tokio::time::timeout(Duration::from_secs(10), b1_wait)
            .await
            .expect("B runs")
            .expect("join");
        // A's guest now waits behind B's (B is active): it runs when a turn frees.
        let a1_wait = tokio::spawn({
            let a1 = a1.clone();
            async move { a1.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!a1_wait.is_finished(), "A's guest waits while B's runs");
        b1.release();
        a2.release();
        tokio::time::timeout(Duration::from_secs(10), a1_wait)
            .await
            .expect("A's guest runs after B's")
            .expect("join");
        a1.release();
        assert_eq!(Gate::lock(&g.gate).running, 0);
    }

    #[tokio::test]
    async fn a_guest_runs_anyway_after_waiting_its_longest() {
        let g = CpuGate::new(1, Duration::from_millis(1));
        let (a, b) = (TenantId::new(), TenantId::new());
        let holder = g.turn(a, 1);
        holder.acquire().await;
        // The holder never yields (it waits in a host call): B's guest runs after 4 ticks.
        let b1 = g.turn(b, 1);
        tokio::time::timeout(Duration::from_secs(10), b1.acquire())
            .await
            .expect("B is not stuck behind a holder that does not yield");
        assert_eq!(Gate::lock(&g.gate).running, 2);
        b1.release();
        holder.release();
        assert_eq!(Gate::lock(&g.gate).running, 0);
    }

    /// A body holds no turn while it runs; at its yield point it is charged the tick it ran
    /// (at most a tick), and it waits behind the guests already waiting for a turn, then gives
    /// the turn straight back.
    #[tokio::test]
    async fn a_body_is_charged_its_tick_and_waits_behind_waiting_guests() {
        // Guests never run anyway beyond the turns here (the gate's tick is an hour).
        let g = gate(1);
        let (a, b) = (TenantId::new(), TenantId::new());
        let body = BodyPacer::new(g.turn(a, 1), Duration::from_millis(50));
        // Nobody waits: the body goes on at once, charged what it ran.
        std::thread::sleep(Duration::from_millis(80));
        tokio::time::timeout(Duration::from_secs(10), body.pause())
            .await
            .expect("nothing to wait for");
        let charged = Gate::lock(&g.gate).tenants[&a].vtime;
        assert!(
            (0.049..=0.051).contains(&charged),
            "at most a tick: {charged}"
        );
        assert_eq!(Gate::lock(&g.gate).running, 0, "it holds no turn");
        // B holds the one turn and C's guest waits for it.
        let (b1, c1) = (g.turn(b, 1), g.turn(TenantId::new(), 1));
        b1.acquire().await;
        let c1_wait = tokio::spawn({
            let c1 = c1.clone();
            async move { c1.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(Gate::lock(&g.gate).waiters(), "C's guest waits");
        let pause = tokio::spawn(body.pause());
        tokio::task::yield_now().await;
        assert!(!pause.is_finished(), "the body waits for a turn");
        // The turn goes to C's waiting guest first (it was first, and less served).
        b1.release();
        tokio::time::timeout(Duration::from_secs(10), c1_wait)
            .await
            .expect("C's guest runs")
            .expect("join");
        assert!(!pause.is_finished(), "the body waits behind C's guest");
        c1.release();
        tokio::time::timeout(Duration::from_secs(10), pause)
            .await
            .expect("the body goes on once a turn is free")
            .expect("join");
        assert_eq!(Gate::lock(&g.gate).running, 0, "and gave its turn back");
    }

    impl Turn {
        /// `pause`'s hand-over, without waiting for the next turn.
        fn pause_for_test(&self) {
            let mut g = Gate::lock(&self.gate.gate);
            self.charge(&mut g, true);
            g.hand_over();
            g.grant();
        }
    }
}
