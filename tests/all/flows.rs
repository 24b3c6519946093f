//! Flows: every example through the CLI and the library API, resume, retries and handlers with an
//! injected clock, mapping, skips, concurrency limits, memory release, cancellation.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice::clock::SimClock;
use sluice::flow::{FlowBuilder, FlowDef, Input, MapOver, TaskDef, Trigger, manifest};
use sluice::runner::{FlowEvent, FlowRun, FlowRunner, PreparedFlow, RunOptions};
use sluice::sandbox::{CancelToken, RunBudget};
use sluice::state::{State, StateName};

use crate::support::{example_flow, guest, history, sandbox, task};

fn sluice_run(flow: &Path, args: &[&str]) -> Output {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(flow)
        .args(args)
        .arg("--json")
        .env("SLUICE_HOME", home)
        .output()
        .expect("run sluice")
}

fn run_json(flow: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let out = sluice_run(flow, args);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), v)
}

async fn prepare(runner: &FlowRunner, def: FlowDef, dir: &Path) -> PreparedFlow {
    runner.prepare(def, dir).await.expect("prepare")
}

/// Prepare a built flow and run it once with the defaults.
async fn run_def(runner: &FlowRunner, def: FlowDef) -> FlowRun {
    let flow = prepare(runner, def, Path::new(".")).await;
    runner.run(&flow, RunOptions::default()).await.expect("run")
}

async fn run_example(
    runner: &FlowRunner,
    name: &str,
    options: RunOptions,
) -> (PreparedFlow, FlowRun) {
    let path = example_flow(name);
    let def = manifest::load(&path).expect("manifest");
    let flow = prepare(runner, def, path.parent().expect("dir")).await;
    let run = runner.run(&flow, options).await.expect("run");
    (flow, run)
}

fn params(pairs: &[(&str, Value)]) -> RunOptions {
    RunOptions {
        parameters: pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        ..RunOptions::default()
    }
}

// ---- the examples, through the CLI ----

#[test]
fn trigger_branch_follows_task_a_both_ways() {
    let flow = example_flow("trigger-branch");
    let (code, run) = run_json(&flow, &[]);
    assert_eq!(code, Some(0));
    assert_eq!(run["state"], "Completed");
    assert_eq!(task(&run, "b")["state"], "Completed");
    assert_eq!(task(&run, "c")["state"], "TriggerFailed");
    assert_eq!(task(&run, "c")["type"], "FAILED");

    let (code, run) = run_json(&flow, &["--param", "fail=true"]);
    assert_eq!(code, Some(1));
    assert_eq!(run["state"], "Failed");
    assert_eq!(task(&run, "a")["state"], "Failed");
    assert_eq!(task(&run, "b")["state"], "TriggerFailed");
    assert_eq!(task(&run, "c")["state"], "Completed");
    assert_eq!(task(&run, "c")["output"], "C ran");
}

#[test]
fn retry_if_negative_shows_its_retries() {
    let (code, run) = run_json(&example_flow("retry-if-negative"), &[]);
    assert_eq!(code, Some(1));
    let t = task(&run, "retry_if_negative");
    assert_eq!(t["attempts"], 3);
    assert_eq!(
        history(t),
        [
            "Pending",
            "Running",
            "AwaitingRetry",
            "Retrying",
            "AwaitingRetry",
            "Retrying",
            "Failed"
        ]
    );
    let (code, run) = run_json(&example_flow("retry-if-negative"), &["--param", "x=4"]);
    assert_eq!(code, Some(0));
    assert_eq!(task(&run, "retry_if_negative")["output"], 4);
}

#[test]
fn try_unlock_needs_its_context_key() {
    let flow = example_flow("try-unlock");
    let (code, run) = run_json(&flow, &[]);
    assert_eq!((code, run["state"].as_str()), (Some(1), Some("Failed")));
    let (code, run) = run_json(&flow, &["--context", "key=abc"]);
    assert_eq!((code, run["state"].as_str()), (Some(0), Some("Completed")));
    assert_eq!(task(&run, "try_unlock")["output"], true);
}

