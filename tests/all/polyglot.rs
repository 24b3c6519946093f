//! Python, JavaScript and C tasks (guest-sdk/{python,js,c}) under the same contract as Rust ones:
//! every signal maps to its state, context is readable, logs are captured, hostile guests are
//! stopped by their budgets and the host survives; and the polyglot example flow through the CLI.
//!
//! The guests are built by the repository's build scripts (see `tests/common/polyglot.rs`); that
//! needs `scripts/setup-polyglot`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use sluice::context::TaskContext;
use sluice::sandbox::{
    Ending, Limit, LimitExceeded, LogLevel, LogSource, RunBudget, RunOutcome, Sandbox, Signal,
    TaskComponent, TimeLimit,
};
use sluice::state::{Retry, State, StateName};

use crate::support::{control_task_completes, example_flow, guest, message, root};

#[path = "../common/polyglot.rs"]
pub(crate) mod builds;
use builds::{LANGUAGES, polyglot_guest};

/// A sandbox of its own with an artifact directory, so the large Python and JavaScript
/// components are compiled once, not once per test run.
pub(crate) fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polyglot-artifacts");
        Sandbox::builder()
            .artifact_dir(dir)
            .build()
            .expect("sandbox")
    })
}

async fn load(path: &Path) -> TaskComponent {
    sandbox()
        .load_file(path)
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

/// Run `lang`'s task `name` (`guest` for the test guest) once.
async fn run_in(
    lang: &str,
    name: &str,
    input: Value,
    ctx: &TaskContext,
    budget: &RunBudget,
) -> RunOutcome {
    let component = load(&polyglot_guest(lang, name)).await;
    sandbox()
        .run(&component, &input.into(), ctx, budget, None)
        .await
}

async fn run(lang: &str, name: &str, input: Value) -> RunOutcome {
    run_in(
        lang,
        name,
        input,
        &TaskContext::new(name),
        &RunBudget::default(),
    )
    .await
}

/// After a hostile guest: a Rust control task completes in the same sandbox, and in the shared one.
async fn host_survives() {
    let component = load(&guest("add_one")).await;
    let out = sandbox()
        .run(
            &component,
            &json!(41).into(),
            &TaskContext::new("control"),
            &RunBudget::default(),
            None,
        )
        .await;
    assert_eq!(
        out.ending,
        Ending::Output(json!(42).into()),
        "the control task failed"
    );
    control_task_completes().await;
}

fn retries_left() -> Retry {
    Retry::Remaining {
        delay: TimeDelta::seconds(5),
        max_delay: TimeDelta::hours(1),
    }
}

#[tokio::test]
async fn every_signal_maps_to_its_state_in_every_language() {
    let cases = [
        // FAIL retries while retries remain, as every failure does (Prefect 1).
        (
            json!({"do": "fail"}),
            StateName::AwaitingRetry,
            Some("failing on purpose"),
        ),
        (
            json!({"do": "retry"}),
            StateName::AwaitingRetry,
            Some("try again"),
        ),
        (
            json!({"do": "skip"}),
            StateName::Skipped,
            Some("nothing to do"),
        ),
        (
            json!({"do": "pause"}),
            StateName::Paused,
            Some("waiting for approval"),
        ),
        (
            json!({"do": "success"}),
            StateName::Completed,
            Some("done early"),
        ),
        (
            json!({"do": "echo", "value": 7}),
            StateName::Completed,
            None,
        ),
        (json!({"do": "crash"}), StateName::AwaitingRetry, None),
    ];
    for lang in LANGUAGES {
        for (input, expected, msg) in &cases {
            let out = run(lang, "guest", input.clone()).await;
            let state = State::after_run(&out.ending, retries_left(), Utc::now());
            assert_eq!(state.name, *expected, "{lang} {input}: {:?}", out.ending);
            if msg.is_some() {
                assert_eq!(state.message.as_deref(), *msg, "{lang} {input}");
            }
        }

        // The exact endings, with the values they carry.
        let out = run(lang, "guest", json!({"do": "success"})).await;
        assert_eq!(
            out.ending,
            Ending::Signal(Signal::Success {
                output: json!({"answer": 42}).into(),
                message: "done early".into()
            }),
            "{lang}"
        );
        let state = State::after_run(&out.ending, retries_left(), Utc::now());
        assert_eq!(state.result, Some(json!({"answer": 42}).into()), "{lang}");
        let out = run(lang, "guest", json!({"do": "retry"})).await;
        assert_eq!(
            out.ending,
            Ending::Signal(Signal::Retry {
                message: "try again".into(),
                delay: None
            }),
            "{lang}"
        );
        let out = run(lang, "guest", json!({"do": "retry_after", "ms": 250})).await;
        assert_eq!(
            out.ending,
            Ending::Signal(Signal::Retry {
                message: "later".into(),
                delay: Some(Duration::from_millis(250)),
            }),
            "{lang}"
        );
        let now = Utc::now();
        let state = State::after_run(&out.ending, retries_left(), now);
        assert_eq!(state.name, StateName::AwaitingRetry, "{lang}");
        assert_eq!(
            state.scheduled_for,
            Some(now + TimeDelta::milliseconds(250)),
            "{lang}"
        );
        let state = State::after_run(&out.ending, Retry::Exhausted, now);
        assert_eq!(state.name, StateName::Failed, "{lang}");

        // A value goes through JSON both ways unchanged.
        let value = json!({"a": [1, -2.5, "é\n\"x\"", null, true, {"b": {}}], "c": []});
        let out = run(lang, "guest", json!({"do": "echo", "value": value})).await;
        assert_eq!(out.ending, Ending::Output(value.into()), "{lang}");

        // An uncaught error fails the run (retriable, like a Rust panic) with its message.
        let out = run(lang, "guest", json!({"do": "crash"})).await;
        assert!(
            matches!(out.ending, Ending::GuestFault { .. }),
            "{lang}: {:?}",
            out.ending
        );
        assert!(
            message(&out.ending).contains("boom"),
            "{lang}: {:?}",
            out.ending
        );
        let state = State::after_run(&out.ending, Retry::Exhausted, Utc::now());
        assert_eq!(state.name, StateName::Failed, "{lang}");
    }
}

/// A task's directory may hold more code: Python modules and packages beside `task.py`, a
/// JavaScript module imported relatively (and an `async run`), several C files.
#[tokio::test]
async fn code_in_the_tasks_other_files_runs_in_every_language() {
    for lang in LANGUAGES {
        let out = run(
            lang,
            "guest",
            json!({"do": "words", "text": "  the quick\tbrown  fox "}),
        )
        .await;
        assert_eq!(
            out.ending,
            Ending::Output(json!({"words": 4}).into()),
            "{lang}"
        );
    }
    // JavaScript's `run` is async: its thrown signals still reach the host.
    let out = run("js", "guest", json!({"do": "fail"})).await;
    assert_eq!(
        out.ending,
        Ending::Signal(Signal::Fail {
            message: "failing on purpose".into()
        })
    );
}

#[tokio::test]
async fn the_example_tasks_behave_like_the_rust_ones() {
    for lang in LANGUAGES {
        let out = run(lang, "add_one", json!(41)).await;
        assert_eq!(
            out.ending,
            Ending::Output(json!(42).into()),
            "{lang} add_one"
        );

        let out = run(lang, "retry_if_negative", json!(-1)).await;
        let state = State::after_run(&out.ending, retries_left(), Utc::now());
        assert_eq!(
            state.name,
            StateName::AwaitingRetry,
            "{lang}: {:?}",
            out.ending
        );
        assert_eq!(state.message.as_deref(), Some("-1 is negative"), "{lang}");
        let out = run(lang, "retry_if_negative", json!(2)).await;
        assert_eq!(out.ending, Ending::Output(json!(2).into()), "{lang}");

        let mut ctx = TaskContext::new("try_unlock");
        let budget = RunBudget::default();
        let out = run_in(lang, "try_unlock", json!(null), &ctx, &budget).await;
        assert_eq!(
            out.ending,
            Ending::Signal(Signal::Fail {
                message: "the context key `key` does not unlock this task".into()
            }),
            "{lang}"
        );
        ctx.values = Arc::new(BTreeMap::from([("key".to_owned(), "abc".to_owned())]));
        let out = run_in(lang, "try_unlock", json!(null), &ctx, &budget).await;
        assert_eq!(out.ending, Ending::Output(json!(true).into()), "{lang}");
    }
}

#[tokio::test]
async fn context_is_readable_in_every_language() {
    for lang in LANGUAGES {
        let mut ctx = TaskContext::new("reader");
        ctx.attempt = 3;
        ctx.map_index = Some(2);
        ctx.parameters = r#"{"x":1}"#.into();
        ctx.values = Arc::new(BTreeMap::from([
            ("key".to_owned(), "abc".to_owned()),
            ("task_name".to_owned(), "spoofed".to_owned()),
        ]));
        let input = json!({"do": "context", "keys": ["key", "missing", "task_name", "attempt"]});
        let out = run_in(lang, "guest", input, &ctx, &RunBudget::default()).await;
        let Ending::Output(v) = out.ending else {
            panic!("{lang}: {:?}", out.ending)
        };
        assert_eq!(
            v,
            json!({
                "flow_run_id": ctx.flow_run_id.to_string(),
                "task_run_id": ctx.task_run_id.to_string(),
                "task_name": "reader",
                "attempt": 3,
                "map_index": 2,
                "parameters": {"x": 1},
                "get": {"key": "abc", "missing": null, "task_name": "reader", "attempt": "3"},
            }),
            "{lang}"
        );
    }
}

#[tokio::test]
async fn logs_stdout_and_stderr_are_captured_in_every_language() {
    for lang in LANGUAGES {
        let out = run(lang, "guest", json!({"do": "log"})).await;
        assert_eq!(out.ending, Ending::Output(json!("logged").into()), "{lang}");
        let lines: Vec<_> = out
            .logs
            .iter()
            .map(|r| (r.source, r.level, r.message.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (LogSource::Log, LogLevel::Trace, "trace line"),
                (LogSource::Log, LogLevel::Debug, "debug line"),
                (LogSource::Log, LogLevel::Info, "info line"),
                (LogSource::Log, LogLevel::Warn, "warn line"),
                (LogSource::Log, LogLevel::Error, "error line"),
                (LogSource::Stdout, LogLevel::Info, "to stdout"),
                (LogSource::Stderr, LogLevel::Warn, "to stderr"),
            ],
            "{lang}"
        );
    }
}

#[tokio::test]
async fn an_infinite_loop_times_out_in_every_language() {
    for lang in LANGUAGES {
        let budget = RunBudget {
            fuel: Some(50_000_000),
            ..RunBudget::default()
        };
        let out = run_in(
            lang,
            "guest",
            json!({"do": "loop"}),
            &TaskContext::new("loop"),
            &budget,
        )
        .await;
        assert_eq!(
            out.ending,
            Ending::TimedOut(TimeLimit::Fuel(50_000_000)),
            "{lang}"
        );
        let state = State::after_run(&out.ending, Retry::Exhausted, Utc::now());
        assert_eq!(state.name, StateName::TimedOut, "{lang}");

        let timeout = Duration::from_millis(300);
        let budget = RunBudget {
            fuel: None,
            timeout,
            ..RunBudget::default()
        };
        let component = load(&polyglot_guest(lang, "guest")).await;
        let started = Instant::now();
        let out = sandbox()
            .run(
                &component,
                &json!({"do": "loop"}).into(),
                &TaskContext::new("loop"),
                &budget,
                None,
            )
            .await;
        let elapsed = started.elapsed();
        assert_eq!(
            out.ending,
            Ending::TimedOut(TimeLimit::Deadline(timeout)),
            "{lang}"
        );
        assert!(
            elapsed < timeout + Duration::from_millis(250),
            "{lang} stopped late: {elapsed:?}"
        );
        host_survives().await;
    }
}

#[tokio::test]
async fn a_memory_bomb_fails_on_the_memory_limit_in_every_language() {
    for lang in LANGUAGES {
        let budget = RunBudget {
            memory_bytes: 64 << 20,
            ..RunBudget::default()
        };
        let out = run_in(
            lang,
            "guest",
            json!({"do": "memory_bomb"}),
            &TaskContext::new("bomb"),
            &budget,
        )
        .await;
        match out.ending {
            Ending::LimitExceeded(LimitExceeded {
                limit: Limit::Memory,
                max,
                ..
            }) => assert_eq!(max, 64 << 20, "{lang}"),
            ref other => panic!("{lang}: expected the memory limit, got {other:?}"),
        }
        assert!(
            message(&out.ending).contains("memory limit of 67108864 bytes exceeded"),
            "{lang}"
        );
        assert!(out.usage.memory_peak_bytes <= 64 << 20, "{lang}");
        let state = State::after_run(&out.ending, Retry::Exhausted, Utc::now());
        assert_eq!(state.name, StateName::Failed, "{lang}");
        host_survives().await;
    }
}

#[test]
fn the_polyglot_example_flow_completes_through_the_cli() {
    // The flow finds its components in examples/build: the Rust ones (copied by example_flow)
    // and the ones this binary built, copied the same way.
    let build = root().join("examples/build");
    std::fs::create_dir_all(&build).expect("examples/build");
    for (lang, name) in [
        ("python", "extract"),
        ("js", "transform"),
        ("c", "checksum"),
    ] {
        let file = format!("{lang}_{name}.wasm");
        let tmp = build.join(format!(".{file}.tmp"));
        std::fs::copy(polyglot_guest(lang, name), &tmp).expect("copy a guest");
        std::fs::rename(&tmp, build.join(&file)).expect("place a guest");
    }
    let flow = example_flow("polyglot");
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .env("SLUICE_HOME", &home)
        .output()
        .expect("run sluice");
    let run: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(out.status.code(), Some(0), "{run}");
    assert_eq!(run["state"], "Completed", "{run}");
    let tasks = run["tasks"].as_array().expect("tasks");
    for name in ["extract", "transform", "checksum", "summarise"] {
        let t = tasks
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no task {name} in {run}"));
        assert_eq!(t["state"], "Completed", "{name}: {t}");
    }
    let summarise = tasks
        .iter()
        .find(|t| t["name"] == "summarise")
        .expect("summarise");
    assert_eq!(
        summarise["output"],
        json!({
            "orders": 4,
            "total_cents": 6225,
            "total": "62.25",
            "largest": "Alice",
            "checksum": "7b8c81c19e6836d2",
        })
    );
    // A second run loads every component precompiled: nothing is compiled again.
    let again = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .env("SLUICE_HOME", &home)
        .output()
        .expect("run sluice");
    assert_eq!(again.status.code(), Some(0));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(!err.contains("compiling"), "the second run compiled: {err}");
}
