//! The source of wall-clock time for everything that records or schedules by time (state
//! timestamps, retry delays, cache expiry). Production code uses [`SystemClock`]; tests inject a
//! [`SimClock`] and move it by hand, so nothing that depends on time needs to sleep.
//!
//! Run budgets (a task's wall-clock deadline) are real elapsed time and do not use this clock.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeDelta, Utc};

/// A future that completes at a time.
pub type Sleep = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A source of the current time, and of waiting for a time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;

    /// Completes once `now() >= at`.
    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep;
}

/// A shared clock.
pub type ClockRef = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that only moves when told to, or when something sleeps on it: sleeping jumps the
/// clock forward to the wake-up time at once, so code that waits (retry delays) runs without
/// waiting and records the times it would have. Cloning shares the same time.
#[derive(Debug, Clone)]
pub struct SimClock(Arc<Mutex<DateTime<Utc>>>);

impl SimClock {
    /// A clock stopped at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self(Arc::new(Mutex::new(start)))
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: TimeDelta) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }

    /// Set the clock to `to`.
    pub fn set(&self, to: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = to;
    }
}

impl Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> Sleep {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *now < at {
            *now = at;
        }
        Box::pin(std::future::ready(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_clock_moves_only_when_told() {
        let start = DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp");
        let clock = SimClock::new(start);
        let shared = clock.clone();
        assert_eq!(clock.now(), start);
        shared.advance(TimeDelta::seconds(90));
        assert_eq!(clock.now(), start + TimeDelta::seconds(90));
        clock.set(start);
        assert_eq!(shared.now(), start);
        drop(clock.sleep_until(start + TimeDelta::seconds(5)));
        assert_eq!(shared.now(), start + TimeDelta::seconds(5));
        drop(clock.sleep_until(start));
        assert_eq!(
            shared.now(),
            start + TimeDelta::seconds(5),
            "never backwards"
        );
    }
}
