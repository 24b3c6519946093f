//! The example tasks: every signal maps to its state, context is readable, logs are captured.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use serde_json::json;
use sluice::context::TaskContext;
use sluice::json::Json;
use sluice::sandbox::{Ending, LogLevel, LogSource, RunBudget, Signal};
use sluice::state::{Retry, State, StateName};

use crate::support::{guest, hostile, load, run_guest, sandbox};

fn retries_left() -> Retry {
    Retry::Remaining {
        delay: TimeDelta::seconds(5),
        max_delay: TimeDelta::hours(1),
    }
}

#[tokio::test]
async fn every_signal_maps_to_its_state() {
    let cases = [
        // FAIL retries while retries remain, as every failure does (Prefect 1's
        // check_for_retry).
        (
            "signal_fail",
            json!(null),
            StateName::AwaitingRetry,
            Some("failing on purpose"),
        ),
        (
            "signal_skip",
            json!(null),
            StateName::Skipped,
            Some("nothing to do"),
        ),
        (
            "signal_pause",
            json!(null),
            StateName::Paused,
            Some("waiting for approval"),
        ),
        (
            "signal_retry",
            json!(null),
            StateName::AwaitingRetry,
            Some("attempt 1 is too early"),
        ),
        (
            "signal_success",
            json!(7),
            StateName::Completed,
            Some("squared early"),
        ),
        ("add_one", json!(1), StateName::Completed, None),
        (
            "retry_if_negative",
            json!(-1),
            StateName::AwaitingRetry,
            Some("-1 is negative"),
        ),
        ("retry_if_negative", json!(2), StateName::Completed, None),
    ];
    for (task, input, expected, message) in cases {
        let out = run_guest(task, input.clone(), &RunBudget::default()).await;
        let state = State::after_run(&out.ending, retries_left(), Utc::now());
        assert_eq!(state.name, expected, "{task}({input}): {:?}", out.ending);
        assert_eq!(state.message.as_deref(), message, "{task}({input})");
    }
    // Values carried by the states.
    let out = run_guest("signal_success", json!(7), &RunBudget::default()).await;
    let state = State::after_run(&out.ending, retries_left(), Utc::now());
    assert_eq!(state.result, Some(json!(49).into()));
    let out = run_guest("retry_if_negative", json!(2), &RunBudget::default()).await;
    assert_eq!(out.ending, Ending::Output(json!(2).into()));
    // RETRY with its own delay; without retries left it fails.
    let out = run_guest("signal_retry", json!(null), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Signal(Signal::Retry {
            message: "attempt 1 is too early".into(),
            delay: Some(std::time::Duration::from_millis(50)),
        })
    );
    let now = Utc::now();
    let state = State::after_run(&out.ending, retries_left(), now);
    assert_eq!(state.scheduled_for, Some(now + TimeDelta::milliseconds(50)));
    let state = State::after_run(&out.ending, Retry::Exhausted, now);
    assert_eq!(state.name, StateName::Failed);
    // FAIL without retries left is final.
    let out = run_guest("signal_fail", json!(null), &RunBudget::default()).await;
    let state = State::after_run(&out.ending, Retry::Exhausted, now);
    assert_eq!(state.name, StateName::Failed);
}

#[tokio::test]
async fn a_task_input_of_the_wrong_type_fails_naming_the_type() {
    let out = run_guest("add_one", json!("one"), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Signal(Signal::Fail {
            message: "the task's input does not fit `i64`: invalid type: string \"one\", \
                      expected i64 at line 1 column 5"
                .into()
        })
    );
}

#[tokio::test]
async fn context_is_readable_and_built_ins_cannot_be_overridden() {
    let component = load(&guest("hostile")).await;
    let mut ctx = TaskContext::new("reader");
    ctx.attempt = 3;
    ctx.map_index = Some(2);
    ctx.parameters = r#"{"x":1}"#.into();
    ctx.values = Arc::new(BTreeMap::from([
        ("key".to_owned(), "abc".to_owned()),
        ("task_name".to_owned(), "spoofed".to_owned()),
    ]));
    let input = json!({"do": "context", "keys": ["key", "missing", "task_name", "attempt"]});
    let out = sandbox()
        .run(&component, &input.into(), &ctx, &RunBudget::default(), None)
        .await;
    let Ending::Output(v) = out.ending else {
        panic!("{:?}", out.ending)
    };
    assert_eq!(
        v,
        json!({
            "flow_run_id": ctx.flow_run_id.to_string(),
            "task_run_id": ctx.task_run_id.to_string(),
            "task_name": "reader",
            "attempt": 3,
            "map_index": 2,
            "parameters": {"Ok": {"x": 1}},
            "get": {"key": "abc", "missing": null, "task_name": "reader", "attempt": "3"},
        })
    );
}

#[tokio::test]
async fn try_unlock_reads_its_key_from_context() {
    let component = load(&guest("try_unlock")).await;
    let mut ctx = TaskContext::new("try_unlock");
    let out = sandbox()
        .run(&component, &Json::null(), &ctx, &RunBudget::default(), None)
        .await;
    assert!(matches!(out.ending, Ending::Signal(Signal::Fail { .. })));
    ctx.values = Arc::new(BTreeMap::from([("key".to_owned(), "abc".to_owned())]));
    let out = sandbox()
        .run(&component, &Json::null(), &ctx, &RunBudget::default(), None)
        .await;
    assert_eq!(out.ending, Ending::Output(json!(true).into()));
}

#[tokio::test]
async fn logs_from_the_log_import_stdout_and_stderr_are_captured_in_order() {
    let out = hostile(json!({"do": "print", "lines": 2}), &RunBudget::default()).await;
    let lines: Vec<_> = out
        .logs
        .iter()
        .map(|r| (r.source, r.level, r.message.as_str()))
        .collect();
    assert_eq!(
        lines,
        [
            (LogSource::Stdout, LogLevel::Info, "out 0"),
            (LogSource::Stderr, LogLevel::Warn, "err 0"),
            (LogSource::Stdout, LogLevel::Info, "out 1"),
            (LogSource::Stderr, LogLevel::Warn, "err 1"),
        ]
    );
    let out = run_guest("signal_success", json!(3), &RunBudget::default()).await;
    assert_eq!(out.logs.len(), 1);
    assert_eq!(
        (
            out.logs[0].source,
            out.logs[0].level,
            out.logs[0].message.as_str()
        ),
        (LogSource::Log, LogLevel::Info, "squaring 3")
    );
}

#[tokio::test]
async fn usage_is_recorded() {
    let out = run_guest("add_one", json!(1), &RunBudget::default()).await;
    assert!(out.usage.fuel_consumed > 0);
    assert!(out.usage.duration > std::time::Duration::ZERO);
    // At least the guest's initial memory (17 pages of 64 KiB for a Rust guest).
    assert!(out.usage.memory_peak_bytes >= 64 << 10);
}