#[test]
fn notify_on_retry_records_each_retrying_transition() {
    let (code, run) = run_json(&example_flow("notify-on-retry"), &[]);
    assert_eq!(code, Some(0));
    let t = task(&run, "flaky");
    let notes: Vec<&str> = t["logs"]
        .as_array()
        .map(|l| l.iter().filter_map(|r| r["message"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        notes,
        [
            "notify: `flaky` is retrying (attempt 2) after AwaitingRetry: attempt 1 is too early",
            "notify: `flaky` is retrying (attempt 3) after AwaitingRetry: attempt 2 is too early",
        ]
    );
}

#[test]
fn manual_pause_pauses_the_flow() {
    let (code, run) = run_json(&example_flow("manual-pause"), &[]);
    assert_eq!(code, Some(3));
    assert_eq!(run["state"], "Paused");
    assert_eq!(task(&run, "approve")["state"], "Paused");
    assert_eq!(task(&run, "ship")["state"], "Pending");
}

#[test]
fn map_add_one_sums_to_nine() {
    let (code, run) = run_json(&example_flow("map-add-one"), &[]);
    assert_eq!(code, Some(0));
    let add = task(&run, "add_one");
    assert_eq!(add["state"], "Mapped");
    assert_eq!(add["type"], "COMPLETED");
    let children = add["children"].as_array().expect("children");
    assert_eq!(children.len(), 3);
    for (i, c) in children.iter().enumerate() {
        assert_eq!(c["map_index"], i);
        assert_eq!(c["state"], "Completed");
    }
    assert_eq!(task(&run, "sum")["output"], 9);
    // add_one's output went to sum and was then released.
    assert_eq!(add["output_released"], true);
    assert_eq!(add["output"], Value::Null);
}

#[test]
fn cleanup_always_runs_after_a_failure() {
    let (code, run) = run_json(&example_flow("cleanup-always"), &[]);
    assert_eq!(code, Some(0));
    assert_eq!(task(&run, "work")["state"], "Failed");
    assert_eq!(task(&run, "cleanup")["state"], "Completed");
}

#[test]
fn manifest_errors_are_usage_errors_with_positions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        "name = \"x\"\n[tasks.a]\ncomponent = \"a.wasm\"\nretires = 1\n",
    )
    .expect("write");
    let out = sluice_run(&flow, &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flow.toml:4:1: unknown field `retires`, expected one of `component`"),
        "{err}"
    );
    assert!(
        err.trim_end().ends_with("(did you mean `retries`?)"),
        "{err}"
    );
    std::fs::write(&flow, "name = \"x\"\n[tasks.a]\ncomponent = \"a.wasm\"\n").expect("write");
    let err = String::from_utf8_lossy(&sluice_run(&flow, &[]).stderr).into_owned();
    assert!(
        err.contains("flow.toml:3:13: task `a`: component file `a.wasm` does not exist"),
        "{err}"
    );
    let out = sluice_run(&example_flow("trigger-branch"), &["--param", "fial=true"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown parameter `fial` (did you mean `fail`?)"),
        "{err}"
    );
}

// ---- the library API ----

#[tokio::test]
async fn the_examples_behave_the_same_through_the_library() {
    let runner = FlowRunner::new(sandbox().clone());
    let (_, run) = run_example(&runner, "trigger-branch", params(&[("fail", json!(true))])).await;
    assert_eq!(run.state.name, StateName::Failed);
    let (_, run) = run_example(
        &runner,
        "map-add-one",
        params(&[("numbers", json!([10, 20]))]),
    )
    .await;
    assert_eq!(
        run.task("sum").and_then(|t| t.output.clone()),
        Some(json!(32).into())
    );
    let (_, run) = run_example(&runner, "cleanup-always", RunOptions::default()).await;
    assert_eq!(run.state.name, StateName::Completed);
    let mut options = RunOptions::default();
    options.context.insert("key".into(), "abc".into());
    let (_, run) = run_example(&runner, "try-unlock", options).await;
    assert_eq!(run.state.name, StateName::Completed);
    let (_, run) = run_example(&runner, "try-unlock", RunOptions::default()).await;
    assert_eq!(run.state.name, StateName::Failed);
    let (_, run) = run_example(&runner, "retry-if-negative", RunOptions::default()).await;
    let t = run.task("retry_if_negative").expect("task");
    assert_eq!((t.state.name, t.attempts), (StateName::Failed, 3));
    let retries = t
        .history
        .iter()
        .filter(|h| h.to == StateName::Retrying)
        .count();
    assert_eq!(retries, 2);
    let (_, run) = run_example(&runner, "notify-on-retry", RunOptions::default()).await;
    let t = run.task("flaky").expect("task");
    assert_eq!((t.state.name, t.attempts), (StateName::Completed, 3));
    let notes = t
        .logs
        .iter()
        .filter(|l| l.message.starts_with("notify: "))
        .count();
    assert_eq!(notes, 2);
    let (_, run) = run_example(&runner, "manual-pause", RunOptions::default()).await;
    assert_eq!(run.state.name, StateName::Paused);
}

#[tokio::test]
async fn resuming_a_paused_run_with_a_start_task_completes_it() {
    let runner = FlowRunner::new(sandbox().clone());
    let (flow, paused) = run_example(&runner, "manual-pause", RunOptions::default()).await;
    assert_eq!(paused.state.name, StateName::Paused);
    // Input caching: the paused task holds the input it will run with.
    assert_eq!(
        paused.task("approve").and_then(|t| t.cached_input.clone()),
        Some(json!(42).into())
    );
    let done = runner
        .resume(&flow, paused, &["approve"], CancelToken::new())
        .await
        .expect("resume");
    assert_eq!(done.state.name, StateName::Completed);
    let prepare = done.task("prepare").expect("prepare");
    assert_eq!(prepare.attempts, 1, "a completed task is not re-run");
    assert_eq!(done.task("approve").map(|t| t.attempts), Some(1));
    assert_eq!(
        done.task("ship").and_then(|t| t.output.clone()),
        Some(json!(43).into())
    );
    let history: Vec<StateName> = done
        .task("approve")
        .expect("approve")
        .history
        .iter()
        .map(|t| t.to)
        .collect();
    assert_eq!(
        history,
        [
            StateName::Pending,
            StateName::Paused,
            StateName::Pending,
            StateName::Running,
            StateName::Completed
        ]
    );
    assert!(
        runner
            .resume(&flow, done, &["nope"], CancelToken::new())
            .await
            .is_err()
    );
}

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).expect("valid time")
}

