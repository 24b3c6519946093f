//! Flow semantics under hostile or careless input: cache identity (context, flow, namespace),
//! exact values (number text kept), guest-chosen retry delays capped, state handlers held to the
//! retry budget, FAIL retrying like every failure, and the per-run cap on mapped children.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice::clock::SimClock;
use sluice::flow::{
    Backoff, DEFAULT_MAX_MAPPED_CHILDREN, DEFAULT_MAX_RETRY_DELAY, FlowBuilder, FlowDef, Input,
    MapOver, TaskDef,
};
use sluice::runner::{FlowRun, FlowRunner, RunOptions, TaskRun};
use sluice::state::{State, StateName, StateType};

use crate::support::{guest, history, json_of, sandbox, sluice, task};

// ---------------------------------------------------------------------------------------------
// Helpers

/// `sluice run <flow> <args> --json` in `home`: the exit code and the run record.
fn run(home: &Path, flow: &Path, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["run", flow.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    all.push("--json");
    let out = sluice(home, &all);
    let v = json_of(&out);
    (out.status.code(), v)
}

/// Write `text` as `<dir>/<name>.toml`.
fn write_flow(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write flow");
    path
}

fn component(name: &str) -> String {
    // TOML basic strings: a path with backslashes or quotes would need escaping; test paths have
    // none.
    guest(name).display().to_string()
}

#[track_caller]
fn assert_cached(t: &Value, source: &Value) {
    assert_eq!(t["state"], "Cached", "{t:#}");
    assert_eq!(t["attempts"], 0, "{t:#}");
    assert_eq!(t["cache"]["source_flow_run"], *source, "{t:#}");
}

#[track_caller]
fn assert_ran(t: &Value) {
    assert_ne!(t["state"], "Cached", "{t:#}");
    assert_eq!(t["attempts"], 1, "{t:#}");
    assert_eq!(t["cache"]["status"], "miss", "{t:#}");
}

fn start() -> DateTime<Utc> {
    DateTime::from_timestamp(1_900_000_000, 0).expect("valid time")
}

async fn run_def(runner: &FlowRunner, def: FlowDef) -> FlowRun {
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    // A bound, so that a regression that loops for ever fails instead of hanging the suite.
    tokio::time::timeout(
        Duration::from_secs(120),
        runner.run(&flow, RunOptions::default()),
    )
    .await
    .expect("the flow run must end")
    .expect("run")
}

/// The time between each AwaitingRetry and the Retrying after it.
fn retry_waits(t: &TaskRun) -> Vec<TimeDelta> {
    let mut waits = Vec::new();
    let mut awaiting = None;
    for h in &t.history {
        match h.to {
            StateName::AwaitingRetry => awaiting = Some(h.time),
            StateName::Retrying => {
                if let Some(a) = awaiting.take() {
                    waits.push(h.time - a);
                }
            }
            _ => {}
        }
    }
    waits
}

// ---------------------------------------------------------------------------------------------
// Cache identity: the context a task can read, and the flow (or its cache namespace)

#[test]
fn a_cached_output_is_only_served_under_the_same_context_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "unlock",
        &format!(
            "name = \"unlock\"\n[tasks.unlock]\ncomponent = \"{}\"\ncache_for = \"1h\"\n",
            component("try_unlock")
        ),
    );
    let (code, first) = run(&home, &flow, &["--context", "key=abc"]);
    assert_eq!(code, Some(0), "{first:#}");
    assert_eq!(task(&first, "unlock")["output"], true);
    assert_ran(task(&first, "unlock"));
    // The same context: a hit, although the per-run keys (flow_run_id, task_run_id,
    // scheduled_start) differ.
    let (code, second) = run(&home, &flow, &["--context", "key=abc"]);
    assert_eq!(code, Some(0), "{second:#}");
    assert_cached(task(&second, "unlock"), &first["id"]);
    // Another value of the key the task reads: it runs (and fails), never Cached `true`.
    for args in [&["--context", "key=WRONG"][..], &[]] {
        let (code, other) = run(&home, &flow, args);
        let t = task(&other, "unlock");
        assert_eq!(code, Some(1), "{args:?}: {other:#}");
        assert_eq!(t["state"], "Failed", "{args:?}: {t:#}");
        assert_ran(t);
        assert!(
            t["cache"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("context values")),
            "{t:#}"
        );
    }
    // A context value the task does not read still changes the key (the host cannot know which
    // keys a task reads).
    let (_, extra) = run(&home, &flow, &["--context", "key=abc", "--context", "z=1"]);
    assert_ran(task(&extra, "unlock"));
}

