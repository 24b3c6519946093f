//! The content-addressed store of precompiled components on disk. An artifact's name is
//! blake3(component bytes) plus a hash of the engine's compatibility settings, so the same bytes
//! are compiled once ever per engine configuration, and an artifact from another wasmtime
//! version or configuration is never loaded. Artifacts are written to a temporary file and
//! renamed into place, so a reader never sees a partial file.
//!
//! Loading an artifact runs the machine code in it, so the store trusts nothing it did not write
//! itself under the user's own secret:
//!
//! - **Per user.** The default directory is the user's cache directory
//!   ([`default_artifact_dir`]: `$XDG_CACHE_HOME/sluice/artifacts`, else
//!   `~/.cache/sluice/artifacts`), never a directory that came with a project. A directory that is
//!   not owned by the user, or that group or others can write, is refused with an error naming
//!   it ([`ArtifactDirError`]); the store creates its directories with mode 0700.
//! - **Authenticated.** Each artifact has a tag, `<artifact>.mac`: blake3's keyed hash, under the
//!   per-user key, of the component's digest, the engine hash and the artifact's bytes. The key is
//!   32 random bytes in `<user cache dir>/sluice/artifact.key` (mode 0600, created on first use;
//!   [`default_key_file`]), never in the artifact directory. A load verifies the tag on the open
//!   file (which must be a regular file owned by the user and writable by nobody else) before
//!   wasmtime deserializes it, and maps that same file (through `/proc/self/fd` where there is
//!   one), so a file swapped in between is not what gets mapped. An artifact without a valid tag
//!   (planted, copied under another digest, damaged, or made with another key) is removed and
//!   the component recompiled, replacing it.
//!
//! Artifacts are memory-mapped while in use, so they must never be modified in place (a process
//! mapping a file that shrinks under it dies of SIGBUS); replace them by rename, as this store
//! does, or delete them.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::Engine;
use wasmtime::component::Component;

/// The name of the per-user key file, in `<user cache dir>/sluice/`.
const KEY_FILE: &str = "artifact.key";

/// What the keyed hash of an artifact starts with (domain separation, and the format version).
const ARTIFACT_TAG_CONTEXT: &[u8] = b"sluice-artifact-1\0";

/// Why an artifact directory (or the key that authenticates its artifacts) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the artifact cache `{}` cannot be used: {detail}", path.display())]
pub struct ArtifactDirError {
    /// The directory or file at fault.
    pub path: PathBuf,
    /// What is wrong, and what to do.
    pub detail: String,
}

/// The user's cache directory: `$XDG_CACHE_HOME` when it is an absolute path, else
/// `$HOME/.cache`; `None` when neither is known.
pub fn user_cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    xdg.or_else(|| {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|home| home.join(".cache"))
    })
}

/// The default artifact directory: `<user cache dir>/sluice/artifacts`.
pub fn default_artifact_dir() -> Option<PathBuf> {
    user_cache_dir().map(|d| d.join("sluice").join("artifacts"))
}

/// The default key file: `<user cache dir>/sluice/artifact.key`.
pub fn default_key_file() -> Option<PathBuf> {
    user_cache_dir().map(|d| d.join("sluice").join(KEY_FILE))
}

/// The per-user secret that authenticates artifacts and file index entries.
pub(super) struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// A key with these bytes (tests).
    #[cfg(test)]
    pub(super) fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    /// A keyed hasher that starts with `context`.
    pub(super) fn hasher(&self, context: &[u8]) -> blake3::Hasher {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(context);
        h
    }

    /// Read the key file at `path`, creating it (32 random bytes, mode 0600) when absent. The
    /// file must belong to the user and be readable by nobody else, and its directory must be
    /// the user's and writable by nobody else.
    pub(super) fn load_or_create(path: &Path) -> Result<Key, ArtifactDirError> {
        let err = |path: &Path, detail: String| ArtifactDirError {
            path: path.to_owned(),
            detail,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        check_private_dir(dir)?;
        match File::open(path) {
            Ok(file) => read_key(path, &file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)
                    .map_err(|e| err(path, format!("no random bytes for a new key: {e}")))?;
                // A temporary file (mode 0600), linked into place only if no other process
                // created the key first: a reader never sees a partial key.
                let created = (|| -> std::io::Result<()> {
                    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
                    tmp.write_all(&key)?;
                    tmp.as_file().sync_all()?;
                    tmp.persist_noclobber(path).map_err(|e| e.error)?;
                    Ok(())
                })();
                match created {
                    Ok(()) => Ok(Key(key)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let file = File::open(path)
                            .map_err(|e| err(path, format!("cannot open the key: {e}")))?;
                        read_key(path, &file)
                    }
                    Err(e) => Err(err(path, format!("cannot create the key: {e}"))),
                }
            }
            Err(e) => Err(err(path, format!("cannot open the key: {e}"))),
        }
    }
}

