//! Enforces a run's memory, table and instance limits. Memory and table limits are summed across
//! all of the instance's memories and tables (wasmtime's own `StoreLimits` counts each one
//! separately), and the first violation is remembered so the run's ending can name it.

use super::outcome::{Limit, LimitExceeded};

#[derive(Debug)]
pub(super) struct Limiter {
    memory_max: u64,
    table_max: u64,
    instances_max: u32,
    memory_total: u64,
    /// The last growth granted, undone if the allocator then fails it.
    memory_granted: u64,
    table_total: u64,
    /// The last table growth granted, undone if the allocator then fails it.
    table_granted: u64,
    pub(super) memory_peak: u64,
    pub(super) violation: Option<LimitExceeded>,
}

impl Limiter {
    pub(super) fn new(memory_max: u64, table_max: u64, instances_max: u32) -> Self {
        Self {
            memory_max,
            table_max,
            instances_max,
            memory_total: 0,
            memory_granted: 0,
            table_total: 0,
            table_granted: 0,
            memory_peak: 0,
            violation: None,
        }
    }

    fn refuse(&mut self, limit: Limit, max: u64, requested: u64) -> wasmtime::Result<bool> {
        self.violation.get_or_insert(LimitExceeded {
            limit,
            max,
            requested: Some(requested),
        });
        Ok(false)
    }
}

fn grow(total: u64, current: usize, desired: usize) -> u64 {
    let delta = (desired as u64).saturating_sub(current as u64);
    total.saturating_add(delta)
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = grow(self.memory_total, current, desired);
        if total > self.memory_max {
            return self.refuse(Limit::Memory, self.memory_max, total);
        }
        self.memory_granted = total - self.memory_total;
        self.memory_total = total;
        self.memory_peak = self.memory_peak.max(total);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // We allowed the growth but the allocator could not provide it (its per-memory maximum is
        // below the run's budget). Report it as the memory limit so the message is useful.
        tracing::debug!("memory growth failed: {error:#}");
        self.memory_total -= std::mem::take(&mut self.memory_granted);
        self.violation.get_or_insert(LimitExceeded {
            limit: Limit::Memory,
            max: self.memory_max,
            requested: None,
        });
        Ok(())
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = grow(self.table_total, current, desired);
        if total > self.table_max {
            return self.refuse(Limit::TableElements, self.table_max, total);
        }
        self.table_granted = total - self.table_total;
        self.table_total = total;
        Ok(true)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        // Allowed by the budget but refused by the allocator (the pool's per-table maximum is
        // below the run's budget): name the table limit rather than fail silently.
        tracing::debug!("table growth failed: {error:#}");
        self.table_total -= std::mem::take(&mut self.table_granted);
        self.violation.get_or_insert(LimitExceeded {
            limit: Limit::TableElements,
            max: self.table_max,
            requested: None,
        });
        Ok(())
    }

    fn instances(&self) -> usize {
        self.instances_max as usize
    }
}

#[cfg(test)]
mod tests {
    use wasmtime::ResourceLimiter;

    use super::*;

    #[test]
    fn memory_is_summed_across_memories() {
        let mut l = Limiter::new(100, 10, 1);
        assert!(l.memory_growing(0, 60, None).expect("no error"));
        assert!(l.memory_growing(0, 40, None).expect("no error"));
        assert_eq!(l.memory_peak, 100);
        assert!(l.violation.is_none());
        assert!(!l.memory_growing(40, 41, None).expect("no error"));
        assert_eq!(
            l.violation,
            Some(LimitExceeded {
                limit: Limit::Memory,
                max: 100,
                requested: Some(101)
            })
        );
    }

    #[test]
    fn a_failed_growth_is_rolled_back() {
        let mut l = Limiter::new(100, 10, 1);
        assert!(l.memory_growing(0, 60, None).expect("no error"));
        assert!(l.memory_growing(60, 90, None).expect("no error"));
        l.memory_grow_failed(wasmtime::Error::msg("no room"))
            .expect("no error");
        assert!(
            l.memory_growing(60, 100, None).expect("no error"),
            "the 30 were given back"
        );
    }

    #[test]
    fn tables_are_summed_and_the_first_violation_is_kept() {
        let mut l = Limiter::new(100, 10, 1);
        assert!(l.table_growing(0, 10, None).expect("no error"));
        assert!(!l.table_growing(0, 1, None).expect("no error"));
        assert!(!l.memory_growing(0, 1000, None).expect("no error"));
        assert_eq!(l.violation.map(|v| v.limit), Some(Limit::TableElements));
    }
}
