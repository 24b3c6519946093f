//! The durable store: output caching with every validator (on an injected clock), caching across
//! processes, crash recovery after SIGKILL, cancel from a second process, pause and resume in a
//! new process, and bad stores (corrupt, foreign, newer, missing blob, read-only home).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{Value, json};
use sluice::cache::{CachePolicy, CacheStatus, CacheValidator};
use sluice::clock::SimClock;
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::ids::FlowRunId;
use sluice::runner::{FlowRunner, RunOptions, TaskRun};
use sluice::sandbox::RunBudget;
use sluice::state::{State, StateName};
use sluice::store::{SqliteStore, Store, Write};

use crate::support::{example_flow, guest, history, json_of, sandbox, sluice, task};

// ---------------------------------------------------------------------------------------------
// Helpers

/// The flow `name` of three hostile tasks: `a` (10 ms) → `b` (1.5 s, long enough to be killed or
/// blocked in) → `c` (reads both).
pub(crate) fn slow_chain(dir: &Path, name: &str) -> PathBuf {
    slow_chain_with_retries(dir, name, 0)
}

/// [`slow_chain`] with `retries` on its slow task `b`.
pub(crate) fn slow_chain_with_retries(dir: &Path, name: &str, retries: u32) -> PathBuf {
    let h = hostile_path();
    write_flow(
        dir,
        &format!(
            r#"name = "{name}"
[tasks.a]
component = {h:?}
input = {{ do = "sleep", ms = 10 }}
[tasks.b]
component = {h:?}
input = {{ do = "sleep", ms = 1500, after = "$tasks.a" }}
retries = {retries}
[tasks.c]
component = {h:?}
input = {{ do = "len", of = ["$tasks.a", "$tasks.b"] }}
"#
        ),
    )
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How many times a history entered Running (executions of the component).
fn executions(history: &[String]) -> usize {
    history.iter().filter(|s| *s == "Running").count()
}

/// The newest run in `home`, started by `child` (waits up to 120 s for it to appear: a loaded
/// machine compiles slowly).
pub(crate) fn newest_run(home: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = sluice(home, &["runs", "--json", "--limit", "1"]);
        let runs = json_of(&out);
        if let Some(id) = runs[0]["id"].as_str() {
            return id.to_owned();
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("sluice run exited ({status}) before its run appeared: {err}");
        }
        assert!(Instant::now() < deadline, "no run appeared in {home:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll `sluice show` until `ready` holds (up to 120 s: the first run compiles its component).
pub(crate) fn wait_for(home: &Path, run: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = json_of(&sluice(home, &["show", run, "--json"]));
        if ready(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting; last: {v:#}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(crate) fn spawn_run(home: &Path, flow: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(flow)
        .arg("--json")
        .env("SLUICE_HOME", home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice")
}

pub(crate) fn write_flow(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("flow.toml");
    std::fs::write(&path, text).expect("write flow");
    path
}

pub(crate) fn hostile_path() -> String {
    guest("hostile").display().to_string()
}

pub(crate) fn start() -> DateTime<Utc> {
    "2030-01-01T00:00:00Z".parse().expect("time")
}

// ---------------------------------------------------------------------------------------------
// Output caching, through the library with an injected clock

struct CacheBench {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    clock: SimClock,
}

impl CacheBench {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Arc::new(SqliteStore::open(dir.path()).expect("store"));
        Self {
            _dir: dir,
            store,
            clock: SimClock::new(start()),
        }
    }

    /// Run a one-task flow: task `t` running `component` with `input`, cached under `policy`,
    /// with parameters `a` and `b`.
    async fn run(
        &self,
        component: &str,
        budget: RunBudget,
        policy: &CachePolicy,
        input: Value,
        params: Value,
    ) -> (FlowRunId, TaskRun) {
        let mut t = TaskDef::new("t", guest(component));
        t.input = Input::from_json(input);
        t.cache = Some(policy.clone());
        t.budget = budget;
        let def = FlowBuilder::new("cached")
            .parameter("a", json!(0))
            .parameter("b", json!(0))
            .task(t)
            .build()
            .expect("flow");
        let runner = FlowRunner::new(sandbox().clone())
            .clock(Arc::new(self.clock.clone()))
            .store(self.store.clone() as Arc<dyn Store>);
        let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
        let parameters: BTreeMap<String, Value> =
            serde_json::from_value(params).expect("parameters");
        let run = runner
            .run(
                &flow,
                RunOptions {
                    parameters,
                    ..RunOptions::default()
                },
            )
            .await
            .expect("run");
        let t = run.task("t").expect("task t").clone();
        // The record reads back as the run left it: state, history and cache information (a
        // hit's reason is derived from its entry, a state from its last transition).
        let mut stored = self.store.load_run(run.id).expect("load").run;
        let mut read = stored.tasks.remove(0);
        read.output_released = t.output_released;
        read.logs.clone_from(&t.logs);
        // Run time is stored in whole microseconds.
        assert_eq!(read.run_time.as_micros(), t.run_time.as_micros());
        read.run_time = t.run_time;
        assert_eq!(
            read, t,
            "the stored task run differs from the run's own record"
        );
        (run.id, t)
    }
}

fn policy(validator: CacheValidator) -> CachePolicy {
    CachePolicy {
        cache_for: Duration::from_secs(60),
        validator,
    }
}

#[track_caller]
fn assert_hit(t: &TaskRun, source: FlowRunId, output: &Value) {
    assert_eq!(t.state.name, StateName::Cached, "{t:#?}");
    assert_eq!(t.attempts, 0, "a hit must not run the component");
    assert!(
        t.history.iter().all(|h| h.to != StateName::Running),
        "a hit must not run: {:?}",
        t.history
    );
    assert_eq!(t.output, Some(output.into()));
    let cache = t.cache.as_ref().expect("cache info");
    assert_eq!(cache.status, CacheStatus::Hit);
    assert_eq!(cache.source_flow_run, Some(source.to_string()));
}

/// The validator the task run's cache information names, as `sluice show` prints it.
#[track_caller]
fn assert_validator(t: &TaskRun, validator: &str) {
    let cache = t.cache.as_ref().expect("cache info");
    assert_eq!(cache.validator, validator);
}

#[track_caller]
fn assert_miss(t: &TaskRun, reason: &str) {
    assert_eq!(t.state.name, StateName::Completed, "{t:#?}");
    assert_eq!(t.attempts, 1);
    let cache = t.cache.as_ref().expect("cache info");
    assert_eq!(cache.status, CacheStatus::Miss);
    assert!(
        cache.reason.contains(reason),
        "miss reason {:?} does not say {reason:?}",
        cache.reason
    );
}

const AB: &str = r#"{"a": "$params.a", "b": "$params.b"}"#;

fn ab() -> Value {
    serde_json::from_str(AB).expect("json")
}

#[tokio::test]
async fn duration_only_hits_until_cache_for_expires() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::DurationOnly);
    let d = RunBudget::default();
    let (first, t) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 1}))
        .await;
    assert_miss(&t, "no cached output of task `t` yet");
    // Other inputs and parameters: duration_only does not look at them.
    b.clock.advance(TimeDelta::seconds(59));
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 2, "b": 2}))
        .await;
    assert_hit(&t, first, &json!({"a": 1, "b": 1}));
    // Past cache_for (60 s after it was stored): expired.
    b.clock.advance(TimeDelta::seconds(2));
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 2, "b": 2}))
        .await;
    assert_miss(&t, "expired at 2030-01-01T00:01:00");
    assert_eq!(t.output, Some(json!({"a": 2, "b": 2}).into()));
}