#[tokio::test]
async fn retry_delays_follow_the_policy_on_an_injected_clock() {
    let clock = SimClock::new(start());
    let runner = FlowRunner::new(sandbox().clone()).clock(Arc::new(clock.clone()));
    let mut t = TaskDef::new("neg", guest("retry_if_negative"));
    t.input = Input::Literal(json!(-5).into());
    t.retries = 3;
    t.retry_delay = Duration::from_secs(10);
    t.backoff = Some(sluice::flow::Backoff {
        factor: 2.0,
        max: Duration::from_secs(25),
        jitter: 0.0,
    });
    let def = FlowBuilder::new("retries").task(t).build().expect("flow");
    let flow = prepare(&runner, def, Path::new(".")).await;
    let began = Instant::now();
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    // Three delays of 10 s, 20 s and 25 s (capped) passed on the clock, none in real time.
    assert!(began.elapsed() < Duration::from_secs(5));
    let t = run.task("neg").expect("task");
    assert_eq!(t.attempts, 4);
    let retrying: Vec<TimeDelta> = t
        .history
        .iter()
        .filter(|h| h.to == StateName::Retrying)
        .map(|h| h.time - start())
        .collect();
    assert_eq!(
        retrying,
        [
            TimeDelta::seconds(10),
            TimeDelta::seconds(30),
            TimeDelta::seconds(55)
        ]
    );
    let awaiting: Vec<_> = t
        .history
        .iter()
        .filter(|h| h.to == StateName::AwaitingRetry)
        .collect();
    assert_eq!(awaiting.len(), 3);
    assert_eq!(t.state.name, StateName::Failed);
    assert_eq!(clock.now_for_test(), start() + TimeDelta::seconds(55));
}

trait NowForTest {
    fn now_for_test(&self) -> DateTime<Utc>;
}

impl NowForTest for SimClock {
    fn now_for_test(&self) -> DateTime<Utc> {
        sluice::clock::Clock::now(self)
    }
}