#[test]
fn only_completed_runs_are_cached_and_a_hit_is_not_cached_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "cached",
        &format!(
            "name = \"cached\"\n[tasks.ok]\ncomponent = \"{}\"\ninput = 1\ncache_for = \"1h\"\n\
             [tasks.skip]\ncomponent = \"{}\"\ncache_for = \"1h\"\n",
            component("add_one"),
            component("signal_skip")
        ),
    );
    let (_, first) = run(&home, &flow, &[]);
    assert_eq!(task(&first, "skip")["state"], "Skipped", "{first:#}");
    let (_, second) = run(&home, &flow, &[]);
    assert_cached(task(&second, "ok"), &first["id"]);
    // A Skipped run (a Completed type, without an output of its own) is not cached.
    assert_ran(task(&second, "skip"));
    let out = sluice(&home, &["cache", "ls", "--json"]);
    let entries = json_of(&out);
    let tasks: Vec<&str> = entries
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["task"].as_str())
        .collect();
    assert_eq!(
        tasks,
        ["ok"],
        "one entry, from the run that computed it: {entries:#}"
    );
}

#[test]
fn an_output_completed_on_a_retry_is_cached() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "retried",
        &format!(
            "name = \"retried\"\n[tasks.t]\ncomponent = \"{}\"\n\
             input = {{ do = \"retry_on_first_attempt\", ms = 0 }}\nretries = 1\ncache_for = \"1h\"\n",
            component("hostile")
        ),
    );
    let (code, first) = run(&home, &flow, &[]);
    assert_eq!(code, Some(0), "{first:#}");
    assert_eq!(task(&first, "t")["attempts"], 2, "{first:#}");
    let (_, second) = run(&home, &flow, &[]);
    assert_cached(task(&second, "t"), &first["id"]);
}

#[test]
fn a_cached_output_is_never_served_to_another_flow_unless_both_name_its_namespace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let unlock = component("try_unlock");
    let manifest = |name: &str, namespace: Option<&str>| {
        let ns = namespace.map_or(String::new(), |n| format!("cache_namespace = \"{n}\"\n"));
        write_flow(
            dir.path(),
            name,
            &format!(
                "name = \"{name}\"\n{ns}[context]\nkey = \"abc\"\n[tasks.unlock]\n\
                 component = \"{unlock}\"\ncache_for = \"1h\"\n"
            ),
        )
    };
    let (_, one) = run(&home, &manifest("one", None), &[]);
    assert_ran(task(&one, "unlock"));
    let (_, again) = run(&home, &manifest("one", None), &[]);
    assert_cached(task(&again, "unlock"), &one["id"]);
    // Another flow, a task of the same name, the same component and context: not shared.
    let (code, two) = run(&home, &manifest("two", None), &[]);
    assert_eq!(code, Some(0));
    assert_ran(task(&two, "unlock"));
    // Two flows that name the same namespace share deliberately.
    let (_, three) = run(&home, &manifest("three", Some("shared")), &[]);
    assert_ran(task(&three, "unlock"));
    let (_, four) = run(&home, &manifest("four", Some("shared")), &[]);
    assert_cached(task(&four, "unlock"), &three["id"]);
    // A namespace is not the flow of the same name.
    let (_, shared) = run(&home, &manifest("shared", None), &[]);
    assert_ran(task(&shared, "unlock"));
}

// ---------------------------------------------------------------------------------------------
// Exact values: number text is hashed, kept and replayed as the guest saw and wrote it

