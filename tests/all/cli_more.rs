//! The CLI's flags and commands that a user relies on but the other CLI tests do not reach:
//! `task run --attempt/--fuel`, the usage figures, `runs --state/--flow`, the human `show`,
//! `logs --follow`, `cache ls --task` and `cache clear --expired`. Each test fails if the flag
//! or command is ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::json;
use sluice::cache::{CachePolicy, CacheValidator};
use sluice::clock::SimClock;
use sluice::flow::{FlowBuilder, Input, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::store::{SqliteStore, Store};

use crate::support::{example_flow, guest, json_of, sandbox, sluice, task};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shared_home() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home")
}

fn hostile() -> String {
    guest("hostile").display().to_string()
}

#[test]
fn task_run_passes_the_attempt_to_the_guest() {
    let h = hostile();
    let input = r#"{"do":"context","keys":[]}"#;
    let out = sluice(
        &shared_home(),
        &[
            "task",
            "run",
            &h,
            "--input",
            input,
            "--attempt",
            "7",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(json_of(&out)["output"]["attempt"], 7);
    // And the default is the first attempt.
    let out = sluice(
        &shared_home(),
        &["task", "run", &h, "--input", input, "--json"],
    );
    assert_eq!(json_of(&out)["output"]["attempt"], 1);
}

#[test]
fn task_run_applies_a_numeric_fuel_budget() {
    let h = hostile();
    let out = sluice(
        &shared_home(),
        &[
            "task",
            "run",
            &h,
            "--input",
            r#"{"do":"loop"}"#,
            "--fuel",
            "1_234_567",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json_of(&out);
    assert_eq!(v["state"], "TimedOut");
    assert_eq!(v["message"], "fuel budget of 1234567 exhausted");
    assert_eq!(v["fuel_consumed"], 1_234_567);
}

#[test]
fn task_run_reports_real_usage_figures() {
    let out = sluice(
        &shared_home(),
        &[
            "task",
            "run",
            &hostile(),
            "--input",
            r#"{"do":"allocate","mib":4}"#,
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let v = json_of(&out);
    // `.is_some()` would accept JSON null; the figures must be real numbers.
    let duration = v["duration_ms"].as_f64().expect("duration_ms is a number");
    assert!(duration > 0.0 && duration < 60_000.0, "{v}");
    let peak = v["memory_peak_bytes"].as_u64().expect("a number");
    assert!((4 << 20..64 << 20).contains(&peak), "{v}");
    assert!(v["fuel_consumed"].as_u64().is_some_and(|f| f > 0), "{v}");
    // The human report shows the same figures.
    let out = sluice(
        &shared_home(),
        &[
            "task",
            "run",
            &hostile(),
            "--input",
            r#"{"do":"allocate","mib":4}"#,
        ],
    );
    let text = stdout(&out);
    let usage = text
        .lines()
        .find(|l| l.starts_with("usage    fuel "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!usage.contains("time 0.000 ms"), "{usage}");
    assert!(
        usage.contains(" MiB") && !usage.contains("memory peak 0 B"),
        "{usage}"
    );
}

/// Three runs of three flows, ending Completed, Failed and Paused.
fn three_runs(home: &Path) -> BTreeMap<&'static str, String> {
    let mut ids = BTreeMap::new();
    for (flow, code) in [("map-add-one", 0), ("try-unlock", 1), ("manual-pause", 3)] {
        let path = example_flow(flow);
        let out = sluice(home, &["run", path.to_str().expect("utf-8"), "--json"]);
        assert_eq!(out.status.code(), Some(code), "{flow}: {out:?}");
        ids.insert(flow, json_of(&out)["id"].as_str().expect("id").to_owned());
    }
    ids
}

#[test]
fn runs_filters_by_state_and_by_flow() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let ids = three_runs(home);
    let listed = |args: &[&str]| -> Vec<(String, String, String)> {
        let mut all = vec!["runs", "--json"];
        all.extend_from_slice(args);
        let out = sluice(home, &all);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        json_of(&out)
            .as_array()
            .expect("a list")
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                (s("id"), s("flow"), s("state"))
            })
            .collect()
    };
    assert_eq!(listed(&[]).len(), 3);
    assert_eq!(
        listed(&["--state", "Failed"]),
        [(
            ids["try-unlock"].clone(),
            "try-unlock".into(),
            "Failed".into()
        )]
    );
    assert_eq!(
        listed(&["--state", "Paused"]),
        [(
            ids["manual-pause"].clone(),
            "manual-pause".into(),
            "Paused".into()
        )]
    );
    assert_eq!(
        listed(&["--flow", "map-add-one"]),
        [(
            ids["map-add-one"].clone(),
            "map-add-one".into(),
            "Completed".into()
        )]
    );
    assert!(listed(&["--flow", "map-add-one", "--state", "Failed"]).is_empty());
    assert_eq!(listed(&["--limit", "2"]).len(), 2);
    // The table has the same filter.
    let table = stdout(&sluice(home, &["runs", "--state", "Failed"]));
    assert!(table.contains(&ids["try-unlock"]), "{table}");
    assert!(!table.contains(&ids["map-add-one"]), "{table}");
}

#[test]
fn show_prints_tasks_states_history_and_outputs_for_people() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("map-add-one");
    let out = sluice(home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    // A unique prefix is enough.
    let out = sluice(home, &["show", &id[..20]]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let columns: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "TASK", "STATE", "ATTEMPTS", "RUN", "TIME", "WALL", "CACHE", "MESSAGE"
        ],
        "{text}"
    );
    let row = |name: &str| -> Vec<&str> {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {text}"))
            .split_whitespace()
            .collect()
    };
    let add = row("add_one");
    assert_eq!(&add[1..4], ["Mapped", "3", "maps"], "{text}");
    assert!(add[4].ends_with("ms"), "{text}");
    let sum = row("sum");
    assert_eq!(&sum[1..3], ["Completed", "1"], "{text}");
    assert!(
        text.contains(&format!(
            "flow run {id} of `map-add-one`: Completed — all reference tasks succeeded"
        )),
        "{text}"
    );
    assert!(text.contains("\nhistory of the flow run:\n"), "{text}");
    for child in 0..3 {
        assert!(
            text.contains(&format!("  [{child}] Completed after 1 attempt(s)\n")),
            "{text}"
        );
    }
    assert!(text.contains("  output: 9\n"), "{text}");
    // Each task's history, in order, with its times.
    let sum_at = text.find("\nsum (").expect("sum's section");
    let sum_history: Vec<&str> = text[sum_at + 1..]
        .lines()
        .skip(1)
        .take(3)
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default())
        .collect();
    assert_eq!(sum_history, ["Pending", "Running", "Completed"], "{text}");
}

#[test]
fn logs_follow_prints_lines_written_after_it_started_until_the_run_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile();
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        format!(
            r#"name = "later"
[tasks.nap]
component = {h:?}
input = {{ do = "sleep", ms = 1500 }}
[tasks.talk]
component = {h:?}
input = {{ do = "print", lines = 2 }}
upstream_tasks = ["nap"]
"#
        ),
    )
    .expect("write");
    let mut run = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&flow)
        .arg("--json")
        .env("SLUICE_HOME", &home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    // Wait until `nap` runs: `talk` has written nothing yet.
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = loop {
        let runs = json_of(&sluice(&home, &["runs", "--json"]));
        if let Some(id) = runs[0]["id"].as_str() {
            let shown = json_of(&sluice(&home, &["show", id, "--json"]));
            if task(&shown, "nap")["state"] == "Running" {
                break id.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "the run never started");
        assert!(
            run.try_wait().expect("wait").is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    let before = stdout(&sluice(&home, &["logs", &id]));
    assert!(!before.contains("out 0"), "{before}");
    let follow = sluice(&home, &["logs", &id, "--follow"]);
    assert_eq!(follow.status.code(), Some(0), "{follow:?}");
    // It returned only once the run had ended, with the lines written meanwhile.
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(
        shown["state"], "Completed",
        "--follow returned while the run was live"
    );
    let text = stdout(&follow);
    for line in ["talk: out 0", "talk: err 0", "talk: out 1", "talk: err 1"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let out = run.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// Cache entries of two tasks, made two hours ago: `old`'s (valid 1 h) has expired, `fresh`'s
/// (valid a day) has not.
async fn aged_cache(home: &Path) {
    let store = Arc::new(SqliteStore::open(home).expect("store"));
    let clock = SimClock::new(Utc::now() - TimeDelta::hours(2));
    let runner = FlowRunner::new(sandbox().clone())
        .clock(Arc::new(clock))
        .store(store.clone() as Arc<dyn Store>);
    let cached = |name: &str, hours: u64| {
        let mut t = TaskDef::new(name, guest("identity"));
        t.input = Input::Literal(json!(name).into());
        t.cache = Some(CachePolicy {
            cache_for: Duration::from_secs(hours * 3600),
            validator: CacheValidator::DurationOnly,
        });
        t
    };
    let def = FlowBuilder::new("aged")
        .task(cached("old", 1))
        .task(cached("fresh", 24))
        .build()
        .expect("flow");
    let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
    runner.run(&flow, RunOptions::default()).await.expect("run");
    store.flush().expect("flush");
}

#[tokio::test]
async fn cache_ls_by_task_and_clear_only_the_expired() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    aged_cache(home).await;
    let ls = |args: &[&str]| -> Vec<(String, bool)> {
        let mut all = vec!["cache", "ls", "--json"];
        all.extend_from_slice(args);
        let out = sluice(home, &all);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let mut v: Vec<(String, bool)> = json_of(&out)
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    e["task"].as_str().unwrap_or_default().to_owned(),
                    e["valid"].as_bool().expect("valid"),
                )
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ls(&[]),
        [("fresh".to_owned(), true), ("old".to_owned(), false)]
    );
    assert_eq!(ls(&["--task", "old"]), [("old".to_owned(), false)]);
    assert_eq!(ls(&["--task", "fresh"]), [("fresh".to_owned(), true)]);
    let table = stdout(&sluice(home, &["cache", "ls", "--task", "old"]));
    assert!(table.contains("expired"), "{table}");
    assert!(!table.contains("fresh"), "{table}");

    let out = sluice(home, &["cache", "clear", "--expired"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(stdout(&out), "removed 1 cache entry\n");
    assert_eq!(ls(&[]), [("fresh".to_owned(), true)]);
    let out = sluice(home, &["cache", "clear", "--expired"]);
    assert_eq!(stdout(&out), "removed 0 cache entries\n");
    assert_eq!(ls(&[]).len(), 1);
}
