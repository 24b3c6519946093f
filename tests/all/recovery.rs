//! Signals and crashes inside flows, through the CLI: a PAUSE signal pauses the flow and a resume
//! finishes it; a SUCCESS signal's output reaches the downstream task; log-import lines keep
//! their order with stdout and stderr; `show` and `resume` (not only `runs`) record a dead run as
//! Crashed; a run killed while a task awaits its retry resumes and completes it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice::flow::{FlowBuilder, Input, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::sandbox::{LogLevel, LogSource, RunBudget};
use sluice::state::StateName;

use crate::support::{guest, history, hostile, json_of, sandbox, sluice, task};

fn write_flow(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("flow.toml");
    let h = guest("hostile").display().to_string();
    std::fs::write(&path, body.replace("HOSTILE", &format!("{h:?}"))).expect("write flow");
    path
}

pub(super) fn spawn_run(home: &Path, flow: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(flow)
        .arg("--json")
        .env("SLUICE_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice")
}

/// The id of the only run in `home`, once `ready` holds for its record (up to 120 s: a loaded
/// machine compiles slowly). Only while the run's process lives: every `sluice` command records
/// dead runs as Crashed, and the tests want their own command to be the first to see a dead run.
pub(super) fn wait_until(home: &Path, child: &mut Child, ready: impl Fn(&Value) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("sluice run exited ({status}) before the run was ready");
        }
        let runs = json_of(&sluice(home, &["runs", "--json", "--limit", "1"]));
        if let Some(id) = runs[0]["id"].as_str() {
            let v = json_of(&sluice(home, &["show", id, "--json"]));
            if ready(&v) {
                return id.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "the run never got ready");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(super) fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

#[test]
fn a_pause_signal_pauses_the_flow_and_resume_finishes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        r#"name = "pausing"
[tasks.a]
component = HOSTILE
input = { do = "len", of = "abc" }
[tasks.p]
component = HOSTILE
input = { do = "pause_on_first_attempt", value = "$tasks.a" }
[tasks.c]
component = HOSTILE
input = { do = "len", of = "$tasks.p" }
"#,
    );
    let out = sluice(&home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Paused");
    assert_eq!(task(&run, "a")["state"], "Completed");
    assert_eq!(task(&run, "p")["state"], "Paused");
    assert_eq!(task(&run, "p")["message"], "paused by the task");
    assert_eq!(task(&run, "c")["state"], "Pending");
    let id = run["id"].as_str().expect("id");

    let out = sluice(&home, &["resume", id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    let a = task(&run, "a");
    assert_eq!(a["attempts"], 1, "a completed task ran again: {a:#}");
    let p = task(&run, "p");
    assert_eq!(
        history(p),
        [
            "Pending",
            "Running",
            "Paused",
            "Pending",
            "Running",
            "Completed"
        ]
    );
    assert_eq!(p["attempts"], 2);
    // p returned a's output (5, the length of "\"abc\""), which c measured.
    assert_eq!(task(&run, "c")["output"], 1);
    let shown = json_of(&sluice(&home, &["show", id, "--json"]));
    assert_eq!(task(&shown, "p")["output"], 5);
}

#[tokio::test]
async fn a_success_signals_output_flows_downstream() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut square = TaskDef::new("square", guest("signal_success"));
    square.input = Input::Literal(json!(7).into());
    let mut next = TaskDef::new("next", guest("add_one"));
    next.input = Input::from_json(json!("$tasks.square"));
    let def = FlowBuilder::new("early")
        .task(square)
        .task(next)
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let square = run.task("square").expect("square");
    assert_eq!(square.state.name, StateName::Completed);
    assert_eq!(square.state.message.as_deref(), Some("squared early"));
    assert_eq!(
        run.task("next").and_then(|t| t.output.clone()),
        Some(json!(50).into())
    );
    assert_eq!(run.state.name, StateName::Completed);
}

#[tokio::test]
async fn log_import_lines_keep_their_order_with_stdout_and_stderr() {
    let out = hostile(json!({"do": "chatter", "lines": 3}), &RunBudget::default()).await;
    let lines: Vec<(LogSource, LogLevel, &str)> = out
        .logs
        .iter()
        .map(|r| (r.source, r.level, r.message.as_str()))
        .collect();
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push((LogSource::Log, LogLevel::Info, format!("log {i}")));
        expected.push((LogSource::Stdout, LogLevel::Info, format!("out {i}")));
        expected.push((LogSource::Stderr, LogLevel::Warn, format!("err {i}")));
    }
    let expected: Vec<(LogSource, LogLevel, &str)> = expected
        .iter()
        .map(|(s, l, m)| (*s, *l, m.as_str()))
        .collect();
    assert_eq!(lines, expected);
    assert!(
        out.logs.windows(2).all(|w| w[0].time <= w[1].time),
        "timestamps out of order"
    );
}