fn read_key(path: &Path, file: &File) -> Result<Key, ArtifactDirError> {
    let err = |detail: String| ArtifactDirError {
        path: path.to_owned(),
        detail,
    };
    let meta = file
        .metadata()
        .map_err(|e| err(format!("cannot read the key: {e}")))?;
    check_owner(&meta, 0o077).map_err(|why| {
        err(format!(
            "the key {why}; it must be a file of this user that nobody else can read or \
             write (remove it to have a new one made; artifacts are then recompiled)"
        ))
    })?;
    let mut bytes = Vec::with_capacity(33);
    Read::take(file, 33)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read the key: {e}")))?;
    let key: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        err(format!(
            "the key is {} bytes, not 32: it is damaged (remove it to have a new one made; \
             artifacts are then recompiled)",
            if b.len() > 32 {
                "more than 32".into()
            } else {
                b.len().to_string()
            }
        ))
    })?;
    Ok(Key(key))
}

/// Create `dir` (and missing parents) with mode 0700.
fn create_private_dir(dir: &Path) -> Result<(), ArtifactDirError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| ArtifactDirError {
        path: dir.to_owned(),
        detail: format!("cannot create it: {e}"),
    })
}

/// Refuse a directory that is not the user's, or that group or others can write (they could
/// replace what is in it).
fn check_private_dir(dir: &Path) -> Result<(), ArtifactDirError> {
    let err = |detail: String| ArtifactDirError {
        path: dir.to_owned(),
        detail,
    };
    let meta = std::fs::metadata(dir).map_err(|e| err(format!("cannot inspect it: {e}")))?;
    if !meta.is_dir() {
        return Err(err("it is not a directory".into()));
    }
    check_owner(&meta, 0o022).map_err(|why| {
        err(format!(
            "it {why}; loading an artifact runs the code in it, so the directory must belong \
             to this user and be writable by nobody else (e.g. `chmod go-w`), or choose \
             another one"
        ))
    })
}

