//! The web UI in a real browser: `tests/ui/browser.mjs` (playwright-core driving Debian's
//! chromium, both installed by `scripts/setup`) against a real `sluice server` with runs made
//! through the CLI: sign in, the runs list, a failed run's graph and its failed task's log line
//! and error, cancelling a running run, another tenant's run unreachable, and axe-core on each
//! page. Screenshots go to `target/ui-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::server::{ServerProcess, stderr};
use crate::store::{hostile_path, write_flow};
use crate::support::{guest, json_of};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_owned()
}

/// Run `flow` (text) as `token`'s tenant through the CLI and return the run's id.
fn run_flow(server: &ServerProcess, token: &str, flow: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_flow(dir.path(), flow);
    let out = server.cli(token, &["run", path.to_str().expect("utf-8"), "--json"]);
    let run = json_of(&out);
    run["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run id: {}", stderr(&out)))
        .to_owned()
}

#[test]
fn a_tenant_signs_in_reads_a_failed_task_and_cancels_a_run_in_a_browser() {
    let server = ServerProcess::start(&[]);
    let alice = server.add_tenant("alice");
    let bob = server.add_tenant("bob");
    let hostile = hostile_path();
    let add_one = guest("add_one").display().to_string();
    let failed = run_flow(
        &server,
        &alice,
        &format!(
            r#"
name = "nightly"
[tasks.boom]
component = "{hostile}"
input = {{ do = "log_then_fail", log = "about to fail: the disk is full", message = "no space left on device" }}
[tasks.after]
component = "{add_one}"
input = "$tasks.boom"
"#
        ),
    );
    let other = run_flow(
        &server,
        &bob,
        &format!("name = \"bobs\"\n[tasks.a]\ncomponent = \"{add_one}\"\ninput = 1\n"),
    );
    // A run that sleeps until cancelled.
    let dir = tempfile::tempdir().expect("dir");
    let sleeper = write_flow(
        dir.path(),
        &format!(
            "name = \"sleeper\"\n[tasks.nap]\ncomponent = \"{hostile}\"\ninput = {{ do = \"sleep\", ms = 600000 }}\ntimeout = \"20m\"\n"
        ),
    );
    let mut client = server.spawn_run(&alice, &sleeper, true, false);
    let began = Instant::now();
    let running = loop {
        let runs = json_of(&server.cli(&alice, &["runs", "--json", "--flow", "sleeper"]));
        if let Some(r) = runs.as_array().and_then(|r| r.first())
            && r["state"] == "Running"
        {
            break r["id"].as_str().expect("id").to_owned();
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the sleeper never ran: {runs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let ui = repo().join("tests/ui");
    let shots = repo().join("target/ui-screenshots");
    let out = Command::new("node")
        .arg(ui.join("browser.mjs"))
        .current_dir(&ui)
        .env("SLUICE_URL", &server.url)
        .env("TOKEN", &alice)
        .env("FAILED_RUN", &failed)
        .env("RUNNING_RUN", &running)
        .env("OTHER_RUN", &other)
        .env("SHOTS", &shots)
        .output()
        .expect("node tests/ui/browser.mjs (scripts/setup installs node's packages)");
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser test failed:\n{said}");
    assert!(
        said.contains("ok: the cancelled run turns Cancelled"),
        "{said}"
    );
    // The CLI that started the sleeper sees it end Cancelled.
    let status = client.wait().expect("sluice run");
    assert_ne!(status.code(), Some(0));
    for page in [
        "sign-in",
        "runs",
        "run",
        "task",
        "cancelled",
        "other-tenant",
    ] {
        assert!(shots.join(format!("{page}.png")).is_file(), "{page}.png");
    }
}
