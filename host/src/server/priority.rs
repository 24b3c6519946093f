//! Where guest threads stand in the kernel's scheduler against the server's own threads (those
//! that serve requests, drive flow runs and write the store): below them, and, while tenants
//! share the server, out of the way of a control-path thread that wakes.
//!
//! - Each guest thread runs [`GUEST_NICE`] nice levels above the server (per thread on Linux):
//!   when both want a core, the kernel gives a guest about a tenth of the time.
//! - While more than one tenant has flow runs in flight (kept by [`super::fair`]), a guest,
//!   at each epoch tick ([`at_tick`]), asks for a long time slice and yields its core.
//!
//! Why both: Linux's EEVDF scheduler (6.6 on) lets a running thread finish its slice before a
//! thread that wakes takes its core ("run to parity"), and gives a waking thread the core only
//! when it is owed time (eligible); a control-path thread woken by a commit or a request then
//! waits for the kernel's next look at the running guest, its tick (4 ms here): a few ms on
//! every hand-off between threads. From 6.12 a waking thread whose slice is shorter than the
//! running one's preempts it when eligible: the server's threads keep the default slice (about
//! 1.5 ms), a guest asks for [`GUEST_SLICE`]. A yield at each epoch tick (1 ms) gives the core
//! to a waiting thread that was not eligible when it woke. Measured beside a noisy neighbour
//! (`cargo bench --bench server -- noisy`, 300 runs, interleaved), B's p99: 5.2, 6.1, 5.8 ms
//! with the long slice alone; 3.0, 4.4, 5.4 ms yielding alone; 2.2–3.9 ms with both at every
//! tick; 3.0 and 4.6 ms with both only while shared (B's request before its run is in flight,
//! after more than 10 s alone, gets no help).
//!
//! Not while one tenant is alone: kernels that make a yielding thread forfeit the rest of its
//! slice put it behind every thread that wants its core, another process's too, and a long slice
//! lets any other process's waking thread preempt it. A 10,000-task run beside a compiler took
//! 3.1 s with both at every tick, 0.7 s with neither; beside two busy shell loops 2.56 s with
//! both at every tick, 0.37 s with them only while shared. "Flow runs in flight" stands for
//! "tenants competing": a run waiting for hours (a retry delay, a body in a host call) counts.
//!
//! A failure is logged, never fatal: guests then share the cores with the server as equals.

use std::cell::Cell;
use std::time::Duration;

/// How much nicer the guest threads are than the server's own: the kernel weighs a thread 10
/// nice levels up at about a tenth, so guests yield to the control path when both want a core,
/// and still use every idle cycle.
pub const GUEST_NICE: i32 = 10;

/// The time slice a guest thread asks for while tenants share the server: longer than the
/// kernel's default (which the server's threads keep). The kernel takes 0.1 to 100 ms.
pub const GUEST_SLICE: Duration = Duration::from_millis(20);

/// The nice value of a guest thread of a server running at `ours`.
pub fn guest_nice(ours: i32) -> i32 {
    (ours + GUEST_NICE).min(19)
}

/// Lower the calling thread's priority by [`GUEST_NICE`], and mark it a guest thread.
#[cfg(target_os = "linux")]
pub fn lower_priority() {
    GUEST_THREAD.with(|g| g.set(true));
    let tid = rustix::thread::gettid();
    let lowered = rustix::process::getpriority_process(Some(tid))
        .and_then(|ours| rustix::process::setpriority_process(Some(tid), guest_nice(ours)));
    if let Err(e) = lowered {
        tracing::warn!("cannot lower the guest thread's priority: {e}");
    }
}

/// Elsewhere the nice value is per process: the guests share the cores as equals.
#[cfg(not(target_os = "linux"))]
pub fn lower_priority() {
    GUEST_THREAD.with(|g| g.set(true));
}

thread_local! {
    /// Whether this is a guest thread ([`lower_priority`]); a guest running beside its driver
    /// ([`super::placement`]) leaves the server's thread as it is.
    static GUEST_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Whether this guest thread last asked for the shared setting (the long slice).
    static SHARED: Cell<bool> = const { Cell::new(false) };
}

