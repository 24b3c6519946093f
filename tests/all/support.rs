//! Test support: builds the Rust guests once per test binary, and shares one sandbox across tests
//! so each component is compiled once.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use sluice::context::TaskContext;
use sluice::sandbox::{Ending, RunBudget, RunOutcome, Sandbox, TaskComponent};

#[path = "../common/guests.rs"]
mod guests;
pub use guests::{guest, root};
#[path = "../common/loopback.rs"]
mod loopback;
pub use loopback::Loopback;

/// A fixture under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The manifest of the example flow `name`, with the example components in `examples/build/`
/// (copied from the guests this test binary built, so no second cargo runs on the same target).
pub fn example_flow(name: &str) -> PathBuf {
    static COPIED: OnceLock<()> = OnceLock::new();
    COPIED.get_or_init(|| {
        let build = root().join("examples/build");
        std::fs::create_dir_all(&build).expect("examples/build");
        for entry in std::fs::read_dir(root().join("examples/tasks/rust")).expect("examples") {
            let name = entry.expect("entry").file_name();
            let name = name.to_string_lossy();
            let to = build.join(format!("{name}.wasm"));
            let tmp = build.join(format!(".{name}.wasm.tmp"));
            std::fs::copy(guest(&name), &tmp).expect("copy a guest");
            std::fs::rename(&tmp, &to).expect("place a guest");
        }
    });
    root().join("examples").join(name).join("flow.toml")
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
        .run(
            component,
            &input.into(),
            &TaskContext::new("test"),
            budget,
            None,
        )
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
        Ending::Output(serde_json::json!(42).into()),
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

/// The task `name` of a flow run record printed as JSON.
pub fn task<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {run}"))
}

/// The states a task (or flow) record's history went through, in order.
pub fn history(t: &Value) -> Vec<String> {
    t["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|x| x["to"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `sluice <args>` with `home` as its home.
pub fn sluice(home: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_HOME", home)
        .output()
        .expect("run sluice")
}

/// A command's stdout as JSON; panics with both streams when it is not.
pub fn json_of(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
