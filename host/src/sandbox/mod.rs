//! The sandbox: the only part of Sluice that touches wasmtime. It owns the engine (pooling
//! allocator, fuel, epoch interruption), turns component bytes into ready-to-instantiate
//! [`TaskComponent`]s (compiling each distinct component once, ever, through the on-disk store of
//! precompiled artifacts), and runs one task run in a fresh store and instance under a
//! [`RunBudget`], returning a plain [`RunOutcome`]. The rest of the host sees only these plain
//! types.
//!
//! Loading a file is fast when it has been loaded before: the artifact directory keeps an index
//! from each file's identity (path, inode, size, times) to its digest, so a warm
//! [`Sandbox::load_file`] maps the precompiled artifact without reading or hashing the file (see
//! `file_index.rs` for what the index trusts, and its residual risk). The host can watch
//! compiles, which take seconds for large components, through [`SandboxBuilder::load_events`].
//!
//! Guests get no ambient authority: stdin is closed, there are no environment variables,
//! arguments, preopened directories or sockets; stdout and stderr are captured into the run's
//! bounded log buffer.

mod admission;
mod artifacts;
mod bindings;
mod budget;
mod capture;
mod file_index;
mod limiter;
mod outcome;

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{Notify, OnceCell};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap,
    UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use self::admission::{Admission, Admitted, Needs};
use self::artifacts::ArtifactStore;
pub use self::artifacts::{
    ArtifactDirError, default_artifact_dir, default_key_file, user_cache_dir,
};
use self::bindings::handler::HandlerPre;
use self::bindings::{TaskPre, WitSignal, WitState, WitStateType};
pub use self::budget::RunBudget;
use self::capture::{Capture, LogSink, SharedSink};
use self::file_index::{FileIdentity, FileIndex};
use self::limiter::Limiter;
pub use self::outcome::{
    Ending, Limit, LimitExceeded, LogLevel, LogRecord, LogSource, RunOutcome, Signal, TimeLimit,
    Usage,
};
use crate::clock::{ClockRef, SystemClock};
use crate::context::TaskContext;
use crate::state::{State, StateName, StateType};

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not a WebAssembly component.
    #[error("`{name}` is not a WebAssembly component: {reason}")]
    NotAComponent {
        /// The component's name (its path, usually).
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The component is malformed or could not be compiled.
    #[error("`{name}` could not be compiled: {detail}")]
    Compile {
        /// The component's name.
        name: String,
        /// The compiler's error.
        detail: String,
    },
    /// The component is valid but is not a Sluice task: it does not export `run` with the
    /// contract's type, or imports something the host does not provide.
    #[error("`{name}` cannot run as a Sluice task: {detail}")]
    Incompatible {
        /// The component's name.
        name: String,
        /// What does not match.
        detail: String,
    },
    /// The component compiled but can never run in this sandbox: it has more core instances,
    /// memories or tables than one component may have, or a memory or table larger than the
    /// sandbox allows (see [`SandboxBuilder`]). Its artifact is kept, so it is not compiled again.
    #[error("`{name}` exceeds a limit of the sandbox: {detail}")]
    ExceedsSandbox {
        /// The component's name.
        name: String,
        /// Which limit, and by how much (wasmtime's words).
        detail: String,
    },
    /// The precompiled artifact could not be written.
    #[error("cannot write the precompiled component to `{path}`: {source}")]
    Store {
        /// The artifact directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file (a directory, a device, a pipe…): components are read
    /// only from regular files.
    #[error("`{path}` is not a component file: it is {what}")]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        what: &'static str,
    },
    /// The file is larger than [`SandboxBuilder::max_component_bytes`]; nothing past the limit
    /// was read.
    #[error(
        "`{path}` is larger than the component size limit of {limit} bytes ({}); raise the \
         limit (`--max-component-size`) if it really is a component",
        bytesize::ByteSize(*limit).display().iec()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit, in bytes.
        limit: u64,
    },
    /// The artifact directory, or the key that authenticates its artifacts, cannot be used
    /// (not the user's, writable by others, unreadable).
    #[error(transparent)]
    Artifacts(#[from] ArtifactDirError),
    /// The sandbox itself failed.
    #[error("the sandbox failed: {0}")]
    Sandbox(String),
}

impl LoadError {
    /// Whether trying again might succeed (an I/O problem), as opposed to a problem with the
    /// component itself.
    pub fn is_retriable(&self) -> bool {
        matches!(self, LoadError::Read { .. } | LoadError::Store { .. })
    }
}

/// How a component became ready in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    /// Compiled with Cranelift (and stored, when the sandbox has an artifact directory).
    Compiled,
    /// Loaded from the artifact directory without compiling, found by hashing the component's
    /// bytes.
    Precompiled,
    /// Loaded from the artifact directory without compiling, found through the artifact
    /// directory's file index: the component's file was neither read nor hashed
    /// ([`Sandbox::load_file`] and [`Sandbox::load_handler_file`] only).
    Indexed,
}

/// What the sandbox reports about loading components, to a channel given to
/// [`SandboxBuilder::load_events`]. Only compiles are reported (loading a precompiled artifact
/// takes milliseconds). Every `Compiling` is followed by exactly one `Compiled` or
/// `CompileFailed` with the same name; compiles of different components may interleave.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoadEvent {
    /// A compile started.
    Compiling {
        /// The component's name, as in [`LoadError`] and [`TaskComponent::name`] (its path,
        /// usually).
        name: String,
        /// The size of the component binary being compiled.
        bytes: u64,
    },
    /// The compile finished, and the artifact is stored when there is an artifact directory.
    Compiled {
        /// The component's name.
        name: String,
        /// The size of the component binary.
        bytes: u64,
        /// Time since `Compiling`: compiling and storing the artifact.
        elapsed: Duration,
    },
    /// The compile (or storing the artifact) failed; the load returns the error.
    CompileFailed {
        /// The component's name.
        name: String,
        /// The size of the component binary.
        bytes: u64,
        /// Time since `Compiling`.
        elapsed: Duration,
    },
}