#[test]
fn numbers_are_hashed_stored_and_replayed_exactly() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = |name: &str, component_name: &str| {
        write_flow(
            dir.path(),
            name,
            &format!(
                "name = \"{name}\"\n[parameters]\nx = 0\n[tasks.t]\ncomponent = \"{}\"\n\
                 input = \"$params.x\"\ncache_for = \"1h\"\ncache_validator = \"all_inputs\"\n",
                component(component_name)
            ),
        )
    };
    // `add_one` takes an integer: 1 → 2, and 1.0 is refused, also after 1 was cached.
    let add = flow("add", "add_one");
    let (code, r) = run(&home, &add, &["--param", "x=1"]);
    assert_eq!((code, &task(&r, "t")["output"]), (Some(0), &json!(2)));
    let (code, r) = run(&home, &add, &["--param", "x=1.0"]);
    let t = task(&r, "t");
    assert_eq!(code, Some(1), "{t:#}");
    assert_eq!(t["state"], "Failed", "{t:#}");
    assert_ran(t);
    assert!(
        t["message"].as_str().is_some_and(|m| m.contains("1.0")),
        "{t:#}"
    );

    // `identity` returns the text it was given: the output, and its replay from the cache, keep
    // each number as written.
    let echo = flow("echo", "identity");
    let output_text = |r: &Value| task(r, "t")["output"].to_string();
    for x in [
        "1.0",
        "[18446744073709551617,18446744073709551616]",
        "-0.0",
        "1.50",
        "1e+2",
    ] {
        let arg = format!("x={x}");
        let (code, first) = run(&home, &echo, &["--param", &arg]);
        assert_eq!(code, Some(0), "{first:#}");
        assert_eq!(output_text(&first), x);
        assert_ran(task(&first, "t"));
        let (_, again) = run(&home, &echo, &["--param", &arg]);
        assert_cached(task(&again, "t"), &first["id"]);
        assert_eq!(output_text(&again), x, "replayed from the cache");
        // `sluice show` reads the stored blob.
        let id = again["id"].as_str().expect("id");
        let shown: Value = serde_json::from_slice(&sluice(&home, &["show", id, "--json"]).stdout)
            .expect("show --json");
        assert_eq!(output_text(&shown), x, "as stored");
    }
    // 1 and 1.0, and the two big integers, are different values.
    let (_, one) = run(&home, &echo, &["--param", "x=1"]);
    assert_ran(task(&one, "t"));
    assert_eq!(output_text(&one), "1");
    let big: Value = serde_json::from_str(&output_text(
        &run(
            &home,
            &echo,
            &["--param", "x=[18446744073709551617,18446744073709551616]"],
        )
        .1,
    ))
    .expect("json");
    assert_ne!(big[0], big[1]);
}

// ---------------------------------------------------------------------------------------------
// Nothing waits for ever: a guest's RETRY delay is capped by the task's policy