#[test]
fn stored_logs_keep_the_order_of_log_import_stdout_and_stderr() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "name = \"chatty\"\n[tasks.talk]\ncomponent = HOSTILE\ninput = { do = \"chatter\", lines = 2 }\n",
    );
    let out = sluice(&home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let logs = sluice(&home, &["logs", &id]);
    let messages: Vec<String> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .map(|l| l.split(": ").nth(1).unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        messages,
        ["log 0", "out 0", "err 0", "log 1", "out 1", "err 1"]
    );
}

/// A flow whose task `b` sleeps long enough to be killed while running, after `a` completed.
const SLOW: &str = r#"name = "slow"
[tasks.a]
component = HOSTILE
input = { do = "sleep", ms = 10 }
[tasks.b]
component = HOSTILE
input = { do = "sleep", ms = 1500, after = "$tasks.a" }
"#;

fn killed_mid_run(dir: &Path) -> (PathBuf, String) {
    let home = dir.join("home");
    let flow = write_flow(dir, SLOW);
    let mut child = spawn_run(&home, &flow);
    let id = wait_until(&home, &mut child, |v| {
        task(v, "a")["state"] == "Completed" && task(v, "b")["state"] == "Running"
    });
    kill(child);
    (home, id)
}

#[test]
fn show_records_a_dead_run_as_crashed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (home, id) = killed_mid_run(dir.path());
    // `show` is the first command to look at the store after the kill.
    let out = sluice(&home, &["show", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Crashed", "{run:#}");
    assert_eq!(run["live"], false);
    assert_eq!(task(&run, "b")["state"], "Crashed");
    assert_eq!(task(&run, "a")["state"], "Completed");
    // And the human form says so too.
    let text = String::from_utf8_lossy(&sluice(&home, &["show", &id]).stdout).into_owned();
    assert!(
        text.contains(": Crashed — the process running this flow run (pid "),
        "{text}"
    );
}

#[test]
fn resume_records_a_dead_run_as_crashed_and_finishes_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (home, id) = killed_mid_run(dir.path());
    // `resume` is the first command after the kill: it recovers the run, then continues it.
    let out = sluice(&home, &["resume", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    let flow_history = history(&run);
    assert!(
        flow_history.contains(&"Crashed".to_owned()),
        "never recorded Crashed: {flow_history:?}"
    );
    let b = task(&run, "b");
    assert!(history(b).contains(&"Crashed".to_owned()), "{b:#}");
    assert_eq!(b["attempts"], 2);
    assert_eq!(task(&run, "a")["attempts"], 1);
}

#[test]
fn a_run_killed_while_a_task_awaits_its_retry_resumes_and_completes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    // The first attempt asks for a retry in 5 s; the run is killed while it waits. The resumed
    // run counts the attempt made before it against the retries: the second attempt retries
    // again (one retry left), the third completes.
    let flow = write_flow(
        dir.path(),
        r#"name = "later"
[tasks.t]
component = HOSTILE
input = { do = "retry_before", attempt = 3, first_ms = 5000 }
retries = 2
[tasks.after]
component = HOSTILE
input = { do = "len", of = "$tasks.t" }
"#,
    );
    let mut child = spawn_run(&home, &flow);
    let id = wait_until(&home, &mut child, |v| {
        task(v, "t")["state"] == "AwaitingRetry"
    });
    kill(child);
    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    assert_eq!(runs[0]["state"], "Crashed", "{runs:#}");
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(task(&shown, "after")["state"], "Pending");

    let mut resume = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["resume", &id, "--json"])
        .env("SLUICE_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn resume");
    let deadline = Instant::now() + Duration::from_secs(60);
    while resume.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            kill(resume);
            panic!("the resumed run did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = resume.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    let t = task(&run, "t");
    assert_eq!(t["attempts"], 3, "{t:#}");
    let h = history(t);
    let awaiting = h
        .iter()
        .position(|s| s == "AwaitingRetry")
        .expect("AwaitingRetry");
    assert_eq!(h.last().map(String::as_str), Some("Completed"), "{h:?}");
    assert!(awaiting < h.len() - 1);
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(task(&shown, "t")["output"], 3);
    assert_eq!(task(&run, "after")["output"], 1);
}