/// How a component was loaded and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadInfo {
    /// Compiled or precompiled.
    pub source: LoadSource,
    /// Time to compile or load it, and link it.
    pub duration: Duration,
}

/// A component compiled and linked against the host, shared by every kind of component made
/// from the same bytes.
struct Prepared {
    name: String,
    digest: blake3::Hash,
    pre: InstancePre<RunState>,
    /// What one run takes from the pool.
    needs: Needs,
    load: LoadInfo,
}

/// A task component ready to run: compiled, linked against the host, and checked against the
/// `task` world. Cheap to clone.
#[derive(Clone)]
pub struct TaskComponent(Arc<(Arc<Prepared>, TaskPre<RunState>)>);

/// A state-handler component ready to run, checked against the `handler` world. Cheap to clone.
#[derive(Clone)]
pub struct HandlerComponent(Arc<(Arc<Prepared>, HandlerPre<RunState>)>);

macro_rules! component_accessors {
    ($ty:ident) => {
        impl $ty {
            /// The name it was loaded under (its path, usually).
            pub fn name(&self) -> &str {
                &self.0.0.name
            }

            /// blake3 of the component's bytes, in hex.
            pub fn digest(&self) -> String {
                self.0.0.digest.to_hex().to_string()
            }

            /// How it was first loaded in this process.
            pub fn load_info(&self) -> LoadInfo {
                self.0.0.load
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    .field("name", &self.name())
                    .field("digest", &self.digest())
                    .field("load", &self.load_info())
                    .finish()
            }
        }
    };
}

component_accessors!(TaskComponent);
component_accessors!(HandlerComponent);

/// What a state handler decided, with its logs.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerOutcome {
    /// A replacement state, none to keep the new state, or why the handler failed.
    pub result: Result<Option<State>, String>,
    /// The handler's logs.
    pub logs: Vec<LogRecord>,
}

/// A signal to stop a running task. Cloning shares the signal.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    /// A token that has not been cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel: running guests are interrupted within one epoch tick.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

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
        bindings::Task::add_to_linker::<_, wasmtime::component::HasSelf<RunState>>(
            &mut linker,
            |s| s,
        )
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
        })))
    }
}

/// Runs task components. Cheap to clone; clones share the engine, the loaded components and the
/// run slots.
#[derive(Clone)]
pub struct Sandbox(Arc<Inner>);

type ComponentCell = Arc<OnceCell<Arc<Prepared>>>;

struct Inner {
    engine: Engine,
    linker: Linker<RunState>,
    artifacts: Option<ArtifactStore>,
    /// File identity → digest, in the artifact directory.
    index: Option<FileIndex>,
    load_events: Option<UnboundedSender<LoadEvent>>,
    /// The largest component file read.
    max_component_bytes: u64,
    /// Every component loaded in this process, by digest, so the same bytes are prepared once.
    components: Mutex<HashMap<blake3::Hash, ComponentCell>>,
    admission: Admission,
    /// The most one component may take from the pool.
    max_needs: Needs,
    clock: ClockRef,
    stop: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("artifact_dir", &self.artifact_dir())
            .finish_non_exhaustive()
    }
}

/// Per-run state inside the wasmtime store.
pub(crate) struct RunState {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    logs: SharedSink,
    ctx: TaskContext,
    host_call_bytes: u64,
    host_call_violation: Option<LimitExceeded>,
    interrupted: Option<Interruption>,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Interruption {
    Deadline,
    Cancelled,
    /// Never admitted: the run's budget can never fit the host.
    Refused(LimitExceeded),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Instantiate,
    Call,
}

impl Sandbox {
    /// A sandbox with the default settings.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// The host's memory ceiling in bytes (see [`SandboxBuilder::memory_ceiling`]).
    pub fn memory_ceiling(&self) -> u64 {
        self.0.admission.ceiling_bytes()
    }

    /// The directory of precompiled artifacts, if any.
    pub fn artifact_dir(&self) -> Option<&Path> {
        self.0.artifacts.as_ref().map(ArtifactStore::dir)
    }

    /// Load the component in the file at `path` (binary, or WebAssembly text). With an artifact
    /// directory, a file loaded before and unchanged since is not read: the directory's file
    /// index gives its digest, and the precompiled artifact is mapped ([`LoadSource::Indexed`]).
    pub async fn load_file(&self, path: &Path) -> Result<TaskComponent, LoadError> {
        let prepared = self.prepared_file(path).await?;
        self.task_component(prepared)
    }

    /// Load a task component from its bytes (binary, or WebAssembly text). The same bytes are
    /// prepared once per process and compiled once per artifact directory; compiling happens on
    /// a blocking thread, off the async runtime.
    pub async fn load_bytes(&self, name: &str, bytes: Vec<u8>) -> Result<TaskComponent, LoadError> {
        let prepared = self.prepared(name, bytes).await?;
        self.task_component(prepared)
    }

    fn task_component(&self, prepared: Arc<Prepared>) -> Result<TaskComponent, LoadError> {
        let pre = TaskPre::new(prepared.pre.clone()).map_err(|e| LoadError::Incompatible {
            name: prepared.name.clone(),
            detail: format!(
                "it must export `run: func(input: string) -> result<string, signal>` \
                 (world `sluice:task/task@0.1.0`): {}",
                error_chain(&e)
            ),
        })?;
        Ok(TaskComponent(Arc::new((prepared, pre))))
    }