#[tokio::test]
async fn a_guest_retry_delay_is_capped_by_the_task_policy() {
    let hour = TimeDelta::from_std(DEFAULT_MAX_RETRY_DELAY).expect("delta");
    assert_eq!(hour, TimeDelta::hours(1), "the documented default");
    // (the delay the guest asks for in ms, the task's max_retry_delay, its backoff.max) → the
    // wait, and whether it was capped.
    type Case = (u64, Option<Duration>, Option<Duration>, TimeDelta, bool);
    let cases: [Case; 6] = [
        // At the default limit: taken as asked.
        (3_600_000, None, None, hour, false),
        // One millisecond over it, and u64::MAX ms: capped at one hour.
        (3_600_001, None, None, hour, true),
        (u64::MAX, None, None, hour, true),
        // A task's own max_retry_delay.
        (
            u64::MAX,
            Some(Duration::from_secs(600)),
            None,
            TimeDelta::minutes(10),
            true,
        ),
        (
            600_000,
            Some(Duration::from_secs(600)),
            None,
            TimeDelta::minutes(10),
            false,
        ),
        // backoff.max caps it too.
        (
            u64::MAX,
            None,
            Some(Duration::from_secs(30)),
            TimeDelta::seconds(30),
            true,
        ),
    ];
    for (ms, max_retry_delay, backoff_max, wait, capped) in cases {
        let clock = SimClock::new(start());
        let runner = FlowRunner::new(sandbox().clone()).clock(Arc::new(clock));
        let mut t = TaskDef::new("t", guest("hostile"));
        t.input = Input::from_json(json!({"do": "retry_after", "ms": ms}));
        t.retries = 1;
        if let Some(m) = max_retry_delay {
            t.max_retry_delay = m;
        }
        t.backoff = backoff_max.map(|max| Backoff {
            factor: 2.0,
            max,
            jitter: 0.0,
        });
        let def = FlowBuilder::new("far").task(t).build().expect("flow");
        let run = run_def(&runner, def).await;
        let t = run.task("t").expect("task");
        assert_eq!((t.state.name, t.attempts), (StateName::Failed, 2), "{ms}");
        assert_eq!(
            retry_waits(t),
            [wait],
            "{ms} ms, {max_retry_delay:?}, {backoff_max:?}"
        );
        let message = t
            .history
            .iter()
            .find(|h| h.to == StateName::AwaitingRetry)
            .and_then(|h| h.message.clone())
            .unwrap_or_default();
        assert_eq!(
            message.contains("capped at") && message.contains("max_retry_delay"),
            capped,
            "{message}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Nothing bypasses the retry budget: state handlers' replacements go through it

#[tokio::test]
async fn a_rescheduling_rust_handler_cannot_exceed_the_retry_budget() {
    for retries in [0, 2] {
        let clock = SimClock::new(start());
        let calls = Arc::new(Mutex::new(0_u32));
        let seen = calls.clone();
        let runner = FlowRunner::new(sandbox().clone())
            .clock(Arc::new(clock))
            .task_handler(
                "t",
                Arc::new(move |_: &str, _: &State, new: State| {
                    if new.state_type() == StateType::Completed {
                        *seen.lock().expect("lock") += 1;
                        // Run it again, in ten years.
                        let mut s =
                            State::new(StateName::Scheduled, new.timestamp).with_message("again");
                        s.scheduled_for = Some(new.timestamp + TimeDelta::days(3650));
                        return s;
                    }
                    new
                }),
            );
        let mut t = TaskDef::new("t", guest("add_one"));
        t.input = Input::Literal(json!(1).into());
        t.retries = retries;
        let mut after = TaskDef::new("after", guest("identity"));
        after.input = Input::Literal(json!("control").into());
        let def = FlowBuilder::new("resched")
            .task(t)
            .task(after)
            .build()
            .expect("flow");
        let run = run_def(&runner, def).await;
        let t = run.task("t").expect("task");
        assert_eq!(t.attempts, retries + 1, "{:#?}", t.history);
        assert_eq!(*calls.lock().expect("lock"), retries + 1);
        assert_eq!(t.state.name, StateName::Failed);
        let m = t.state.message.clone().unwrap_or_default();
        assert!(
            m.contains("no retries remain") && m.contains(&format!("retries = {retries}")),
            "{m}"
        );
        // Each allowed re-run started within the task's retry delay cap (1 hour), not in ten
        // years.
        let scheduled: Vec<TimeDelta> = t
            .history
            .windows(2)
            .filter(|w| w[0].to == StateName::Scheduled && w[1].to == StateName::Retrying)
            .map(|w| w[1].time - w[0].time)
            .collect();
        assert_eq!(scheduled, vec![TimeDelta::hours(1); retries as usize]);
        // The control task completes.
        assert_eq!(
            run.task("after").map(|t| t.state.name),
            Some(StateName::Completed)
        );
    }
}

#[test]
fn a_rescheduling_handler_component_cannot_exceed_the_retry_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    for retries in [0, 1] {
        let flow = write_flow(
            dir.path(),
            "resched",
            &format!(
                "name = \"resched\"\n[tasks.t]\ncomponent = \"{}\"\ninput = 1\nretries = {retries}\n\
                 on_completion = [\"{}\"]\n[tasks.control]\ncomponent = \"{}\"\ninput = 2\n",
                component("add_one"),
                component("reschedule"),
                component("add_one"),
            ),
        );
        let (code, r) = run(&home, &flow, &[]);
        let t = task(&r, "t");
        assert_eq!(code, Some(1), "{r:#}");
        assert_eq!(t["attempts"], retries + 1, "{t:#}");
        assert_eq!(t["state"], "Failed", "{t:#}");
        let h = history(t);
        assert_eq!(
            h.iter().filter(|s| *s == "Scheduled").count(),
            retries as usize,
            "{h:?}"
        );
        assert_eq!(task(&r, "control")["state"], "Completed");
        assert_eq!(task(&r, "control")["output"], 3);
    }
}

// ---------------------------------------------------------------------------------------------
// FAIL retries while retries remain (Prefect 1's check_for_retry)

#[test]
fn fail_retries_while_retries_remain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "fail",
        &format!(
            "name = \"fail\"\n[tasks.f]\ncomponent = \"{}\"\ninput = true\nretries = 2\n\
             [tasks.control]\ncomponent = \"{}\"\ninput = false\n",
            component("fail_if"),
            component("fail_if"),
        ),
    );
    let (code, r) = run(&home, &flow, &[]);
    assert_eq!(code, Some(1));
    let t = task(&r, "f");
    assert_eq!(t["attempts"], 3, "{t:#}");
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
    assert_eq!(task(&r, "control")["state"], "Completed");
    // The fuel of every attempt is summed: three attempts burn more than the control's one.
    let fuel = |name: &str| {
        task(&r, name)["fuel_consumed"]
            .as_u64()
            .expect("fuel_consumed")
    };
    assert!(fuel("control") > 0, "{r:#}");
    assert!(fuel("f") > fuel("control"), "{r:#}");
    // Without retries, FAIL is final at once.
    let flow = write_flow(
        dir.path(),
        "fail0",
        &format!(
            "name = \"fail0\"\n[tasks.f]\ncomponent = \"{}\"\ninput = true\n",
            component("fail_if"),
        ),
    );
    let (_, r) = run(&home, &flow, &[]);
    assert_eq!(history(task(&r, "f")), ["Pending", "Running", "Failed"]);
}

