//! Admission of runs: before a run's store exists, it reserves everything the pooling allocator
//! will give it — a run slot (one component instance, one async stack and the per-component
//! maximum of core instances), exactly the linear memories and tables its component defines, and
//! its memory budget against the host's memory ceiling. The pool is sized so that every
//! reservation fits at once, so an admitted run always gets its slots: no run can exhaust the
//! pool and make another fail. A run that cannot be admitted yet waits. Reservations are taken in
//! one fixed order from FIFO semaphores, so runs are admitted in arrival order and can never
//! deadlock, and they are released only after the run's store (and with it every slot) is gone.
//!
//! A code flow's body waits for its task runs while it holds its reservation, so bodies are
//! admitted within half of the run slots and half of the memory ceiling: however many bodies
//! wait, task runs always have the other half, and a body never waits for a task run that
//! bodies keep from being admitted.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::outcome::{Limit, LimitExceeded};

/// What one run of a component takes from the pool besides its slot: the memories and tables
/// its core modules define (known statically for every component Sluice can run).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Needs {
    pub(super) memories: u32,
    pub(super) tables: u32,
}

/// The host's admission queues.
#[derive(Debug)]
pub(super) struct Admission {
    slots: Arc<Semaphore>,
    memories: Arc<Semaphore>,
    tables: Arc<Semaphore>,
    /// The host-wide memory ceiling, in MiB of run budgets.
    memory_mib: Arc<Semaphore>,
    ceiling_bytes: u64,
    /// The share of the run slots code flows' bodies may hold.
    body_slots: Arc<Semaphore>,
    /// The share of the memory ceiling (MiB) their budgets may hold.
    body_memory_mib: Arc<Semaphore>,
}

/// A run's reservation; dropping it gives everything back.
#[derive(Debug)]
pub(super) struct Admitted {
    _permits: Vec<OwnedSemaphorePermit>,
}

const MIB: u64 = 1 << 20;

impl Admission {
    /// Queues for `slots` concurrent runs, `memories` and `tables` pool slots, and a memory
    /// ceiling of `ceiling_bytes` summed over the budgets of admitted runs.
    pub(super) fn new(slots: u32, memories: u32, tables: u32, ceiling_bytes: u64) -> Self {
        let permits = |n: u64| {
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .min(Semaphore::MAX_PERMITS)
        };
        Self {
            slots: Arc::new(Semaphore::new(permits(u64::from(slots)))),
            memories: Arc::new(Semaphore::new(permits(u64::from(memories)))),
            tables: Arc::new(Semaphore::new(permits(u64::from(tables)))),
            memory_mib: Arc::new(Semaphore::new(permits(ceiling_bytes / MIB))),
            ceiling_bytes: ceiling_bytes / MIB * MIB,
            body_slots: Arc::new(Semaphore::new(permits(u64::from(slots / 2).max(1)))),
            body_memory_mib: Arc::new(Semaphore::new(permits(ceiling_bytes / MIB / 2))),
        }
    }

    /// The part of the memory ceiling bodies may hold, in bytes (whole MiB).
    fn body_ceiling_bytes(&self) -> u64 {
        self.ceiling_bytes / MIB / 2 * MIB
    }

    /// The memory ceiling, in bytes (whole MiB).
    pub(super) fn ceiling_bytes(&self) -> u64 {
        self.ceiling_bytes
    }

    /// Whether a run with this memory budget (a code flow's body when `body`) can ever be
    /// admitted.
    pub(super) fn check(&self, memory_bytes: u64, body: bool) -> Result<(), LimitExceeded> {
        let max = match body {
            true => self.body_ceiling_bytes(),
            false => self.ceiling_bytes,
        };
        if memory_bytes > max {
            return Err(LimitExceeded {
                limit: Limit::HostMemory,
                max,
                requested: Some(memory_bytes),
            });
        }
        Ok(())
    }

