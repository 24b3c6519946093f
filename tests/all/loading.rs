//! Loading components: invalid input gets a clear error (never a panic), and the same bytes are
//! compiled once, ever, per artifact directory.

use sluice::sandbox::{LoadError, LoadSource, Sandbox};

use crate::support::{control_task_completes, guest, sandbox};

async fn load_err(name: &str, bytes: &[u8]) -> String {
    let err = sandbox()
        .load_bytes(name, bytes.to_vec())
        .await
        .expect_err("must not load");
    assert!(!err.is_retriable(), "{err}");
    err.to_string()
}

#[tokio::test]
async fn random_bytes_are_not_a_component() {
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let err = load_err("noise.wasm", &bytes).await;
    assert_eq!(
        err,
        "`noise.wasm` is not a WebAssembly component: it does not start with the WebAssembly \
         magic bytes `\\0asm`"
    );
    // The magic bytes followed by garbage: wasmtime's parser rejects it, naming the offset.
    let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
    bytes.extend_from_slice(&[0xff; 64]);
    let err = load_err("garbage.wasm", &bytes).await;
    assert!(
        err.starts_with("`garbage.wasm` could not be compiled: "),
        "{err}"
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_core_module_is_not_a_component() {
    let err = load_err("core.wat", b"(module (func (export \"run\")))").await;
    assert!(
        err.contains("is a core WebAssembly module; Sluice runs components"),
        "{err}"
    );
}

#[tokio::test]
async fn a_component_without_run_is_refused() {
    let err = load_err("empty.wat", b"(component)").await;
    assert!(
        err.starts_with("`empty.wat` cannot run as a Sluice task: it must export `run"),
        "{err}"
    );
}

#[tokio::test]
async fn a_run_of_the_wrong_type_is_refused() {
    let wat = br#"(component
        (core module $m (func (export "run") (param i32) (result i32) local.get 0))
        (core instance $i (instantiate $m))
        (func (export "run") (param "x" u32) (result u32) (canon lift (core func $i "run"))))"#;
    let err = load_err("wrong.wat", wat).await;
    assert!(
        err.contains("cannot run as a Sluice task: it must export `run"),
        "{err}"
    );
}

#[tokio::test]
async fn a_component_importing_what_the_host_lacks_is_refused() {
    let wat = br#"(component
        (import "evil:net/raw-socket@1.0.0" (instance (export "open" (func (result u32))))))"#;
    let err = load_err("evil.wat", wat).await;
    assert!(
        err.starts_with("`evil.wat` cannot run as a Sluice task"),
        "{err}"
    );
    assert!(err.contains("evil:net/raw-socket@1.0.0"), "{err}");
    control_task_completes().await;
}

#[tokio::test]
async fn a_missing_file_is_a_retriable_read_error() {
    let err = sandbox()
        .load_file(std::path::Path::new("/no/such/task.wasm"))
        .await
        .expect_err("no file");
    assert!(matches!(err, LoadError::Read { .. }));
    assert!(err.is_retriable());
    assert!(
        err.to_string()
            .starts_with("cannot read `/no/such/task.wasm`: "),
        "{err}"
    );
}

#[tokio::test]
async fn the_same_bytes_are_compiled_once_ever() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(guest("add_one")).expect("guest");
    let first = Sandbox::builder()
        .artifact_dir(dir.path())
        .build()
        .expect("sandbox");
    let c1 = first
        .load_bytes("add_one", bytes.clone())
        .await
        .expect("load");
    assert_eq!(c1.load_info().source, LoadSource::Compiled);
    // Loading again in the same process returns the prepared component.
    let c2 = first
        .load_bytes("again", bytes.clone())
        .await
        .expect("load");
    assert_eq!(c2.name(), "add_one");
    // A new sandbox (as in a new process) loads the artifact instead of compiling.
    let second = Sandbox::builder()
        .artifact_dir(dir.path())
        .build()
        .expect("sandbox");
    let c3 = second
        .load_bytes("add_one", bytes.clone())
        .await
        .expect("load");
    assert_eq!(c3.load_info().source, LoadSource::Precompiled);
    assert_eq!(c3.digest(), c1.digest());
    let artifacts: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert_eq!(
        artifacts.len(),
        2,
        "one artifact and its tag, no temporary files left"
    );

    // A corrupt artifact is discarded and rebuilt, not trusted. (It is replaced, not overwritten
    // in place: the live sandboxes above map the file, exactly as Sluice's own writer assumes.)
    let path = artifacts
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("the artifact")
        .clone();
    let corrupt = dir.path().join("corrupt.tmp");
    std::fs::write(&corrupt, b"not an artifact").expect("write");
    std::fs::rename(&corrupt, &path).expect("corrupt it");
    let third = Sandbox::builder()
        .artifact_dir(dir.path())
        .build()
        .expect("sandbox");
    let c4 = third.load_bytes("add_one", bytes).await.expect("load");
    assert_eq!(c4.load_info().source, LoadSource::Compiled);
    let out = third
        .run(
            &c4,
            &serde_json::json!(1).into(),
            &sluice::context::TaskContext::new("t"),
            &Default::default(),
            None,
        )
        .await;
    assert_eq!(
        out.ending,
        sluice::sandbox::Ending::Output(serde_json::json!(2).into())
    );
}

