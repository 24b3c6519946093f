//! Time: the real clock really waits out a retry delay (through the CLI, the one place a test may
//! sleep: it checks `SystemClock` itself), and backoff jitter really varies the delays within
//! its bounds.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice::clock::SimClock;
use sluice::flow::{Backoff, FlowBuilder, Input, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::state::StateName;

use crate::support::{guest, sandbox, task};

/// The time of each transition of `t` into `state`.
fn times_of(t: &Value, state: &str) -> Vec<DateTime<Utc>> {
    t["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter(|h| h["to"] == state)
        .map(|h| {
            h["time"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no time in {h}"))
        })
        .collect()
}

#[test]
fn the_system_clock_waits_out_the_retry_delay() {
    let dir = tempfile::tempdir().expect("temp dir");
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        format!(
            "name = \"waits\"\n[tasks.neg]\ncomponent = {:?}\ninput = -1\nretries = 2\n\
             retry_delay = \"400ms\"\n",
            guest("retry_if_negative").display().to_string()
        ),
    )
    .expect("write");
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .env("SLUICE_HOME", home)
        .output()
        .expect("run sluice");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let t = task(&run, "neg");
    assert_eq!(t["attempts"], 3, "{t:#}");
    let awaiting = times_of(t, "AwaitingRetry");
    let retrying = times_of(t, "Retrying");
    assert_eq!((awaiting.len(), retrying.len()), (2, 2), "{t:#}");
    for (a, r) in awaiting.iter().zip(&retrying) {
        assert!(
            *r - *a >= TimeDelta::milliseconds(400),
            "retried {} ms after AwaitingRetry, before the 400 ms delay",
            (*r - *a).num_milliseconds()
        );
    }
}

#[test]
fn jitter_spreads_retry_delays_within_their_bounds() {
    let mut t = TaskDef::new("t", "x.wasm");
    t.retry_delay = Duration::from_secs(1);
    t.backoff = Some(Backoff {
        factor: 2.0,
        max: Duration::from_secs(100),
        jitter: 0.5,
    });
    // Retry 3: a base of 4 s, plus up to 2 s at random.
    let delays: Vec<Duration> = (0..2000).map(|_| t.retry_delay_for(3)).collect();
    let (lo, hi) = (Duration::from_secs(4), Duration::from_secs(6));
    assert!(delays.iter().all(|d| *d >= lo && *d <= hi), "out of bounds");
    let min = delays.iter().min().copied().unwrap_or_default();
    let max = delays.iter().max().copied().unwrap_or_default();
    // Uniform over [4 s, 6 s]: 2000 draws reach both ends' tenths (a failure chance of ~1e-91).
    assert!(min < Duration::from_millis(4200), "never near 4 s: {min:?}");
    assert!(max > Duration::from_millis(5800), "never near 6 s: {max:?}");
    let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
    assert!(
        mean > Duration::from_millis(4800) && mean < Duration::from_millis(5200),
        "{mean:?}"
    );
    // Without jitter every delay is the base.
    t.backoff = Some(Backoff {
        jitter: 0.0,
        ..t.backoff.expect("backoff")
    });
    assert!((0..100).all(|_| t.retry_delay_for(3) == lo));
}

/// Jitter reaches the retries a run schedules: the recorded delays differ between runs.
#[tokio::test]
async fn a_run_schedules_its_retries_with_jitter() {
    let start: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().expect("time");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let clock = SimClock::new(start);
        let runner = FlowRunner::new(sandbox().clone()).clock(Arc::new(clock));
        let mut t = TaskDef::new("neg", guest("retry_if_negative"));
        t.input = Input::Literal(json!(-1).into());
        t.retries = 1;
        t.retry_delay = Duration::from_secs(10);
        t.backoff = Some(Backoff {
            factor: 1.0,
            max: Duration::from_secs(100),
            jitter: 1.0,
        });
        let def = FlowBuilder::new("jitter").task(t).build().expect("flow");
        let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
        let run = runner.run(&flow, RunOptions::default()).await.expect("run");
        let t = run.task("neg").expect("task");
        let at = |name| {
            t.history
                .iter()
                .find(|h| h.to == name)
                .map(|h| h.time)
                .expect("transition")
        };
        let delay = at(StateName::Retrying) - at(StateName::AwaitingRetry);
        assert!(
            delay >= TimeDelta::seconds(10) && delay <= TimeDelta::seconds(20),
            "{delay:?}"
        );
        seen.insert(delay);
    }
    assert!(seen.len() > 1, "four runs, one delay: {seen:?}");
}