#[tokio::test]
async fn handlers_chain_in_order_on_every_transition() {
    let clock = SimClock::new(start());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let runner = FlowRunner::new(sandbox().clone())
        .clock(Arc::new(clock))
        .task_handler(
            "one",
            Arc::new(move |task: &str, old: &State, new: State| {
                s1.lock()
                    .expect("lock")
                    .push(format!("first {task}: {} -> {}", old.name, new.name));
                // Turn a failure into a skip: the next handler sees the replacement.
                if new.name == StateName::Failed {
                    return State::new(StateName::Skipped, new.timestamp).with_message("forgiven");
                }
                new
            }),
        )
        .every_task_handler(Arc::new(move |task: &str, _old: &State, new: State| {
            s2.lock()
                .expect("lock")
                .push(format!("second {task}: {}", new.name));
            new
        }))
        .flow_handler(Arc::new(move |flow: &str, old: &State, new: State| {
            s3.lock()
                .expect("lock")
                .push(format!("flow {flow}: {} -> {}", old.name, new.name));
            new
        }));
    let def = FlowBuilder::new("handlers")
        .task(TaskDef::new("one", guest("signal_fail")))
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    assert_eq!(
        run.task("one").map(|t| t.state.name),
        Some(StateName::Skipped)
    );
    assert_eq!(run.state.name, StateName::Completed);
    assert_eq!(
        *seen.lock().expect("lock"),
        [
            "flow handlers: Pending -> Running",
            "first one: Pending -> Running",
            "second one: Running",
            "first one: Running -> Failed",
            "second one: Skipped",
            "flow handlers: Running -> Completed",
        ]
    );
}

#[tokio::test]
async fn each_hook_runs_its_handler_components_on_exactly_its_transitions() {
    let runner = FlowRunner::new(sandbox().clone());
    // Retried once, then completed; or failed outright. One hook per task, the same recorder.
    let retried = |name: &str| {
        let mut t = TaskDef::new(name, guest("hostile"));
        t.input = Input::from_json(json!({"do": "retry_on_first_attempt", "ms": 0}));
        t.retries = 1;
        t
    };
    let failed = |name: &str| {
        let mut t = TaskDef::new(name, guest("hostile"));
        t.input = Input::from_json(json!({"do": "panic", "message": "no"}));
        t
    };
    let recorder = || vec![guest("recorder")];
    let (mut on_state, mut on_completion, mut on_retry) = (
        retried("on_state"),
        retried("on_completion"),
        retried("on_retry"),
    );
    on_state.hooks.on_state = recorder();
    on_completion.hooks.on_completion = recorder();
    on_retry.hooks.on_retry = recorder();
    let (mut on_failure, mut no_completion) = (failed("on_failure"), failed("no_completion"));
    on_failure.hooks.on_failure = recorder();
    no_completion.hooks.on_completion = recorder();
    let def = FlowBuilder::new("hooks")
        .task(on_state)
        .task(on_completion)
        .task(on_retry)
        .task(on_failure)
        .task(no_completion)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    let seen = |name: &str| -> Vec<String> {
        run.task(name)
            .expect("task")
            .logs
            .iter()
            .filter(|l| l.message.contains(" -> "))
            .map(|l| l.message.clone())
            .collect()
    };
    assert_eq!(
        seen("on_state"),
        [
            "Pending -> Running",
            "Running -> AwaitingRetry",
            "AwaitingRetry -> Retrying",
            "Retrying -> Completed"
        ]
    );
    assert_eq!(seen("on_completion"), ["Retrying -> Completed"]);
    assert_eq!(seen("on_retry"), ["AwaitingRetry -> Retrying"]);
    assert_eq!(seen("on_failure"), ["Running -> Failed"]);
    assert!(
        seen("no_completion").is_empty(),
        "{:?}",
        seen("no_completion")
    );
}