// ---------------------------------------------------------------------------------------------
// Host memory stays bounded: the per-run cap on mapped children

#[test]
fn mapped_children_are_capped_per_flow_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    // A guest returns the list (identity of its input); `add` maps over it, `more` maps over
    // the same list again: the cap is the sum of both.
    let flow = |n: usize, cap: usize, second: bool| {
        let list: Vec<usize> = (0..n).collect();
        let more = if second {
            format!(
                "[tasks.more]\ncomponent = \"{}\"\ninput = \"$tasks.list\"\nmap = true\n\
                 upstream_tasks = [\"add\"]\n",
                component("add_one")
            )
        } else {
            String::new()
        };
        write_flow(
            dir.path(),
            "mapped",
            &format!(
                "name = \"mapped\"\nmax_mapped_children = {cap}\n[tasks.list]\ncomponent = \"{}\"\n\
                 input = {list:?}\n[tasks.add]\ncomponent = \"{}\"\ninput = \"$tasks.list\"\n\
                 map = true\n{more}[tasks.control]\ncomponent = \"{}\"\ninput = 1\n",
                component("identity"),
                component("add_one"),
                component("add_one"),
            ),
        )
    };
    // At the cap: every child runs.
    let (code, r) = run(&home, &flow(5, 5, false), &[]);
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(task(&r, "add")["state"], "Mapped");
    assert_eq!(task(&r, "add")["output"], json!([1, 2, 3, 4, 5]));
    // One over: Failed, naming the cap, and no child was created.
    let (code, r) = run(&home, &flow(6, 5, false), &[]);
    assert_eq!(code, Some(1));
    let t = task(&r, "add");
    assert_eq!(t["state"], "Failed");
    assert_eq!(
        t["message"],
        "mapping over 6 elements would make more mapped children than the flow's \
         max_mapped_children of 5"
    );
    assert!(t["children"].as_array().is_none_or(Vec::is_empty), "{t:#}");
    assert_eq!(task(&r, "control")["state"], "Completed");
    // Summed over the run's mapped tasks: 3 + 3 = 6 is at a cap of 6, over a cap of 5.
    let (code, r) = run(&home, &flow(3, 6, true), &[]);
    assert_eq!(code, Some(0), "{r:#}");
    assert_eq!(task(&r, "more")["state"], "Mapped");
    let (code, r) = run(&home, &flow(3, 5, true), &[]);
    assert_eq!(code, Some(1));
    assert_eq!(task(&r, "add")["state"], "Mapped");
    assert_eq!(
        task(&r, "more")["message"],
        "mapping over 3 elements would make 6 mapped children in this flow run (3 already), \
         more than the flow's max_mapped_children of 5"
    );
}

#[tokio::test]
async fn the_default_cap_on_mapped_children_holds() {
    assert_eq!(
        DEFAULT_MAX_MAPPED_CHILDREN, 100_000,
        "the documented default"
    );
    let runner = FlowRunner::new(sandbox().clone());
    let def = |n: usize| {
        let mut list = TaskDef::new("list", guest("identity"));
        list.input = Input::Literal(json!((0..n).collect::<Vec<_>>()).into());
        let mut add = TaskDef::new("add", guest("identity"));
        add.input = Input::Task("list".into());
        add.map = MapOver::Input;
        FlowBuilder::new("default-cap")
            .task(list)
            .task(add)
            .build()
            .expect("flow")
    };
    let over = run_def(&runner, def(DEFAULT_MAX_MAPPED_CHILDREN + 1)).await;
    let add = over.task("add").expect("add");
    assert_eq!(add.state.name, StateName::Failed);
    assert!(add.children.is_empty());
    assert_eq!(
        add.state.message.as_deref(),
        Some(
            "mapping over 100001 elements would make more mapped children than the flow's \
             max_mapped_children of 100000"
        )
    );
    let at = run_def(&runner, def(DEFAULT_MAX_MAPPED_CHILDREN)).await;
    let add = at.task("add").expect("add");
    assert_eq!(add.state.name, StateName::Mapped, "{:?}", add.state.message);
    assert_eq!(add.children.len(), DEFAULT_MAX_MAPPED_CHILDREN);
}

