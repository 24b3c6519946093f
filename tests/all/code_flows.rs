//! Flows written as code, through `sluice run` as a user runs them: a body (Rust, Python,
//! JavaScript) submitting task runs of the tasks its manifest declares, each type of submission
//! of seed 004 answered by the real runner; the task runs recorded and shown in submission
//! order with their map indexes; the flow run ending as the body did; hostile bodies (a loop,
//! too many task runs) stopped with the limit named.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::support::{guest, history, json_of, sluice};

/// A manifest of a code flow whose body is `body`, with `code_extra` added to its `code` table
/// and `flow_extra` to its flow keys; it declares `double`, `fail` (always fails) and `slow`
/// (the hostile guest).
fn manifest(dir: &Path, body: &Path, code_extra: &str, flow_extra: &str) -> PathBuf {
    let text = format!(
        r#"name = "code"
code = {{ path = "{body}"{code_extra} }}
{flow_extra}

[parameters]
scenario = "types"
n = 0
ms = 300

[tasks.double]
component = "{double}"

[tasks.fail]
component = "{fail}"

[tasks.slow]
component = "{slow}"
"#,
        body = body.display(),
        double = guest("double").display(),
        fail = guest("signal_fail").display(),
        slow = guest("hostile").display(),
    );
    let path = dir.join("flow.toml");
    std::fs::write(&path, text).expect("write the manifest");
    path
}

fn run(dir: &Path, manifest: &Path, args: &[&str]) -> (std::process::Output, Value) {
    let flow = manifest.to_str().expect("UTF-8 path");
    let mut all = vec!["run", flow, "--json"];
    all.extend_from_slice(args);
    let out = sluice(&dir.join("home"), &all);
    let record = json_of(&out);
    (out, record)
}

/// Each task run's name, with its map index when it has one, in the record's order.
fn submitted(record: &Value) -> Vec<String> {
    record["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| match t["map_index"].as_u64() {
            Some(i) => format!("{}[{i}]", t["name"].as_str().unwrap_or("?")),
            None => t["name"].as_str().unwrap_or("?").to_owned(),
        })
        .collect()
}

/// The task runs the `types` scenario submits, in order, as `show` names them.
const SUBMITTED: [&str; 10] = [
    "double",
    "double",
    "fail",
    "double",
    "double",
    "double[0]",
    "double[1]",
    "double[2]",
    "fail[0]",
    "fail[1]",
];

/// What the `types` scenario observed, run by the real runner: the same for every language.
fn every_type_of_submission(out: &std::process::Output, record: &Value) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(record["state"], "Completed", "{record}");
    assert_eq!(record["message"], "the flow body returned a value");
    let v = &record["result"];
    assert_eq!(v["call"], 4, "r1 = t1(): the result");
    assert_eq!(
        v["wait"]["name"], "Completed",
        "wait: the final state, with its result"
    );
    assert_eq!(v["result"], 10);
    assert_eq!(
        v["raised"],
        json!({"name": "Failed", "message": "failing on purpose"}),
        "result() raises the failed state"
    );
    assert_eq!(v["failed_state"], "Failed");
    assert_eq!(v["failed_is_failed"], true);
    assert_eq!(
        v["after_default"], "TriggerFailed",
        "wait_for feeds the default trigger"
    );
    assert_eq!(v["after_finished"], 14, "all_finished runs after a failure");
    assert_eq!(v["map"], json!([2, 4, 6]));
    assert_eq!(v["map_states"], json!(["Failed", "Failed"]));
    assert_eq!(v["wait_any"], 0, "the failed one was final first");
    assert_eq!(v["refused"], "the flow declares no task `nope`");
    assert_eq!(
        submitted(record),
        SUBMITTED,
        "every task run recorded, in submission order, map elements with their index"
    );
    let tasks = record["tasks"].as_array().expect("tasks");
    assert_eq!(v["id"], tasks[1]["id"], "a future's id is its task run's");
    let states: Vec<&str> = tasks.iter().filter_map(|t| t["state"].as_str()).collect();
    assert_eq!(
        states,
        [
            "Completed",
            "Completed",
            "Failed",
            "TriggerFailed",
            "Completed",
            "Completed",
            "Completed",
            "Completed",
            "Failed",
            "Failed",
        ]
    );
    assert_eq!(
        history(&tasks[0]),
        ["Pending", "Running", "Completed"],
        "a submitted task run goes through the same states as a DAG's"
    );
}

