//! [`SandboxBuilder`]: every setting of a [`Sandbox`] and its default, and building one: the
//! engine and its pooling allocator sized from the settings, the artifact store and file index,
//! and the epoch ticker.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::admission::{self, Admission, Needs};
use super::artifacts::ArtifactStore;
use super::bindings;
use super::ending::{BACKTRACE_FRAMES, error_chain};
use super::file_index::FileIndex;
use super::{
    ArtifactDirError, DEFAULT_MAX_COMPONENT_BYTES, Inner, LoadError, LoadEvent, RunState, Sandbox,
    default_key_file,
};
#[cfg(doc)]
use super::{Limit, RunBudget, default_artifact_dir};
use crate::clock::{ClockRef, SystemClock};

/// Bytes of each linear memory kept resident when its slot is freed. With the kernel's
/// `PAGEMAP_SCAN` (Linux 6.7+) only the pages the run dirtied are reset, with `memset`, instead
/// of `madvise`: the next run in the slot takes no page faults, and no TLB shootdown interrupts
/// the other cores (the cost that dominated a run on a busy multi-core host). Without the ioctl,
/// this many low bytes are `memset`.
const KEEP_RESIDENT: usize = 64 << 10;

/// Configuration of a [`Sandbox`]; every setting has a documented default.
///
/// The pooling allocator is sized from these settings so that every admitted run is guaranteed
/// its slots: [`max_concurrent_runs`](Self::max_concurrent_runs) runs at once, each with up to
/// [`max_instances_per_component`](Self::max_instances_per_component) core instances, and
/// [`pool_memories`](Self::pool_memories) linear memories and [`pool_tables`](Self::pool_tables)
/// tables shared by the runs in progress, each run reserving exactly what its component
/// defines. A run that does not fit waits; it never fails because of its neighbours. A component
/// that could never fit (more memories, tables or core instances than one component may have,
/// a table larger than [`max_table_elements`](Self::max_table_elements)) is refused when it is
/// loaded, naming the limit.
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    artifact_dir: Option<PathBuf>,
    artifact_key_file: Option<PathBuf>,
    max_component_bytes: u64,
    max_concurrent_runs: u32,
    max_memory_bytes: u64,
    max_instances_per_component: u32,
    max_memories_per_component: u32,
    max_tables_per_component: u32,
    pool_memories: u32,
    pool_tables: u32,
    max_table_elements: u64,
    memory_ceiling: Option<u64>,
    epoch_tick: Duration,
    clock: ClockRef,
    load_events: Option<UnboundedSender<LoadEvent>>,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        Self {
            artifact_dir: None,
            artifact_key_file: None,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            max_concurrent_runs: 128,
            max_memory_bytes: 4 << 30,
            max_instances_per_component: 64,
            max_memories_per_component: 32,
            max_tables_per_component: 32,
            pool_memories: 1000,
            pool_tables: 1000,
            max_table_elements: 100_000,
            memory_ceiling: None,
            epoch_tick: Duration::from_millis(5),
            clock: Arc::new(SystemClock),
            load_events: None,
        }
    }
}