/// A cached mapped task of more children than one preload chunk holds, and than the flow's
/// concurrency: its second run answers every child from the entries preloaded as they stream
/// in, without a single lookup in the store, each with its own output and source; its first
/// run looked every miss up.
#[tokio::test]
async fn a_large_cached_map_hits_on_every_child_from_the_preload() {
    let b = CacheBench::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(crate::scheduling::PollRecorder::new(
        SqliteStore::open(dir.path()).expect("store"),
    ));
    let n = sluice::store::PRELOAD_CHUNK * 2 + 88;
    let run = |b: &CacheBench| {
        let mut t = TaskDef::new("add", guest("add_one"));
        t.input = Input::Literal(json!((0..n as i64).collect::<Vec<_>>()).into());
        t.map = MapOver::Input;
        t.cache = Some(policy(CacheValidator::AllInputs));
        let def = FlowBuilder::new("cached-map")
            .task(t)
            .build()
            .expect("flow");
        let runner = FlowRunner::new(sandbox().clone())
            .clock(Arc::new(b.clock.clone()))
            .store(store.clone() as Arc<dyn Store>);
        async move {
            let flow = runner.prepare(def, Path::new(".")).await.expect("prepare");
            runner.run(&flow, RunOptions::default()).await.expect("run")
        }
    };
    let first = run(&b).await;
    assert_eq!(first.state.name, StateName::Completed);
    let children = &first.tasks[0].children;
    assert_eq!(children.len(), n);
    assert!(
        children
            .iter()
            .all(|c| c.state.name == StateName::Completed)
    );
    assert_eq!(store.lookups(), n, "each miss is looked up (and explained)");
    b.clock.advance(TimeDelta::seconds(1));
    let second = run(&b).await;
    assert_eq!(store.lookups(), n, "a hit is answered from the preload");
    assert_eq!(second.state.name, StateName::Completed);
    let children = &second.tasks[0].children;
    assert_eq!(children.len(), n);
    for c in children {
        assert_eq!(c.state.name, StateName::Cached, "{c:#?}");
        assert_eq!(c.attempts, 0, "a hit must not run the component");
        let cache = c.cache.as_ref().expect("cache info");
        assert_eq!(cache.status, CacheStatus::Hit);
        assert_eq!(cache.source_flow_run, Some(first.id.to_string()));
    }
    // Each child its own output, in order.
    let expected = json!((1..=n as i64).collect::<Vec<_>>());
    assert_eq!(second.tasks[0].output, Some(expected.into()));
}

