//! The flow benchmark, in one run:
//!
//! 1. the raw wasmtime floor per task (see `support/raw_floor.rs`), for comparison;
//! 2. a 10,000-task mapped flow of a trivial Rust task (`add_one` over 0..10000): tasks/s and
//!    the wall time per task, against the floor;
//! 3. peak memory (VmHWM) of a 100,000-task flow whose outputs are 1 KiB each: 50,000 producers
//!    each hand a 1 KiB string to their own consumer, which returns its length. Consumed outputs
//!    are released, so memory must not grow with them.
//!
//! Run: `cargo bench --bench flow`.

#[path = "../../tests/common/guests.rs"]
mod guests;
#[path = "support/raw_floor.rs"]
mod raw_floor;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::sandbox::Sandbox;
use sluice::state::StateName;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// Reset the peak resident set size (VmHWM) to the current one.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

async fn mapped_flow(runner: &FlowRunner, n: usize) -> Duration {
    let mut add = TaskDef::new("add_one", guests::guest("add_one"));
    add.input = Input::Literal(json!((0..n as i64).collect::<Vec<_>>()));
    add.map = MapOver::Input;
    let def = FlowBuilder::new("bench-map")
        .task(add)
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let began = Instant::now();
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let elapsed = began.elapsed();
    assert_eq!(run.state.name, StateName::Completed);
    assert_eq!(run.tasks[0].children.len(), n);
    elapsed
}

async fn chains_flow(runner: &FlowRunner, pairs: usize) -> (Duration, StateName) {
    let hostile = guests::guest("hostile");
    let mut b = FlowBuilder::new("bench-memory");
    for i in 0..pairs {
        let mut p = TaskDef::new(format!("p{i}"), hostile.clone());
        p.input = Input::Literal(json!({"do": "output", "bytes": 1024}));
        let mut c = TaskDef::new(format!("c{i}"), hostile.clone());
        c.input = Input::from_json(json!({"do": "len", "of": format!("$tasks.p{i}")}));
        b = b.task(p).task(c);
    }
    let def = b.build().expect("flow");
    eprintln!(
        "  RSS with the definition built: {} MiB",
        status_kib("VmRSS:") >> 10
    );
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    eprintln!(
        "  RSS after prepare: {} MiB (peak {} MiB)",
        status_kib("VmRSS:") >> 10,
        status_kib("VmHWM:") >> 10
    );
    let began = Instant::now();
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    eprintln!(
        "  RSS with the run record: {} MiB (peak {} MiB)",
        status_kib("VmRSS:") >> 10,
        status_kib("VmHWM:") >> 10
    );
    let released = run.tasks.iter().filter(|t| t.output_released).count();
    assert_eq!(released, pairs, "every producer's output was released");
    let (elapsed, state) = (began.elapsed(), run.state.name);
    drop(run);
    eprintln!(
        "  RSS after dropping the record: {} MiB",
        status_kib("VmRSS:") >> 10
    );
    drop(flow);
    eprintln!(
        "  RSS after dropping the flow: {} MiB",
        status_kib("VmRSS:") >> 10
    );
    (elapsed, state)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let add_one = guests::guest("add_one");
    runtime.block_on(async {
        let floor = raw_floor::raw_floor(&add_one, 300, 3000).await;
        println!(
            "raw wasmtime floor (one thread):  p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, mean {:.1} µs per task",
            raw_floor::us(floor.p50),
            raw_floor::us(floor.p90),
            raw_floor::us(floor.p99),
            raw_floor::us(floor.mean)
        );

        let runner = FlowRunner::new(Sandbox::builder().build().expect("sandbox"));
        let n = 10_000;
        let _warm = mapped_flow(&runner, 1_000).await;
        let best = {
            let mut times = Vec::new();
            for _ in 0..3 {
                times.push(mapped_flow(&runner, n).await);
            }
            times.into_iter().min().expect("runs")
        };
        let per_task = best / n as u32;
        println!(
            "10,000-task mapped flow:          {:.0} ms  →  {:.0} tasks/s, {:.1} µs wall per task \
             ({:.2}× the one-thread floor; 2 cores)   target ≥ 10,000 tasks/s",
            raw_floor::ms(best),
            n as f64 / best.as_secs_f64(),
            raw_floor::us(per_task),
            raw_floor::us(per_task) / raw_floor::us(floor.p50)
        );

        let pairs = 50_000;
        reset_peak();
        let before = status_kib("VmRSS:");
        let (elapsed, state) = chains_flow(&runner, pairs).await;
        let peak = status_kib("VmHWM:");
        println!(
            "100,000-task flow, 1 KiB outputs: {state} in {:.1} s; RSS before {} MiB, peak {} MiB \
             (target ≤ 300 MB)",
            elapsed.as_secs_f64(),
            before >> 10,
            peak >> 10
        );
    });
}