    /// Wait until a run of a component with `needs` and a memory budget of `memory_bytes` fits
    /// (a code flow's body when `body`: within the bodies' share too), and reserve it. Refused
    /// at once when it could never fit the memory ceiling.
    pub(super) async fn admit(
        &self,
        needs: Needs,
        memory_bytes: u64,
        body: bool,
    ) -> Result<Admitted, LimitExceeded> {
        self.check(memory_bytes, body)?;
        let mib = u32::try_from(memory_bytes.div_ceil(MIB)).unwrap_or(u32::MAX);
        // The order is fixed (the bodies' share, slot, memories, tables, memory): a run holding
        // a reservation only ever waits for one later in the order, so no cycle of waiting runs
        // can form. The semaphores are never closed, so acquiring only waits.
        let acquire = async |s: &Arc<Semaphore>, n: u32| s.clone().acquire_many_owned(n).await;
        let reserved = async {
            let mut permits = Vec::with_capacity(6);
            if body {
                permits.push(acquire(&self.body_slots, 1).await?);
                permits.push(acquire(&self.body_memory_mib, mib).await?);
            }
            permits.push(acquire(&self.slots, 1).await?);
            permits.push(acquire(&self.memories, needs.memories).await?);
            permits.push(acquire(&self.tables, needs.tables).await?);
            permits.push(acquire(&self.memory_mib, mib).await?);
            Ok::<_, tokio::sync::AcquireError>(permits)
        };
        match reserved.await {
            Ok(permits) => Ok(Admitted { _permits: permits }),
            // Unreachable: the semaphores are owned here and never closed.
            Err(_) => Err(LimitExceeded {
                limit: Limit::HostMemory,
                max: self.ceiling_bytes,
                requested: Some(memory_bytes),
            }),
        }
    }
}

/// The default memory ceiling: three quarters of the machine's physical memory (Linux:
/// `MemTotal` in `/proc/meminfo`), or 8 GiB where that cannot be read.
pub(super) fn default_memory_ceiling() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib.saturating_mul(1024) / 4 * 3)
        })
        .unwrap_or(8 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_run_over_the_ceiling_is_refused_and_one_at_it_is_admitted() {
        let a = Admission::new(4, 4, 4, 64 * MIB);
        let at = a
            .admit(Needs::default(), 64 * MIB, false)
            .await
            .expect("fits");
        let over = a.check(64 * MIB + 1, false).expect_err("over the ceiling");
        assert_eq!(over.limit, Limit::HostMemory);
        assert_eq!(over.max, 64 * MIB);
        drop(at);
    }

    #[tokio::test]
    async fn a_run_waits_until_its_memories_are_free() {
        let a = Arc::new(Admission::new(4, 3, 4, 1 << 30));
        let first = a
            .admit(
                Needs {
                    memories: 2,
                    tables: 0,
                },
                MIB,
                false,
            )
            .await
            .expect("fits");
        let a2 = a.clone();
        let second = tokio::spawn(async move {
            a2.admit(
                Needs {
                    memories: 2,
                    tables: 0,
                },
                MIB,
                false,
            )
            .await
            .map(|_| ())
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "only one memory is free");
        drop(first);
        second.await.expect("joined").expect("admitted once freed");
    }

    /// Bodies hold at most half the run slots and half the memory ceiling: at the share one
    /// more body waits (a task run does not), and a body's budget over half the ceiling is
    /// refused naming the half.
    #[tokio::test]
    async fn bodies_are_admitted_within_half_the_slots_and_memory() {
        let a = Arc::new(Admission::new(4, 8, 8, 64 * MIB));
        let none = Needs::default();
        let b1 = a.admit(none, MIB, true).await.expect("first body");
        let b2 = a
            .admit(none, MIB, true)
            .await
            .expect("second body: at the share");
        let a2 = a.clone();
        let third = tokio::spawn(async move { a2.admit(none, MIB, true).await.map(drop) });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third body waits");
        let task = a
            .admit(none, MIB, false)
            .await
            .expect("a task run is admitted");
        drop(b1);
        third
            .await
            .expect("joined")
            .expect("admitted once a body ended");
        drop((b2, task));
        let at = a
            .admit(none, 32 * MIB, true)
            .await
            .expect("at half the ceiling");
        drop(at);
        let over = a.check(32 * MIB + 1, true).expect_err("over half");
        assert_eq!((over.limit, over.max), (Limit::HostMemory, 32 * MIB));
        a.check(32 * MIB + 1, false)
            .expect("a task run may have more");
    }

    #[test]
    fn the_default_ceiling_is_positive() {
        assert!(default_memory_ceiling() > 0);
    }
}