#[tokio::test]
async fn all_inputs_hits_only_on_equal_inputs() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::AllInputs);
    let d = RunBudget::default();
    let (first, _) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 1}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 1}))
        .await;
    assert_hit(&t, first, &json!({"a": 1, "b": 1}));
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 2}))
        .await;
    assert_miss(&t, "the inputs differ");
    // Parameters that do not reach the input do not matter.
    let constant = json!({"k": 1});
    let (second, _) = b
        .run("identity", d, &p, constant.clone(), json!({"a": 5}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, constant.clone(), json!({"a": 6}))
        .await;
    assert_hit(&t, second, &constant);
    b.clock.advance(TimeDelta::seconds(61));
    let (_, t) = b.run("identity", d, &p, constant, json!({"a": 6})).await;
    assert_miss(&t, "expired");
}

#[tokio::test]
async fn equal_values_hit_whatever_their_key_order_but_numbers_are_exact() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::AllInputs);
    let d = RunBudget::default();
    let one: Value =
        serde_json::from_str(r#"{"y": [1, 2.5], "x": {"q": 1.0, "p": null}}"#).expect("json");
    let two: Value =
        serde_json::from_str(r#"{"x": {"p": null, "q": 1.0}, "y": [1, 2.5]}"#).expect("json");
    let (first, _) = b
        .run("identity", d, &p, json!("$params.a"), json!({"a": one}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, json!("$params.a"), json!({"a": two}))
        .await;
    assert_eq!(t.state.name, StateName::Cached, "{:?}", t.cache);
    assert_eq!(
        t.cache.as_ref().and_then(|c| c.source_flow_run.clone()),
        Some(first.to_string())
    );
    // `1.0` is not `1`: a task may tell them apart.
    let three: Value =
        serde_json::from_str(r#"{"x": {"p": null, "q": 1}, "y": [1, 2.5]}"#).expect("json");
    let (_, t) = b
        .run("identity", d, &p, json!("$params.a"), json!({"a": three}))
        .await;
    assert_miss(&t, "the inputs differ");
}

#[tokio::test]
async fn all_parameters_hits_only_on_equal_parameters() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::AllParameters);
    let d = RunBudget::default();
    let input = json!({"k": 1});
    let (first, _) = b
        .run("identity", d, &p, input.clone(), json!({"a": 1, "b": 1}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, input.clone(), json!({"a": 1, "b": 1}))
        .await;
    assert_hit(&t, first, &input);
    let (_, t) = b
        .run("identity", d, &p, input, json!({"a": 1, "b": 2}))
        .await;
    assert_miss(&t, "the parameters differ");
}

#[tokio::test]
async fn partial_inputs_only_validates_the_named_fields() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::PartialInputsOnly(vec!["a".into()]));
    let d = RunBudget::default();
    let (first, _) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 1}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 1, "b": 2}))
        .await;
    // The cached output is the one computed with b = 1.
    assert_hit(&t, first, &json!({"a": 1, "b": 1}));
    assert_validator(&t, "partial_inputs_only(a)");
    let (_, t) = b
        .run("identity", d, &p, ab(), json!({"a": 2, "b": 2}))
        .await;
    assert_miss(&t, "the inputs differ");
}

#[tokio::test]
async fn partial_parameters_only_validates_the_named_parameters() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::PartialParametersOnly(vec!["a".into()]));
    let d = RunBudget::default();
    let input = json!("$params.b");
    let (first, _) = b
        .run("identity", d, &p, input.clone(), json!({"a": 1, "b": 1}))
        .await;
    let (_, t) = b
        .run("identity", d, &p, input.clone(), json!({"a": 1, "b": 2}))
        .await;
    assert_hit(&t, first, &json!(1));
    assert_validator(&t, "partial_parameters_only(a)");
    let (_, t) = b
        .run("identity", d, &p, input, json!({"a": 2, "b": 2}))
        .await;
    assert_miss(&t, "the parameters differ");
}

#[tokio::test]
async fn never_use_always_runs_and_stores_nothing() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::NeverUse);
    let d = RunBudget::default();
    for _ in 0..2 {
        let (_, t) = b
            .run("identity", d, &p, ab(), json!({"a": 1, "b": 1}))
            .await;
        assert_eq!(t.state.name, StateName::Completed);
        assert_eq!(t.attempts, 1);
        assert_eq!(t.cache, None);
    }
    b.store.flush().expect("flush");
    assert!(b.store.cache_entries(None).expect("entries").is_empty());
}