#[test]
fn a_rust_flow_body_runs_every_type_of_submission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let (out, record) = run(dir.path(), &flow, &[]);
    every_type_of_submission(&out, &record);
    assert_eq!(
        record["tasks"][0]["output_released"], true,
        "the body dropped its handle: the output was not kept for it"
    );
}

#[test]
fn a_python_flow_body_runs_every_type_of_submission() {
    polyglot_types("python");
}

#[test]
fn a_javascript_flow_body_runs_every_type_of_submission() {
    polyglot_types("js");
}

/// The `types` scenario of the `lang` flow body, through `sluice run`.
fn polyglot_types(lang: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = super::polyglot::builds::polyglot_guest(lang, "flow");
    let flow = manifest(dir.path(), &body, "", "");
    let (out, record) = run(dir.path(), &flow, &[]);
    every_type_of_submission(&out, &record);
}

/// A Python or JavaScript future used after it was released (a `with` block's end, `dispose()`)
/// raises an error the body sees, naming the task run; it never reaches the host.
#[test]
fn a_released_future_raises_in_python_and_javascript() {
    let dir = tempfile::tempdir().expect("tempdir");
    for lang in ["python", "js"] {
        let body = super::polyglot::builds::polyglot_guest(lang, "flow");
        let flow = manifest(dir.path(), &body, "", "");
        let (out, record) = run(dir.path(), &flow, &["--param", "scenario=\"released\""]);
        assert!(out.status.success(), "{lang}: {record:#}");
        let v = &record["result"];
        assert_eq!(v["first"], 2, "{lang}: {v}");
        let id = record["tasks"][0]["id"].as_str().expect("id");
        assert_eq!(v["id"], id, "{lang}: a released future keeps its id");
        let error = v["error"].as_str().unwrap_or("");
        assert!(
            error.starts_with(&format!("the future of task run {id} was released")),
            "{lang}: {error}"
        );
        assert!(
            error.ends_with("its state and result can no longer be read"),
            "{lang}: {error}"
        );
    }
}

/// `examples/dynamic-flow`: its Python body and the Rust variant loop on a task's output, map
/// over what they collected and branch on a failed task run, through `sluice run` as the
/// example's comments show; both submit the same task runs and return the same result.
#[test]
fn the_dynamic_flow_examples_loop_map_and_branch() {
    let build = super::support::root().join("examples/build");
    let python = super::polyglot::builds::polyglot_guest("python", "dynamic_flow");
    std::fs::create_dir_all(&build).expect("examples/build");
    let tmp = build.join(".python_dynamic_flow.wasm.tmp");
    std::fs::copy(python, &tmp).expect("copy the body");
    std::fs::rename(&tmp, build.join("python_dynamic_flow.wasm")).expect("place the body");
    let python = super::support::example_flow("dynamic-flow");
    let rust = python.with_file_name("flow-rust.toml");
    let dir = tempfile::tempdir().expect("tempdir");
    let grown = json!([6, 12, 24, 48, 96, 192]);
    for flow in [&python, &rust] {
        let (out, record) = run(dir.path(), flow, &[]);
        assert!(out.status.success(), "{}: {record:#}", flow.display());
        assert_eq!(
            record["result"],
            json!({"grown": grown, "kept": [7, 13, 25], "total": 45, "branch": "over budget"}),
            "{}",
            flow.display()
        );
        let mut expected = vec!["double"; 6];
        let names: Vec<String> = (0..6).map(|i| format!("add_one[{i}]")).collect();
        expected.extend(names.iter().map(String::as_str));
        expected.extend(["sum", "over_budget", "sum"]);
        assert_eq!(submitted(&record), expected, "{}", flow.display());
        assert_eq!(record["tasks"][13]["state"], "Failed");
        let id = record["id"].as_str().expect("id");
        let logs = sluice(&dir.path().join("home"), &["logs", id]);
        let logs = String::from_utf8_lossy(&logs.stdout);
        assert!(
            logs.contains(
                "384 is over the budget of 200 (asked to fail): keeping the smaller half"
            ),
            "{}: {logs}",
            flow.display()
        );

        let (out, record) = run(dir.path(), flow, &["--param", "budget=1000"]);
        assert!(out.status.success(), "{}: {record:#}", flow.display());
        assert_eq!(
            record["result"],
            json!({"grown": grown, "kept": [7, 13, 25, 49, 97, 193], "total": 384, "branch": "within budget"}),
        );
        assert_eq!(record["tasks"].as_array().map(Vec::len), Some(14));
    }
}