// ---------------------------------------------------------------------------------------------
// A slow handler component holds only its own task; cancellation does not wait for it

/// `slow` (add_one, with a handler that sleeps 3 s and answers Failed) beside the chain
/// `a → b → c`.
fn slow_handler_flow() -> sluice::flow::FlowDef {
    let mut slow = TaskDef::new("slow", guest("add_one"));
    slow.input = Input::Literal(json!(1).into());
    slow.hooks.on_completion = vec![guest("slow_handler")];
    let mut b = FlowBuilder::new("slow-handler").task(slow);
    for (name, input) in [
        ("a", json!(1)),
        ("b", json!("$tasks.a")),
        ("c", json!("$tasks.b")),
    ] {
        let mut t = TaskDef::new(name, guest("add_one"));
        t.input = Input::from_json(input);
        b = b.task(t);
    }
    b.build().expect("flow")
}

fn entered(t: &TaskRun, state: StateName) -> DateTime<Utc> {
    t.history
        .iter()
        .find(|h| h.to == state)
        .map(|h| h.time)
        .unwrap_or_else(|| panic!("`{}` never entered {state}: {:?}", t.name, t.history))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_component_holds_only_its_own_task() {
    let runner = FlowRunner::new(sandbox().clone());
    let flow = runner
        .prepare(slow_handler_flow(), Path::new("."))
        .await
        .expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let slow = run.task("slow").expect("slow");
    assert_eq!(slow.state.name, StateName::Failed, "{:?}", slow.history);
    assert_eq!(
        slow.state.message.as_deref(),
        Some("the slow handler says no")
    );
    let c = run.task("c").expect("c");
    assert_eq!(c.output, Some(json!(4).into()));
    // The chain ran while the handler slept: `c` completed before the handler's answer was
    // recorded (with a blocking handler it could only start after it).
    assert!(
        entered(c, StateName::Completed) < entered(slow, StateName::Failed),
        "c: {:?}\nslow: {:?}",
        c.history,
        slow.history
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_does_not_wait_for_a_slow_handler_component() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = FlowRunner::new(sandbox().clone()).events(tx);
    let flow = runner
        .prepare(slow_handler_flow(), Path::new("."))
        .await
        .expect("prepare");
    let cancel = sluice::sandbox::CancelToken::default();
    let options = RunOptions {
        cancel: cancel.clone(),
        ..RunOptions::default()
    };
    let running = tokio::spawn(async move { runner.run(&flow, options).await });
    // Once the chain is done, `slow` (one short attempt) is in its handler, which sleeps 3 s.
    while let Some(event) = rx.recv().await {
        if let sluice::runner::FlowEvent::Task { name, state, .. } = &event
            && name == "c"
            && *state == StateName::Completed
        {
            break;
        }
    }
    cancel.cancel();
    let run = running.await.expect("join").expect("run");
    assert_eq!(run.state.name, StateName::Cancelled);
    let slow = run.task("slow").expect("slow");
    // The handler's answer (Failed) was never waited for: `slow` keeps the state its attempt
    // ended in.
    assert_ne!(slow.state.name, StateName::Failed, "{:?}", slow.history);
    assert!(
        slow.history
            .iter()
            .all(|h| h.message.as_deref() != Some("the slow handler says no")),
        "{:?}",
        slow.history
    );
    assert_eq!(
        run.task("c").and_then(|c| c.output.clone()),
        Some(json!(4).into())
    );
}

// ---------------------------------------------------------------------------------------------
// Triggers and skips see a mapped upstream task as its children's states (Prefect 1)

/// `sluice run` of a flow whose `m` maps `component` over `items`, with `after` (add_one, a
/// state-only edge on `m`) under `trigger`: `after`'s state and message.
fn after_a_map(dir: &Path, component: &str, items: &str, trigger: &str) -> (String, String) {
    let home = dir.join("home");
    let flow = write_flow(
        dir,
        &format!("after-map-{trigger}"),
        &format!(
            "name = \"after-map\"\n[tasks.m]\ncomponent = \"{}\"\ninput = {items}\nmap = true\n\
             [tasks.after]\ncomponent = \"{}\"\ninput = 1\nupstream_tasks = [\"m\"]\n\
             trigger = \"{trigger}\"\n",
            self::component(component),
            self::component("add_one"),
        ),
    );
    let (_, r) = run(&home, &flow, &[]);
    let t = task(&r, "after");
    let s = |k: &str| t[k].as_str().unwrap_or_default().to_owned();
    (s("state"), s("message"))
}

#[test]
fn any_successful_runs_after_a_map_with_some_failed_children() {
    let dir = tempfile::tempdir().expect("temp dir");
    // fail_if fails on `true`: one child fails, one completes, so the map is Failed.
    let (state, msg) = after_a_map(dir.path(), "fail_if", "[true, false]", "any_successful");
    assert_eq!(state, "Completed", "{msg}");
    // The message counts the children per state, in the order the states first appear.
    let (state, msg) = after_a_map(
        dir.path(),
        "fail_if",
        "[true, false, true, false, false]",
        "all_successful",
    );
    assert_eq!(state, "TriggerFailed");
    assert!(
        msg.contains("`m`'s mapped children are 2 Failed, 3 Completed"),
        "{msg}"
    );
    let (state, _) = after_a_map(dir.path(), "fail_if", "[true, false]", "any_failed");
    assert_eq!(state, "Completed");
    let (state, _) = after_a_map(dir.path(), "fail_if", "[true, true]", "all_failed");
    assert_eq!(state, "Completed");
}

#[test]
fn the_any_triggers_fail_after_an_empty_map_and_the_all_triggers_pass() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (trigger, want) in [
        ("any_successful", "TriggerFailed"),
        ("any_failed", "TriggerFailed"),
        ("all_successful", "Completed"),
        ("all_failed", "Completed"),
        ("all_finished", "Completed"),
    ] {
        let (state, msg) = after_a_map(dir.path(), "add_one", "[]", trigger);
        assert_eq!(state, want, "{trigger}: {msg}");
        if want == "TriggerFailed" {
            assert!(msg.contains("`m` mapped no children"), "{msg}");
        }
    }
}

#[test]
fn a_skipped_mapped_child_skips_the_downstream_task() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, msg) = after_a_map(dir.path(), "signal_skip", "[1, 2]", "all_successful");
    assert_eq!(state, "Skipped");
    assert_eq!(msg, "a mapped child of upstream task `m` was skipped");
}

