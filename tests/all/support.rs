//! Test support: builds the Rust guests once per test binary, and shares one sandbox across tests
//! so each component is compiled once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sluice::context::TaskContext;
use sluice::sandbox::{Ending, RunBudget, RunOutcome, Sandbox, TaskComponent};

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate is one level below the root")
}

/// The path of the built Rust guest `name` (a package under `examples/tasks/rust/` or
/// `tests/guests/`). The first call builds all of them.
pub fn guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(build_guests);
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.is_file(), "no guest `{name}` at {}", path.display());
    path
}

/// A fixture under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

fn build_guests() -> PathBuf {
    // A target directory of its own, so this never waits on the lock of the `cargo test` that
    // runs us.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args([
            "build",
            "--quiet",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
        ])
        .env("CARGO_TARGET_DIR", &target);
    for dir in ["examples/tasks/rust", "tests/guests"] {
        for entry in std::fs::read_dir(root().join(dir)).expect("guest directory") {
            let entry = entry.expect("directory entry");
            if entry.path().join("Cargo.toml").is_file() {
                cmd.arg("-p").arg(entry.file_name());
            }
        }
    }
    let out = cmd.output().expect("run cargo to build the guests");
    assert!(
        out.status.success(),
        "building the guests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2/guest")
}

/// One sandbox for the whole test binary.
pub fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| Sandbox::builder().build().expect("sandbox"))
}

/// Load a component from a path (compiled once per test binary).
pub async fn load(path: &Path) -> TaskComponent {
    sandbox()
        .load_file(path)
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Run `component` once with `input` under `budget`.
pub async fn run_with(
    component: &TaskComponent,
    input: serde_json::Value,
    budget: &RunBudget,
) -> RunOutcome {
    sandbox()
        .run(component, &input, &TaskContext::new("test"), budget, None)
        .await
}

/// Run the guest `name` once with `input` under `budget`.
pub async fn run_guest(name: &str, input: serde_json::Value, budget: &RunBudget) -> RunOutcome {
    run_with(&load(&guest(name)).await, input, budget).await
}

/// The hostile guest doing `input`.
pub async fn hostile(input: serde_json::Value, budget: &RunBudget) -> RunOutcome {
    run_guest("hostile", input, budget).await
}

/// After a hostile guest: a control task in the same process still completes.
pub async fn control_task_completes() {
    let out = run_guest("add_one", serde_json::json!(41), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(serde_json::json!(42)),
        "the control task did not complete"
    );
}

/// The text of an ending that should carry a message.
pub fn message(ending: &Ending) -> String {
    match ending {
        Ending::GuestFault { message } | Ending::HostFault { message } => message.clone(),
        Ending::LimitExceeded(l) => l.to_string(),
        Ending::TimedOut(t) => t.to_string(),
        other => format!("{other:?}"),
    }
}