/// `get_state()` answers at once (Pending or Running), `wait()` once the task run is final: in
/// Rust and in Python.
#[test]
fn get_state_does_not_wait_and_wait_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let python = super::polyglot::builds::polyglot_guest("python", "flow");
    for body in [guest("flow_body"), python] {
        let flow = manifest(dir.path(), &body, "", "");
        let (out, record) = run(dir.path(), &flow, &["--param", "scenario=\"state\""]);
        assert!(out.status.success(), "{record}");
        let before = record["result"]["before"].as_str().unwrap_or("?");
        assert!(
            ["Pending", "Running"].contains(&before),
            "get_state of a task run sleeping 300 ms: {before}"
        );
        assert_eq!(record["result"]["after"], "Completed");
    }
}

/// `sluice show` lists a code flow's task runs in submission order, a map's elements with their
/// index, and the body's result.
#[test]
fn show_lists_task_runs_in_submission_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let (out, record) = run(dir.path(), &flow, &[]);
    assert!(out.status.success(), "{record}");
    let id = record["id"].as_str().expect("id");
    let show = sluice(&dir.path().join("home"), &["show", id]);
    let text = String::from_utf8_lossy(&show.stdout);
    let names: Vec<&str> = text
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, SUBMITTED, "{text}");
    assert!(text.contains("result: {"), "{text}");
    assert!(text.contains("\n#5 double [0] ("), "{text}");
}

/// A body that never returns ends at its deadline, and the flow run with it: TimedOut, exit 1.
#[test]
fn a_looping_body_ends_the_flow_run_timed_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), r#", timeout = "1s""#, "");
    let (out, record) = run(dir.path(), &flow, &["--param", "scenario=\"loop\""]);
    assert_eq!(out.status.code(), Some(1), "{record}");
    assert_eq!(record["state"], "TimedOut", "{record}");
    let message = record["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("the flow body ended TimedOut"),
        "{message}"
    );
}

/// `max_task_runs`: a body may submit exactly that many task runs; one more is refused, the
/// body sees the refusal naming the limit (and, not handling it, fails the flow run).
#[test]
fn max_task_runs_at_the_limit_and_one_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "max_task_runs = 3");
    let (out, record) = run(
        dir.path(),
        &flow,
        &["--param", "scenario=\"hold\"", "--param", "n=3"],
    );
    assert!(out.status.success(), "{record}");
    assert_eq!(record["result"], 6, "0 + 2 + 4");
    let (out, record) = run(
        dir.path(),
        &flow,
        &["--param", "scenario=\"hold\"", "--param", "n=4"],
    );
    assert_eq!(out.status.code(), Some(1), "{record}");
    assert_eq!(record["state"], "Failed");
    let message = record["message"].as_str().unwrap_or("");
    assert!(
        message.contains(
            "submitting 1 more task runs would make 4 in this flow run, more than the flow's \
             max_task_runs of 3"
        ),
        "{message}"
    );
    assert_eq!(
        record["tasks"].as_array().map(Vec::len),
        Some(3),
        "nothing was created by the refused submission"
    );
}