    /// Load the state-handler component in the file at `path` (as [`load_file`](Self::load_file)
    /// does).
    pub async fn load_handler_file(&self, path: &Path) -> Result<HandlerComponent, LoadError> {
        let prepared = self.prepared_file(path).await?;
        let pre = HandlerPre::new(prepared.pre.clone()).map_err(|e| LoadError::Incompatible {
            name: prepared.name.clone(),
            detail: format!(
                "a state handler must export `handle: func(task: string, old: state, new: state) \
                 -> option<state>` (world `sluice:task/handler@0.1.0`): {}",
                error_chain(&e)
            ),
        })?;
        Ok(HandlerComponent(Arc::new((prepared, pre))))
    }

    /// The prepared component in the file at `path`: through the file index when it knows the
    /// file as it is now and its artifact loads, otherwise by reading and hashing the file (and
    /// then recording it in the index).
    async fn prepared_file(&self, path: &Path) -> Result<Arc<Prepared>, LoadError> {
        let name = path.display().to_string();
        if self.0.index.is_none() {
            return self
                .prepared(&name, read(path, self.0.max_component_bytes).await?.bytes)
                .await;
        }
        let this = self.clone();
        let owned = path.to_owned();
        let indexed = tokio::task::spawn_blocking(move || {
            let index = this.0.index.as_ref()?;
            index.lookup(&FileIdentity::of_path(&owned)?)
        })
        .await
        .ok()
        .flatten();
        if let Some(digest) = indexed {
            match self.prepared_from_artifact(&name, digest).await {
                Ok(prepared) => return Ok(prepared),
                Err(IndexedLoad::Failed(e)) => return Err(e),
                Err(IndexedLoad::Miss) => {}
            }
        }
        let file = read(path, self.0.max_component_bytes).await?;
        let prepared = self.prepared(&name, file.bytes).await?;
        if let Some(identity) = file.identity {
            // Best effort, and off the async runtime: a failure is a miss next time.
            let this = self.clone();
            let digest = prepared.digest;
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(index) = &this.0.index {
                    index.record(&identity, &digest);
                }
            })
            .await;
        }
        Ok(prepared)
    }

    /// The prepared component for `digest`, shared in this process, or loaded from its artifact
    /// without the component's bytes. A missing or unusable artifact is a miss.
    async fn prepared_from_artifact(
        &self,
        name: &str,
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, IndexedLoad> {
        let cell = self.cell(digest);
        cell.get_or_try_init(|| {
            let this = self.clone();
            let name = name.to_owned();
            async move {
                tokio::task::spawn_blocking(move || this.prepare_indexed(name, digest))
                    .await
                    .map_err(|e| {
                        IndexedLoad::Failed(LoadError::Sandbox(format!(
                            "the loader thread failed: {e}"
                        )))
                    })?
            }
        })
        .await
        .cloned()
    }

    fn cell(&self, digest: blake3::Hash) -> ComponentCell {
        let mut map = self.0.components.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(digest).or_default().clone()
    }

    async fn prepared(&self, name: &str, bytes: Vec<u8>) -> Result<Arc<Prepared>, LoadError> {
        let bytes = component_binary(name, bytes)?;
        let digest = blake3::hash(&bytes);
        let cell = self.cell(digest);
        cell.get_or_try_init(|| {
            let this = self.clone();
            let name = name.to_owned();
            async move {
                tokio::task::spawn_blocking(move || this.prepare(name, &bytes, digest))
                    .await
                    .map_err(|e| LoadError::Sandbox(format!("the compiler thread failed: {e}")))?
            }
        })
        .await
        .cloned()
    }

    /// Load the artifact for `digest` and link it; no artifact (or an unusable one, which the
    /// store removes) is a miss.
    fn prepare_indexed(
        &self,
        name: String,
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, IndexedLoad> {
        let started = Instant::now();
        let store = self.0.artifacts.as_ref().ok_or(IndexedLoad::Miss)?;
        let component = store
            .load(&self.0.engine, &digest, unfit_for_pool)
            .map_err(|e| IndexedLoad::Failed(exceeds_sandbox(&name, &e)))?
            .ok_or(IndexedLoad::Miss)?;
        self.link(name, digest, &component, LoadSource::Indexed, started)
            .map_err(IndexedLoad::Failed)
    }

    fn prepare(
        &self,
        name: String,
        bytes: &[u8],
        digest: blake3::Hash,
    ) -> Result<Arc<Prepared>, LoadError> {
        let started = Instant::now();
        let engine = &self.0.engine;
        let load_err = |e: wasmtime::Error| match unfit_for_pool(&e) {
            true => exceeds_sandbox(&name, &e),
            false => LoadError::Compile {
                name: name.clone(),
                detail: error_chain(&e),
            },
        };
        let (component, source) = match &self.0.artifacts {
            None => (
                self.compile(&name, bytes.len() as u64, || {
                    Component::new(engine, bytes).map_err(load_err)
                })?,
                LoadSource::Compiled,
            ),
            Some(store) => match store.load(engine, &digest, unfit_for_pool) {
                Err(e) => return Err(exceeds_sandbox(&name, &e)),
                Ok(Some(c)) => (c, LoadSource::Precompiled),
                Ok(None) => {
                    let c = self.compile(&name, bytes.len() as u64, || {
                        let artifact = engine.precompile_component(bytes).map_err(load_err)?;
                        // Stored even when the component turns out not to fit the pool: the
                        // next load refuses it from the artifact, without compiling again.
                        let path =
                            store
                                .store(&digest, &artifact)
                                .map_err(|source| LoadError::Store {
                                    path: store.dir().to_owned(),
                                    source,
                                })?;
                        store
                            .load(engine, &digest, unfit_for_pool)
                            .map_err(|e| exceeds_sandbox(&name, &e))?
                            .ok_or_else(|| {
                                LoadError::Sandbox(format!(
                                    "the artifact just written to `{}` could not be loaded",
                                    path.display()
                                ))
                            })
                    })?;
                    (c, LoadSource::Compiled)
                }
            },
        };
        self.link(name, digest, &component, source, started)
    }

    /// Run `compile` on the component binary of `bytes` bytes, reporting it to the load events
    /// (its end even if the compiler panics).
    fn compile(
        &self,
        name: &str,
        bytes: u64,
        compile: impl FnOnce() -> Result<Component, LoadError>,
    ) -> Result<Component, LoadError> {
        tracing::info!(component = %name, bytes, "compiling");
        self.report(LoadEvent::Compiling {
            name: name.to_owned(),
            bytes,
        });
        let mut end = CompileEnd {
            sandbox: self,
            name,
            bytes,
            started: Instant::now(),
            ok: false,
        };
        let compiled = compile();
        end.ok = compiled.is_ok();
        compiled
    }

    fn report(&self, event: LoadEvent) {
        if let Some(events) = &self.0.load_events {
            // A receiver that has gone away is not the sandbox's problem.
            let _ = events.send(event);
        }
    }

    fn link(
        &self,
        name: String,
        digest: blake3::Hash,
        component: &Component,
        source: LoadSource,
        started: Instant,
    ) -> Result<Arc<Prepared>, LoadError> {
        let pre =
            self.0
                .linker
                .instantiate_pre(component)
                .map_err(|e| LoadError::Incompatible {
                    name: name.clone(),
                    detail: error_chain(&e),
                })?;
        // Known statically for every component whose core modules are its own (a task cannot
        // import core modules); otherwise reserve the most a component may have.
        let needs = component
            .resources_required()
            .map_or(self.0.max_needs, |r| Needs {
                memories: r.num_memories,
                tables: r.num_tables,
            });
        Ok(Arc::new(Prepared {
            name,
            digest,
            pre,
            needs,
            load: LoadInfo {
                source,
                duration: started.elapsed(),
            },
        }))
    }

    /// Run `component` once with `input`, in a fresh store and instance, under `budget`.
    /// Never fails: every problem, the host's included, is an [`Ending`].
    pub async fn run(
        &self,
        component: &TaskComponent,
        input: &serde_json::Value,
        ctx: &TaskContext,
        budget: &RunBudget,
        cancel: Option<&CancelToken>,
    ) -> RunOutcome {
        let input = input.to_string();
        let pre = &component.0.1;
        let ex = self
            .execute(
                ctx,
                budget,
                cancel,
                component.0.0.needs,
                async |store: &mut Store<RunState>| {
                    let task = pre
                        .instantiate_async(&mut *store)
                        .await
                        .map_err(|e| (Phase::Instantiate, e))?;
                    task.call_run(&mut *store, &input)
                        .await
                        .map_err(|e| (Phase::Call, e))
                },
            )
            .await;
        let ending = ex.ending(budget, |r| match r {
            Ok(output) => output_ending(output, budget),
            Err(signal) => signal_ending(signal, budget),
        });
        ex.finish(ending, budget)
    }

    /// Run a state handler on the transition `old` → `new` of `task`, in a fresh sandbox under
    /// `budget`. A handler that fails, or returns something invalid, is reported in the
    /// outcome; it never fails the caller.
    pub async fn run_handler(
        &self,
        handler: &HandlerComponent,
        task: &str,
        old: &State,
        new: &State,
        ctx: &TaskContext,
        budget: &RunBudget,
    ) -> HandlerOutcome {
        let (old_w, new_w) = (wit_state(old), wit_state(new));
        let pre = &handler.0.1;
        let task_name = task.to_owned();
        let ex = self
            .execute(
                ctx,
                budget,
                None,
                handler.0.0.needs,
                async |store: &mut Store<RunState>| {
                    let h = pre
                        .instantiate_async(&mut *store)
                        .await
                        .map_err(|e| (Phase::Instantiate, e))?;
                    h.call_handle(&mut *store, &task_name, &old_w, &new_w)
                        .await
                        .map_err(|e| (Phase::Call, e))
                },
            )
            .await;
        let mut decided = None;
        let ending = ex.ending(budget, |r| {
            decided = Some(r);
            Ending::Output(serde_json::Value::Null)
        });
        let now = self.0.clock.now();
        let outcome = ex.finish(ending, budget);
        let result = match (decided, &outcome.ending) {
            (Some(None), _) => Ok(None),
            (Some(Some(w)), _) => from_wit_state(w, now),
            (None, ending) => Err(describe(ending)),
        };
        HandlerOutcome {
            result,
            logs: outcome.logs,
        }
    }

    /// Run `call` in a fresh store under `budget`, stopping it at the deadline or on cancel.
    /// The run first waits to be admitted (its slot, the memories and tables of a component
    /// that `needs` them, its memory budget under the host's ceiling); the deadline counts from
    /// admission, a cancel stops the wait too.
    async fn execute<R>(
        &self,
        ctx: &TaskContext,
        budget: &RunBudget,
        cancel: Option<&CancelToken>,
        needs: Needs,
        call: impl AsyncFnOnce(&mut Store<RunState>) -> Result<R, (Phase, wasmtime::Error)>,
    ) -> Execution<R> {
        let admitted = tokio::select! {
            biased;
            () = cancelled(cancel) => Err(Interruption::Cancelled),
            a = self.0.admission.admit(needs, budget.memory_bytes) => a.map_err(Interruption::Refused),
        };
        let started = Instant::now();
        // A deadline too far away to represent is as good as none: about a century.
        let deadline = started
            .checked_add(budget.timeout)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
        let sink: SharedSink = Arc::new(Mutex::new(LogSink::new(
            budget.log_bytes,
            self.0.clock.clone(),
        )));
        let mut store = self.new_store(ctx, budget, &sink, deadline, cancel);
        let (result, admitted) = match admitted {
            Err(why) => (Err(why), None),
            Ok(admitted) => {
                let call = call(&mut store);
                let result = tokio::select! {
                    biased;
                    r = call => Ok(r),
                    () = tokio::time::sleep_until(deadline.into()) => Err(Interruption::Deadline),
                    () = cancelled(cancel) => Err(Interruption::Cancelled),
                };
                (result, Some(admitted))
            }
        };
        Execution {
            result,
            duration: started.elapsed(),
            store,
            sink,
            admitted,
        }
    }

    fn new_store(
        &self,
        ctx: &TaskContext,
        budget: &RunBudget,
        sink: &SharedSink,
        deadline: Instant,
        cancel: Option<&CancelToken>,
    ) -> Store<RunState> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(Capture::new(
            sink.clone(),
            LogSource::Stdout,
            budget.host_call_bytes,
        ))
        .stderr(Capture::new(
            sink.clone(),
            LogSource::Stderr,
            budget.host_call_bytes,
        ))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        // Random bytes are made in host memory before they are copied in: one call gets at most
        // what any other host call may carry.
        .max_random_size(budget.host_call_bytes);
        let state = RunState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter::new(budget.memory_bytes, budget.table_elements, budget.instances),
            logs: sink.clone(),
            ctx: ctx.clone(),
            host_call_bytes: budget.host_call_bytes,
            host_call_violation: None,
            interrupted: None,
        };
        let mut store = Store::new(&self.0.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Fuel is always enabled in the engine; "unlimited" is the largest amount.
        if let Err(e) = store.set_fuel(budget.fuel.unwrap_or(u64::MAX)) {
            tracing::error!("cannot set fuel: {e}");
        }
        // Compiled code keeps a function's fuel in a register and writes it back only at calls,
        // returns and fuel checks, not before an epoch interruption: a loop stopped by its
        // deadline or a cancel would report only the fuel used before it started. Refuelling
        // every `FUEL_FLUSH` units writes it back, so usage is exact to within that.
        if let Err(e) = store.fuel_async_yield_interval(Some(FUEL_FLUSH)) {
            tracing::error!("cannot set the fuel yield interval: {e}");
        }
        // Caps every transfer from guest to host (the output, a log line, one write) before the
        // host allocates it; the finer per-kind limits are checked after.
        let transfer = budget.output_bytes.max(budget.host_call_bytes);
        store.set_hostcall_fuel(usize::try_from(transfer).unwrap_or(usize::MAX));
        store.set_epoch_deadline(1);
        let cancel = cancel.cloned();
        store.epoch_deadline_callback(move |mut cx| {
            let why = if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
                Interruption::Cancelled
            } else if Instant::now() >= deadline {
                Interruption::Deadline
            } else {
                // Let other tasks on this thread run, then check again after the next tick.
                return Ok(UpdateDeadline::Yield(1));
            };
            cx.data_mut().interrupted = Some(why);
            Ok(UpdateDeadline::Interrupt)
        });
        store
    }
}

