//! `sluice run`: run a flow manifest, with a live view on a terminal, then a summary table (or
//! the flow run record as JSON).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use serde_json::{Value, json};
use sluice::flow::manifest;
use sluice::runner::{FlowEvent, FlowRun, FlowRunner, RunOptions, TaskRun, Transition};
use sluice::sandbox::{CancelToken, Sandbox};
use sluice::state::{State, StateName};
use tokio::sync::mpsc;

use crate::{UsageError, exit_code};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The flow manifest (TOML).
    flow: PathBuf,

    /// Set a parameter (repeatable): `--param name=value`. The value is JSON when it parses as
    /// JSON, else a string.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = crate::parse_key_value)]
    params: Vec<(String, String)>,

    /// Set a context value (repeatable): `--context key=value`.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = crate::parse_key_value)]
    context: Vec<(String, String)>,

    /// Print the flow run record as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(home: &Path, args: Args) -> Result<ExitCode, UsageError> {
    let usage = |e: anyhow::Error| UsageError(e);
    let def = manifest::load(&args.flow).map_err(|e| usage(e.into()))?;
    let parameters: BTreeMap<String, Value> = args
        .params
        .into_iter()
        .map(|(k, v)| {
            let value = serde_json::from_str(&v).unwrap_or(Value::String(v));
            (k, value)
        })
        .collect();
    let sandbox = Sandbox::builder()
        .artifact_dir(home.join("artifacts"))
        .build()
        .map_err(|e| usage(anyhow!("cannot start the sandbox: {e}")))?;
    let (events, rx) = mpsc::unbounded_channel();
    let runner = FlowRunner::new(sandbox).events(events);
    let dir = args
        .flow
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let flow = runner
        .prepare(def, &dir)
        .await
        .map_err(|e| usage(e.into()))?;

    let cancel = CancelToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ncancelling: interrupting running tasks…");
            on_ctrl_c.cancel();
        }
    });
    let live = (!args.json && std::io::stderr().is_terminal())
        .then(|| tokio::spawn(live_view(rx, flow.def().tasks.len())));
    let options = RunOptions {
        parameters,
        context: args.context.into_iter().collect(),
        cancel,
    };
    let result = runner.run(&flow, options).await;
    drop(runner);
    if let Some(view) = live {
        let _ = view.await;
    }
    let run = result.map_err(|e| usage(e.into()))?;
    let report = if args.json {
        format!("{:#}\n", run_json(&run))
    } else {
        summary(&run)
    };
    crate::print_stdout(&report);
    Ok(exit_code(run.state.state_type()))
}

/// Counts of task runs by state and the tasks running now, redrawn as events arrive.
async fn live_view(mut rx: mpsc::UnboundedReceiver<FlowEvent>, tasks: usize) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut states: HashMap<(String, Option<u32>), StateName> = HashMap::new();
    while let Some(event) = rx.recv().await {
        let FlowEvent::Task {
            name,
            map_index,
            state,
        } = event
        else {
            continue;
        };
        states.insert((name, map_index), state);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut running: Vec<String> = Vec::new();
        for ((name, idx), s) in &states {
            *counts.entry(s.as_str()).or_default() += 1;
            if matches!(s, StateName::Running | StateName::Retrying) {
                running.push(match idx {
                    Some(i) => format!("{name}[{i}]"),
                    None => name.clone(),
                });
            }
        }
        running.sort();
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let mut line = format!("{tasks} tasks │ {}", counts.join("  "));
        if !running.is_empty() {
            let shown: Vec<&str> = running.iter().take(6).map(String::as_str).collect();
            line.push_str(&format!(" │ running: {}", shown.join(", ")));
            if running.len() > 6 {
                line.push_str(&format!(" +{}", running.len() - 6));
            }
        }
        bar.set_message(line);
    }
    bar.finish_and_clear();
}

fn summary(run: &FlowRun) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let width = run
        .tasks
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{:<width$}  {:<13}  {:>8}  {:>10}  MESSAGE",
        "TASK", "STATE", "ATTEMPTS", "RUN TIME"
    );
    for t in &run.tasks {
        let attempts = if t.children.is_empty() {
            t.attempts.to_string()
        } else {
            format!("{} maps", t.children.len())
        };
        let run_time = t.run_time + t.children.iter().map(|c| c.run_time).sum::<Duration>();
        let message = t.state.message.as_deref().unwrap_or("");
        let message = message.lines().next().unwrap_or("");
        let _ = writeln!(
            out,
            "{:<width$}  {:<13}  {:>8}  {:>8.1}ms  {}",
            t.name,
            t.state.name.as_str(),
            attempts,
            run_time.as_secs_f64() * 1e3,
            truncate(message, 100)
        );
    }
    let _ = writeln!(
        out,
        "\nflow run {} of `{}`: {} — {}",
        run.id,
        run.flow,
        run.state.name,
        run.state.message.as_deref().unwrap_or("")
    );
    for t in run.tasks.iter().filter(|t| t.output.is_some()) {
        let output = t.output.as_ref().map(Value::to_string).unwrap_or_default();
        let _ = writeln!(out, "output of {}: {}", t.name, truncate(&output, 200));
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}

fn state_json(s: &State) -> Value {
    json!({
        "state": s.name,
        "type": s.state_type(),
        "message": s.message,
        "timestamp": s.timestamp,
        "scheduled_for": s.scheduled_for,
    })
}

fn history_json(h: &[Transition]) -> Value {
    h.iter()
        .map(|t| {
            json!({
                "from": t.from,
                "to": t.to,
                "type": t.to.state_type(),
                "time": t.time,
                "message": t.message,
            })
        })
        .collect()
}

fn task_json(t: &TaskRun) -> Value {
    let mut v = json!({
        "name": t.name,
        "id": t.id,
        "state": t.state.name,
        "type": t.state.state_type(),
        "message": t.state.message,
        "output": t.output,
        "output_released": t.output_released,
        "attempts": t.attempts,
        "run_time_ms": t.run_time.as_secs_f64() * 1e3,
        "fuel_consumed": t.fuel_consumed,
        "history": history_json(&t.history),
        "logs": t.logs,
    });
    if let Some(i) = t.map_index {
        v["map_index"] = json!(i);
    }
    if !t.children.is_empty() {
        v["children"] = t.children.iter().map(task_json).collect();
    }
    v
}

/// The flow run record: the flow's state and every task with state, type, message, output,
/// attempts and history.
pub(crate) fn run_json(run: &FlowRun) -> Value {
    let mut v = state_json(&run.state);
    v["id"] = json!(run.id);
    v["flow"] = json!(run.flow);
    v["parameters"] = json!(run.parameters);
    v["context"] = json!(run.context);
    v["history"] = history_json(&run.history);
    v["tasks"] = run.tasks.iter().map(task_json).collect();
    v
}