#[tokio::test]
async fn a_handler_cannot_leave_a_finished_attempt_running_pending_or_cancelling() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut builder = FlowBuilder::new("replaced");
    for to in ["Running", "Pending", "Cancelling", "Failed"] {
        let mut t = TaskDef::new(format!("to_{to}"), guest("add_one"));
        t.input = Input::Literal(json!(1).into());
        t.hooks.on_completion = vec![guest("replacer")];
        builder = builder.task(t);
    }
    let run = run_def(&runner, builder.build().expect("flow")).await;
    for to in ["Running", "Pending", "Cancelling"] {
        let t = run.task(&format!("to_{to}")).expect("task");
        assert_eq!(t.state.name, StateName::Failed, "{to}");
        assert_eq!(
            t.state.message.as_deref(),
            Some(
                format!(
                    "a state handler replaced Completed with {to}, which cannot follow a \
                     finished attempt (only a finished, paused or scheduled state can)"
                )
                .as_str()
            ),
        );
    }
    // A finished state is taken as it is.
    let t = run.task("to_Failed").expect("task");
    assert_eq!(
        (t.state.name, t.state.message.as_deref()),
        (StateName::Failed, Some("replaced by the handler"))
    );
}

#[tokio::test]
async fn a_failing_handler_component_is_reported_and_cannot_crash_the_flow() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut t = TaskDef::new("t", guest("add_one"));
    t.input = Input::Literal(json!(1).into());
    // A task component is not a handler: refused when the flow is prepared.
    t.hooks.on_completion.push(guest("add_one"));
    let def = FlowBuilder::new("bad-handler")
        .task(t)
        .build()
        .expect("flow");
    let err = runner
        .prepare(def, Path::new("."))
        .await
        .expect_err("not a handler");
    assert!(
        err.to_string()
            .contains("a state handler must export `handle"),
        "{err}"
    );
}

#[tokio::test]
async fn skips_propagate_unless_the_task_opts_out() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut follows = TaskDef::new("follows", guest("identity"));
    follows.upstream_tasks.push("skipper".into());
    let mut runs_anyway = TaskDef::new("runs_anyway", guest("identity"));
    runs_anyway.upstream_tasks.push("skipper".into());
    runs_anyway.skip_on_upstream_skip = false;
    let def = FlowBuilder::new("skips")
        .task(TaskDef::new("skipper", guest("signal_skip")))
        .task(follows)
        .task(runs_anyway)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    let state = |n: &str| run.task(n).map(|t| t.state.name);
    assert_eq!(state("skipper"), Some(StateName::Skipped));
    assert_eq!(state("follows"), Some(StateName::Skipped));
    assert_eq!(
        run.task("follows")
            .and_then(|t| t.state.message.clone())
            .as_deref(),
        Some("upstream task `skipper` was skipped")
    );
    assert_eq!(state("runs_anyway"), Some(StateName::Completed));
    assert_eq!(run.state.name, StateName::Completed);
}

#[tokio::test]
async fn a_mapped_task_with_a_failing_child_fails_and_stops_its_consumers() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut add = TaskDef::new("add", guest("add_one"));
    add.input = Input::Literal(json!([1, "two", 3]).into());
    add.map = MapOver::Input;
    let mut sum = TaskDef::new("sum", guest("sum"));
    sum.input = Input::Task("add".into());
    let def = FlowBuilder::new("map-fail")
        .task(add)
        .task(sum)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    let add = run.task("add").expect("add");
    assert_eq!(add.state.name, StateName::Failed);
    assert_eq!(
        add.state.message.as_deref(),
        Some("1 of 3 mapped runs did not succeed: 1 is Failed")
    );
    assert_eq!(add.children[0].output, None);
    assert_eq!(
        run.task("sum").map(|t| t.state.name),
        Some(StateName::TriggerFailed)
    );

    // Mapping over fields zips them; other fields are passed to every child.
    let mut ctx = TaskDef::new("ctx", guest("identity"));
    ctx.input = Input::from_json(json!({"x": [1, 2], "y": ["a", "b"], "k": 0}));
    ctx.map = MapOver::Fields(vec!["x".into(), "y".into()]);
    let def = FlowBuilder::new("zip").task(ctx).build().expect("flow");
    let run = run_def(&runner, def).await;
    assert_eq!(
        run.task("ctx").and_then(|t| t.output.clone()),
        Some(json!([{"x": 1, "y": "a", "k": 0}, {"x": 2, "y": "b", "k": 0}]).into())
    );
}