/// A body submitting ten million task runs under the default `max_task_runs` (100,000): the
/// 100,001st is refused naming the limit, and the run ends Failed with exactly 100,000 task
/// runs recorded, never out of memory. One map past the limit is refused whole.
#[test]
fn a_body_submitting_ten_million_task_runs_hits_the_task_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let (out, record) = run(dir.path(), &flow, &["--param", "scenario=\"flood\""]);
    assert_eq!(out.status.code(), Some(1), "{}", record["message"]);
    assert_eq!(record["state"], "Failed");
    let message = record["message"].as_str().unwrap_or("");
    assert!(
        message.contains(
            "submitting 1 more task runs would make 100001 in this flow run, more than the \
             flow's max_task_runs of 100000"
        ),
        "{message}"
    );
    let tasks = record["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 100_000);
    assert!(tasks.iter().all(|t| t["state"] == "Completed"));

    let (out, record) = run(
        dir.path(),
        &flow,
        &["--param", "scenario=\"flood_map\"", "--param", "n=100001"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", record["message"]);
    let message = record["message"].as_str().unwrap_or("");
    assert!(
        message.contains("submitting 100001 more task runs would make 100001"),
        "{message}"
    );
    assert_eq!(record["tasks"].as_array().map(Vec::len), Some(0));
}

/// A raw handle the body no longer holds (its submission dropped) or was never given (as
/// another run's would be) is refused by the host: the body is stopped and the flow run fails
/// naming the bad handle; the task run it did submit is unharmed.
#[test]
fn waiting_on_a_dropped_or_forged_handle_fails_the_body() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    for scenario in ["dropped", "forged"] {
        let (out, record) = run(
            dir.path(),
            &flow,
            &["--param", &format!("scenario=\"{scenario}\"")],
        );
        assert_eq!(out.status.code(), Some(1), "{scenario}: {record:#}");
        assert_eq!(record["state"], "Failed", "{scenario}: {record:#}");
        let message = record["message"].as_str().unwrap_or("");
        assert!(
            message.contains("the flow body ended Failed: the guest failed: unknown handle index"),
            "{scenario}: {message}"
        );
    }
    let (_, record) = run(dir.path(), &flow, &["--param", "scenario=\"dropped\""]);
    assert_eq!(record["tasks"][0]["state"], "Completed", "{record:#}");
}

/// `subflow`: a body runs another flow of its manifest's `[subflows]` as a child flow run,
/// recorded as a run of its own whose context names its parent; the task run standing for it
/// ends as the child did (a code flow's result its output; a failed DAG flow failing it, naming
/// the child run); an undeclared subflow, parameters that are not an object, a task as a
/// subflow and a subflow as a task are refused, each naming why. In Rust, Python and
/// JavaScript.
#[test]
fn a_body_runs_subflows_as_child_flow_runs() {
    let python = super::polyglot::builds::polyglot_guest("python", "flow");
    let js = super::polyglot::builds::polyglot_guest("js", "flow");
    for body in [guest("flow_body"), python, js] {
        subflows_of(&body);
    }
}

/// [`manifest`] of `body` in `dir` with subflows `child` (`child.toml`, written by the caller)
/// and `dag` (`dag.toml`, written here: one failing task).
fn with_subflows(dir: &Path, body: &Path) -> PathBuf {
    std::fs::write(
        dir.join("dag.toml"),
        format!(
            "name = \"dag\"\n[tasks.fail]\ncomponent = \"{fail}\"\n",
            fail = guest("signal_fail").display(),
        ),
    )
    .expect("write the dag");
    manifest(
        dir,
        body,
        "",
        "\n[subflows]\nchild = \"child.toml\"\ndag = \"dag.toml\"\n",
    )
}

/// The `subflow` scenario of `body`, checked.
fn subflows_of(body: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let child = dir.path().join("child.toml");
    std::fs::write(
        &child,
        format!(
            "name = \"child\"\ncode = \"{body}\"\n[parameters]\nscenario = \"chain\"\nn = 1\n\
             [tasks.add_one]\ncomponent = \"{add_one}\"\n",
            body = guest("flow_body").display(),
            add_one = guest("add_one").display(),
        ),
    )
    .expect("write the child");
    let flow = with_subflows(dir.path(), body);
    let (out, record) = run(
        dir.path(),
        &flow,
        &["--param", "scenario=\"subflow\"", "--param", "n=4"],
    );
    assert!(out.status.success(), "{record:#}");
    let v = &record["result"];
    assert_eq!(v["state"], "Completed", "{v}");
    assert_eq!(v["result"], 4, "the child's result: n = 4 calls of add_one");
    assert_eq!(v["failed"]["name"], "Failed", "{v}");
    assert_eq!(
        v["refused"],
        json!([
            "the flow declares no subflow `nope`",
            "the parameters of subflow `child` must be a JSON object of parameter names and values",
            "the flow declares no subflow `double`",
        ])
    );
    assert_eq!(v["as_task"], "the flow declares no task `child`");
    assert_eq!(submitted(&record), ["child", "dag"]);
    let parent = record["id"].as_str().expect("id");
    let tasks = record["tasks"].as_array().expect("tasks");
    assert_eq!(tasks[0]["state"], "Completed");
    assert_eq!(tasks[1]["state"], "Failed");
    let home = dir.path().join("home");
    let shown = json_of(&sluice(&home, &["show", parent, "--json"]));
    assert_eq!(
        shown["tasks"][0]["output"], 4,
        "the child's result, recorded"
    );
    let human = sluice(&home, &["show", parent]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("subflow child → #0"), "the journal: {human}");

    // The child runs are runs of their own, each naming its parent.
    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 3, "{runs:#?}");
    for (name, state, task) in [
        ("child", "Completed", &tasks[0]),
        ("dag", "Failed", &tasks[1]),
    ] {
        let child = runs
            .iter()
            .find(|r| r["flow"] == name)
            .unwrap_or_else(|| panic!("no run of {name}: {runs:#?}"));
        assert_eq!(child["state"], state);
        let id = child["id"].as_str().expect("id");
        let shown = json_of(&sluice(&home, &["show", id, "--json"]));
        assert_eq!(shown["context"]["parent_flow_run_id"], parent, "{shown:#}");
        assert_eq!(
            shown["context"]["parent_task_run_id"], task["id"],
            "{shown:#}"
        );
        if name == "dag" {
            let message = v["failed"]["message"].as_str().unwrap_or("");
            assert_eq!(
                message,
                format!(
                    "subflow run {id} of `dag` ended Failed: reference tasks did not succeed: fail"
                ),
            );
        }
        let logs = sluice(&home, &["logs", parent, name]);
        let logs = String::from_utf8_lossy(&logs.stdout);
        assert!(
            logs.contains(&format!("subflow run {id} of `{name}` ended {state}")),
            "{logs}"
        );
    }
}

