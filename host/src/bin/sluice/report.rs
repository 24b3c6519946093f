//! How flow runs are shown: the summary table of `sluice run`/`resume`/`show`, the detailed
//! history of `sluice show`, and the JSON record every one of them prints with `--json`.

use std::fmt::Write as _;
use std::time::Duration;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sluice::cache::CacheStatus;
use sluice::ids::TaskRunId;
use sluice::runner::{FlowRun, JournalEntry, TaskRun, Transition};
use sluice::state::{State, StateType};
use sluice::store::{LogTail, Store, TailLimits};

/// Wall time from the first Running transition to the last terminal one.
fn wall_time(history: &[Transition]) -> Option<Duration> {
    let start = history
        .iter()
        .find(|t| t.to.state_type() == StateType::Running)?
        .time;
    let end = history
        .iter()
        .rev()
        .find(|t| t.to.state_type().is_terminal())?
        .time;
    (end - start).to_std().ok()
}

fn cache_cell(t: &TaskRun) -> &'static str {
    match t.cache.as_ref().map(|c| c.status) {
        Some(CacheStatus::Hit) => "hit",
        Some(CacheStatus::Miss) => "miss",
        None => "-",
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}

/// The task table and the flow's state (and, with `detail`, every task's history and cache
/// explanation).
pub(crate) fn summary(run: &FlowRun, detail: bool) -> String {
    let mut out = String::new();
    let names: Vec<String> = run.tasks.iter().map(label).collect();
    let width = column_width(names.iter().map(String::as_str));
    let _ = writeln!(
        out,
        "{:<width$}  {:<13}  {:>8}  {:>10}  {:>10}  {:<5}  MESSAGE",
        "TASK", "STATE", "ATTEMPTS", "RUN TIME", "WALL", "CACHE"
    );
    for (t, name) in run.tasks.iter().zip(&names) {
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
            "{:<width$}  {:<13}  {:>8}  {:>10}  {:>10}  {:<5}  {}",
            fit(name, width),
            t.state.name.as_str(),
            attempts,
            ms(run_time),
            wall_time(&t.history).map_or_else(|| "-".into(), ms),
            cache_cell(t),
            truncate(message, 100)
        );
    }
    let _ = writeln!(
        out,
        "\nflow run {} of `{}`: {} — {}",
        run.id,
        truncate(&run.flow, LONG_NAME),
        run.state.name,
        run.state.message.as_deref().unwrap_or("")
    );
    if let Some(result) = &run.state.result {
        let _ = writeln!(out, "result: {}", truncate(result.as_str(), 200));
    }
    if detail {
        let _ = writeln!(out, "\nhistory of the flow run:");
        history(&mut out, &run.history, "  ");
        if !run.journal.is_empty() {
            let _ = writeln!(out, "\njournal of the flow body:");
            for (seq, e) in run.journal.iter().enumerate() {
                let _ = writeln!(out, "  {seq:>4}  {}", journal_line(e));
            }
        }
        for (k, t) in run.tasks.iter().enumerate() {
            let _ = match (t.map_index, t.children.is_empty()) {
                // A code flow's task runs: their place in submission order, and a map's index.
                (Some(i), true) => writeln!(
                    out,
                    "\n#{k} {} [{i}] ({}):",
                    truncate(&t.name, LONG_NAME),
                    t.id
                ),
                _ => writeln!(out, "\n{} ({}):", truncate(&t.name, LONG_NAME), t.id),
            };
            if let Some(c) = &t.cache {
                let _ = writeln!(
                    out,
                    "  cache {} ({}): {}",
                    cache_cell(t),
                    c.validator,
                    c.reason
                );
            }
            history(&mut out, &t.history, "  ");
            for c in &t.children {
                let _ = writeln!(
                    out,
                    "  [{}] {} after {} attempt(s){}",
                    c.map_index.unwrap_or_default(),
                    c.state.name,
                    c.attempts,
                    match cache_cell(c) {
                        "-" => String::new(),
                        s => format!(", cache {s}"),
                    }
                );
            }
            if let Some(o) = &t.output {
                let _ = writeln!(out, "  output: {}", truncate(o.as_str(), 200));
            }
        }
    } else {
        for t in run.tasks.iter().filter(|t| t.output.is_some()) {
            let output = t.output.as_ref().map_or("", |o| o.as_str());
            let _ = writeln!(
                out,
                "output of {}: {}",
                truncate(&t.name, LONG_NAME),
                truncate(output, 200)
            );
        }
    }
    out
}