#[tokio::test]
async fn a_changed_component_or_limit_never_hits() {
    let b = CacheBench::new();
    let p = policy(CacheValidator::DurationOnly);
    let d = RunBudget::default();
    let (first, t) = b.run("add_one", d, &p, json!(1), json!({})).await;
    assert_eq!(t.output, Some(json!(2).into()));
    let (_, t) = b.run("add_one", d, &p, json!(1), json!({})).await;
    assert_hit(&t, first, &json!(2));
    // Same task name, other bytes: runs, and says why.
    let (_, t) = b.run("identity", d, &p, json!(1), json!({})).await;
    assert_miss(&t, "the component changed");
    assert_eq!(t.output, Some(json!(1).into()));
    // Same bytes, other limits.
    let fuel = RunBudget {
        fuel: Some(1_000_000_000),
        ..d
    };
    let (_, t) = b.run("identity", fuel, &p, json!(1), json!({})).await;
    assert_miss(&t, "limits");
}

// ---------------------------------------------------------------------------------------------
// Through the CLI, across processes

#[test]
fn the_cache_survives_a_new_process_and_explains_itself() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("time-travel");
    let flow = flow.to_str().expect("utf-8 path");
    let first = sluice(home, &["run", flow, "--json"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let first = json_of(&first);
    assert_eq!(task(&first, "expensive")["state"], "Completed");
    assert_eq!(task(&first, "expensive")["cache"]["status"], "miss");

    // A new process: Cached, pointing at the first run, not executed.
    let second = json_of(&sluice(home, &["run", flow, "--json"]));
    let t = task(&second, "expensive");
    assert_eq!(t["state"], "Cached", "{t:#}");
    assert_eq!(t["type"], "COMPLETED");
    assert_eq!(t["attempts"], 0);
    assert!(!history(t).contains(&"Running".to_owned()), "{t:#}");
    assert_eq!(t["cache"]["status"], "hit");
    assert_eq!(
        t["cache"]["validator"], "all_inputs",
        "as the manifest names it"
    );
    assert_eq!(t["cache"]["source_flow_run"], first["id"]);
    assert_eq!(
        task(&second, "report")["output"],
        json!({"x": 1, "result": 2})
    );

    // `sluice show` of the second run explains the hit.
    let id = second["id"].as_str().expect("id");
    let shown = json_of(&sluice(home, &["show", id, "--json"]));
    let reason = task(&shown, "expensive")["cache"]["reason"]
        .as_str()
        .expect("reason")
        .to_owned();
    assert!(
        reason.contains(first["id"].as_str().expect("id")),
        "{reason}"
    );
    assert_eq!(
        task(&shown, "report")["output"],
        json!({"x": 1, "result": 2})
    );

    // Another parameter: runs, and the miss says the inputs differ.
    let third = json_of(&sluice(home, &["run", flow, "--param", "x=5", "--json"]));
    let t = task(&third, "expensive");
    assert_eq!(t["state"], "Completed");
    assert_eq!(
        task(&third, "report")["output"],
        json!({"x": 5, "result": 6})
    );
    assert!(
        t["cache"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("inputs differ")),
        "{t:#}"
    );

    // The cache commands.
    let entries = json_of(&sluice(home, &["cache", "ls", "--json"]));
    assert_eq!(entries.as_array().map(Vec::len), Some(2), "{entries:#}");
    let key = entries[0]["key"].as_str().expect("key");
    let shown = json_of(&sluice(home, &["cache", "show", &key[..12], "--json"]));
    assert_eq!(shown["value"], json!(6));
    let cleared = sluice(home, &["cache", "clear", "--task", "expensive"]);
    assert!(
        String::from_utf8_lossy(&cleared.stdout).contains("removed 2 cache entries"),
        "{cleared:?}"
    );
    let fourth = json_of(&sluice(home, &["run", flow, "--json"]));
    assert_eq!(task(&fourth, "expensive")["state"], "Completed");
}

#[test]
fn sigkill_mid_run_then_resume_finishes_without_rerunning_completed_tasks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = slow_chain(dir.path(), "slow");
    let mut child = spawn_run(&home, &flow);
    let id = newest_run(&home, &mut child);
    let before = wait_for(&home, &id, |v| {
        task(v, "a")["state"] == "Completed" && task(v, "b")["state"] == "Running"
    });
    child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL on Unix.
    let _ = child.wait();

    // The next look at the store records the dead run as Crashed.
    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    assert_eq!(runs[0]["id"], id.as_str());
    assert_eq!(runs[0]["state"], "Crashed", "{runs:#}");
    assert_eq!(runs[0]["live"], false);

    let resumed = sluice(&home, &["resume", &id, "--json"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let after = json_of(&resumed);
    assert_eq!(after["state"], "Completed", "{after:#}");
    // `a` completed before the kill: kept, not run again.
    let a = task(&after, "a");
    assert_eq!(a["attempts"], 1);
    assert_eq!(executions(&history(a)), 1, "{a:#}");
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(task(&shown, "a")["output"], task(&before, "a")["output"]);
    assert_eq!(task(&shown, "a")["output"], json!(10));
    // `b` was killed: Crashed in its history, then ran again (attempt 2) and completed.
    let b = task(&after, "b");
    let hb = history(b);
    let crashed = hb.iter().position(|s| s == "Crashed").expect("Crashed");
    assert!(hb[crashed..].contains(&"Completed".to_owned()), "{hb:?}");
    assert_eq!(b["attempts"], 2);
    assert_eq!(task(&shown, "b")["output"], json!(1500));
    // `c` received both outputs.
    assert_eq!(task(&after, "c")["output"], json!("[10,1500]".len()));
}

#[test]
fn a_run_that_died_before_its_first_state_write_is_not_left_running() {
    let home = tempfile::tempdir().expect("home");
    let store = SqliteStore::open(home.path()).expect("store");
    let id = FlowRunId::new();
    let state = State::new(StateName::Pending, start());
    // What a process writes first; it dies before anything else (and holds no lease).
    store.submit(Write::RunCreated(Box::new(sluice::store::RunHeader {
        id,
        flow: "ghost".into(),
        history: vec![sluice::runner::Transition {
            from: None,
            to: StateName::Pending,
            time: start(),
            message: None,
        }],
        state,
        parameters: BTreeMap::new(),
        context: BTreeMap::new(),
        manifest: None,
        files: None,
        pid: 999_999,
        tasks: Vec::new(),
    })));
    store.flush().expect("flush");
    drop(store);
    let runs = json_of(&sluice(home.path(), &["runs", "--json"]));
    assert_eq!(runs[0]["id"], id.to_string());
    assert_eq!(runs[0]["state"], "Crashed");
    assert!(
        runs[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("pid 999999") && m.contains("died")),
        "{runs:#}"
    );
}

#[test]
fn cancel_from_a_second_process_stops_a_live_run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile_path();
    let flow = write_flow(
        dir.path(),
        &format!(
            r#"name = "spin"
[tasks.spin]
component = {h:?}
input = {{ do = "loop" }}
fuel = "unlimited"
[tasks.after]
component = {h:?}
input = {{ do = "len", of = "$tasks.spin" }}
"#
        ),
    );
    let mut child = spawn_run(&home, &flow);
    let id = newest_run(&home, &mut child);
    wait_for(&home, &id, |v| task(v, "spin")["state"] == "Running");
    let asked = Instant::now();
    let cancel = sluice(&home, &["cancel", &id]);
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    let out = child.wait_with_output().expect("wait");
    // Noticed within the poll interval (100 ms) plus an epoch tick; generous for a busy machine.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&cancel.stdout).contains("Cancelled"),
        "{cancel:?}"
    );
    let run = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Cancelled");
    assert!(history(&run).contains(&"Cancelling".to_owned()), "{run:#}");
    assert_eq!(task(&run, "spin")["state"], "Cancelled");
    assert_eq!(task(&run, "after")["state"], "Cancelled");
    assert!(run["cancel_requested_at"].is_string());
}

