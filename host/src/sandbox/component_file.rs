//! Reading a component file (a regular file, bounded in size, its identity kept for the file
//! index when it stayed the same while it was read) and checking the component-model header,
//! converting WebAssembly text first.

use std::io::Read;
use std::path::Path;
use std::time::SystemTime;

use super::LoadError;
#[cfg(doc)]
use super::SandboxBuilder;
use super::file_index::FileIdentity;

/// A component file's bytes, and its identity when the file stayed the same while it was read
/// and had settled before (see `file_index.rs`): only then may the index record it.
pub(super) struct FileBytes {
    pub(super) bytes: Vec<u8>,
    pub(super) identity: Option<FileIdentity>,
}

/// The default of [`SandboxBuilder::max_component_bytes`]: 256 MiB, ten times the largest
/// component Sluice has met (an interpreter-embedding Python task is about 40 MiB).
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// Read the component file at `path`: a regular file of at most `max_bytes` bytes (nothing past
/// the limit is read, so `/dev/zero` or a growing file cannot exhaust memory).
pub(super) async fn read(path: &Path, max_bytes: u64) -> Result<FileBytes, LoadError> {
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
pub(super) fn component_binary(name: &str, bytes: Vec<u8>) -> Result<Vec<u8>, LoadError> {
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
}
