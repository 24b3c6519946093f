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
    let artifacts: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").collect();
    assert_eq!(artifacts.len(), 1, "one artifact, no temporary files left");

    // A corrupt artifact is discarded and rebuilt, not trusted. (It is replaced, not overwritten
    // in place: the live sandboxes above map the file, exactly as Sluice's own writer assumes.)
    let path = artifacts[0].as_ref().expect("entry").path();
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
            &serde_json::json!(1),
            &sluice::context::TaskContext::new("t"),
            &Default::default(),
            None,
        )
        .await;
    assert_eq!(
        out.ending,
        sluice::sandbox::Ending::Output(serde_json::json!(2))
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