#[tokio::test]
async fn context_reaches_every_task_with_parameters_and_map_index() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut probe = TaskDef::new("probe", guest("hostile"));
    probe.input =
        Input::from_json(json!({"do": "context", "keys": ["key", "scheduled_start", "n"]}));
    let def = FlowBuilder::new("ctx")
        .parameter("n", json!(5))
        .context("key", "from-flow")
        .task(probe)
        .build()
        .expect("flow");
    let flow = prepare(&runner, def, Path::new(".")).await;
    let mut options = params(&[("n", json!(6))]);
    options.context.insert("key".into(), "from-cli".into());
    let run = runner.run(&flow, options).await.expect("run");
    let out = run
        .task("probe")
        .and_then(|t| t.output.clone())
        .expect("output")
        .to_value()
        .expect("JSON");
    assert_eq!(out["flow_run_id"], json!(run.id.to_string()));
    assert_eq!(
        out["task_run_id"],
        json!(run.task("probe").map(|t| t.id.to_string()))
    );
    assert_eq!(out["task_name"], "probe");
    assert_eq!(out["attempt"], 1);
    assert_eq!(out["parameters"], json!({"Ok": {"n": 6}}));
    assert_eq!(out["get"]["key"], "from-cli");
    assert!(
        out["get"]["scheduled_start"]
            .as_str()
            .is_some_and(|s| s.contains('T'))
    );
}

#[tokio::test]
async fn concurrency_limits_hold_globally_and_per_tag() {
    let (events, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = FlowRunner::new(sandbox().clone()).events(events);
    let mut builder = FlowBuilder::new("limits").concurrency(3).tag_limit("db", 1);
    for i in 0..8 {
        let mut t = TaskDef::new(format!("t{i}"), guest("hostile"));
        t.input = Input::from_json(json!({"do": "sleep", "ms": 20}));
        if i % 2 == 0 {
            t.tags.push("db".into());
        }
        builder = builder.task(t);
    }
    let flow = prepare(&runner, builder.build().expect("flow"), Path::new(".")).await;
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    drop(runner);
    assert_eq!(run.state.name, StateName::Completed);
    let (mut running, mut db, mut max, mut max_db) = (BTreeMap::new(), 0i32, 0, 0);
    let mut flow_states = Vec::new();
    while let Some(e) = rx.recv().await {
        if let FlowEvent::Flow(state) = e {
            flow_states.push(state);
        }
        if let FlowEvent::Task { name, state, .. } = e {
            let is_db = name[1..].parse::<u32>().is_ok_and(|i| i % 2 == 0);
            let now_running = state == StateName::Running;
            let was = running.insert(name, now_running).unwrap_or(false);
            if now_running && !was && is_db {
                db += 1;
            }
            if !now_running && was && is_db {
                db -= 1;
            }
            max = max.max(running.values().filter(|r| **r).count());
            max_db = max_db.max(db);
        }
    }
    assert_eq!(max, 3, "the global limit");
    assert_eq!(max_db, 1, "the db tag's limit");
    // The flow run's own changes are events too, in order.
    assert_eq!(
        flow_states.first(),
        Some(&StateName::Running),
        "{flow_states:?}"
    );
    assert_eq!(
        flow_states.last(),
        Some(&StateName::Completed),
        "{flow_states:?}"
    );
}

/// A cancel while the only task awaits a retry an hour away: the machine hears it (no attempt
/// is running to notice it), ends the task and the run Cancelled and waits for nothing. The
/// cancel is made by a state handler when the task enters AwaitingRetry, so nothing sleeps; the
/// timeout only turns a hang into a failure.
#[tokio::test]
async fn a_cancel_while_a_task_awaits_its_retry_ends_the_run_at_once() {
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    let runner = FlowRunner::new(sandbox().clone()).every_task_handler(Arc::new(
        move |_: &str, _: &State, new: State| {
            if new.name == StateName::AwaitingRetry {
                canceller.cancel();
            }
            new
        },
    ));
    let mut t = TaskDef::new("flaky", guest("hostile"));
    t.input = Input::from_json(json!({"do": "panic", "message": "not yet"}));
    t.retries = 1;
    t.retry_delay = Duration::from_secs(3600);
    let def = FlowBuilder::new("cancel-retry")
        .task(t)
        .build()
        .expect("flow");
    let flow = prepare(&runner, def, Path::new(".")).await;
    let options = RunOptions {
        cancel,
        ..RunOptions::default()
    };
    let run = tokio::time::timeout(Duration::from_secs(120), runner.run(&flow, options))
        .await
        .expect("the run waited for the retry instead of ending on the cancel")
        .expect("run");
    assert_eq!(run.state.name, StateName::Cancelled);
    let t = run.task("flaky").expect("task");
    assert_eq!(t.state.name, StateName::Cancelled, "{t:#?}");
    assert_eq!(t.attempts, 1, "the retry never started");
}

#[tokio::test]
async fn cancelling_a_flow_with_a_guest_in_an_infinite_loop_ends_cancelled_quickly() {
    let cancelled_seen: Arc<Mutex<Vec<StateName>>> = Arc::default();
    let seen = cancelled_seen.clone();
    let runner = FlowRunner::new(sandbox().clone()).every_task_handler(Arc::new(
        move |_: &str, _: &State, new: State| {
            seen.lock().expect("lock").push(new.name);
            new
        },
    ));
    let mut spin = TaskDef::new("spin", guest("hostile"));
    spin.input = Input::from_json(json!({"do": "loop"}));
    spin.budget = RunBudget {
        fuel: None,
        ..RunBudget::default()
    };
    let mut after = TaskDef::new("after", guest("identity"));
    after.upstream_tasks.push("spin".into());
    after.trigger = Trigger::AllFinished;
    let def = FlowBuilder::new("cancel")
        .task(spin)
        .task(after)
        .build()
        .expect("flow");
    let flow = prepare(&runner, def, Path::new(".")).await;
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        canceller.cancel();
    });
    let began = Instant::now();
    let options = RunOptions {
        cancel,
        ..RunOptions::default()
    };
    let run = runner.run(&flow, options).await.expect("run");
    let stopped_after_cancel = began.elapsed() - Duration::from_millis(200);
    assert!(
        stopped_after_cancel < Duration::from_secs(1),
        "{stopped_after_cancel:?}"
    );
    assert_eq!(run.state.name, StateName::Cancelled);
    let flow_states: Vec<StateName> = run.history.iter().map(|h| h.to).collect();
    assert!(
        flow_states.contains(&StateName::Cancelling),
        "{flow_states:?}"
    );
    assert_eq!(
        run.task("spin").map(|t| t.state.name),
        Some(StateName::Cancelled)
    );
    assert_eq!(
        run.task("after").map(|t| t.state.name),
        Some(StateName::Cancelled)
    );
    // Handlers still ran for the cancellations.
    assert!(
        cancelled_seen
            .lock()
            .expect("lock")
            .contains(&StateName::Cancelled)
    );
}