/// A code flow killed (SIGKILL) while its subflow (a code flow of four slow steps) runs its third
/// step, then `sluice resume`d: the parent resumes the child run it had started instead of
/// starting another; the child replays its journal, so no completed task run of either runs
/// again, and both complete.
#[test]
fn a_resumed_parent_resumes_its_unfinished_subflow_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("child.toml"),
        format!(
            "name = \"child\"\ncode = \"{body}\"\n[parameters]\nscenario = \"durable\"\nn = 4\n\
             ms = 1500\n[tasks.slow]\ncomponent = \"{slow}\"\n[tasks.double]\ncomponent = \"{double}\"\n",
            body = guest("flow_body").display(),
            slow = guest("hostile").display(),
            double = guest("double").display(),
        ),
    )
    .expect("write the child");
    let flow = with_subflows(dir.path(), &guest("flow_body"));
    let text = std::fs::read_to_string(&flow)
        .expect("read")
        .replace("scenario = \"types\"", "scenario = \"subflow\"")
        .replace("n = 0", "n = 4");
    std::fs::write(&flow, text).expect("write");
    let home = dir.path().join("home");
    let mut process = super::recovery::spawn_run(&home, &flow);
    // The newest run is the child.
    let child = super::recovery::wait_until(&home, &mut process, |v| {
        let tasks = v["tasks"].as_array().map_or(&[][..], Vec::as_slice);
        v["flow"] == "child" && tasks.len() == 6 && tasks[4]["state"] == "Running"
    });
    super::recovery::kill(process);
    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    let parent = runs
        .as_array()
        .and_then(|r| r.iter().find(|r| r["flow"] == "code"))
        .and_then(|r| r["id"].as_str())
        .expect("the parent run")
        .to_owned();

    let out = sluice(&home, &["resume", &parent, "--json"]);
    let record = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{record:#}");
    assert_eq!(record["state"], "Completed", "{record:#}");
    assert_eq!(record["result"]["result"]["x"], 16, "{record:#}");
    let standing = &record["tasks"][0];
    assert_eq!(standing["name"], "child");
    assert_eq!(standing["attempts"], 2, "{standing:#}");

    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    let runs = runs.as_array().expect("runs");
    let children: Vec<&Value> = runs.iter().filter(|r| r["flow"] == "child").collect();
    assert_eq!(children.len(), 1, "no second child run: {runs:#?}");
    assert_eq!(children[0]["id"], child.as_str());
    assert_eq!(children[0]["state"], "Completed");
    let shown = json_of(&sluice(&home, &["show", &child, "--json"]));
    let tasks = shown["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 8, "4 steps of 2 task runs: none made twice");
    let again: Vec<&Value> = tasks.iter().filter(|t| t["attempts"] != 1).collect();
    assert_eq!(
        again.len(),
        1,
        "only the task run killed ran again: {shown:#}"
    );
    assert!(history(again[0]).contains(&"Crashed".to_owned()));
    let logs = sluice(&home, &["logs", &parent, "child"]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(
        logs.contains(&format!("subflow run {child} of `child` ended Completed")),
        "{logs}"
    );
}

/// The context keys naming a subflow's parent, and a scheduled run's `scheduled_start` and
/// `deployment`, are Sluice's own: given on the command line or in the manifest's `[context]`, the run is refused
/// naming the key (a run posing as a child could be taken for one by a resumed parent, and a
/// user's `scheduled_start` would be left out of cache keys).
#[test]
fn the_context_keys_naming_a_parent_are_refused_from_users() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let home = dir.path().join("home");
    let flow_arg = flow.to_str().expect("utf-8");
    for key in [
        "parent_task_run_id",
        "parent_flow_run_id",
        "scheduled_start",
        "deployment",
    ] {
        let given = format!("{key}=01M8V3ANQBWQYKY5502SBWBN54");
        let out = sluice(&home, &["run", flow_arg, "--context", &given]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("context key `{key}` is Sluice's own")),
            "{err}"
        );
    }
    let text = std::fs::read_to_string(&flow).expect("read");
    std::fs::write(
        &flow,
        text.replace(
            "[parameters]",
            "[context]\nparent_task_run_id = \"x\"\n\n[parameters]",
        ),
    )
    .expect("write");
    let out = sluice(&home, &["run", flow_arg]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("context key `parent_task_run_id` is Sluice's own"),
        "{out:?}"
    );
    let out = sluice(&home, &["runs", "--json"]);
    assert_eq!(json_of(&out), json!([]), "no run was made");
}