/// At a guest's yield point (an epoch tick), on a guest thread: while tenants share the server (`shared`), ask
/// for [`GUEST_SLICE`] (once, when that changes) and yield the core to a waiting server thread;
/// while one tenant is alone, keep the kernel's default slice and go on.
pub fn at_tick(shared: bool) {
    if !GUEST_THREAD.with(Cell::get) {
        return;
    }
    if SHARED.with(|s| s.replace(shared)) != shared {
        set_slice(shared.then_some(GUEST_SLICE));
    }
    if shared {
        rustix::thread::sched_yield();
    }
}

/// Ask for `slice` (`None`: the kernel's default) on the calling thread, keeping its nice value.
#[cfg(target_os = "linux")]
fn set_slice(slice: Option<Duration>) {
    let tid = rustix::thread::gettid();
    let set = rustix::process::getpriority_process(Some(tid))
        .map_err(std::io::Error::from)
        .and_then(|nice| linux::set_fair(nice, slice.unwrap_or(Duration::ZERO)));
    if let Err(e) = set {
        tracing::debug!("cannot set the guest thread's time slice: {e}");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_slice(_: Option<Duration>) {}

#[cfg(target_os = "linux")]
mod linux {
    use std::time::Duration;

    /// `struct sched_attr` of `sched_setattr(2)`, its first version (48 bytes).
    #[repr(C)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        /// For the normal policy (Linux 6.12 on): the time slice asked for, in ns (0: default).
        runtime: u64,
        deadline: u64,
        period: u64,
    }

    /// `sched_attr.sched_flags`: keep the thread's scheduling policy.
    const SCHED_FLAG_KEEP_POLICY: u64 = 0x08;

    /// Set the calling thread's nice value to `nice` and ask for a time slice of `slice`,
    /// keeping its scheduling policy.
    pub(super) fn set_fair(nice: i32, slice: Duration) -> std::io::Result<()> {
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            // Ignored: the thread keeps its policy (and its reset-on-fork flag).
            policy: 0,
            flags: SCHED_FLAG_KEEP_POLICY,
            nice,
            priority: 0,
            runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
            deadline: 0,
            period: 0,
        };
        // SAFETY: `sched_setattr(pid, attr, flags)` reads `attr.size` bytes from `attr`, a live,
        // initialised `repr(C)` value of the layout the kernel documents for that size, and
        // writes nothing; pid 0 is the calling thread. No Rust-visible state changes.
        #[allow(unsafe_code)]
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_setattr,
                0 as libc::pid_t,
                &attr as *const SchedAttr,
                0 as libc::c_uint,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's time slice as the kernel reports it (`se.slice`, in ns).
    fn slice() -> Option<u64> {
        let sched = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        sched
            .lines()
            .find(|l| l.starts_with("se.slice"))?
            .split(':')
            .nth(1)?
            .trim()
            .parse()
            .ok()
    }

    /// The running kernel's version (major, minor).
    fn kernel() -> (u32, u32) {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
        let mut parts = release
            .trim()
            .split(['.', '-'])
            .map(|p| p.parse().unwrap_or(0));
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    /// A guest thread asks for the long slice while tenants share the server and goes back to
    /// the default when one is alone again, keeping its nice value; where the kernel keeps
    /// slices per thread (6.12 on) and lets this process ask for one.
    #[test]
    fn a_guest_asks_for_the_long_slice_only_while_tenants_share_the_server() {
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let (ours, default) = (nice().expect("our nice value"), slice());
        let seen = std::thread::spawn(move || {
            lower_priority();
            at_tick(false);
            let alone = slice();
            at_tick(true);
            let shared = (slice(), nice().expect("nice"));
            at_tick(true);
            at_tick(false);
            (alone, shared, slice())
        })
        .join()
        .expect("thread");
        let (alone, (shared, shared_nice), again) = seen;
        assert_eq!(shared_nice, guest_nice(ours), "the nice value is kept");
        let allowed = std::thread::spawn(|| linux::set_fair(19, GUEST_SLICE).is_ok())
            .join()
            .expect("probe");
        if kernel() >= (6, 12) && allowed && default.is_some() {
            assert_eq!(alone, default, "alone: the default slice");
            assert_eq!(
                shared,
                Some(GUEST_SLICE.as_nanos() as u64),
                "shared: the long slice"
            );
            assert_eq!(again, default, "alone again: the default slice");
        }
    }
}
