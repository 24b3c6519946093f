//! The `sluice` binary's allocator: mimalloc, committing memory as it is used and returning freed
//! memory at once. The runner allocates what the store's writer thread frees; glibc's allocator
//! takes an arena lock for each such free, and on an all-cache-hit run that was a third of the
//! runner's CPU (`cargo bench --bench flow -- hits`, whose binary includes this file).
//! mimalloc's defaults (arenas committed eagerly, purges delayed 10 ms) would raise the
//! peaks of big runs (a 100,000-task flow 228 → 290 MiB), so both options are set to 0, and set
//! before the first allocation: an arena made before that is committed eagerly whatever is set
//! later.

/// mimalloc's options, by their index in its `mi_option_e` (the same in its v2 and v3).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn set_up_allocator() {
    // SAFETY: sets options by their index in mimalloc's own enum; runs before `main`, on the
    // only thread, before anything has allocated through mimalloc.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0);
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
}

/// Runs [`set_up_allocator`] as the process starts, before the Rust runtime allocates anything
/// (an ELF constructor; elsewhere mimalloc keeps its defaults).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
#[used]
#[unsafe(link_section = ".init_array")]
static SET_UP_ALLOCATOR: extern "C" fn() = set_up_allocator;