/// One journal entry, as `show` prints it.
fn journal_line(e: &JournalEntry) -> String {
    match e {
        JournalEntry::Submit {
            task,
            count,
            mapped,
            wait_for,
            trigger,
            first,
            subflow,
            ..
        } => {
            let what = match (mapped, *count) {
                (true, n) => format!(
                    "map {task} over {n} → #{first}..#{}",
                    first + n.saturating_sub(1)
                ),
                (false, _) if *subflow => format!("subflow {task} → #{first}"),
                (false, _) => format!("submit {task} → #{first}"),
            };
            let waits = match wait_for.is_empty() {
                true => String::new(),
                false => format!(
                    " waiting for {}",
                    wait_for
                        .iter()
                        .map(|w| format!("#{w}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            let trigger = trigger
                .as_ref()
                .map(|t| format!(" ({t})"))
                .unwrap_or_default();
            format!("{what}{waits}{trigger}")
        }
        JournalEntry::Refused { task, why } => format!("submit {task} refused: {why}"),
        JournalEntry::State { of, state } => format!("get_state #{of} → {state}"),
        JournalEntry::WaitAny { all, index } => format!(
            "wait_any [{}] → {index}",
            all.iter()
                .map(|w| format!("#{w}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        JournalEntry::Now { at } => format!(
            "now → {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ),
        JournalEntry::Replayed { calls } => {
            format!("resumed: the body's first {calls} calls were replayed from the journal")
        }
    }
}

/// A task run's name in the table: a code flow's map element with its index (`add_one[2]`).
fn label(t: &TaskRun) -> String {
    match (t.map_index, t.children.is_empty()) {
        (Some(i), true) => format!("{}[{i}]", t.name),
        _ => t.name.clone(),
    }
}

fn history(out: &mut String, h: &[Transition], indent: &str) {
    for t in h {
        let _ = writeln!(
            out,
            "{indent}{}  {:<13} {}",
            t.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            t.to.as_str(),
            t.message.as_deref().unwrap_or("")
        );
    }
}

/// The widest a name column of a table gets; longer names are elided (`…`).
pub(crate) const NAME_COLUMN: usize = 48;

/// Names outside tables (headings) are cut at this many characters.
pub(crate) const LONG_NAME: usize = 200;

/// The width of a column of `names`: the longest one's, between 4 and [`NAME_COLUMN`].
pub(crate) fn column_width<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .map(|n| n.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(4, NAME_COLUMN)
}

/// `s` in at most `width` characters: longer text ends in `…`; control characters (which would
/// break the table's lines) are shown as `�`.
pub(crate) fn fit(s: &str, width: usize) -> String {
    let clean = |c: char| if c.is_control() { '\u{fffd}' } else { c };
    if s.chars().count() <= width {
        return s.chars().map(clean).collect();
    }
    let mut t: String = s.chars().take(width.saturating_sub(1)).map(clean).collect();
    t.push('…');
    t
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
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

/// The newest logs of each task run of `run`, as the JSON record shows them (see
/// [`TailLimits::default`]): read from the store, never all of a run's logs. A store that cannot
/// be read gives none, with a warning.
pub(crate) fn log_tails(store: &dyn Store, run: &FlowRun) -> HashMap<TaskRunId, LogTail> {
    store
        .log_tails(run.id, &TailLimits::default())
        .unwrap_or_else(|e| {
            eprintln!(
                "warning: the logs of flow run {} cannot be read: {e}",
                run.id
            );
            HashMap::new()
        })
}

fn task_json(t: &TaskRun, tails: &HashMap<TaskRunId, LogTail>) -> Value {
    // Logs kept in the record (a run without a store), else the tail read from the store.
    let (logs, omitted) = match tails.get(&t.id) {
        Some(tail) if t.logs.is_empty() => (json!(tail.records), tail.omitted),
        _ => (json!(t.logs), 0),
    };
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
        "wall_time_ms": wall_time(&t.history).map(|d| d.as_secs_f64() * 1e3),
        "fuel_consumed": t.fuel_consumed,
        "memory_peak_bytes": t.memory_peak_bytes,
        "cache": t.cache,
        "history": history_json(&t.history),
        "logs": logs,
        "logs_omitted": omitted,
    });
    if let Some(i) = t.map_index {
        v["map_index"] = json!(i);
    }
    if !t.children.is_empty() {
        v["children"] = t.children.iter().map(|c| task_json(c, tails)).collect();
    }
    v
}

/// The flow run record: the flow's state and every task with state, type, message, output,
/// attempts, durations, cache status, history and its newest logs (`tails`, from
/// [`log_tails`]; `logs_omitted` counts the older ones, which `sluice logs` prints).
pub(crate) fn run_json(run: &FlowRun, tails: &HashMap<TaskRunId, LogTail>) -> Value {
    let tasks = run.tasks.iter().map(|t| task_json(t, tails)).collect();
    run_json_with(run, tails, tasks)
}

/// [`run_json`], written to `out` as it is made (pretty, ending with a newline): one task run's
/// record at a time, never the whole record in memory at once (a run of 100,000 task runs).
pub(crate) fn write_run_json(
    out: &mut impl std::io::Write,
    run: &FlowRun,
    tails: &HashMap<TaskRunId, LogTail>,
) -> std::io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, &RunRecord { run, tails })?;
    out.write_all(b"\n")?;
    out.flush()
}

/// The flow run record, serialized with its task runs made one at a time.
struct RunRecord<'a> {
    run: &'a FlowRun,
    tails: &'a HashMap<TaskRunId, LogTail>,
}

impl serde::Serialize for RunRecord<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap as _, SerializeSeq as _};
        struct Tasks<'a>(&'a RunRecord<'a>);
        impl serde::Serialize for Tasks<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.run.tasks.len()))?;
                for t in &self.0.run.tasks {
                    seq.serialize_element(&task_json(t, self.0.tails))?;
                }
                seq.end()
            }
        }
        // Everything else as `run_json` makes it, `tasks` in its place (the map's own order).
        let head = run_json_with(self.run, self.tails, Value::Null);
        let Some(head) = head.as_object() else {
            return head.serialize(s);
        };
        let mut map = s.serialize_map(Some(head.len()))?;
        for (k, v) in head {
            match k.as_str() {
                "tasks" => map.serialize_entry(k, &Tasks(self))?,
                _ => map.serialize_entry(k, v)?,
            }
        }
        map.end()
    }
}

/// [`run_json`] with `tasks` as the task runs' records.
fn run_json_with(run: &FlowRun, tails: &HashMap<TaskRunId, LogTail>, tasks: Value) -> Value {
    let mut v = state_json(&run.state);
    v["id"] = json!(run.id);
    v["flow"] = json!(run.flow);
    v["parameters"] = json!(run.parameters);
    v["context"] = json!(run.context);
    v["history"] = history_json(&run.history);
    v["tasks"] = tasks;
    // A code flow's: what its body returned, its journal, and what it logged.
    if let Some(result) = &run.state.result {
        v["result"] = json!(result);
    }
    if !run.journal.is_empty() {
        v["journal"] = json!(run.journal);
    }
    let body = TaskRunId::of_body(run.id);
    match tails.get(&body) {
        Some(tail) if run.logs.is_empty() => {
            v["body_logs"] = json!(tail.records);
            v["body_logs_omitted"] = json!(tail.omitted);
        }
        _ if !run.logs.is_empty() => v["body_logs"] = json!(run.logs),
        _ => {}
    }
    v
}

/// A timestamp for tables: local-independent, to the second.
pub(crate) fn when(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}