/// A finished (or stopped) call in its store.
struct Execution<R> {
    result: Result<Result<R, (Phase, wasmtime::Error)>, Interruption>,
    duration: Duration,
    store: Store<RunState>,
    sink: SharedSink,
    /// The run's reservation, given back only once the store (and every pool slot it holds)
    /// is dropped.
    admitted: Option<Admitted>,
}

impl<R> Execution<R> {
    /// How the run ended; `returned` maps what the guest returned.
    fn ending(&self, budget: &RunBudget, returned: impl FnOnce(R) -> Ending) -> Ending
    where
        R: Clone,
    {
        let log_sink = capture::lock(&self.sink);
        match &self.result {
            Err(Interruption::Deadline) => Ending::TimedOut(TimeLimit::Deadline(budget.timeout)),
            Err(Interruption::Cancelled) => Ending::Cancelled,
            Err(Interruption::Refused(l)) => Ending::LimitExceeded(*l),
            Ok(Ok(r)) => returned(r.clone()),
            Ok(Err((phase, e))) => error_ending(self.store.data(), &log_sink, *phase, e, budget),
        }
    }

    fn finish(self, ending: Ending, budget: &RunBudget) -> RunOutcome {
        let fuel = budget.fuel.unwrap_or(u64::MAX);
        let usage = Usage {
            fuel_consumed: fuel.saturating_sub(self.store.get_fuel().unwrap_or(0)),
            duration: self.duration,
            memory_peak_bytes: self.store.data().limiter.memory_peak,
        };
        // The store first: its instances, memories and tables go back to the pool before the
        // reservation that guaranteed them is released.
        drop(self.store);
        drop(self.admitted);
        let logs = capture::lock(&self.sink).finish();
        RunOutcome {
            ending,
            logs: logs.records,
            logs_dropped_bytes: logs.dropped_bytes,
            usage,
        }
    }
}