#[tokio::test]
async fn consumed_outputs_are_released_and_terminal_outputs_kept() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut a = TaskDef::new("a", guest("add_one"));
    a.input = Input::Literal(json!(1).into());
    let mut b = TaskDef::new("b", guest("add_one"));
    b.input = Input::Task("a".into());
    let mut c = TaskDef::new("c", guest("add_one"));
    c.input = Input::Task("a".into());
    let def = FlowBuilder::new("release")
        .task(a)
        .task(b)
        .task(c)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    let a = run.task("a").expect("a");
    assert!(a.output_released);
    assert_eq!(a.output, None);
    assert_eq!(
        run.task("b").and_then(|t| t.output.clone()),
        Some(json!(3).into())
    );
    assert_eq!(
        run.task("c").and_then(|t| t.output.clone()),
        Some(json!(3).into())
    );
}

#[test]
fn ctrl_c_cancels_a_running_flow_from_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let flow = dir.path().join("flow.toml");
    let manifest = format!(
        "name = \"spin\"\n[tasks.spin]\ncomponent = {:?}\ninput = {{ do = \"loop\" }}\nfuel = \"unlimited\"\n",
        guest("hostile").display().to_string()
    );
    std::fs::write(&flow, manifest).expect("write");
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .env("SLUICE_HOME", home)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    // Let it compile and start spinning, then press Ctrl-C.
    std::thread::sleep(Duration::from_millis(1500));
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait");
    assert!(
        sent.elapsed() < Duration::from_secs(1),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let run: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(run["state"], "Cancelled");
    assert_eq!(task(&run, "spin")["state"], "Cancelled");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelling"));
}

