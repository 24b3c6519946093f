//! The file index: a map, kept in the artifact directory, from a component file's identity to
//! the blake3 digest of its content, so that a warm [`Sandbox::load_file`](super::Sandbox) can
//! find the precompiled artifact without reading and hashing a file of many megabytes. A file's
//! identity is its canonical path (symlinks resolved), device, inode, size, modification time
//! and status-change time (ctime), both in nanoseconds. An entry is one small file,
//! `<artifact dir>/index/<blake3 of the canonical path>`, written to a temporary file and renamed
//! into place after a load that read and hashed the file; a lookup trusts it only if every field
//! matches the file as it is now. Anything else (no entry, a mismatch, an unreadable or corrupt
//! entry, a missing artifact) is a miss, and the load reads and hashes the file as if there were
//! no index; the index never causes an error.
//!
//! What it catches: a file replaced by rename (a new inode), rewritten in place (the ctime
//! changes, and the kernel sets it, so tools that restore the modification time do not hide
//! the change; the size usually changes too), or reached through another path (canonicalized).
//!
//! The residual risk is the one every stat-based cache has ("racy git"): a file rewritten in
//! place with the same size within one tick of the filesystem's timestamp clock (the kernel's
//! coarse clock, 1–10 ms on Linux; a second or two on some filesystems) keeps its identity. It
//! is narrowed here: an entry is written only when the file was stable while it was read (its
//! identity the same before and after), and its last change was at least [`SETTLED`] before the
//! read began, so any later change gets a later ctime. (A component built moments before its
//! first load is therefore indexed on a later load.) What remains: clocks that jump backwards,
//! and a filesystem whose timestamps come from another machine's clock (network filesystems).
//!
//! An entry decides which artifact a file runs as, so it is authenticated like the artifacts
//! (see `artifacts.rs`): it starts with a keyed blake3 hash, under the per-user key, of the rest
//! of the entry. An entry planted by someone without the key (one that would make a file load
//! as another component's artifact) fails the check and is a miss.
//! A file whose content must be trusted unconditionally can be loaded with
//! [`Sandbox::load_bytes`](super::Sandbox::load_bytes), which always hashes.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::artifacts::Key;

/// How long ago a file must have last changed for its digest to be recorded (a conservative
/// bound on the timestamp granularity of the filesystems Sluice runs on).
pub(super) const SETTLED: Duration = Duration::from_secs(2);

/// The version of the entry format (the first word of an entry).
const FORMAT: &str = "sluice-file-index-2";

/// What the keyed hash of an entry starts with (domain separation).
const TAG_CONTEXT: &[u8] = b"sluice-file-index-2\0";

/// The length of an entry's tag: 64 hex digits and a newline.
const TAG_LEN: usize = 65;

/// Who a file is, as far as the filesystem says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileIdentity {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    /// The identity of the file `path` names now (following symlinks), if it can be had.
    pub(super) fn of_path(path: &Path) -> Option<Self> {
        let canonical = std::fs::canonicalize(path).ok()?;
        let meta = std::fs::metadata(&canonical).ok()?;
        Self::from_metadata(canonical, &meta)
    }

    /// The identity of the open `file`, found at the canonical path `canonical`.
    pub(super) fn of_file(canonical: PathBuf, file: &File) -> Option<Self> {
        Self::from_metadata(canonical, &file.metadata().ok()?)
    }

    #[cfg(unix)]
    fn from_metadata(path: PathBuf, meta: &std::fs::Metadata) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        if !meta.is_file() {
            return None;
        }
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Some(Self {
            path,
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        })
    }

    /// Without device and inode numbers there is no identity to trust: no index.
    #[cfg(not(unix))]
    fn from_metadata(_path: PathBuf, _meta: &std::fs::Metadata) -> Option<Self> {
        None
    }

    /// The canonical path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The size, as a capacity for reading the file (0 if it does not fit in memory).
    pub(super) fn len_hint(&self) -> usize {
        usize::try_from(self.size).unwrap_or(0)
    }

    /// Whether the file last changed (and was last modified) at least [`SETTLED`] before `now`.
    pub(super) fn settled_at(&self, now: SystemTime) -> bool {
        let Ok(now) = now.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let horizon = i128::try_from(now.saturating_sub(SETTLED).as_nanos()).unwrap_or(0);
        self.ctime_ns.max(self.mtime_ns) < horizon
    }

    fn entry(&self, digest: &blake3::Hash) -> Vec<u8> {
        let mut out = format!(
            "{FORMAT} {} {} {} {} {} {}\n",
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns,
            self.ctime_ns,
            digest.to_hex()
        )
        .into_bytes();
        out.extend_from_slice(path_bytes(&self.path).as_ref());
        out
    }
}

#[cfg(unix)]
fn path_bytes(path: &Path) -> std::borrow::Cow<'_, [u8]> {
    use std::os::unix::ffi::OsStrExt;
    path.as_os_str().as_bytes().into()
}

#[cfg(not(unix))]
fn path_bytes(path: &Path) -> std::borrow::Cow<'_, [u8]> {
    path.to_string_lossy().into_owned().into_bytes().into()
}

/// The index directory.
#[derive(Debug)]
pub(super) struct FileIndex {
    dir: PathBuf,
    key: Arc<Key>,
}

impl FileIndex {
    /// The index of the artifact directory `artifact_dir`, its entries authenticated with `key`.
    pub(super) fn new(artifact_dir: &Path, key: Arc<Key>) -> Self {
        Self {
            dir: artifact_dir.join("index"),
            key,
        }
    }

    fn tag(&self, body: &[u8]) -> blake3::Hash {
        self.key.hasher(TAG_CONTEXT).update(body).finalize()
    }

