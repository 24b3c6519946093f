//! The test binary's allocator: the system allocator, counting the bytes each thread holds, so a
//! test can measure the peak of what its own thread allocated (other tests run on other threads
//! at the same time). Requested sizes are counted, not the allocator's overhead.
//!
//! A global allocator is `unsafe` to implement; this is the one place the tests allow it, and
//! every method only forwards to `System`.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    /// Bytes allocated minus bytes freed on this thread.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The highest `LIVE` since the last reset.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize) {
    // `try_with`: nothing is counted while a thread's locals are being destroyed.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + bytes;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded to `System` unchanged; the counting has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `realloc` is passed on.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Measures the peak of this thread's allocations from [`Meter::start`].
#[derive(Debug)]
pub struct Meter {
    base: isize,
}

impl Meter {
    /// Start measuring: the peak is reset to what the thread holds now.
    pub fn start() -> Self {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        Self { base }
    }

    /// The most bytes this thread held at once since `start`, beyond what it held then.
    pub fn peak(&self) -> usize {
        usize::try_from(PEAK.with(Cell::get) - self.base).unwrap_or(0)
    }
}