#[tokio::test]
async fn concurrent_loads_of_the_same_bytes_compile_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(guest("try_unlock")).expect("guest");
    let sandbox = Sandbox::builder()
        .artifact_dir(dir.path())
        .build()
        .expect("sandbox");
    let loads = (0..8).map(|i| {
        let sandbox = sandbox.clone();
        let bytes = bytes.clone();
        tokio::spawn(async move { sandbox.load_bytes(&format!("copy{i}"), bytes).await })
    });
    let mut names = std::collections::BTreeSet::new();
    for l in loads {
        names.insert(l.await.expect("join").expect("load").name().to_owned());
    }
    assert_eq!(names.len(), 1, "every load got the one prepared component");
}

#[tokio::test]
async fn concurrent_loads_of_the_same_bytes_report_exactly_one_compile() {
    use sluice::sandbox::LoadEvent;
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(guest("summarise")).expect("guest");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sandbox = Sandbox::builder()
        .artifact_dir(dir.path())
        .load_events(tx)
        .build()
        .expect("sandbox");
    let loads: Vec<_> = (0..8)
        .map(|i| {
            let sandbox = sandbox.clone();
            let bytes = bytes.clone();
            tokio::spawn(async move { sandbox.load_bytes(&format!("copy{i}"), bytes).await })
        })
        .collect();
    let mut sources = Vec::new();
    for l in loads {
        sources.push(l.await.expect("join").expect("load").load_info().source);
    }
    // Events are sent before a load returns.
    let mut events = Vec::new();
    while let Ok(e) = rx.try_recv() {
        events.push(e);
    }
    let compiling = events
        .iter()
        .filter(|e| matches!(e, LoadEvent::Compiling { .. }))
        .count();
    let compiled = events
        .iter()
        .filter(|e| matches!(e, LoadEvent::Compiled { .. }))
        .count();
    assert_eq!((compiling, compiled), (1, 1), "{events:?}");
    assert!(
        sources.iter().all(|s| *s == LoadSource::Compiled),
        "every load shares the one compile: {sources:?}"
    );
}

/// A sandbox on the artifact directory `dir`, as a new process would have.
fn sandbox_on(dir: &std::path::Path) -> Sandbox {
    Sandbox::builder()
        .artifact_dir(dir)
        .build()
        .expect("sandbox")
}

/// Wait until files written now count as settled: the file index records a file only when its
/// last change is at least 2 s older than the load (`file_index::SETTLED`).
async fn let_files_settle() {
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
}

/// Run `component` on `input` and return its output.
async fn output_of(
    sandbox: &Sandbox,
    component: &sluice::sandbox::TaskComponent,
    input: serde_json::Value,
) -> sluice::sandbox::Ending {
    sandbox
        .run(
            component,
            &input.into(),
            &sluice::context::TaskContext::new("t"),
            &Default::default(),
            None,
        )
        .await
        .ending
}

/// The files of the artifact directory's file index.
fn index_entries(artifacts: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(artifacts.join("index"))
        .expect("the index directory")
        .map(|e| e.expect("entry").path())
        .collect()
}