/// A sentence for an ending that is not a normal return.
fn describe(ending: &Ending) -> String {
    match ending {
        Ending::GuestFault { message } | Ending::HostFault { message } => message.clone(),
        Ending::LimitExceeded(l) => l.to_string(),
        Ending::TimedOut(t) => t.to_string(),
        Ending::Cancelled => "cancelled".into(),
        Ending::Output(_) | Ending::Signal(_) => "returned".into(),
    }
}

fn wit_state(s: &State) -> WitState {
    WitState {
        name: s.name.as_str().to_owned(),
        type_: match s.state_type() {
            StateType::Scheduled => WitStateType::Scheduled,
            StateType::Pending => WitStateType::Pending,
            StateType::Running => WitStateType::Running,
            StateType::Paused => WitStateType::Paused,
            StateType::Cancelling => WitStateType::Cancelling,
            StateType::Cancelled => WitStateType::Cancelled,
            StateType::Completed => WitStateType::Completed,
            StateType::Failed => WitStateType::Failed,
            StateType::Crashed => WitStateType::Crashed,
        },
        message: s.message.clone(),
        result: s.result.as_ref().map(|v| v.to_string()),
    }
}

/// A handler's returned state. Its type is implied by its name; a name Sluice does not know, or
/// a result that is not JSON, is an error.
fn from_wit_state(
    w: WitState,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<State>, String> {
    let name: StateName = w
        .name
        .parse()
        .map_err(|e| format!("the handler returned an invalid state: {e}"))?;
    let mut state = State::new(name, now);
    state.message = w.message;
    if let Some(r) = w.result {
        state.result = Some(
            serde_json::from_str(&r)
                .map_err(|e| format!("the handler returned a result that is not JSON: {e}"))?,
        );
    }
    Ok(Some(state))
}

async fn cancelled(cancel: Option<&CancelToken>) {
    match cancel {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Reports the end of a compile when dropped: `Compiled` if it succeeded, `CompileFailed`
/// otherwise (an error, or a panic unwinding through it).
struct CompileEnd<'a> {
    sandbox: &'a Sandbox,
    name: &'a str,
    bytes: u64,
    started: Instant,
    ok: bool,
}

impl Drop for CompileEnd<'_> {
    fn drop(&mut self) {
        let (name, bytes, elapsed) = (self.name.to_owned(), self.bytes, self.started.elapsed());
        self.sandbox.report(if self.ok {
            LoadEvent::Compiled {
                name,
                bytes,
                elapsed,
            }
        } else {
            LoadEvent::CompileFailed {
                name,
                bytes,
                elapsed,
            }
        });
    }
}

/// Why a load through the file index did not give a component.
enum IndexedLoad {
    /// No usable artifact: read and hash the file instead.
    Miss,
    /// The artifact loaded but the component cannot be used; reading the file would not help.
    Failed(LoadError),
}

/// A component file's bytes, and its identity when the file stayed the same while it was read
/// and had settled before (see `file_index.rs`): only then may the index record it.
struct FileBytes {
    bytes: Vec<u8>,
    identity: Option<FileIdentity>,
}

/// The default of [`SandboxBuilder::max_component_bytes`]: 256 MiB, ten times the largest
/// component Sluice has met (an interpreter-embedding Python task is about 40 MiB).
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// Read the component file at `path`: a regular file of at most `max_bytes` bytes (nothing past
/// the limit is read, so `/dev/zero` or a growing file cannot exhaust memory).
async fn read(path: &Path, max_bytes: u64) -> Result<FileBytes, LoadError> {
    let owned = path.to_owned();
    let io = |source: std::io::Error| LoadError::Read {
        path: path.to_owned(),
        source,
    };
    let not_a_file = |meta: &std::fs::Metadata| LoadError::NotAFile {
        path: path.to_owned(),
        what: file_kind(meta),
    };
    let too_large = || LoadError::TooLarge {
        path: path.to_owned(),
        limit: max_bytes,
    };
    let read = tokio::task::spawn_blocking(move || -> Result<_, std::io::Error> {
        let now = SystemTime::now();
        // Looked at before opening: opening a FIFO would wait for a writer.
        let meta = std::fs::metadata(&owned)?;
        if !meta.is_file() {
            return Ok(Err(meta));
        }
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::custom_flags(
            &mut options,
            rustix::fs::OFlags::NONBLOCK.bits().cast_signed(),
        );
        let file = options.open(&owned)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(Err(meta));
        }
        if meta.len() > max_bytes {
            return Ok(Ok(None));
        }
        let canonical = std::fs::canonicalize(&owned).ok();
        let before = canonical
            .clone()
            .and_then(|c| FileIdentity::of_file(c, &file));
        let capacity = before.as_ref().map_or(0, FileIdentity::len_hint);
        let mut bytes = Vec::with_capacity(capacity);
        // One byte past the limit tells a file that grew while being read.
        (&file)
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > max_bytes {
            return Ok(Ok(None));
        }
        let identity = before.filter(|before| {
            before.settled_at(now)
                && FileIdentity::of_file(before.path().to_owned(), &file).as_ref() == Some(before)
        });
        Ok(Ok(Some(FileBytes { bytes, identity })))
    });
    match read.await {
        Ok(Ok(Ok(Some(bytes)))) => Ok(bytes),
        Ok(Ok(Ok(None))) => Err(too_large()),
        Ok(Ok(Err(meta))) => Err(not_a_file(&meta)),
        Ok(Err(source)) => Err(io(source)),
        Err(e) => Err(LoadError::Sandbox(format!("the reader thread failed: {e}"))),
    }
}

