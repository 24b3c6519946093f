//! Builds the Python, JavaScript and C guests (the example tasks under `examples/tasks/{python,
//! js,c}/` and the test guests under `tests/polyglot/`) with the repository's build scripts, once
//! per test or bench binary, into `$CARGO_TARGET_TMPDIR/polyglot/`. The scripts skip components
//! that are newer than their sources and were built with the same toolchain (each one's
//! `.toolchain` record), so later runs are cheap and a toolchain change rebuilds them. Needs `scripts/setup-polyglot`.
//! Shared by the integration tests and the benchmarks through `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The languages with a guest SDK besides Rust, as named under `guest-sdk/` and in file names.
pub const LANGUAGES: [&str; 3] = ["python", "js", "c"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate is one level below the root")
}

/// The built component of example task `name` in `lang` (`examples/tasks/<lang>/<name>`), or of
/// the test guest (`tests/polyglot/<lang>`) for the name `guest`, or of the flow body
/// (`tests/polyglot/<lang>-flow`, Python and JavaScript) for `flow`, or of the Python body of
/// `examples/dynamic-flow` for (`python`, `dynamic_flow`). The first call builds
/// them all.
pub fn polyglot_guest(lang: &str, name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(build_all);
    let path = dir.join(format!("{lang}_{name}.wasm"));
    assert!(
        path.is_file(),
        "no {lang} guest `{name}` at {}",
        path.display()
    );
    path
}

fn build_all() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polyglot");
    std::fs::create_dir_all(&dir).expect("the polyglot build directory");
    let missing: Vec<&str> = [
        ".venv/bin/componentize-py",
        "guest-sdk/js/node_modules/@bytecodealliance/componentize-js/package.json",
        ".tools/bin/wit-bindgen",
        ".tools/bin/wasm-tools",
        ".tools/share/wasi_snapshot_preview1.reactor.wasm",
    ]
    .into_iter()
    .filter(|p| !root().join(p).exists())
    .collect();
    assert!(
        missing.is_empty(),
        "the Python, JavaScript and C toolchains are not installed (missing {}): run \
         scripts/setup-polyglot first",
        missing.join(", ")
    );
    // The examples (the languages in parallel), and the three test guests side by side.
    let mut builds = vec![Command::new(root().join("scripts/build-polyglot"))];
    builds[0].arg(&dir);
    for lang in LANGUAGES {
        let mut cmd = Command::new(root().join("guest-sdk").join(lang).join("build"));
        cmd.arg(root().join("tests/polyglot").join(lang))
            .arg(dir.join(format!("{lang}_guest.wasm")));
        builds.push(cmd);
    }
    // The Python and JavaScript flow bodies (world `flow`).
    for lang in ["python", "js"] {
        let mut cmd = Command::new(root().join("guest-sdk").join(lang).join("build"));
        cmd.arg(root().join("tests/polyglot").join(format!("{lang}-flow")))
            .arg(dir.join(format!("{lang}_flow.wasm")));
        builds.push(cmd);
    }
    // The Python body of examples/dynamic-flow.
    let mut cmd = Command::new(root().join("guest-sdk/python/build"));
    cmd.arg(root().join("examples/dynamic-flow/flow.py"))
        .arg(dir.join("python_dynamic_flow.wasm"));
    builds.push(cmd);
    let children: Vec<_> = builds
        .iter_mut()
        .map(|cmd| {
            let shown = format!("{cmd:?}");
            let child = cmd
                .current_dir(root())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
            (shown, child)
        })
        .collect();
    for (shown, child) in children {
        let out = child.wait_with_output().expect("wait for a guest build");
        assert!(
            out.status.success(),
            "building the polyglot guests failed: {shown}\n{}{}\n(run scripts/setup-polyglot if \
             a toolchain is missing)",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}