#[tokio::test]
async fn a_file_loaded_before_is_not_read_again() {
    use sluice::sandbox::Ending;
    let dir = tempfile::tempdir().expect("temp dir");
    let artifacts = dir.path().join("artifacts");
    let file = dir.path().join("add_one.wasm");
    std::fs::copy(guest("add_one"), &file).expect("copy");
    let_files_settle().await;

    let first = sandbox_on(&artifacts)
        .load_file(&file)
        .await
        .expect("first load");
    assert_eq!(first.load_info().source, LoadSource::Compiled);
    assert_eq!(index_entries(&artifacts).len(), 1, "the load was indexed");

    // A new sandbox (a new process) finds the artifact through the index: no read, no compile.
    let second = sandbox_on(&artifacts);
    let c = second.load_file(&file).await.expect("warm load");
    assert_eq!(c.load_info().source, LoadSource::Indexed);
    assert_eq!(c.digest(), first.digest());
    assert_eq!(c.name(), file.display().to_string());
    assert_eq!(
        output_of(&second, &c, serde_json::json!(1)).await,
        Ending::Output(serde_json::json!(2).into())
    );
    // The same bytes loaded otherwise share the prepared component.
    let bytes = std::fs::read(&file).expect("read");
    let same = second.load_bytes("bytes", bytes).await.expect("load");
    assert_eq!(same.load_info().source, LoadSource::Indexed);
    assert_eq!(same.name(), c.name());

    // Through a symlink: the canonical path is the same file.
    #[cfg(unix)]
    {
        let link = dir.path().join("link.wasm");
        std::os::unix::fs::symlink(&file, &link).expect("symlink");
        let c = sandbox_on(&artifacts).load_file(&link).await.expect("load");
        assert_eq!(c.load_info().source, LoadSource::Indexed);
    }
    // Handlers load through the same index (this one is a task, so it is refused after).
    let err = sandbox_on(&artifacts)
        .load_handler_file(&file)
        .await
        .expect_err("not a handler");
    assert!(err.to_string().contains("state handler"), "{err}");
}

/// `bytes` with a custom section appended, `extra` bytes longer.
fn padded(mut bytes: Vec<u8>, extra: usize) -> Vec<u8> {
    if extra == 0 {
        return bytes;
    }
    let leb = |mut n: usize| {
        let mut out = vec![];
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    };
    // id 0, size, then the name ("pad", 1 + 3 bytes) and the payload.
    let size = (4..extra)
        .rev()
        .find(|&s| 1 + leb(s).len() + s == extra)
        .expect("a custom section of that size");
    bytes.push(0);
    bytes.extend(leb(size));
    bytes.extend([3, b'p', b'a', b'd']);
    bytes.extend(std::iter::repeat_n(0u8, size - 4));
    bytes
}

#[cfg(unix)]
#[tokio::test]
async fn a_file_rewritten_in_place_is_hashed_again() {
    use sluice::sandbox::Ending;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let artifacts = dir.path().join("artifacts");
    // Two different tasks of exactly the same size, so only the change time and the content
    // tell them apart once the modification time is set back.
    let (add_one, identity) = (
        std::fs::read(guest("add_one")).expect("guest"),
        std::fs::read(guest("identity")).expect("guest"),
    );
    let len = add_one.len().max(identity.len()) + 16;
    let add_one = padded(add_one.clone(), len - add_one.len());
    let identity = padded(identity.clone(), len - identity.len());
    assert_eq!(add_one.len(), identity.len());
    let file = dir.path().join("task.wasm");
    let other = dir.path().join("identity.wasm");
    std::fs::write(&file, &add_one).expect("write");
    std::fs::write(&other, &identity).expect("write");
    let_files_settle().await;

    let first = sandbox_on(&artifacts).load_file(&file).await.expect("load");
    assert_eq!(first.load_info().source, LoadSource::Compiled);
    let s = sandbox_on(&artifacts);
    let warm = s.load_file(&file).await.expect("load");
    assert_eq!(
        warm.load_info().source,
        LoadSource::Indexed,
        "the index hits"
    );
    assert_eq!(
        output_of(&s, &warm, serde_json::json!(1)).await,
        Ending::Output(serde_json::json!(2).into())
    );

    // Rewrite it in place (same inode, same size) and set the modification time back.
    let before = std::fs::metadata(&file).expect("stat");
    std::fs::copy(&other, &file).expect("rewrite in place");
    std::fs::File::options()
        .write(true)
        .open(&file)
        .expect("open")
        .set_modified(before.modified().expect("mtime"))
        .expect("set the mtime back");
    let after = std::fs::metadata(&file).expect("stat");
    assert_eq!(after.ino(), before.ino(), "rewritten in place");
    assert_eq!(after.len(), before.len());
    assert_eq!(
        after.modified().expect("mtime"),
        before.modified().expect("mtime")
    );
    assert_ne!(
        (after.ctime(), after.ctime_nsec()),
        (before.ctime(), before.ctime_nsec())
    );

    let s = sandbox_on(&artifacts);
    let c = s.load_file(&file).await.expect("load");
    assert_eq!(c.load_info().source, LoadSource::Compiled, "new bytes");
    assert_ne!(c.digest(), first.digest());
    assert_eq!(
        output_of(&s, &c, serde_json::json!(1)).await,
        Ending::Output(serde_json::json!(1).into()),
        "the new component runs"
    );

    // Replaced by rename (a new inode): the old content again, found by its hash.
    let tmp = dir.path().join("task.wasm.tmp");
    std::fs::write(&tmp, &add_one).expect("write");
    std::fs::rename(&tmp, &file).expect("rename");
    let s = sandbox_on(&artifacts);
    let c = s.load_file(&file).await.expect("load");
    assert_eq!(c.load_info().source, LoadSource::Precompiled);
    assert_eq!(c.digest(), first.digest());
    assert_eq!(
        output_of(&s, &c, serde_json::json!(1)).await,
        Ending::Output(serde_json::json!(2).into())
    );
}