/// What a path that is not a regular file is, for messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a named pipe";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Check the component-model header, converting WebAssembly text first.
fn component_binary(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>, LoadError> {
    let not_a_component = |reason: String| LoadError::NotAComponent {
        name: name.to_owned(),
        reason,
    };
    if let Some(rest) = bytes.strip_prefix(b"\0asm") {
        return match rest.get(..4) {
            Some([0x0d, 0x00, 0x01, 0x00]) => Ok(bytes),
            Some([0x01, 0x00, 0x00, 0x00]) => Err(not_a_component(
                "it is a core WebAssembly module; Sluice runs components (build Rust tasks for \
                 `wasm32-wasip2`, or wrap a module with `wasm-tools component new`)"
                    .into(),
            )),
            _ => Err(not_a_component(
                "it has an unsupported WebAssembly version or layer".into(),
            )),
        };
    }
    let looks_like_text = std::str::from_utf8(&bytes).is_ok_and(|t| {
        let t = t.trim_start();
        t.starts_with('(') || t.starts_with(";;")
    });
    if looks_like_text {
        let binary =
            wat::parse_bytes(&bytes).map_err(|e| not_a_component(format!("invalid text: {e}")))?;
        return component_binary(name, binary.into_owned());
    }
    Err(not_a_component(
        "it does not start with the WebAssembly magic bytes `\\0asm`".into(),
    ))
}

fn output_ending(output: String, budget: &RunBudget) -> Ending {
    let len = output.len() as u64;
    if len > budget.output_bytes {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: budget.output_bytes,
            requested: Some(len),
        });
    }
    match serde_json::from_str(&output) {
        Ok(v) => Ending::Output(v),
        Err(e) => Ending::GuestFault {
            message: format!("the task's output is not valid JSON: {e}"),
        },
    }
}

