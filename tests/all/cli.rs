//! `sluice task run` through the binary, as a user runs it.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{fixture, guest};

fn sluice(args: &[&str]) -> Output {
    let home = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_HOME", home)
        .output()
        .expect("run sluice")
}

/// `sluice task run <component> <args>`.
fn task_run(component: &str, args: &[&str]) -> Output {
    let mut all = vec!["task", "run", component];
    all.extend_from_slice(args);
    sluice(&all)
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn path(name: &str) -> String {
    guest(name).display().to_string()
}

#[test]
fn try_unlock_completes_with_the_key_and_fails_without_it() {
    let out = task_run(&path("try_unlock"), &["--context", "key=abc", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["state"], "Completed");
    assert_eq!(v["type"], "COMPLETED");
    assert_eq!(v["output"], true);
    for field in [
        "message",
        "fuel_consumed",
        "duration_ms",
        "memory_peak_bytes",
        "logs",
    ] {
        assert!(v.get(field).is_some(), "no `{field}` in {v}");
    }
    assert!(v["fuel_consumed"].as_u64().is_some_and(|f| f > 0));

    let out = task_run(&path("try_unlock"), &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("state    Failed (FAILED)\n"), "{text}");
}

#[test]
fn retry_if_negative_awaits_retry_or_completes() {
    let out = task_run(&path("retry_if_negative"), &["--input", "-1", "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let v = json_of(&out);
    assert_eq!(v["state"], "AwaitingRetry");
    assert_eq!(v["type"], "SCHEDULED");

    let out = task_run(&path("retry_if_negative"), &["--input", "2", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v = json_of(&out);
    assert_eq!(v["state"], "Completed");
    assert_eq!(v["output"], 2);
}

#[test]
fn every_exit_code() {
    let code = |args: &[&str]| sluice(args).status.code();
    assert_eq!(code(&["task", "run", &path("signal_skip")]), Some(0));
    assert_eq!(code(&["task", "run", &path("signal_fail")]), Some(1));
    assert_eq!(code(&["task", "run", &path("signal_pause")]), Some(3));
    let hostile = path("hostile");
    assert_eq!(
        code(&[
            "task",
            "run",
            &hostile,
            "--input",
            r#"{"do":"loop"}"#,
            "--fuel",
            "1000000"
        ]),
        Some(1)
    );
    assert_eq!(
        code(&["task", "run", &hostile, "--input", "{not json"]),
        Some(2)
    );
    assert_eq!(
        code(&["task", "run", &hostile, "--timeout", "soon"]),
        Some(2)
    );
    assert_eq!(code(&["task", "run", "/no/such.wasm"]), Some(2));
    assert_eq!(code(&["task", "bogus"]), Some(2));
}

#[test]
fn limits_from_flags_are_applied_and_named() {
    let hostile = path("hostile");
    let out = task_run(
        &hostile,
        &[
            "--input",
            r#"{"do":"loop"}"#,
            "--fuel",
            "unlimited",
            "--timeout",
            "200ms",
            "--json",
        ],
    );
    let v = json_of(&out);
    assert_eq!(v["state"], "TimedOut");
    assert_eq!(v["message"], "wall-clock deadline of 200ms passed");

    let out = task_run(
        &hostile,
        &[
            "--input",
            r#"{"do":"memory_bomb"}"#,
            "--memory",
            "16MiB",
            "--json",
        ],
    );
    let v = json_of(&out);
    assert_eq!(v["state"], "Failed");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("memory limit of 16777216 bytes exceeded"),
        "{msg}"
    );

    let out = task_run(
        &fixture("huge_output.wat").display().to_string(),
        &["--memory", "2GiB", "--json"],
    );
    let v = json_of(&out);
    assert_eq!(v["message"], "output limit of 16777216 bytes exceeded");
}

#[test]
fn invalid_components_and_input_are_usage_errors_with_clear_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let noise = dir.path().join("noise.wasm");
    std::fs::write(&noise, [0x13u8, 0x37, 0, 1, 2, 3]).expect("write");
    let out = task_run(&noise.display().to_string(), &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("noise.wasm` is not a WebAssembly component"),
        "{err}"
    );

    let out = task_run(&path("add_one"), &["--input", "[1,"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("error: --input is not valid JSON: "),
        "{err}"
    );
}

/// `sluice build`: runs each declared build command once, skips tasks newer than their
/// sources, names the task, the command and its stderr when a build fails; `run --build`.
#[test]
fn sluice_build_builds_skips_and_reports_failures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::copy(guest("add_one"), d.join("src.wasm")).expect("copy");
    let flow = d.join("flow.toml");
    std::fs::write(
        &flow,
        r#"name = "built"
[tasks.a]
component = { path = "out.wasm", build = "cp src.wasm out.wasm", sources = ["src.wasm"] }
input = 1
"#,
    )
    .expect("write");
    let flow = flow.to_str().expect("utf-8");
    let build = |args: &[&str]| {
        let out = sluice(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = build(&["build", flow]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("build: a: built in"), "{err}");
    let (_, err) = build(&["build", flow]);
    assert!(err.contains("build: a: up to date"), "{err}");
    // A source newer than the component: built again.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options()
        .write(true)
        .open(d.join("src.wasm"))
        .and_then(|f| f.set_modified(later))
        .expect("touch");
    let (_, err) = build(&["build", flow]);
    assert!(err.contains("build: a: built in"), "{err}");
    let out = sluice(&["run", "--build", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(json_of(&out)["tasks"][0]["output"], 2);

    std::fs::write(
        d.join("flow.toml"),
        r#"name = "broken"
[tasks.a]
component = { path = "never.wasm", build = "echo 'no compiler here' >&2; exit 3" }
"#,
    )
    .expect("write");
    let (code, err) = build(&["build", flow]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "building `a`: `echo 'no compiler here' >&2; exit 3` failed with exit status: 3"
        ) && err.contains("no compiler here"),
        "{err}"
    );
}

/// A first run shows its compiles; a second run of the same flow compiles nothing.
#[test]
fn the_first_run_reports_compiling_and_the_second_never_compiles() {
    let home = tempfile::tempdir().expect("home");
    let flow = crate::support::example_flow("map-add-one");
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg(&flow)
            .env("SLUICE_HOME", home.path())
            // Artifacts are per user: a directory of this test's own, so the first run compiles.
            .env("SLUICE_ARTIFACTS", home.path().join("artifacts"))
            .output()
            .expect("run sluice");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let first = run();
    assert!(
        first.contains("compiling") && first.contains("add_one.wasm") && first.contains("compiled"),
        "{first}"
    );
    let second = run();
    assert!(!second.contains("compiling"), "{second}");
}

/// SIGTERM (what `kill`, service managers and container runtimes send) ends a `sluice run` as
/// Ctrl-C does: the run goes Cancelling → Cancelled, is recorded so (not found Crashed later),
/// and the process exits promptly with code 1.
#[test]
fn sigterm_cancels_a_running_flow_and_records_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = dir.path().join("flow.toml");
    let manifest = format!(
        "name = \"spin\"\n[tasks.spin]\ncomponent = {:?}\ninput = {{ do = \"loop\" }}\nfuel = \"unlimited\"\n",
        path("hostile")
    );
    std::fs::write(&flow, manifest).expect("write");
    let sluice = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env("SLUICE_HOME", &home)
            .output()
            .expect("run sluice")
    };
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .env("SLUICE_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    // Wait until the task is Running in the store, then send SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let runs = json_of(&sluice(&["runs", "--json"]));
        if runs[0]["tasks"]["Running"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the task never started: {runs}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cancelling (SIGTERM)"), "{err}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Cancelled");
    let id = run["id"].as_str().expect("id");
    let flow_states = crate::support::history(&run);
    assert!(
        flow_states.ends_with(&["Cancelling".to_owned(), "Cancelled".to_owned()]),
        "{flow_states:?}"
    );

    // Recorded: another process sees it Cancelled, not Crashed, and not live.
    let shown = json_of(&sluice(&["show", id, "--json"]));
    assert_eq!(shown["state"], "Cancelled", "{shown}");
    assert_eq!(shown["live"], false);
    assert_eq!(crate::support::task(&shown, "spin")["state"], "Cancelled");
    let runs = json_of(&sluice(&["runs", "--json"]));
    assert_eq!(runs[0]["state"], "Cancelled");
}
