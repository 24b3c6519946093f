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
//! arguments, preopened directories or sockets beyond a run's [`RunGrants`]; stdout and stderr
//! are captured into the run's bounded log buffer.
//!
//! The parts: `builder.rs` (settings and building the engine), `loading.rs` (what loading
//! reports), `component.rs` (preparing components), `component_file.rs` (reading component
//! files), `run.rs` (one run in a fresh store), `grants.rs` (what a run is granted, and the
//! redaction of its secrets), `http.rs` (its outbound HTTP), `sockets.rs` (its outbound TCP and
//! name lookups), `ending.rs` (classifying how a run
//! ended).

mod admission;
mod artifacts;
mod bindings;
mod budget;
mod builder;
mod capture;
mod component;
mod component_file;
mod ending;
mod file_index;
mod flow_body;
mod grants;
mod http;
mod limiter;
mod loading;
mod outcome;
mod pacing;
mod run;
mod sockets;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;
use tokio::sync::mpsc::UnboundedSender;
use wasmtime::Engine;
use wasmtime::component::Linker;

use self::admission::{Admission, Needs};
use self::artifacts::ArtifactStore;
pub use self::artifacts::{
    ArtifactDirError, default_artifact_dir, default_key_file, user_cache_dir,
};
pub use self::budget::RunBudget;
pub use self::builder::SandboxBuilder;
use self::component::Prepared;
pub use self::component::{FlowComponent, HandlerComponent, TaskComponent};
pub use self::component_file::DEFAULT_MAX_COMPONENT_BYTES;
use self::file_index::FileIndex;
pub use self::flow_body::{Answer, FlowBody, Orchestrator, Submitted};
pub use self::grants::{REDACTED, RunGrants, WireGrants, WireHttpGrant};
pub use self::loading::{LoadError, LoadEvent, LoadInfo, LoadSource};
pub use self::outcome::{
    Ending, Limit, LimitExceeded, LogLevel, LogRecord, LogSource, RunOutcome, Signal, TimeLimit,
    Usage,
};
pub use self::pacing::{Pacer, paced};
pub(crate) use self::run::RunState;
pub use self::run::{CancelToken, HandlerOutcome};
use crate::clock::ClockRef;

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
    /// How often running guests reach a yield point.
    epoch_tick: std::time::Duration,
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

impl Sandbox {
    /// A sandbox with the default settings.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// The host's memory ceiling in bytes (see [`SandboxBuilder::memory_ceiling`]).
    pub fn memory_ceiling(&self) -> u64 {
        self.0.admission.ceiling_bytes()
    }

    /// How often a running guest reaches a yield point (see [`SandboxBuilder::epoch_tick`]).
    pub fn epoch_tick(&self) -> std::time::Duration {
        self.0.epoch_tick
    }

    /// The largest component file it reads (see [`SandboxBuilder::max_component_bytes`]).
    pub fn max_component_bytes(&self) -> u64 {
        self.0.max_component_bytes
    }

    /// The directory of precompiled artifacts, if any.
    pub fn artifact_dir(&self) -> Option<&Path> {
        self.0.artifacts.as_ref().map(ArtifactStore::dir)
    }

    /// A hasher keyed with a key derived from the per-user artifact key (or, without an
    /// artifact directory, a key of this process): for digests of secret values that the
    /// database may hold without revealing them, nor allowing a guess to be checked.
    pub fn secret_hasher(&self) -> blake3::Hasher {
        const CONTEXT: &[u8] = b"sluice-secret-digest-v1\0";
        match &self.0.artifacts {
            Some(store) => store.key().hasher(CONTEXT),
            None => {
                static PROCESS_KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
                let key = PROCESS_KEY.get_or_init(|| {
                    let mut k = [0u8; 32];
                    if getrandom::fill(&mut k).is_err() {
                        // No randomness: digests are still distinct per value, only guessable.
                        k = *blake3::hash(format!("{:?}", std::time::SystemTime::now()).as_bytes())
                            .as_bytes();
                    }
                    k
                });
                let mut h = blake3::Hasher::new_keyed(key);
                h.update(CONTEXT);
                h
            }
        }
    }
}