fn signal_ending(signal: WitSignal, budget: &RunBudget) -> Ending {
    let len = match &signal {
        WitSignal::Fail(m) | WitSignal::Skip(m) | WitSignal::Pause(m) => m.len(),
        WitSignal::Retry(r) => r.message.len(),
        WitSignal::Success(s) => s.message.len() + s.output.as_ref().map_or(0, String::len),
    } as u64;
    if len > budget.output_bytes {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: budget.output_bytes,
            requested: Some(len),
        });
    }
    Ending::Signal(match signal {
        WitSignal::Fail(message) => Signal::Fail { message },
        WitSignal::Retry(r) => Signal::Retry {
            message: r.message,
            delay: r.delay_ms.map(Duration::from_millis),
        },
        WitSignal::Skip(message) => Signal::Skip { message },
        WitSignal::Pause(message) => Signal::Pause { message },
        WitSignal::Success(s) => {
            let output = match s.output.as_deref().map(serde_json::from_str).transpose() {
                Ok(v) => v.unwrap_or(serde_json::Value::Null),
                Err(e) => {
                    return Ending::GuestFault {
                        message: format!("the SUCCESS signal's output is not valid JSON: {e}"),
                    };
                }
            };
            Signal::Success {
                output,
                message: s.message,
            }
        }
    })
}

/// The marker of wasmtime's error when a guest hands the host more than the hostcall fuel.
const TRANSFER_TOO_LARGE: &str = "too much data is being copied between the host and the guest";
/// How often (in fuel units) a running guest's fuel count is written back to its store, and the
/// guest yields to other tasks: the accuracy of the fuel a stopped run reports.
const FUEL_FLUSH: u64 = 1_000_000;

/// Bytes of each linear memory kept resident when its slot is freed. With the kernel's
/// `PAGEMAP_SCAN` (Linux 6.7+) only the pages the run dirtied are reset, with `memset`, instead
/// of `madvise`: the next run in the slot takes no page faults, and no TLB shootdown interrupts
/// the other cores (the cost that dominated a run on a busy multi-core host). Without the ioctl,
/// this many low bytes are `memset`.
const KEEP_RESIDENT: usize = 64 << 10;
/// How wasmtime's backtrace context starts when displayed.
const BACKTRACE_CONTEXT: &str = "error while executing at wasm backtrace:";
/// How many guest stack frames wasmtime captures, and a trap message shows.
const BACKTRACE_FRAMES: usize = 24;
/// How many of the guest's last stderr lines a trap message shows.
const STDERR_LINES: usize = 8;

fn error_ending(
    state: &RunState,
    logs: &LogSink,
    phase: Phase,
    err: &wasmtime::Error,
    budget: &RunBudget,
) -> Ending {
    match state.interrupted {
        Some(Interruption::Cancelled) => return Ending::Cancelled,
        Some(Interruption::Deadline) => {
            return Ending::TimedOut(TimeLimit::Deadline(budget.timeout));
        }
        Some(Interruption::Refused(l)) => return Ending::LimitExceeded(l),
        None => {}
    }
    let trap = err.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return Ending::TimedOut(TimeLimit::Fuel(budget.fuel.unwrap_or(u64::MAX)));
    }
    if let Some(v) = state
        .limiter
        .violation
        .or(state.host_call_violation)
        .or(logs.violation)
    {
        return Ending::LimitExceeded(v);
    }
    let chain = error_chain(err);
    if chain.contains(TRANSFER_TOO_LARGE) {
        // A transfer during execution carries the guest's backtrace; the output is lifted after
        // the guest returned, with no guest frames left.
        let (limit, max) = if err.downcast_ref::<WasmBacktrace>().is_some() {
            (Limit::HostCallBytes, budget.host_call_bytes)
        } else {
            (Limit::OutputBytes, budget.output_bytes)
        };
        return Ending::LimitExceeded(LimitExceeded {
            limit,
            max,
            requested: None,
        });
    }
    if let Some(requested) = random_request(&chain) {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::HostCallBytes,
            max: budget.host_call_bytes,
            requested: Some(requested),
        });
    }
    if phase == Phase::Instantiate && trap.is_none() {
        if chain.contains("instance count too high") {
            return Ending::LimitExceeded(LimitExceeded {
                limit: Limit::Instances,
                max: u64::from(budget.instances),
                requested: None,
            });
        }
        return Ending::HostFault {
            message: format!("cannot instantiate the component: {chain}"),
        };
    }
    let stderr = logs.stderr_tail(STDERR_LINES);
    let mut message = match (trap, panic_message(&stderr)) {
        (_, Some(panic)) => format!("the task panicked{panic}"),
        (Some(Trap::StackOverflow), _) => {
            "stack overflow: the guest exhausted its call stack".into()
        }
        (Some(Trap::MemoryOutOfBounds), _) if let Some(f) = deep_recursion(err) => format!(
            "stack overflow: `{f}` recursed until the guest's stack in linear memory ran out \
             (trap: {})",
            Trap::MemoryOutOfBounds
        ),
        // The guest's own code trapped before `run` was called: a start function, or a data or
        // element segment out of bounds. Its fault, like any trap.
        (Some(t), _) if phase == Phase::Instantiate => {
            format!(
                "the component trapped while it was instantiated (its start function or segments): {t}"
            )
        }
        (Some(t), _) => format!("the guest trapped: {t}"),
        (None, _) => format!("the guest failed: {chain}"),
    };
    let stderr: Vec<&String> = stderr.iter().filter(|l| !l.trim().is_empty()).collect();
    if !stderr.is_empty() {
        message.push_str("\nstderr:");
        for line in stderr {
            message.push_str("\n  ");
            message.push_str(line);
        }
    }
    if let Some(bt) = err.downcast_ref::<WasmBacktrace>() {
        message.push_str("\nguest backtrace:");
        push_backtrace(&mut message, bt);
    }
    Ending::GuestFault { message }
}