/// `Err(why)` when `meta` is not owned by the effective user, or has any of the permission bits
/// in `forbidden`.
#[cfg(unix)]
fn check_owner(meta: &std::fs::Metadata, forbidden: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "belongs to user id {}, not to this user ({me})",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & forbidden != 0 {
        return Err(format!(
            "has mode {mode:03o}: {} can {}",
            match (mode & forbidden & 0o070 != 0, mode & forbidden & 0o007 != 0) {
                (true, true) => "its group and others",
                (true, false) => "its group",
                _ => "others",
            },
            if forbidden & 0o044 != 0 {
                "access it"
            } else {
                "write it"
            }
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_owner(_meta: &std::fs::Metadata, _forbidden: u32) -> Result<(), String> {
    Ok(())
}

/// The on-disk store.
#[derive(Debug)]
pub(super) struct ArtifactStore {
    dir: PathBuf,
    engine_hash: String,
    key: Arc<Key>,
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
    /// The store in `dir` (created with mode 0700 when absent), its artifacts authenticated
    /// with the key in `key_file` (created when absent; see the module's documentation). A
    /// directory that is not the user's, or that others can write, is refused.
    pub(super) fn open(
        dir: PathBuf,
        key_file: &Path,
        engine: &Engine,
    ) -> Result<Self, ArtifactDirError> {
        let key = Key::load_or_create(key_file)?;
        create_private_dir(&dir)?;
        check_private_dir(&dir)?;
        let mut h = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut h);
        let engine_hash = h.0.finalize().to_hex()[..16].to_owned();
        Ok(Self {
            dir,
            engine_hash,
            key: Arc::new(key),
        })
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key, shared with the file index.
    pub(super) fn key(&self) -> Arc<Key> {
        self.key.clone()
    }

    pub(super) fn path_for(&self, digest: &blake3::Hash) -> PathBuf {
        self.dir
            .join(format!("{}-{}.cwasm", digest.to_hex(), self.engine_hash))
    }

    fn tag_path(path: &Path) -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(".mac");
        PathBuf::from(p)
    }

    /// A hasher for the tag of the artifact of `digest`, fed the bytes next.
    fn tagger(&self, digest: &blake3::Hash) -> blake3::Hasher {
        let mut h = self.key.hasher(ARTIFACT_TAG_CONTEXT);
        h.update(digest.as_bytes());
        h.update(self.engine_hash.as_bytes());
        h
    }

    /// Load the artifact for `digest`, if one exists, is authentic and is usable. A file that
    /// fails authentication, or that wasmtime refuses (truncated, corrupt, another version), is
    /// removed so it gets rebuilt. A component that compiled but does not fit the sandbox's pool
    /// (`unfit` says which errors mean that) is an error, and its artifact is kept: compiling it
    /// again would not help.
    pub(super) fn load(
        &self,
        engine: &Engine,
        digest: &blake3::Hash,
        unfit: impl Fn(&wasmtime::Error) -> bool,
    ) -> Result<Option<Component>, wasmtime::Error> {
        let path = self.path_for(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot open a precompiled component: {e}");
                return Ok(None);
            }
        };
        if let Err(why) = self.verify(&file, &path, digest) {
            tracing::warn!(path = %path.display(), "discarding a precompiled component that is not authentic: {why}; recompiling");
            self.remove(&path);
            return Ok(None);
        }
        // SAFETY: the file's tag, a keyed hash under this user's secret key over the digest,
        // the engine hash and these very bytes, was verified on the open file just now; the file
        // is this user's and writable by nobody else, and what is mapped is that same open file
        // (its `/proc/self/fd` link), so it is an artifact this store wrote with
        // `Engine::precompile_component` for this engine configuration. wasmtime also checks
        // its header and version.
        let mapped = open_file_path(&file).unwrap_or_else(|| path.clone());
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &mapped) };
        drop(file);
        match loaded {
            Ok(c) => Ok(Some(c)),
            Err(e) if unfit(&e) => Err(e),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding unusable precompiled component: {e:#}");
                self.remove(&path);
                Ok(None)
            }
        }
    }

    /// Check that the open `file` is a regular file of this user that nobody else can write,
    /// and that its tag matches its bytes.
    fn verify(&self, mut file: &File, path: &Path, digest: &blake3::Hash) -> Result<(), String> {
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot inspect it: {e}"))?;
        if !meta.is_file() {
            return Err("it is not a regular file".into());
        }
        check_owner(&meta, 0o022)?;
        let tag = std::fs::read(Self::tag_path(path)).map_err(|e| format!("no tag: {e}"))?;
        let tag: [u8; 32] = tag
            .try_into()
            .map_err(|_| "its tag is not 32 bytes".to_owned())?;
        let mut h = self.tagger(digest);
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("cannot read it: {e}")),
            }
        }
        // `blake3::Hash` compares in constant time.
        if h.finalize() != blake3::Hash::from_bytes(tag) {
            return Err(
                "its tag does not match (not written by this user's Sluice, or not for \
                        this component)"
                    .into(),
            );
        }
        Ok(())
    }

    fn remove(&self, path: &Path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(Self::tag_path(path));
    }

    /// Write `artifact` for `digest` atomically, with its tag, and return its path.
    pub(super) fn store(&self, digest: &blake3::Hash, artifact: &[u8]) -> std::io::Result<PathBuf> {
        create_private_dir(&self.dir).map_err(std::io::Error::other)?;
        let path = self.path_for(digest);
        let tag = self.tagger(digest).update(artifact).finalize();
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_all()?;
        let mut tag_tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tag_tmp.write_all(tag.as_bytes())?;
        tag_tmp.as_file().sync_all()?;
        // The tag first: a reader that sees the new artifact sees its tag (or a newer one, which
        // fails to match and only costs a recompile).
        tag_tmp
            .persist(Self::tag_path(&path))
            .map_err(|e| e.error)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(path)
    }
}

/// A path that opens the same file as the open `file` (Linux: `/proc/self/fd/<fd>`), if there
/// is one.
fn open_file_path(file: &File) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let p = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        p.exists().then_some(p)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_key_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sub").join(KEY_FILE);
        let a = Key::load_or_create(&path).expect("created");
        let meta = std::fs::metadata(&path).expect("key");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 32);
        let b = Key::load_or_create(&path).expect("read");
        assert_eq!(a.0, b.0);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Key::load_or_create(&path).expect_err("readable by others");
        assert!(e.to_string().contains("has mode 644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, b"short").expect("write");
        let e = Key::load_or_create(&path).expect_err("damaged");
        assert!(e.to_string().contains("is 5 bytes, not 32"), "{e}");
    }

    #[test]
    fn directories_writable_by_others_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().join("artifacts");
        create_private_dir(&d).expect("create");
        assert_eq!(
            std::fs::metadata(&d).expect("dir").permissions().mode() & 0o777,
            0o700
        );
        check_private_dir(&d).expect("private");
        for (mode, who) in [
            (0o777, "its group and others"),
            (0o775, "its group"),
            (0o757, "others"),
        ] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let e = check_private_dir(&d).expect_err("writable");
            assert!(
                e.to_string().contains(&format!("{who} can write it")),
                "{e}"
            );
            assert!(e.to_string().contains(&d.display().to_string()), "{e}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        check_private_dir(&d).expect("readable by others is fine");
    }
}