// ---------------------------------------------------------------------------------------------
// Inputs built from upstream outputs

#[test]
fn an_input_may_refer_to_one_upstream_output_several_times() {
    let dir = tempfile::tempdir().expect("temp dir");
    let id = component("identity");
    // `twice` is `x`'s only consumer and refers to it three times: every reference gets the
    // output. `y0` then feeds two consumers, one of them twice.
    let flow = write_flow(
        dir.path(),
        "refs",
        &format!(
            "name = \"refs\"\n\
             [tasks.x]\ncomponent = \"{id}\"\ninput = {{ k = \"v\" }}\n\
             [tasks.twice]\ncomponent = \"{id}\"\ninput = {{ a = \"$tasks.x\", b = [\"$tasks.x\", \"$tasks.x\"] }}\n\
             [tasks.y]\ncomponent = \"{id}\"\ninput = {{ a = \"$tasks.y0\", b = \"$tasks.y0\" }}\n\
             [tasks.y0]\ncomponent = \"{id}\"\ninput = 7\n\
             [tasks.z]\ncomponent = \"{id}\"\ninput = [\"$tasks.y0\"]\n"
        ),
    );
    let (code, r) = run(&dir.path().join("home"), &flow, &[]);
    assert_eq!(code, Some(0), "{r}");
    let x = json!({ "k": "v" });
    assert_eq!(task(&r, "twice")["output"], json!({ "a": x, "b": [x, x] }));
    assert_eq!(task(&r, "y")["output"], json!({ "a": 7, "b": 7 }));
    assert_eq!(task(&r, "z")["output"], json!([7]));
}

// ---------------------------------------------------------------------------------------------
// A handler that turns a cache hit into Scheduled makes the component run (and not hit again)

#[test]
fn a_handler_rescheduling_a_cache_hit_runs_the_component() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = write_flow(
        dir.path(),
        "rerun",
        &format!(
            "name = \"rerun\"\n[tasks.Cached_to_Scheduled]\ncomponent = \"{}\"\ninput = 1\n\
             cache_for = \"1h\"\nretries = 1\non_completion = [\"{}\"]\n",
            component("add_one"),
            component("replacer"),
        ),
    );
    let (code, r) = run(&home, &flow, &[]);
    assert_eq!(code, Some(0), "{r:#}");
    let t = task(&r, "Cached_to_Scheduled");
    assert_eq!(history(t), ["Pending", "Running", "Completed"], "{t:#}");
    // The second run hits the cache; the handler replaces Cached with Scheduled, and the
    // component runs instead of the cache being asked again.
    let (code, r) = run(&home, &flow, &[]);
    assert_eq!(code, Some(0), "{r:#}");
    let t = task(&r, "Cached_to_Scheduled");
    assert_eq!(
        history(t),
        ["Pending", "Scheduled", "Running", "Completed"],
        "{t:#}"
    );
    assert_eq!(t["attempts"], 1, "{t:#}");
    assert_eq!(t["output"], 2, "{t:#}");
}