impl SandboxBuilder {
    /// Where precompiled components are kept. Default: none (compile in memory, once per
    /// process). Use a directory of the user's own, such as [`default_artifact_dir`]: loading
    /// an artifact runs the code in it, so [`build`](Self::build) refuses a directory that is
    /// not the user's or that others can write, and every artifact is authenticated with the
    /// per-user key (see [`artifact_key_file`](Self::artifact_key_file)) before it is loaded.
    pub fn artifact_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.artifact_dir = Some(dir.into());
        self
    }

    /// The file holding the secret key that authenticates artifacts and file index entries
    /// (32 random bytes, created with mode 0600 when absent). Keep it out of the artifact
    /// directory and out of any project. Default: [`default_key_file`]
    /// (`<user cache dir>/sluice/artifact.key`).
    pub fn artifact_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.artifact_key_file = Some(path.into());
        self
    }

    /// The largest component file [`Sandbox::load_file`] reads; a larger one is
    /// [`LoadError::TooLarge`], and nothing past the limit is read. (A file the artifact
    /// directory's index knows, unchanged since it was loaded, is not read at all.) Default:
    /// [`DEFAULT_MAX_COMPONENT_BYTES`] (256 MiB).
    pub fn max_component_bytes(mut self, bytes: u64) -> Self {
        self.max_component_bytes = bytes;
        self
    }

    /// How many task runs may execute at once; more wait for a slot. Each slot reserves address
    /// space (not memory) for its instances. Default: 128.
    pub fn max_concurrent_runs(mut self, n: u32) -> Self {
        self.max_concurrent_runs = n.max(1);
        self
    }

    /// The largest a single linear memory may grow, whatever a run's budget says. Default:
    /// 4 GiB (the most a 32-bit memory can address).
    pub fn max_memory_bytes(mut self, bytes: u64) -> Self {
        self.max_memory_bytes = bytes;
        self
    }

    /// The most core instances one component may create; a run's
    /// [`RunBudget::instances`] can only lower it. Default: 64.
    pub fn max_instances_per_component(mut self, n: u32) -> Self {
        self.max_instances_per_component = n.max(1);
        self
    }

    /// The most linear memories one component may define, over all its core modules (a module
    /// may define several: multi-memory). Default: 32.
    pub fn max_memories_per_component(mut self, n: u32) -> Self {
        self.max_memories_per_component = n;
        self
    }

    /// The most tables one component may define, over all its core modules. Default: 32.
    pub fn max_tables_per_component(mut self, n: u32) -> Self {
        self.max_tables_per_component = n;
        self
    }

    /// Linear memories shared by the runs in progress (each reserves address space, not
    /// memory: about 4 GiB of it). Never fewer than one component's maximum. Default: 1000.
    pub fn pool_memories(mut self, n: u32) -> Self {
        self.pool_memories = n;
        self
    }

    /// Tables shared by the runs in progress. Never fewer than one component's maximum.
    /// Default: 1000.
    pub fn pool_tables(mut self, n: u32) -> Self {
        self.pool_tables = n;
        self
    }

    /// The most elements a single table may hold, whatever a run's budget says (the budget's
    /// [`RunBudget::table_elements`] sums over a run's tables). Default: 100 000, the default
    /// table budget.
    pub fn max_table_elements(mut self, n: u64) -> Self {
        self.max_table_elements = n.max(1);
        self
    }

    /// The host's memory ceiling: the memory budgets of the runs in progress never add up to
    /// more; further runs wait until earlier ones finish. A run whose budget alone exceeds it
    /// is refused ([`Limit::HostMemory`]). Default: three quarters of the machine's physical
    /// memory (8 GiB where it cannot be read).
    pub fn memory_ceiling(mut self, bytes: u64) -> Self {
        self.memory_ceiling = Some(bytes);
        self
    }

    /// How often running guests are checked against their deadline and cancellation. Default:
    /// 5 ms.
    pub fn epoch_tick(mut self, tick: Duration) -> Self {
        self.epoch_tick = tick.max(Duration::from_micros(100));
        self
    }

    /// The clock used for log timestamps. Default: the system clock.
    pub fn clock(mut self, clock: ClockRef) -> Self {
        self.clock = clock;
        self
    }

    /// Where to report compiles: a [`LoadEvent::Compiling`] when a compile starts and a
    /// [`LoadEvent::Compiled`] (or [`LoadEvent::CompileFailed`]) when it ends, sent from the
    /// compiler thread. A closed receiver is ignored. Default: none.
    pub fn load_events(mut self, events: UnboundedSender<LoadEvent>) -> Self {
        self.load_events = Some(events);
        self
    }

    /// Start the sandbox: build the engine and start its epoch ticker.
    pub fn build(self) -> Result<Sandbox, LoadError> {
        let sandbox_err = |e: wasmtime::Error| LoadError::Sandbox(error_chain(&e));
        let n = self.max_concurrent_runs;
        let per = (
            self.max_instances_per_component,
            self.max_memories_per_component,
            self.max_tables_per_component,
        );
        let pool_memories = self.pool_memories.max(per.1).max(1);
        let pool_tables = self.pool_tables.max(per.2).max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            // Core instances cost no memory in the pool (only a count): every slot gets the
            // maximum one component may create.
            .total_core_instances(n.saturating_mul(per.0))
            .max_core_instances_per_component(per.0)
            .total_memories(pool_memories)
            .max_memories_per_component(per.1)
            .max_memories_per_module(per.1.max(1))
            .total_tables(pool_tables)
            .max_tables_per_component(per.2)
            .max_tables_per_module(per.2.max(1))
            .table_elements(usize::try_from(self.max_table_elements).unwrap_or(usize::MAX))
            // One async stack per run slot.
            .total_stacks(n)
            .max_memory_size(usize::try_from(self.max_memory_bytes).unwrap_or(usize::MAX))
            .linear_memory_keep_resident(KEEP_RESIDENT)
            .table_keep_resident(16 << 10)
            .pagemap_scan(wasmtime::Enabled::Auto);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .consume_fuel(true)
            .epoch_interruption(true)
            .wasm_component_model(true)
            .wasm_multi_memory(true)
            .wasm_backtrace_max_frames(NonZeroUsize::new(BACKTRACE_FRAMES));
        let engine = Engine::new(&config).map_err(sandbox_err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(sandbox_err)?;
        // Name lookups only of the names a run's TCP grants allow: Sluice's `ip-name-lookup`
        // replaces wasmtime-wasi's.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::add_to_linker::<
            RunState,
            super::sockets::GrantedLookup,
        >(&mut linker, RunState::lookup_view)
        .map_err(sandbox_err)?;
        linker.allow_shadowing(false);
        // `wasi:http` for every component; each request is checked against the run's grants.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).map_err(sandbox_err)?;
        bindings::Task::add_to_linker::<_, wasmtime::component::HasSelf<RunState>>(
            &mut linker,
            |s| s,
        )
        .map_err(sandbox_err)?;
        // Linked for every component, answered only for a flow body (others have no
        // orchestrator and trap when they call it).
        bindings::flow::sluice::task::orchestrate::add_to_linker::<
            _,
            wasmtime::component::HasSelf<RunState>,
        >(&mut linker, |s| s)
        .map_err(sandbox_err)?;

        // Before the ticker starts, so a refused directory leaves no thread behind.
        let (artifacts, index) = match self.artifact_dir {
            None => (None, None),
            Some(dir) => {
                let key_file = self
                    .artifact_key_file
                    .or_else(default_key_file)
                    .ok_or_else(|| ArtifactDirError {
                        path: dir.clone(),
                        detail: "there is no per-user cache directory for the key that \
                                 authenticates artifacts: set XDG_CACHE_HOME or HOME"
                            .into(),
                    })?;
                let store = ArtifactStore::open(dir, &key_file, &engine)?;
                let index = FileIndex::new(store.dir(), store.key());
                (Some(store), Some(index))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        let tick = self.epoch_tick;
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| LoadError::Sandbox(format!("cannot start the epoch ticker: {e}")))?;

        let ceiling = self
            .memory_ceiling
            .unwrap_or_else(admission::default_memory_ceiling);
        Ok(Sandbox(Arc::new(Inner {
            engine,
            linker,
            artifacts,
            index,
            load_events: self.load_events,
            max_component_bytes: self.max_component_bytes,
            components: Mutex::default(),
            admission: Admission::new(n, pool_memories, pool_tables, ceiling),
            max_needs: Needs {
                memories: per.1,
                tables: per.2,
            },
            clock: self.clock,
            stop,
            epoch_tick: tick,
        })))
    }
}
