//! Logs at the scale of a flow run: a run with a store hands its logs to the store and keeps
//! none; the flow run's `max_log_bytes` (at the cap everything is kept, one byte less drops the
//! rest and says so once); `sluice logs` reads page by page, `sluice show` and the JSON record
//! read only a bounded tail; and the peak memory of a 1,000-child flow logging 1 MiB per child,
//! and of `show` and `logs` of it, measured in separate processes.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::state::StateName;
use sluice::store::{SqliteStore, Store};

use crate::memory::peak_rss;
use crate::store::{hostile_path, stderr, write_flow};
use crate::support::{guest, json_of, sandbox, sluice, task};

/// A flow whose task `talk` maps over `children`, each child logging `lines` lines of `bytes`
/// bytes through the log import, with `extra` flow keys.
fn talk_flow(dir: &Path, children: usize, lines: usize, bytes: usize, extra: &str) -> String {
    let h = hostile_path();
    let item = format!("{{ do = \"log\", lines = {lines}, bytes = {bytes} }}");
    let items = vec![item; children].join(", ");
    let flow = write_flow(
        dir,
        &format!(
            "name = \"talk\"\nconcurrency = 1\n{extra}\n[tasks.talk]\ncomponent = {h:?}\n\
             map = true\ninput = [{items}]\n"
        ),
    );
    flow.to_str().expect("utf-8").to_owned()
}

/// `sluice logs <run> --json`, one object per line.
fn log_lines(home: &Path, id: &str) -> Vec<Value> {
    let out = sluice(home, &["logs", id, "--json"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// What 4 records of 100 bytes cost against `max_log_bytes`: 4 × (100 + 64).
const FOUR_LINES: u64 = 4 * (100 + 64);

#[test]
fn logs_exactly_at_max_log_bytes_are_all_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = talk_flow(
        dir.path(),
        2,
        2,
        100,
        &format!("max_log_bytes = {FOUR_LINES}"),
    );
    let out = sluice(&home, &["run", &flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let lines = log_lines(&home, &id);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l["message"].as_str().is_some_and(|m| m.len() == 100)),
        "{lines:?}"
    );
}

#[test]
fn logs_one_byte_over_max_log_bytes_are_dropped_and_noted_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let cap = FOUR_LINES - 1;
    let flow = talk_flow(dir.path(), 2, 2, 100, &format!("max_log_bytes = {cap}"));
    let out = sluice(&home, &["run", &flow, "--json"]);
    // The cap fails no task run.
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    let children = task(&run, "talk")["children"]
        .as_array()
        .expect("children")
        .clone();
    assert!(children.iter().all(|c| c["state"] == "Completed"), "{run}");
    let id = run["id"].as_str().expect("id").to_owned();
    let lines = log_lines(&home, &id);
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert_eq!(messages.len(), 4, "3 lines kept and one note: {messages:?}");
    let notes: Vec<&&str> = messages
        .iter()
        .filter(|m| m.contains("max_log_bytes"))
        .collect();
    assert_eq!(notes.len(), 1, "{messages:?}");
    assert!(
        notes[0].contains(&format!("max_log_bytes = {cap} bytes"))
            && notes[0].contains("100 more bytes in 1 records"),
        "{}",
        notes[0]
    );
    // On the child that lost its line, after what it kept.
    let last = lines.last().expect("lines");
    assert_eq!(last["map_index"], 1, "{last}");
    assert_eq!(last["level"], "warn", "{last}");
}

#[test]
fn a_resumed_run_counts_its_earlier_logs_against_max_log_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile_path();
    // Room for three lines of 100 bytes: `a` logs two before the pause, `c` two after it.
    let cap = 3 * (100 + 64);
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"resumed\"\nmax_log_bytes = {cap}\n\
             [tasks.a]\ncomponent = {h:?}\ninput = {{ do = \"log\", lines = 2, bytes = 100 }}\n\
             [tasks.p]\ncomponent = {h:?}\nupstream_tasks = [\"a\"]\n\
             input = {{ do = \"pause_on_first_attempt\", value = 1 }}\n\
             [tasks.c]\ncomponent = {h:?}\nupstream_tasks = [\"p\"]\n\
             input = {{ do = \"log\", lines = 2, bytes = 100 }}\n"
        ),
    );
    let out = sluice(&home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(3), "paused: {}", stderr(&out));
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let out = sluice(&home, &["resume", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = log_lines(&home, &id);
    let by_task: Vec<(&str, &str)> = lines
        .iter()
        .map(|l| {
            let m = l["message"].as_str().unwrap_or_default();
            (
                l["task"].as_str().unwrap_or_default(),
                if m.contains("max_log_bytes") {
                    "note"
                } else {
                    "line"
                },
            )
        })
        .collect();
    assert_eq!(
        by_task,
        [("a", "line"), ("a", "line"), ("c", "line"), ("c", "note")],
        "{lines:?}"
    );
}

#[tokio::test]
async fn a_run_with_a_store_hands_its_logs_over_and_keeps_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut t = TaskDef::new("talk", guest("hostile"));
    t.map = MapOver::Input;
    t.input =
        Input::Literal(Value::Array(vec![json!({"do": "log", "lines": 3, "bytes": 50}); 4]).into());
    let def = FlowBuilder::new("talk").task(t).build().expect("flow");

    let store = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    let runner = FlowRunner::new(sandbox().clone()).store(store.clone());
    let flow = runner
        .prepare(def.clone(), Path::new("."))
        .await
        .expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    assert_eq!(run.state.name, StateName::Completed);
    let talk = run.task("talk").expect("talk");
    assert_eq!(talk.children.len(), 4);
    assert!(
        talk.children.iter().all(|c| c.logs.is_empty()),
        "the record kept logs the store has"
    );
    let stored = store.logs(run.id, Some("talk"), 0, 1000).expect("logs");
    assert_eq!(stored.len(), 12);

    // Without a store, the record is where the logs are, within the flow's cap.
    let runner = FlowRunner::new(sandbox().clone());
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    let talk = run.task("talk").expect("talk");
    assert!(talk.children.iter().all(|c| c.logs.len() == 3), "{talk:?}");
}