/// `sluice build` of a code flow builds its subflows' components too, each subflow's command
/// run in its own manifest's directory.
#[test]
fn building_a_code_flow_builds_its_subflows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    std::fs::write(
        sub.join("child.toml"),
        format!(
            "name = \"child\"\n[tasks.a]\ncomponent = {{ path = \"built.wasm\", build = \
             \"cp '{add_one}' built.wasm\" }}\n",
            add_one = guest("add_one").display(),
        ),
    )
    .expect("write the child");
    let flow = manifest(
        dir.path(),
        &guest("flow_body"),
        "",
        "\n[subflows]\nchild = \"sub/child.toml\"\n",
    );
    let out = sluice(
        &dir.path().join("home"),
        &["build", flow.to_str().expect("utf-8")],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(sub.join("built.wasm").is_file(), "{out:?}");
}

/// `sluice cancel` of a code flow waiting for a subflow cancels the child flow run too: the
/// child's task run is interrupted, and the child, the task run standing for it and the parent
/// all end Cancelled.
#[test]
fn cancelling_a_parent_cancels_its_subflow() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("long.toml"),
        format!(
            "name = \"long\"\n[tasks.sleep]\ncomponent = \"{slow}\"\n\
             input = {{ do = \"sleep\", ms = 60000 }}\n",
            slow = guest("hostile").display(),
        ),
    )
    .expect("write the child");
    let flow = manifest(
        dir.path(),
        &guest("flow_body"),
        "",
        "\n[subflows]\nlong = \"long.toml\"\n",
    );
    let text = std::fs::read_to_string(&flow)
        .expect("read")
        .replace("scenario = \"types\"", "scenario = \"subflow_long\"");
    std::fs::write(&flow, text).expect("write");
    let home = dir.path().join("home");
    let mut child = super::recovery::spawn_run(&home, &flow);
    // Until the child flow run's task runs (the newest run is the child's).
    super::recovery::wait_until(&home, &mut child, |v| {
        v["flow"] == "long" && v["tasks"][0]["state"] == "Running"
    });
    let runs = json_of(&sluice(&home, &["runs", "--json", "--flow", "code"]));
    let id = runs[0]["id"].as_str().expect("the parent's id");
    let out = sluice(&home, &["cancel", id]);
    assert!(out.status.success(), "{out:?}");
    let out = child.wait_with_output().expect("the run ends");
    let record = json_of(&out);
    assert_eq!(record["id"], id);
    assert_eq!(record["state"], "Cancelled", "{record:#}");
    assert_eq!(record["tasks"][0]["state"], "Cancelled", "{record:#}");
    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    let long = runs
        .as_array()
        .and_then(|r| r.iter().find(|r| r["flow"] == "long"))
        .unwrap_or_else(|| panic!("no run of long: {runs:#}"));
    assert_eq!(long["state"], "Cancelled", "{runs:#}");
}