#[tokio::test]
async fn a_task_fed_by_an_empty_map_runs_exactly_once() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut a = TaskDef::new("a", guest("add_one"));
    a.input = Input::Literal(json!([]).into());
    a.map = MapOver::Input;
    let mut b = TaskDef::new("b", guest("sum"));
    b.input = Input::Task("a".into());
    let mut c = TaskDef::new("c", guest("add_one"));
    c.input = Input::Task("b".into());
    let def = FlowBuilder::new("empty-map")
        .task(a)
        .task(b)
        .task(c)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    assert_eq!(run.task("a").map(|t| t.state.name), Some(StateName::Mapped));
    for name in ["b", "c"] {
        let t = run.task(name).expect("task");
        assert_eq!(t.attempts, 1, "{name}");
        let states: Vec<StateName> = t.history.iter().map(|h| h.to).collect();
        assert_eq!(
            states,
            [StateName::Pending, StateName::Running, StateName::Completed],
            "{name}"
        );
    }
    assert_eq!(
        run.task("c").and_then(|t| t.output.clone()),
        Some(json!(1).into())
    );
}

#[tokio::test]
async fn an_absurd_retry_delay_from_a_guest_cannot_crash_the_host() {
    let clock = SimClock::new(start());
    let runner = FlowRunner::new(sandbox().clone()).clock(Arc::new(clock));
    let mut t = TaskDef::new("t", guest("hostile"));
    t.input = Input::from_json(json!({"do": "retry_after", "ms": u64::MAX}));
    t.retries = 1;
    let def = FlowBuilder::new("far").task(t).build().expect("flow");
    let run = run_def(&runner, def).await;
    let t = run.task("t").expect("task");
    assert_eq!((t.state.name, t.attempts), (StateName::Failed, 2));
    let awaiting = t.history.iter().find(|h| h.to == StateName::AwaitingRetry);
    assert!(awaiting.is_some());
}

#[tokio::test]
async fn resuming_with_a_record_of_another_flow_is_refused() {
    let runner = FlowRunner::new(sandbox().clone());
    let (_, paused) = run_example(&runner, "manual-pause", RunOptions::default()).await;
    let (other, _) = run_example(&runner, "cleanup-always", RunOptions::default()).await;
    let err = runner
        .resume(&other, paused, &[], CancelToken::new())
        .await
        .expect_err("mismatch");
    assert!(
        err.to_string()
            .starts_with("the run record does not match flow `cleanup-always`"),
        "{err}"
    );
}

/// A task whose trigger does not pass is TriggerFailed with a message naming the trigger and each
/// upstream state (a mutant of `Trigger::as_str` that scripts/mutants found survived).
#[tokio::test]
async fn a_trigger_that_does_not_pass_is_named_in_the_message() {
    let runner = FlowRunner::new(sandbox().clone());
    let mut ok = TaskDef::new("ok", guest("add_one"));
    ok.input = Input::Literal(json!(1).into());
    let mut needs_success = TaskDef::new("needs_success", guest("identity"));
    needs_success.upstream_tasks.push("fails".into());
    let mut needs_failure = TaskDef::new("needs_failure", guest("identity"));
    needs_failure.upstream_tasks.push("ok".into());
    needs_failure.trigger = Trigger::AnyFailed;
    let def = FlowBuilder::new("named-triggers")
        .task(TaskDef::new("fails", guest("signal_fail")))
        .task(ok)
        .task(needs_success)
        .task(needs_failure)
        .build()
        .expect("flow");
    let run = run_def(&runner, def).await;
    let message = |name: &str| {
        let t = run.task(name).expect("task");
        assert_eq!(t.state.name, StateName::TriggerFailed, "{name}");
        t.state.message.clone().unwrap_or_default()
    };
    assert_eq!(
        message("needs_success"),
        "trigger `all_successful` did not pass: `fails` is Failed"
    );
    assert_eq!(
        message("needs_failure"),
        "trigger `any_failed` did not pass: `ok` is Completed"
    );
}
