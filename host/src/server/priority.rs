//! Where guest threads stand in the kernel's scheduler against the server's own threads (those
//! that serve requests, drive flow runs and write the store): below them, so a guest never holds
//! a core a control-path thread wants.
//!
//! Two settings, both per thread on Linux, both asked for on each guest thread as it starts:
//!
//! - a nice value [`GUEST_NICE`] levels above the server's: when both want a core, the kernel
//!   gives a guest about a tenth of the time;
//! - a long time slice ([`GUEST_SLICE`]). Linux's EEVDF scheduler (6.6 on) lets a running
//!   thread finish its slice before a thread that wakes takes its core ("run to parity"); a
//!   control-path thread woken by a commit or a request then waits for the guest's slice to end,
//!   which the kernel notices at its next tick (4 ms here): a few ms on every hand-off between
//!   threads. From 6.12 a waking thread whose slice is shorter than the running one's may
//!   preempt it, when it is owed time (eligible): the server's threads keep the default slice
//!   (about 1.5 ms), so a guest with a longer one gives way to them when they wake, if they have
//!   not just run. Guests rarely compete with each other for a core (one guest thread per core,
//!   turns shared by [`super::cpu`]). Older kernels take the request and ignore the slice. The
//!   thread keeps its scheduling policy (`SCHED_FLAG_KEEP_POLICY`), as a nice value alone would.
//!
//! And at every epoch tick a guest yields its core ([`give_way`]), for a server thread that was
//! not owed time when it woke.
//!
//! A failure is logged, never fatal: guests then share the cores with the server as equals.

use std::time::Duration;

/// How much nicer the guest threads are than the server's own: the kernel weighs a thread 10
/// nice levels up at about a tenth, so guests yield to the control path when both want a core,
/// and still use every idle cycle.
pub const GUEST_NICE: i32 = 10;

/// The time slice a guest thread asks for: longer than the kernel's default (which the server's
/// threads keep), so a waking server thread preempts a guest at once. The kernel takes 0.1 to
/// 100 ms.
pub const GUEST_SLICE: Duration = Duration::from_millis(20);

/// The nice value of a guest thread of a server running at `ours`.
pub fn guest_nice(ours: i32) -> i32 {
    (ours + GUEST_NICE).min(19)
}

/// Lower the calling thread below the server's: [`GUEST_NICE`] and [`GUEST_SLICE`].
#[cfg(target_os = "linux")]
pub fn lower_priority() {
    let tid = rustix::thread::gettid();
    let nice = match rustix::process::getpriority_process(Some(tid)) {
        Ok(ours) => guest_nice(ours),
        Err(e) => {
            tracing::warn!("cannot read the guest thread's priority: {e}");
            return;
        }
    };
    if let Err(e) = linux::set_fair(nice, GUEST_SLICE) {
        tracing::debug!("cannot set the guest thread's time slice ({e}); setting its nice value");
        if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
            tracing::warn!("cannot lower the guest thread's priority: {e}");
        }
    }
}

/// At a guest's yield point (every epoch tick): let a server thread that waits for this core
/// have it now. The kernel gives a waking thread the core at once only when it is owed time
/// (EEVDF's eligibility); one that ran a moment before waits for the kernel's next look, its tick
/// (4 ms here), unless the running thread yields. With this it waits about an epoch tick.
/// The cost: kernels that make a yielding thread forfeit the rest of its slice put a guest behind
/// every other thread that wants its core at that moment (its own process's or another's); it
/// runs again as soon as they sleep. Measured beside a noisy neighbour (`cargo bench --bench
/// server -- noisy`, 300 runs, three pairs): B's p99 5.2, 6.1, 5.8 ms without; 2.8, 2.8,
/// 6.2 ms with.
pub fn give_way() {
    rustix::thread::sched_yield();
}

/// Elsewhere the nice value is per process: the guests share the cores as equals.
#[cfg(not(target_os = "linux"))]
pub fn lower_priority() {}

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

    /// A lowered thread has the guest's nice value, and its long slice where the kernel keeps
    /// slices per thread (6.12 on); the thread that spawned it keeps both of its own.
    #[test]
    fn a_lowered_thread_is_nicer_and_asks_for_a_long_slice() {
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        let (ours, our_slice) = (nice().expect("our nice value"), slice());
        let (theirs, their_slice) = std::thread::spawn(move || {
            lower_priority();
            (nice().expect("the guest's nice value"), slice())
        })
        .join()
        .expect("thread");
        assert_eq!(theirs, guest_nice(ours));
        assert_eq!(nice().expect("our nice value"), ours);
        assert_eq!(slice(), our_slice, "the caller's own slice");
        // Where the kernel keeps slices per thread and lets this process ask for one.
        let allowed = std::thread::spawn(|| linux::set_fair(19, GUEST_SLICE).is_ok())
            .join()
            .expect("probe");
        if kernel() >= (6, 12) && allowed && our_slice.is_some() {
            assert_eq!(their_slice, Some(GUEST_SLICE.as_nanos() as u64));
        }
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
}
