//! `sluice task run`: one task run of one component, printed for people or as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use chrono::{TimeDelta, Utc};
use serde_json::json;
use sluice::context::TaskContext;
use sluice::sandbox::{RunBudget, RunOutcome};
use sluice::state::{Retry, State};

use crate::{UsageError, exit_code};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The task: a WebAssembly component (`.wasm`, or `.wat` text).
    component: PathBuf,

    /// The task's input, as JSON.
    #[arg(long, default_value = "null", allow_hyphen_values = true)]
    input: String,

    /// A context value the task can read (repeatable): `--context key=value`.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = crate::parse_key_value)]
    context: Vec<(String, String)>,

    /// The flow parameters the task sees, as a JSON object.
    #[arg(long, default_value = "{}")]
    parameters: String,

    /// The attempt number the task sees.
    #[arg(long, default_value_t = 1)]
    attempt: u32,

    /// Fuel budget (instructions, roughly), or `unlimited`. Default: 10000000000.
    #[arg(long, value_parser = parse_fuel)]
    fuel: Option<FuelArg>,

    /// Wall-clock deadline, e.g. `500ms`, `30s`, `2m`. Default: 60s.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,

    /// Memory cap across all of the task's memories, e.g. `64MiB`, `1GiB`. Default: 256MiB.
    #[arg(long, value_parser = crate::parse_size)]
    memory: Option<u64>,

    /// Print one JSON object instead of a report.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy)]
struct FuelArg(Option<u64>);

fn parse_fuel(s: &str) -> Result<FuelArg, String> {
    if s == "unlimited" {
        return Ok(FuelArg(None));
    }
    s.replace('_', "")
        .parse::<u64>()
        .map(|n| FuelArg(Some(n)))
        .map_err(|e| format!("`{s}` is not a number of fuel units or `unlimited`: {e}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s or 500ms: {e}"))
}

pub(crate) async fn run(sandbox: &crate::SandboxArgs, args: Args) -> Result<ExitCode, UsageError> {
    let usage = |e: anyhow::Error| UsageError(e);
    let input = sluice::json::Json::parse(&args.input)
        .map_err(|e| usage(anyhow!("--input is not valid JSON: {e}")))?;
    let parameters: serde_json::Value = serde_json::from_str(&args.parameters)
        .map_err(|e| usage(anyhow!("--parameters is not valid JSON: {e}")))?;
    if !parameters.is_object() {
        return Err(usage(anyhow!("--parameters must be a JSON object")));
    }
    let mut budget = RunBudget::default();
    if let Some(FuelArg(f)) = args.fuel {
        budget.fuel = f;
    }
    if let Some(t) = args.timeout {
        budget.timeout = t;
    }
    if let Some(m) = args.memory {
        budget.memory_bytes = m;
    }

    let sandbox = sandbox
        .builder()
        .build()
        .context("cannot start the sandbox")
        .map_err(usage)?;
    let component = sandbox
        .load_file(&args.component)
        .await
        .map_err(|e| usage(e.into()))?;

    let task_name = args
        .component
        .file_stem()
        .map_or_else(|| "task".to_owned(), |s| s.to_string_lossy().into_owned());
    let mut ctx = TaskContext::new(&task_name);
    ctx.attempt = args.attempt;
    ctx.parameters = parameters.to_string().into();
    ctx.values = Arc::new(args.context.into_iter().collect::<BTreeMap<_, _>>());

    let outcome = sandbox.run(&component, &input, &ctx, &budget, None).await;
    let state = State::after_run(
        &outcome.ending,
        Retry::OnSignal {
            delay: TimeDelta::zero(),
        },
        Utc::now(),
    );
    let report = if args.json {
        format!("{}\n", report_json(&state, &outcome, &component))
    } else {
        human_report(&state, &outcome)
    };
    crate::print_stdout(&report);
    Ok(exit_code(state.state_type()))
}

fn report_json(
    state: &State,
    outcome: &RunOutcome,
    component: &sluice::sandbox::TaskComponent,
) -> serde_json::Value {
    json!({
        "state": state.name,
        "type": state.state_type(),
        "message": state.message,
        "output": state.result,
        "scheduled_for": state.scheduled_for,
        "timestamp": state.timestamp,
        "fuel_consumed": outcome.usage.fuel_consumed,
        "duration_ms": outcome.usage.duration.as_secs_f64() * 1e3,
        "memory_peak_bytes": outcome.usage.memory_peak_bytes,
        "logs": outcome.logs,
        "logs_dropped_bytes": outcome.logs_dropped_bytes,
        "component": { "path": component.name(), "digest": component.digest() },
    })
}

fn human_report(state: &State, outcome: &RunOutcome) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing to a String cannot fail.
    macro_rules! println {
        ($($t:tt)*) => { let _ = writeln!(out, $($t)*); };
    }
    println!("state    {} ({})", state.name, state.state_type());
    if let Some(m) = &state.message {
        let mut lines = m.lines();
        println!("message  {}", lines.next().unwrap_or_default());
        for line in lines {
            println!("         {line}");
        }
    }
    if let Some(r) = &state.result {
        println!("output   {r}");
    }
    if let Some(at) = &state.scheduled_for {
        println!("retry at {at}");
    }
    let u = &outcome.usage;
    println!(
        "usage    fuel {}  time {:.3} ms  memory peak {}",
        u.fuel_consumed,
        u.duration.as_secs_f64() * 1e3,
        bytesize::ByteSize::b(u.memory_peak_bytes).display().iec()
    );
    if !outcome.logs.is_empty() {
        println!("logs");
        for r in &outcome.logs {
            let level = serde_json::to_value(r.level).unwrap_or_default();
            let source = serde_json::to_value(r.source).unwrap_or_default();
            println!(
                "  {} {:<5} {:<6} {}",
                r.time.format("%H:%M:%S%.3f"),
                level.as_str().unwrap_or("?"),
                source.as_str().unwrap_or("?"),
                r.message
            );
        }
    }
    out
}