    fn entry_path(&self, path: &Path) -> PathBuf {
        self.dir
            .join(blake3::hash(path_bytes(path).as_ref()).to_hex().as_str())
    }

    /// The digest recorded for exactly this identity, if any.
    pub(super) fn lookup(&self, id: &FileIdentity) -> Option<blake3::Hash> {
        let file = std::fs::read(self.entry_path(&id.path)).ok()?;
        let (tag, entry) = file.split_at_checked(TAG_LEN)?;
        let tag = blake3::Hash::from_hex(tag.strip_suffix(b"\n")?).ok()?;
        // `blake3::Hash` compares in constant time.
        if tag != self.tag(entry) {
            return None;
        }
        let expected = id.entry(&blake3::Hash::from_bytes([0; 32]));
        // Everything but the digest must be byte-for-byte what this identity would write.
        let digest_at = expected.iter().position(|&b| b == b'\n')? - 64;
        if entry.len() != expected.len()
            || entry[..digest_at] != expected[..digest_at]
            || entry[digest_at + 64..] != expected[digest_at + 64..]
        {
            return None;
        }
        let hex = std::str::from_utf8(&entry[digest_at..digest_at + 64]).ok()?;
        blake3::Hash::from_hex(hex).ok()
    }

    /// Record that the file `id` holds the component whose digest is `digest`. Best effort: a
    /// failure only means the next load hashes the file again.
    pub(super) fn record(&self, id: &FileIdentity, digest: &blake3::Hash) {
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
            let entry = id.entry(digest);
            tmp.write_all(self.tag(&entry).to_hex().as_bytes())?;
            tmp.write_all(b"\n")?;
            tmp.write_all(&entry)?;
            // No fsync: after a crash an entry is whole, empty or garbage, never another file's.
            tmp.persist(self.entry_path(&id.path))
                .map_err(|e| e.error)?;
            Ok(())
        };
        if let Err(e) = write() {
            tracing::debug!(dir = %self.dir.display(), "cannot write a file index entry: {e}");
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn identity() -> FileIdentity {
        FileIdentity {
            path: PathBuf::from("/a/b.wasm"),
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 4,
            ctime_ns: 5,
        }
    }

    #[test]
    fn entries_match_only_the_same_identity() {
        let dir = tempfile::tempdir().expect("temp dir");
        let index = FileIndex::new(dir.path(), Arc::new(Key::from_bytes([7; 32])));
        let id = identity();
        let digest = blake3::hash(b"component");
        assert_eq!(index.lookup(&id), None);
        index.record(&id, &digest);
        assert_eq!(index.lookup(&id), Some(digest));
        for other in [
            FileIdentity {
                ino: 9,
                ..identity()
            },
            FileIdentity {
                size: 9,
                ..identity()
            },
            FileIdentity {
                mtime_ns: 9,
                ..identity()
            },
            FileIdentity {
                ctime_ns: 9,
                ..identity()
            },
            FileIdentity {
                dev: 9,
                ..identity()
            },
        ] {
            assert_eq!(index.lookup(&other), None, "{other:?}");
        }
        // Corrupt entries are misses.
        let entry = index.entry_path(&id.path);
        let tagged = std::fs::read(&entry).expect("entry");
        for garbage in [
            &b""[..],
            b"\xff\xfe",
            &id.entry(&digest)[..40],
            &tagged[..TAG_LEN],
        ] {
            std::fs::write(&entry, garbage).expect("write");
            assert_eq!(index.lookup(&id), None);
        }
        let mut bad_hex = id.entry(&digest);
        let at = bad_hex.iter().position(|&b| b == b'\n').expect("newline") - 1;
        bad_hex[at] = b'z';
        std::fs::write(&entry, bad_hex).expect("write");
        assert_eq!(index.lookup(&id), None);
    }

    /// An entry is trusted only under the key it was written with: one planted without the key
    /// (the body of a valid entry with another component's digest, or an entry made with another
    /// key) is a miss, so a file cannot be made to load as another component's artifact.
    #[test]
    fn entries_without_the_key_are_misses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mine = FileIndex::new(dir.path(), Arc::new(Key::from_bytes([1; 32])));
        let theirs = FileIndex::new(dir.path(), Arc::new(Key::from_bytes([2; 32])));
        let id = identity();
        let real = blake3::hash(b"identity");
        let other = blake3::hash(b"add_one");
        mine.record(&id, &real);
        assert_eq!(mine.lookup(&id), Some(real));
        // The planter's own key: not this user's.
        theirs.record(&id, &other);
        assert_eq!(theirs.lookup(&id), Some(other));
        assert_eq!(mine.lookup(&id), None);
        // The valid entry's tag on a body naming another digest.
        mine.record(&id, &real);
        let entry = mine.entry_path(&id.path);
        let valid = std::fs::read(&entry).expect("entry");
        let mut planted = valid[..TAG_LEN].to_vec();
        planted.extend_from_slice(&id.entry(&other));
        std::fs::write(&entry, planted).expect("write");
        assert_eq!(mine.lookup(&id), None);
        // An untagged entry in the previous format.
        std::fs::write(&entry, id.entry(&other)).expect("write");
        assert_eq!(mine.lookup(&id), None);
    }

    #[test]
    fn recent_changes_are_not_settled() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let at = |secs: i128| FileIdentity {
            mtime_ns: secs * 1_000_000_000,
            ctime_ns: secs * 1_000_000_000,
            ..identity()
        };
        assert!(at(90).settled_at(now));
        assert!(!at(99).settled_at(now));
        assert!(!at(200).settled_at(now));
        // A modification time set back does not hide a recent change.
        let restored = FileIdentity {
            mtime_ns: 0,
            ..at(99)
        };
        assert!(!restored.settled_at(now));
    }
}