#[tokio::test]
async fn a_corrupt_index_entry_or_artifact_falls_back_to_hashing() {
    use sluice::sandbox::Ending;
    let dir = tempfile::tempdir().expect("temp dir");
    let artifacts = dir.path().join("artifacts");
    let file = dir.path().join("add_one.wasm");
    std::fs::copy(guest("add_one"), &file).expect("copy");
    let_files_settle().await;
    let first = sandbox_on(&artifacts).load_file(&file).await.expect("load");
    assert_eq!(first.load_info().source, LoadSource::Compiled);
    let entries = index_entries(&artifacts);
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    let good = std::fs::read(entry).expect("entry");

    // An entry naming a digest with no artifact, a truncated one, garbage, an empty file.
    let mut missing = good.clone();
    let digest_end = missing
        .iter()
        .position(|&b| b == b'\n')
        .expect("a first line");
    missing[digest_end - 64..digest_end].fill(b'0');
    for corrupt in [
        missing,
        good[..good.len() / 2].to_vec(),
        vec![0xff; 300],
        vec![],
    ] {
        std::fs::write(entry, &corrupt).expect("corrupt the entry");
        let s = sandbox_on(&artifacts);
        let c = s.load_file(&file).await.expect("falls back");
        assert_eq!(c.load_info().source, LoadSource::Precompiled);
        assert_eq!(c.digest(), first.digest());
        assert_eq!(
            output_of(&s, &c, serde_json::json!(1)).await,
            Ending::Output(serde_json::json!(2).into())
        );
        assert_eq!(std::fs::read(entry).expect("entry"), good, "rewritten");
        let c = sandbox_on(&artifacts).load_file(&file).await.expect("load");
        assert_eq!(c.load_info().source, LoadSource::Indexed);
    }

    // A corrupt artifact behind a good entry is discarded and rebuilt.
    let artifact = std::fs::read_dir(&artifacts)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("the artifact");
    let tmp = artifacts.join("corrupt.tmp");
    std::fs::write(&tmp, b"not an artifact").expect("write");
    std::fs::rename(&tmp, &artifact).expect("corrupt it");
    let s = sandbox_on(&artifacts);
    let c = s.load_file(&file).await.expect("load");
    assert_eq!(c.load_info().source, LoadSource::Compiled);
    assert_eq!(
        output_of(&s, &c, serde_json::json!(1)).await,
        Ending::Output(serde_json::json!(2).into())
    );
}

#[tokio::test]
async fn compiles_are_reported_as_load_events() {
    use sluice::sandbox::LoadEvent;
    let dir = tempfile::tempdir().expect("temp dir");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let s = Sandbox::builder()
        .artifact_dir(dir.path())
        .load_events(tx)
        .build()
        .expect("sandbox");
    let path = guest("sum");
    let size = std::fs::metadata(&path).expect("stat").len();
    s.load_file(&path).await.expect("load");
    let name = path.display().to_string();
    assert_eq!(
        rx.try_recv().expect("an event"),
        LoadEvent::Compiling {
            name: name.clone(),
            bytes: size
        }
    );
    match rx.try_recv().expect("an event") {
        LoadEvent::Compiled {
            name: n, bytes: b, ..
        } => assert_eq!((n, b), (name, size)),
        other => panic!("expected Compiled, got {other:?}"),
    }
    // Loading again compiles nothing, so reports nothing.
    s.load_file(&path).await.expect("load");
    assert!(rx.try_recv().is_err());

    let mut garbage = b"\0asm\x0d\0\x01\0".to_vec();
    garbage.extend_from_slice(&[0xff; 64]);
    s.load_bytes("garbage.wasm", garbage)
        .await
        .expect_err("not compiled");
    assert!(matches!(
        rx.try_recv().expect("an event"),
        LoadEvent::Compiling { name, bytes: 72 } if name == "garbage.wasm"
    ));
    assert!(matches!(
        rx.try_recv().expect("an event"),
        LoadEvent::CompileFailed { name, bytes: 72, .. } if name == "garbage.wasm"
    ));
}
