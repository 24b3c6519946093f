//! Which runtime a guest's attempt runs on. The guests' runtime of [`super::fair`] keeps the
//! control path (requests, drivers, the store's writer) out of the way of guests; but an attempt
//! there crosses between the two runtimes twice (its job there, its end back), and a woken
//! driver preempts the lower-priority guest thread each time: a 10,000-task map of trivial tasks
//! took 1.4× its embedded time that way, with 160,000 context switches for 11 such runs against
//! 17,000 on one runtime. Those crossings matter only for short attempts. So while one tenant
//! is alone (no neighbour to protect) an attempt starts beside its driver, as an embedded run's
//! does, until its second pause there: a short one ends there; at the second pause (a guest
//! pauses at every epoch tick and every million units of fuel; a host call that waits pauses
//! too) it goes on on the guests' runtime (a future may be polled on any thread between polls).
//! A CPU-bound guest so holds a control-path thread for a few milliseconds at most, at the
//! server's own priority, even if another tenant arrives meanwhile. (Timing its polls instead
//! moved a trivial attempt now and then: a poll's clock runs on while its thread is preempted.)
//!
//! Not beside: an attempt that may open connections (an HTTP or TCP grant), whose sockets and
//! the tasks serving them would stay on the runtime that first polled it; and, for [`APART`]
//! after one of a tenant's attempts went on, the tenant's next attempts: a tenant running long
//! tasks (5 ms each) would otherwise keep the control-path threads busy with their starts, and
//! another tenant's first request, before its run is in flight, waited behind them (B's p99
//! 82× solo, against 0.4× without this).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use crate::ids::TenantId;

/// How long a tenant's attempts start on the guests' runtime after one of its attempts paused
/// twice beside its driver.
pub const APART: Duration = Duration::from_secs(1);

/// Where attempts start. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Placement {
    guests: Handle,
    /// [`APART`], but for tests.
    apart: Duration,
    /// By tenant: until when its attempts start on the guests' runtime.
    apart_until: Arc<Mutex<HashMap<TenantId, Instant>>>,
}

impl Placement {
    /// Attempts that do not start beside their drivers run on `guests`.
    pub(super) fn new(guests: Handle) -> Placement {
        Placement {
            guests,
            apart: APART,
            apart_until: Arc::default(),
        }
    }

    fn apart_until(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, Instant>> {
        self.apart_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawn `tenant`'s `attempt`: beside its caller while the tenant is alone (not `shared`),
    /// the attempt opens no connections (not `network`) and none of the tenant's attempts
    /// paused twice there in the last [`APART`]; on the guests' runtime otherwise (or when the
    /// caller is on no runtime, or on the guests' one). Detached: it reports its own end.
    pub(super) fn spawn<F>(&self, tenant: TenantId, shared: bool, network: bool, attempt: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let beside = match Handle::try_current() {
            Ok(here) if !shared && !network && here.id() != self.guests.id() => {
                let now = Instant::now();
                let mut apart = self.apart_until();
                match apart.get(&tenant) {
                    Some(until) if *until > now => None,
                    Some(_) => {
                        apart.remove(&tenant);
                        Some(here)
                    }
                    None => Some(here),
                }
            }
            _ => None,
        };
        match beside {
            Some(here) => drop(here.spawn(Placed {
                at: At::Here(Box::pin(attempt)),
                placement: self.clone(),
                tenant,
                pauses: 0,
            })),
            None => drop(self.guests.spawn(attempt)),
        }
    }
}

/// An attempt started beside its driver, until its second pause there.
struct Placed<F> {
    at: At<F>,
    placement: Placement,
    tenant: TenantId,
    /// How often it paused beside its driver (a poll that did not end it).
    pauses: u32,
}

enum At<F> {
    /// Polled here.
    Here(Pin<Box<F>>),
    /// Moved to the guests' runtime.
    Moved,
}

impl<F: Future<Output = ()> + Send + 'static> Future for Placed<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // `Placed` is `Unpin` (its future is boxed).
        let this = &mut *self;
        if let At::Here(attempt) = &mut this.at {
            if attempt.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            // It reached a yield point or waits in a host call. A tick may come at any moment
            // of a short attempt (and a preempted thread's clock runs on): the first pause
            // does not count; at the second it has run for a tick at least, or waits.
            this.pauses += 1;
            if this.pauses < 2 {
                return Poll::Pending;
            }
            // It goes on on the guests' runtime (polled there anew, so its wake-ups go there),
            // detached: it reports its own end. Its tenant's next attempts start there too for
            // a while.
            let placement = &this.placement;
            {
                let now = Instant::now();
                let mut apart = placement.apart_until();
                apart.retain(|_, until| *until > now);
                apart.insert(this.tenant, now + placement.apart);
            }
            if let At::Here(attempt) = std::mem::replace(&mut this.at, At::Moved) {
                drop(placement.guests.spawn(attempt));
            }
        }
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the threads an attempt was polled on, recorded at each of its `polls` polls.
    async fn recorder(polls: usize, seen: Arc<Mutex<Vec<String>>>) {
        for i in 0..polls {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            seen.lock().expect("seen").push(name);
            if i + 1 < polls {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Alone, an attempt runs where it was submitted until its second pause there, then on the
    /// guests' runtime (one that may open connections starts there), and its tenant's next attempts start there for a while (another
    /// tenant's do not); one submitted while tenants share runs there from its first poll.
    #[test]
    fn an_attempt_starts_beside_its_driver_while_alone_and_goes_on_with_the_guests() {
        let guests = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-guest")
            .build()
            .expect("guests");
        let server = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("server");
        let main = std::thread::current().name().unwrap_or("").to_owned();
        let mut placement = Placement::new(guests.handle().clone());
        // Long enough for the test on any machine.
        placement.apart = Duration::from_secs(600);
        let run = |tenant: TenantId, (shared, network): (bool, bool), polls: usize| {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let (tx, rx) = std::sync::mpsc::channel();
            let (p, s) = (placement.clone(), seen.clone());
            server.block_on(async move {
                p.spawn(tenant, shared, network, async move {
                    recorder(polls, s).await;
                    let _ = tx.send(());
                });
                // The server's runtime goes on while the attempt runs.
                tokio::task::spawn_blocking(move || rx.recv().expect("ended"))
                    .await
                    .expect("joined");
            });
            seen.lock().expect("seen").clone()
        };
        let (a, b) = (TenantId::new(), TenantId::new());
        let here = |n: usize| vec![main.clone(); n];
        // Short attempts end beside their driver, one after another, even when they pause once.
        assert_eq!(run(a, (false, false), 1), here(1));
        assert_eq!(run(a, (false, false), 2), here(2));
        // A longer one: its first two polls there, the others with the guests.
        let seen = run(a, (false, false), 4);
        assert_eq!(seen[..2], here(2), "{seen:?}");
        assert!(seen[2..].iter().all(|t| t == "test-guest"), "{seen:?}");
        assert_eq!(seen.len(), 4);
        // Then the same tenant's next attempts start with the guests; another's do not.
        assert_eq!(run(a, (false, false), 1), ["test-guest"]);
        assert_eq!(run(b, (false, false), 1), here(1));
        // Until `APART` has passed.
        placement
            .apart_until()
            .insert(a, Instant::now() - Duration::from_millis(1));
        assert_eq!(run(a, (false, false), 1), here(1));
        // While tenants share, or when it may open connections: with the guests from the start.
        assert_eq!(run(b, (true, false), 1), ["test-guest"]);
        assert_eq!(run(b, (false, true), 1), ["test-guest"]);
        assert_eq!(run(b, (false, false), 1), here(1));
    }
}