#[test]
fn cancel_of_a_paused_run_records_it_cancelled() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("manual-pause");
    let out = sluice(home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(3));
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let cancel = sluice(home, &["cancel", &id]);
    assert!(
        String::from_utf8_lossy(&cancel.stdout).contains("recorded Cancelled"),
        "{cancel:?}"
    );
    let run = json_of(&sluice(home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Cancelled");
    assert_eq!(task(&run, "approve")["state"], "Cancelled");
    assert_eq!(task(&run, "prepare")["state"], "Completed");
}

#[test]
fn pause_exit_and_resume_in_a_new_process_uses_the_cached_input() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("manual-pause");
    let out = sluice(home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let paused = json_of(&out);
    let id = paused["id"].as_str().expect("id").to_owned();
    assert_eq!(task(&paused, "approve")["state"], "Paused");

    // The paused task's resolved input is in the store, with its state.
    let db = rusqlite::Connection::open(home.join("sluice.db")).expect("db");
    let input: String = db
        .query_row(
            "SELECT b.data FROM task_runs t JOIN blobs b ON b.hash = t.cached_input WHERE t.name = 'approve'",
            [],
            |r| r.get::<_, Vec<u8>>(0).map(|d| String::from_utf8_lossy(&d).into_owned()),
        )
        .expect("approve's cached input");
    assert_eq!(input, "42");
    drop(db);

    let resumed = sluice(home, &["resume", &id, "--start", "approve", "--json"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let run = json_of(&resumed);
    assert_eq!(run["state"], "Completed");
    let prepare = task(&run, "prepare");
    assert_eq!(prepare["attempts"], 1, "upstream ran again: {prepare:#}");
    assert_eq!(executions(&history(prepare)), 1);
    assert_eq!(task(&run, "ship")["output"], json!(43));
    // Every result is in the store (the run record releases outputs once consumed).
    let shown = json_of(&sluice(home, &["show", &id, "--json"]));
    assert_eq!(task(&shown, "prepare")["output"], json!(42));
    assert_eq!(task(&shown, "approve")["output"], json!(42));
    // Resuming a completed run is refused, naming the state.
    let again = sluice(home, &["resume", &id]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("already Completed"), "{again:?}");
}

#[test]
fn logs_are_stored_and_printed_per_task() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile_path();
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"talk\"\n[tasks.talk]\ncomponent = {h:?}\ninput = {{ do = \"print\", lines = 2 }}\n"
        ),
    );
    let out = sluice(&home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let logs = sluice(&home, &["logs", &id, "talk"]);
    let text = String::from_utf8_lossy(&logs.stdout);
    for line in ["out 0", "err 0", "out 1", "err 1"] {
        assert!(text.contains(line), "{text}");
    }
    assert!(text.contains("talk: out 0"), "{text}");
    let json_lines = sluice(&home, &["logs", &id, "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&json_lines.stdout).lines().count(),
        4
    );
    let unknown = sluice(&home, &["logs", &id, "tlak"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        stderr(&unknown).contains("did you mean `talk`"),
        "{unknown:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Bad stores: clear errors, nothing lost

#[test]
fn a_corrupt_or_foreign_database_is_refused_and_left_untouched() {
    let home = tempfile::tempdir().expect("home");
    let db = home.path().join("sluice.db");
    let flow = example_flow("map-add-one");
    let flow = flow.to_str().expect("utf-8");

    std::fs::write(
        &db,
        "these are someone's notes, not a database\n".repeat(200),
    )
    .expect("write");
    let before = std::fs::read(&db).expect("read");
    for args in [&["runs"][..], &["run", flow][..]] {
        let out = sluice(home.path(), args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = stderr(&out);
        assert!(err.contains(&db.display().to_string()), "{err}");
        assert!(err.contains("is not a Sluice database"), "{err}");
        assert!(err.contains("left untouched"), "{err}");
    }
    assert_eq!(std::fs::read(&db).expect("read"), before);
    std::fs::remove_file(&db).expect("remove");

    // Another application's SQLite database.
    let other = rusqlite::Connection::open(&db).expect("db");
    other
        .execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ada');")
        .expect("create");
    drop(other);
    let before = std::fs::read(&db).expect("read");
    let out = sluice(home.path(), &["runs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("another application"), "{out:?}");
    assert_eq!(std::fs::read(&db).expect("read"), before);
    std::fs::remove_file(&db).expect("remove");

    // A store from a newer Sluice.
    drop(SqliteStore::open(home.path()).expect("store"));
    let conn = rusqlite::Connection::open(&db).expect("db");
    conn.pragma_update(None, "user_version", 99)
        .expect("pragma");
    drop(conn);
    let out = sluice(home.path(), &["run", flow]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("schema version 99, newer than this Sluice"),
        "{out:?}"
    );
}

#[test]
fn a_missing_blob_is_named_and_resume_changes_nothing() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("manual-pause");
    let out = sluice(home, &["run", flow.to_str().expect("utf-8"), "--json"]);
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();
    let db = rusqlite::Connection::open(home.join("sluice.db")).expect("db");
    let hash: String = db
        .query_row(
            "SELECT cached_input FROM task_runs WHERE name = 'approve'",
            [],
            |r| r.get(0),
        )
        .expect("hash");
    db.execute("DELETE FROM blobs WHERE hash = ?1", [&hash])
        .expect("delete");
    drop(db);

    let out = sluice(home, &["resume", &id, "--start", "approve"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "blob {hash} (cached input of task `approve`) is missing from the store"
        )),
        "{err}"
    );
    // Still shown, with a warning for each value that used the blob (blobs are shared by
    // content: prepare's output is the same value); still Paused.
    let shown = sluice(home, &["show", &id, "--json"]);
    assert_eq!(shown.status.code(), Some(0));
    let warnings = stderr(&shown);
    assert!(
        warnings.contains("(output of task `prepare`) is missing")
            && warnings.contains("(cached input of task `approve`) is missing"),
        "{warnings}"
    );
    let run = json_of(&shown);
    assert_eq!(run["state"], "Paused");
    assert_eq!(run["problems"].as_array().map(Vec::len), Some(2));
}

/// Makes files immutable (even to root) until dropped.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn new(paths: Vec<PathBuf>) -> Self {
        let status = Command::new("chattr")
            .arg("+i")
            .args(&paths)
            .status()
            .expect("run chattr");
        assert!(
            status.success(),
            "chattr +i failed: the read-only home test needs a file system with immutable files"
        );
        Self(paths)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").args(&self.0).status();
    }
}

#[test]
fn a_read_only_home_refuses_runs_and_still_shows_history() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("map-add-one");
    let flow = flow.to_str().expect("utf-8");
    let out = sluice(home, &["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let id = json_of(&out)["id"].as_str().expect("id").to_owned();

    let mut paths: Vec<PathBuf> = std::fs::read_dir(home)
        .expect("home")
        .map(|e| e.expect("entry").path())
        .collect();
    paths.push(home.to_owned());
    let frozen = Immutable::new(paths);
    let out = sluice(home, &["run", flow]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("is read-only"), "{out:?}");
    assert!(stderr(&out).contains("choose a writable --home"), "{out:?}");
    let out = sluice(home, &["resume", &id, "--start", "sum"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("is read-only"), "{out:?}");
    // History can still be read.
    let runs = sluice(home, &["runs", "--json"]);
    assert_eq!(runs.status.code(), Some(0), "{runs:?}");
    assert_eq!(json_of(&runs)[0]["id"], id.as_str());
    drop(frozen);
    // Nothing was lost.
    let run = json_of(&sluice(home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Completed");
    assert_eq!(task(&run, "sum")["output"], json!(9));
}

/// Resuming a failed mapped task in a new process (the record read back from the store) re-runs
/// only the children that did not complete: its upstream task completed, so their inputs are
/// what they were.
#[tokio::test]
async fn a_resumed_mapped_task_reruns_only_its_unfinished_children() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    let flow = |component: &str| {
        let mut items = TaskDef::new("items", guest("identity"));
        items.input = Input::Literal(json!([false, true, false]).into());
        let mut m = TaskDef::new("m", guest(component));
        m.input = Input::from_json(json!("$tasks.items"));
        m.map = sluice::flow::MapOver::Input;
        FlowBuilder::new("mapped")
            .task(items)
            .task(m)
            .build()
            .expect("flow")
    };
    let runner = FlowRunner::new(sandbox().clone()).store(store.clone() as Arc<dyn Store>);
    let first = runner
        .prepare(flow("fail_if"), Path::new("."))
        .await
        .expect("prepare");
    let run = runner
        .run(&first, RunOptions::default())
        .await
        .expect("run");
    assert_eq!(run.state.name, StateName::Failed);
    let children = |r: &sluice::runner::FlowRun| -> Vec<(StateName, u32)> {
        r.tasks[1]
            .children
            .iter()
            .map(|c| (c.state.name, c.attempts))
            .collect()
    };
    assert_eq!(
        children(&run),
        [
            (StateName::Completed, 1),
            (StateName::Failed, 1),
            (StateName::Completed, 1)
        ]
    );
    // The record as a new process reads it; the task's component is fixed (identity).
    let stored = store.load_run(run.id).expect("load").run;
    assert_eq!(children(&stored), children(&run));
    let fixed = runner
        .prepare(flow("identity"), Path::new("."))
        .await
        .expect("prepare");
    let resumed = runner
        .resume(&fixed, stored, &[], Default::default())
        .await
        .expect("resume");
    assert_eq!(resumed.state.name, StateName::Completed, "{resumed:#?}");
    assert_eq!(
        children(&resumed),
        [
            (StateName::Completed, 1),
            (StateName::Completed, 2),
            (StateName::Completed, 1)
        ]
    );
    // fail_if's outputs (true) kept, identity's (true for input true) computed.
    let shown = store.load_run(run.id).expect("load").run;
    assert_eq!(shown.tasks[1].state.name, StateName::Mapped);
    assert_eq!(
        shown.tasks[1].output,
        Some(json!([true, true, true]).into())
    );
    assert_eq!(shown.tasks[1].children.len(), 3);
}

/// A run cancelled from another process can be resumed: the old request does not cancel the
/// new execution.
#[test]
fn a_cancelled_run_resumes_and_completes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile_path();
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"nap\"\n[tasks.nap]\ncomponent = {h:?}\ninput = {{ do = \"sleep\", ms = 1500 }}\n"
        ),
    );
    let mut child = spawn_run(&home, &flow);
    let id = newest_run(&home, &mut child);
    wait_for(&home, &id, |v| task(v, "nap")["state"] == "Running");
    let cancel = sluice(&home, &["cancel", &id]);
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    let _ = child.wait();
    let run = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Cancelled");
    let resumed = sluice(&home, &["resume", &id, "--json"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let run = json_of(&resumed);
    assert_eq!(run["state"], "Completed", "{run:#}");
    let nap = task(&run, "nap");
    assert_eq!(nap["output"], json!(1500));
    assert_eq!(nap["attempts"], 2);
}

/// The change feed, read while a run executes (woken by the store's change counter): every
/// task run's last state read is its state in the record, the flow run's too, every log line
/// comes once and in order, and a read after the end finds nothing. 1,500 mapped children and
/// 1,500 log lines take more than one page of each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_read_during_a_run_ends_at_the_record() {
    use sluice::store::{ChangeCursor, TaskChange};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(SqliteStore::open(dir.path()).expect("store"));
    let mut items = TaskDef::new("items", guest("hostile"));
    items.input = Input::Literal(json!({"do": "list", "n": 1500}).into());
    let mut m = TaskDef::new("m", guest("identity"));
    m.input = Input::from_json(json!("$tasks.items"));
    m.map = sluice::flow::MapOver::Input;
    let mut talk = TaskDef::new("talk", guest("hostile"));
    talk.input = Input::Literal(json!({"do": "log", "lines": 1500, "bytes": 8}).into());
    let flow = FlowBuilder::new("fed")
        .task(items)
        .task(m)
        .task(talk)
        .build()
        .expect("flow");
    let runner = FlowRunner::new(sandbox().clone()).store(store.clone() as Arc<dyn Store>);
    let prepared = runner.prepare(flow, Path::new(".")).await.expect("prepare");
    let id = FlowRunId::new();
    let options = RunOptions {
        id: Some(id),
        ..RunOptions::default()
    };
    let mut changed = store.watch_changes();
    let run = tokio::spawn(async move { runner.run(&prepared, options).await });
    let mut cursor = ChangeCursor::START;
    let mut tasks: BTreeMap<String, TaskChange> = BTreeMap::new();
    let mut flow_state = None;
    let mut log_seqs = Vec::new();
    let mut reads = 0;
    loop {
        let finished = run.is_finished();
        let changes = match store.changes(id, None, cursor) {
            Ok(c) => c,
            // Not created yet.
            Err(sluice::store::StoreError::UnknownRun(_)) if !finished => {
                let _ = changed.changed().await;
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        reads += 1;
        assert!(
            changes.cursor >= cursor,
            "{:?} after {cursor:?}",
            changes.cursor
        );
        cursor = changes.cursor;
        let empty = changes.is_empty();
        if let Some(f) = changes.flow {
            flow_state = Some(f.state.name);
        }
        for t in changes.tasks {
            tasks.insert(t.id.to_string(), t);
        }
        log_seqs.extend(changes.logs.iter().map(|l| l.seq));
        if empty && finished {
            break;
        }
        if empty {
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
        }
    }
    let done = run.await.expect("join").expect("run");
    assert!(reads > 2, "{reads} reads");
    assert_eq!(flow_state, Some(done.state.name));
    assert_eq!(done.state.name, StateName::Completed);
    let record = store.load_run(id).expect("load").run;
    let mut expected = BTreeMap::new();
    for t in &record.tasks {
        expected.insert(t.id.to_string(), (t.state.name, t.history.len()));
        for c in &t.children {
            expected.insert(c.id.to_string(), (c.state.name, c.history.len()));
        }
    }
    assert_eq!(expected.len(), 1503);
    let seen: BTreeMap<String, (StateName, usize)> = tasks
        .iter()
        .map(|(k, t)| (k.clone(), (t.state.name, t.history.len())))
        .collect();
    assert_eq!(seen, expected);
    let m_children = tasks
        .values()
        .filter(|t| t.task == "m" && t.map_index.is_some());
    assert_eq!(m_children.count(), 1500);
    assert_eq!(log_seqs.len(), 1500);
    assert!(log_seqs.windows(2).all(|w| w[0] < w[1]));
    // Nothing after the end; one task alone from the start.
    let after = store.changes(id, None, cursor).expect("changes");
    assert!(after.is_empty() && after.cursor == cursor, "{after:?}");
    let talk = store
        .changes(id, Some("talk"), ChangeCursor::START)
        .expect("changes");
    assert_eq!(talk.tasks.len(), 1);
    assert_eq!(talk.tasks[0].state.name, StateName::Completed);
    assert_eq!(talk.logs.len(), 1000, "one page of lines");
    assert!(talk.logs.iter().all(|l| l.task == "talk"));
    // The cursor is written and read back as an SSE event id.
    assert_eq!(cursor.to_string().parse::<ChangeCursor>(), Ok(cursor));
    let bad = "1.2.3".parse::<ChangeCursor>().expect_err("three parts");
    assert!(bad.contains("`1.2.3` is not a change cursor"), "{bad}");
    assert!("1.2.3.4.5".parse::<ChangeCursor>().is_err());
}
