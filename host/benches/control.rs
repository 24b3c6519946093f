//! Control latency under CPU load: how long the engine takes to act on a cancel and on a retry
//! timer while guests of the same process keep every core busy.
//!
//! 1. cancel: a flow maps the hostile guest's endless loop over N children (the flow's
//!    concurrency is N); once they all run, the run is cancelled; the figure is the time from
//!    `cancel()` until the run returns (every guest interrupted, everything recorded Cancelled);
//! 2. retry timer: beside the same load, a task raises RETRY asking for 100 ms; the figure is how
//!    much later than asked its retry started (Retrying − AwaitingRetry − 100 ms, from its
//!    recorded history).
//!
//! The target is 50 ms for each. Run: `cargo bench --bench control`.

#[path = "../../tests/common/guests.rs"]
mod guests;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::sandbox::{CancelToken, RunBudget, Sandbox};
use sluice::state::StateName;

/// The children looping forever under `timeout`.
fn load(n: usize, timeout: Duration) -> TaskDef {
    let mut spin = TaskDef::new("spin", guests::guest("hostile"));
    spin.input = Input::Literal(json!(vec![json!({"do": "loop"}); n]).into());
    spin.map = MapOver::Input;
    spin.budget = RunBudget {
        fuel: None,
        timeout,
        ..RunBudget::default()
    };
    spin
}

async fn cancel_latency(runner: &FlowRunner, n: usize) -> Duration {
    let def = FlowBuilder::new("bench-cancel")
        .concurrency(n)
        .task(load(n, Duration::from_secs(60)))
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let cancel = CancelToken::new();
    let options = RunOptions {
        cancel: cancel.clone(),
        ..RunOptions::default()
    };
    let run = tokio::spawn({
        let runner = runner.clone();
        async move { runner.run(&flow, options).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = Instant::now();
    cancel.cancel();
    let run = run.await.expect("joined").expect("run");
    let latency = asked.elapsed();
    assert_eq!(run.state.name, StateName::Cancelled);
    latency
}

async fn retry_lag(runner: &FlowRunner, n: usize) -> Duration {
    let mut retry = TaskDef::new("retry", guests::guest("hostile"));
    retry.input = Input::Literal(json!({"do": "retry_after", "ms": 100}).into());
    retry.retries = 1;
    let def = FlowBuilder::new("bench-retry")
        .concurrency(n + 1)
        .task(load(n, Duration::from_secs(2)))
        .task(retry)
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let history = &run.task("retry").expect("task").history;
    let at = |name: StateName| {
        history
            .iter()
            .find(|t| t.to == name)
            .map(|t| t.time)
            .expect("transition")
    };
    let waited = (at(StateName::Retrying) - at(StateName::AwaitingRetry))
        .to_std()
        .unwrap_or_default();
    waited.saturating_sub(Duration::from_millis(100))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let runner = FlowRunner::new(Sandbox::builder().build().expect("sandbox"));
        for n in [16, 64, 128] {
            let mut cancels = Vec::new();
            let mut lags = Vec::new();
            for _ in 0..3 {
                cancels.push(cancel_latency(&runner, n).await);
                lags.push(retry_lag(&runner, n).await);
            }
            println!(
                "{n:>3} looping guests: cancel → returned {:>7.1} ms (median of 3, max {:.1}); retry timer late by {:>7.1} ms (median of 3, max {:.1})",
                median(cancels.clone()).as_secs_f64() * 1e3,
                cancels.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3,
                median(lags.clone()).as_secs_f64() * 1e3,
                lags.iter().max().copied().unwrap_or_default().as_secs_f64() * 1e3,
            );
        }
    });
}