/// A code flow's task declares no input, edges or map of its own, and it has no reference
/// tasks: each refused at its line, naming the key.
#[test]
fn a_code_flows_tasks_are_templates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let text = std::fs::read_to_string(&flow).expect("read");
    for (extra, line, key) in [
        ("input = 1\n", 12, "input"),
        ("upstream_tasks = [\"fail\"]\n", 12, "upstream_tasks"),
        ("map = true\n", 12, "map"),
    ] {
        let bad = text.replacen(
            &format!("component = \"{}\"\n", guest("double").display()),
            &format!("component = \"{}\"\n{extra}", guest("double").display()),
            1,
        );
        std::fs::write(&flow, bad).expect("write");
        let out = sluice(
            &dir.path().join("home"),
            &["run", flow.to_str().expect("path")],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("flow.toml:{line}:"))
                && err.contains(&format!("task `double` has `{key}`")),
            "{err}"
        );
    }
}

/// A code flow killed (SIGKILL) while its third step runs, then `sluice resume`d: it
/// completes; every task run that had completed kept its one attempt (it did not run again),
/// the one running when the process died ran again; the body's observations were replayed
/// from the journal, which says so.
#[test]
fn a_killed_code_flow_resumes_by_replay_without_running_a_completed_task_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, id, _) = killed_mid_durable(dir.path());
    let out = sluice(&home, &["resume", &id, "--json"]);
    let record = json_of(&out);
    assert_eq!(out.status.code(), Some(0), "{record:#}");
    assert_eq!(record["state"], "Completed", "{record:#}");
    assert_eq!(record["result"]["x"], 16, "1 doubled 4 times");
    let tasks = record["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 8, "4 steps of 2 task runs: none made twice");
    for (i, t) in tasks.iter().enumerate().take(4) {
        assert_eq!(
            t["attempts"], 1,
            "task run #{i} completed before the kill: {t:#}"
        );
        assert_eq!(history(t), ["Pending", "Running", "Completed"], "#{i}");
    }
    let crashed = &tasks[4];
    assert_eq!(crashed["attempts"], 2, "{crashed:#}");
    assert!(
        history(crashed).contains(&"Crashed".to_owned()),
        "{crashed:#}"
    );
    let journal = record["journal"].as_array().expect("journal");
    let replayed = journal
        .iter()
        .position(|e| e["call"] == "replayed")
        .expect("the journal marks the replay");
    assert!(
        replayed >= 6,
        "at least two steps were replayed: {journal:#?}"
    );
    let submits: Vec<&Value> = journal.iter().filter(|e| e["call"] == "submit").collect();
    assert_eq!(
        submits.len(),
        8,
        "each submission journaled once: {journal:#?}"
    );
    for (i, e) in submits.iter().enumerate() {
        assert_eq!(e["first"], i, "{journal:#?}");
    }
    let seen = record["result"]["seen"].as_array().expect("seen");
    assert_eq!(seen.len(), 8);
    for (k, s) in seen.iter().enumerate().step_by(2).take(2) {
        assert_eq!(
            *s,
            journal
                .iter()
                .filter(|e| e["call"] == "state")
                .nth(k / 2)
                .map(|e| e["state"].clone())
                .expect("journaled"),
            "a replayed get_state answers what the journal recorded"
        );
    }
    let show = sluice(&home, &["show", &id]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("resumed: the body's first") && text.contains("replayed from the journal"),
        "{text}"
    );
}

