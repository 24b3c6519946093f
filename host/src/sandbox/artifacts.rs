//! The content-addressed store of precompiled components on disk. An artifact's name is
//! blake3(component bytes) plus a hash of the engine's compatibility settings, so the same bytes
//! are compiled once ever per engine configuration, and an artifact from another wasmtime
//! version or configuration is never loaded. Artifacts are written to a temporary file and
//! renamed into place, so a reader never sees a partial file.
//!
//! The directory must be writable only by the user running Sluice: loading an artifact runs the
//! machine code in it. Artifacts are memory-mapped while in use, so they must never be modified
//! in place (a process mapping a file that shrinks under it dies of SIGBUS); replace them by
//! rename, as this store does, or delete them.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

/// The on-disk store.
#[derive(Debug)]
pub(super) struct ArtifactStore {
    dir: PathBuf,
    engine_hash: String,
}

/// A `Hasher` that feeds blake3, so the engine's compatibility hash is stable across processes.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn finish(&self) -> u64 {
        let mut out = [0u8; 8];
        out.copy_from_slice(&self.0.finalize().as_bytes()[..8]);
        u64::from_le_bytes(out)
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

impl ArtifactStore {
    pub(super) fn new(dir: PathBuf, engine: &Engine) -> Self {
        let mut h = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = h.0.finalize().to_hex()[..16].to_owned();
        Self { dir, engine_hash }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn path_for(&self, digest: &blake3::Hash) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.to_hex(), self.engine_hash))
    }

    /// Load the artifact for `digest`, if one exists and is usable. A file that wasmtime refuses
    /// (truncated, corrupt, another version) is removed so it gets rebuilt. A component that
    /// compiled but does not fit the sandbox's pool (`unfit` says which errors mean that) is an
    /// error, and its artifact is kept: compiling it again would not help.
    pub(super) fn load(
        &self,
        engine: &Engine,
        digest: &blake3::Hash,
        unfit: impl Fn(&wasmtime::Error) -> bool,
    ) -> Result<Option<Component>, wasmtime::Error> {
        let path = self.path_for(digest);
        if !path.is_file() {
            return Ok(None);
        }
        // SAFETY: the file was produced by `Engine::precompile_component` with this engine's
        // configuration (its name carries the compatibility hash) and written atomically into a
        // directory only this user writes to; wasmtime also checks its header and version.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &path) };
        match loaded {
            Ok(c) => Ok(Some(c)),
            Err(e) if unfit(&e) => Err(e),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding unusable precompiled component: {e:#}");
                let _ = std::fs::remove_file(&path);
                Ok(None)
            }
        }
    }

    /// Write `artifact` for `digest` atomically and return its path.
    pub(super) fn store(&self, digest: &blake3::Hash, artifact: &[u8]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path_for(digest);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(path)
    }
}