/// The function, when the trap's backtrace is one function calling itself over and over: the
/// signature of a shadow-stack overflow (compilers keep large frames in linear memory, below
/// the data, so overflowing them is an out-of-bounds access rather than a call-stack trap).
fn deep_recursion(err: &wasmtime::Error) -> Option<String> {
    let frames = err.downcast_ref::<WasmBacktrace>()?.frames();
    let first = frames.first()?;
    let recursive = frames.len() >= BACKTRACE_FRAMES
        && frames.iter().all(|f| f.func_index() == first.func_index());
    recursive.then(|| frame_name(first))
}

fn frame_name(frame: &wasmtime::FrameInfo) -> String {
    frame.func_name().map_or_else(
        || format!("<function {}>", frame.func_index()),
        |n| format!("{:#}", rustc_demangle::demangle(n)),
    )
}

/// The panic in a Rust guest's stderr (` at <location>: <message>`), if there is one.
fn panic_message(stderr: &[String]) -> Option<String> {
    let start = stderr.iter().rposition(|l| l.contains(" panicked at "))?;
    let location = stderr[start]
        .split_once(" panicked at ")
        .map_or("", |(_, loc)| loc.trim_end_matches(':'));
    let text: Vec<&str> = stderr[start + 1..]
        .iter()
        .map(String::as_str)
        .take_while(|l| !l.starts_with("note: "))
        .collect();
    Some(format!(" at {location}: {}", text.join("\n")))
}

fn push_backtrace(out: &mut String, bt: &WasmBacktrace) {
    for (i, frame) in bt.frames().iter().enumerate() {
        let module = frame.module().name().unwrap_or("<module>");
        out.push_str(&format!("\n  {i:>3}: {module}!{}", frame_name(frame)));
    }
}

/// The size of a `wasi:random` request that wasmtime-wasi refused for exceeding
/// `max_random_size` (the run's host-call limit), from its error text.
fn random_request(chain: &str) -> Option<u64> {
    let (_, rest) = chain.split_once("requested len ")?;
    let (n, _) = rest.split_once(" exceeds limit ")?;
    n.parse().ok()
}

/// Whether loading failed because the component does not fit the pooling allocator's
/// per-component or per-module limits (wasmtime's `validate_component` and `validate_module`
/// errors all say so), as opposed to an unusable artifact or a compile error.
fn unfit_for_pool(e: &wasmtime::Error) -> bool {
    error_chain(e).contains("pooling allocator")
}

fn exceeds_sandbox(name: &str, e: &wasmtime::Error) -> LoadError {
    LoadError::ExceedsSandbox {
        name: name.to_owned(),
        detail: error_chain(e),
    }
}

/// An error and its causes, joined with `: `. The guest backtrace that wasmtime attaches as
/// context is left out (messages show it separately, after the reason).
fn error_chain(e: &wasmtime::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) || text.starts_with(BACKTRACE_CONTEXT) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked_before_compiling() {
        let err = |bytes: &[u8]| {
            component_binary("x.wasm", bytes.to_vec())
                .expect_err("not a component")
                .to_string()
        };
        assert!(err(b"\0asm\x01\0\0\0").contains("core WebAssembly module"));
        assert!(err(b"\0asm\x02\0\0\0").contains("unsupported WebAssembly version"));
        assert!(err(&[0xde, 0xad, 0xbe, 0xef]).contains("magic bytes"));
        assert!(err(b"(module").contains("invalid text"));
        assert!(err(b"(module)").contains("core WebAssembly module"));
        assert!(component_binary("c.wat", b"(component)".to_vec()).is_ok());
    }

    #[test]
    fn outputs_are_checked_for_size_and_json() {
        let budget = RunBudget {
            output_bytes: 4,
            ..RunBudget::default()
        };
        assert_eq!(
            output_ending("[1]".into(), &budget),
            Ending::Output(serde_json::json!([1]))
        );
        assert!(matches!(
            output_ending("[1,2]".into(), &budget),
            Ending::LimitExceeded(LimitExceeded {
                limit: Limit::OutputBytes,
                max: 4,
                requested: Some(5)
            })
        ));
        assert!(matches!(
            output_ending("nope".into(), &budget),
            Ending::GuestFault { .. }
        ));
    }
}