// ---------------------------------------------------------------------------------------------
// A handler component's replacement stands only where the task run can go on from it

#[test]
fn a_handler_components_replacement_skips_an_attempt_or_fails_the_task() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (add, fail, replacer) = (
        component("add_one"),
        component("fail_if"),
        component("replacer"),
    );
    let flow = write_flow(
        dir.path(),
        "replaced",
        &format!(
            "name = \"replaced\"\n\
             [tasks.Running_to_Skipped]\ncomponent = \"{add}\"\ninput = 1\non_state = [\"{replacer}\"]\n\
             [tasks.Running_to_Paused]\ncomponent = \"{add}\"\ninput = 1\non_state = [\"{replacer}\"]\n\
             [tasks.fails]\ncomponent = \"{fail}\"\ninput = true\n\
             [tasks.TriggerFailed_to_Running]\ncomponent = \"{add}\"\ninput = 1\n\
             upstream_tasks = [\"fails\"]\non_state = [\"{replacer}\"]\n"
        ),
    );
    let (code, r) = run(&dir.path().join("home"), &flow, &[]);
    assert_eq!(code, Some(1), "{r:#}");
    // Skipped before it started: the component never ran.
    let t = task(&r, "Running_to_Skipped");
    assert_eq!(history(t), ["Pending", "Skipped"], "{t:#}");
    assert_eq!(t["attempts"], 0, "{t:#}");
    assert_eq!(t["message"], "replaced by the handler", "{t:#}");
    // Paused before it started would wait on nothing.
    let t = task(&r, "Running_to_Paused");
    assert_eq!(history(t), ["Pending", "Failed"], "{t:#}");
    assert_eq!(t["attempts"], 0, "{t:#}");
    assert_eq!(
        t["message"],
        "a state handler replaced Running with Paused before the attempt started (only Running, \
         Retrying, or a finished state, which skips the attempt, can replace it)",
        "{t:#}"
    );
    // Running after TriggerFailed would leave the flow run waiting on it (it said Paused).
    let t = task(&r, "TriggerFailed_to_Running");
    assert_eq!(history(t), ["Pending", "Failed"], "{t:#}");
    assert_eq!(
        t["message"],
        "a state handler replaced TriggerFailed with Running but TriggerFailed ends the task \
         run (only a finished state can replace it)",
        "{t:#}"
    );
    assert_eq!(r["state"], "Failed", "{r:#}");
}

/// A run whose task `b` (one retry; it fails every attempt) crashed on its first attempt: a
/// server resuming it by itself (`resume_crashed`) gives `b` the one attempt its retries have
/// left; a user's `resume` gives it its retries afresh.
#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_run_resumed_by_the_server_keeps_its_retry_budget() {
    let mut b = TaskDef::new("b", guest("hostile"));
    b.input = Input::from_json(json!({"do": "signal", "kind": "fail", "bytes": 1}));
    b.retries = 1;
    let def = FlowBuilder::new("crashy").task(b).build().expect("flow");
    let runner = FlowRunner::new(sandbox().clone());
    let flow = runner
        .prepare(def.clone(), Path::new("."))
        .await
        .expect("prepare");
    let crashed = || {
        let mut run = FlowRun::new(&def, Default::default(), Default::default(), start());
        run.state = State::new(StateName::Crashed, start());
        run.tasks[0].state = State::new(StateName::Crashed, start());
        run.tasks[0].attempts = 1;
        run
    };
    let cancel = sluice::sandbox::CancelToken::new;
    let after = runner
        .resume_crashed(&flow, crashed(), cancel())
        .await
        .expect("resume");
    assert_eq!(after.tasks[0].state.name, StateName::Failed);
    assert_eq!(after.tasks[0].attempts, 2, "1 + retries, the crash counted");
    let after = runner
        .resume(&flow, crashed(), &[], cancel())
        .await
        .expect("resume");
    assert_eq!(after.tasks[0].state.name, StateName::Failed);
    assert_eq!(
        after.tasks[0].attempts, 3,
        "the user's resume: its retries afresh"
    );
}