#[test]
fn logs_pages_through_every_line_once_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    // 2,500 lines: three pages of `sluice logs`.
    let flow = talk_flow(dir.path(), 5, 500, 20, "");
    let out = sluice(&home, &["run", &flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let lines = log_lines(&home, &id);
    assert_eq!(lines.len(), 2500);
    let seqs: Vec<i64> = lines.iter().filter_map(|l| l["seq"].as_i64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "out of order");
    let order: Vec<(u64, String)> = lines
        .iter()
        .map(|l| {
            let m = l["message"].as_str().unwrap_or_default();
            (
                l["map_index"].as_u64().unwrap_or(99),
                m.split(':').next().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = (0..5)
        .flat_map(|c| (0..500).map(move |i| (c, i.to_string())))
        .collect();
    assert_eq!(order, expected);
}

#[test]
fn the_json_record_carries_each_task_runs_newest_logs_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = talk_flow(dir.path(), 2, 150, 20, "");
    let out = sluice(&home, &["run", &flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let ran = json_of(&out);
    let id = ran["id"].as_str().expect("id").to_owned();
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    for run in [&ran, &shown] {
        for child in task(run, "talk")["children"].as_array().expect("children") {
            let logs = child["logs"].as_array().expect("logs");
            let first: Vec<&str> = logs
                .iter()
                .filter_map(|l| l["message"].as_str()?.split(':').next())
                .collect();
            let expected: Vec<String> = (50..150).map(|i| i.to_string()).collect();
            assert_eq!(first, expected, "the newest 100 lines, oldest first");
            assert_eq!(child["logs_omitted"], 50, "{child}");
        }
    }
}

/// The acceptance of bounded log memory: 1,000 mapped children each logging 1 MiB (16 lines of
/// 65,000 bytes: 1,040,000 bytes), at the default concurrency, run by `sluice run`: once with the
/// default `max_log_bytes` (a quarter of it is kept), once with the cap above the 1 GB they log,
/// so nothing is dropped; then, of the second run, `sluice show`, `show --json`, `logs --json`
/// (every line, whole) and `logs` of an unknown task. Each process must peak under 200 MB.
#[test]
fn a_thousand_children_logging_1_mib_each_and_reading_them_stay_under_200_mb() {
    const LIMIT: u64 = 200_000_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = |name: &str, extra: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).expect("dir");
        let flow = talk_flow(&d, 1000, 16, 65_000, extra);
        // Concurrency as by default, not the helper's 1.
        let text = std::fs::read_to_string(&flow).expect("flow");
        std::fs::write(&flow, text.replace("concurrency = 1\n", "")).expect("flow");
        flow
    };

    let (capped_peak, code, _) = peak_rss(&home, &["run", &flow("capped", "")]);
    assert_eq!(code, 0, "the run did not complete");
    assert!(
        capped_peak < LIMIT,
        "sluice run (default max_log_bytes) peaked at {} MiB",
        capped_peak >> 20
    );
    let (run_peak, code, _) = peak_rss(&home, &["run", &flow("whole", "max_log_bytes = \"2GiB\"")]);
    assert_eq!(code, 0, "the run did not complete");
    let out = sluice(&home, &["runs", "--json", "--limit", "1"]);
    let id = json_of(&out)[0]["id"].as_str().expect("id").to_owned();
    let (show_peak, code, _) = peak_rss(&home, &["show", &id]);
    assert_eq!(code, 0);
    let (json_peak, code, json_bytes) = peak_rss(&home, &["show", &id, "--json"]);
    assert_eq!(code, 0);
    let (logs_peak, code, logs_bytes) = peak_rss(&home, &["logs", &id, "--json"]);
    assert_eq!(code, 0);
    let (unknown_peak, code, _) = peak_rss(&home, &["logs", &id, "tlak"]);
    assert_eq!(code, 2, "an unknown task is a usage error");
    eprintln!(
        "peak RSS (MiB): run {} (default max_log_bytes: {}), show {}, show --json {} ({} KiB \
         printed), logs --json {} ({} MiB printed), logs of an unknown task {}",
        run_peak >> 20,
        capped_peak >> 20,
        show_peak >> 20,
        json_peak >> 20,
        json_bytes >> 10,
        logs_peak >> 20,
        logs_bytes >> 20,
        unknown_peak >> 20
    );
    // Everything was logged and kept: 16,000 lines of 65,000 bytes (and their prefixes).
    assert!(logs_bytes > 16_000 * 65_000, "{logs_bytes} bytes of logs");
    for (what, peak) in [
        ("sluice run", run_peak),
        ("sluice show", show_peak),
        ("sluice show --json", json_peak),
        ("sluice logs --json", logs_peak),
        ("sluice logs <unknown task>", unknown_peak),
    ] {
        assert!(peak < LIMIT, "{what} peaked at {} MiB", peak >> 20);
    }
}