/// The same run resumed with a changed body, whose first call differs from the journal's:
/// refused as not deterministic, naming the call.
#[test]
fn a_resumed_code_flow_whose_body_changed_is_refused_as_not_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, id, body) = killed_mid_durable(dir.path());
    let python = super::polyglot::builds::polyglot_guest("python", "flow");
    std::fs::copy(python, &body).expect("change the body");
    let out = sluice(&home, &["resume", &id, "--json"]);
    let record = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{record:#}");
    assert_eq!(record["state"], "Failed");
    assert_eq!(
        record["message"],
        "the flow body is not deterministic: its call #0 was a task run of `double`, but the \
         journal of the run it resumes has a task run of `slow` there"
    );
}

/// A `durable` code flow (4 steps of 1.5 s) killed once two steps completed and the third
/// runs: its home, run id and body file.
fn killed_mid_durable(dir: &Path) -> (PathBuf, String, PathBuf) {
    let body = dir.join("body.wasm");
    std::fs::copy(guest("flow_body"), &body).expect("copy the body");
    let flow = manifest(dir, &body, "", "");
    let text = std::fs::read_to_string(&flow)
        .expect("read")
        .replace("scenario = \"types\"", "scenario = \"durable\"")
        .replace("n = 0", "n = 4")
        .replace("ms = 300", "ms = 1500");
    std::fs::write(&flow, text).expect("write");
    let home = dir.join("home");
    let mut child = super::recovery::spawn_run(&home, &flow);
    let id = super::recovery::wait_until(&home, &mut child, |v| {
        let tasks = v["tasks"].as_array().map_or(&[][..], Vec::as_slice);
        tasks.len() == 6 && tasks[4]["state"] == "Running"
    });
    super::recovery::kill(child);
    (home, id, body)
}

/// `sluice cancel` of a code flow whose body waits for a long task run: the task run is
/// interrupted, the body stopped, and the flow run ends Cancelled.
#[test]
fn cancelling_a_code_flow_stops_its_body_and_its_task_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = manifest(dir.path(), &guest("flow_body"), "", "");
    let text = std::fs::read_to_string(&flow)
        .expect("read")
        .replace("scenario = \"types\"", "scenario = \"state\"")
        .replace("ms = 300", "ms = 60000");
    std::fs::write(&flow, text).expect("write");
    let home = dir.path().join("home");
    let mut child = super::recovery::spawn_run(&home, &flow);
    let id =
        super::recovery::wait_until(&home, &mut child, |v| v["tasks"][0]["state"] == "Running");
    let out = sluice(&home, &["cancel", &id]);
    assert!(out.status.success(), "{out:?}");
    let out = child.wait_with_output().expect("the run ends");
    let record = json_of(&out);
    assert_eq!(out.status.code(), Some(1), "{record:#}");
    assert_eq!(record["state"], "Cancelled", "{record:#}");
    assert_eq!(record["tasks"][0]["state"], "Cancelled", "{record:#}");
}
