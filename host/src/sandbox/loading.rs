//! What loading a component reports: [`LoadError`] (why a component could not be loaded),
//! [`LoadSource`] and [`LoadInfo`] (how it became ready, and how long it took), and the
//! [`LoadEvent`]s a host can watch compiles with.

use std::path::PathBuf;
use std::time::Duration;

use super::ArtifactDirError;
#[cfg(doc)]
use super::{Sandbox, SandboxBuilder, TaskComponent};

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
