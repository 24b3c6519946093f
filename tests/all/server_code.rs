//! Flows written as code on a real `sluice server`, reached as users reach it (`sluice run
//! --server`, raw HTTP): the body runs with the tenant's guests, its task runs join the
//! tenant's queue, its subflows (manifests and components uploaded with it, each path resolved
//! beside the manifest naming it) are child flow runs of the tenant; another tenant reaches
//! none of it; the tenant's ceilings hold for the body and for every subflow; a server killed
//! mid-run is resumed by replay.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::server::{ServerProcess, client, get, kill_when, stderr};
use crate::support::{guest, history, json_of};

/// A code flow in `dir` whose body and `double` task are files beside it (`body.wasm`,
/// `task.wasm`), with subflows `child` (`sub/child.toml`: a code flow whose body is
/// `../body.wasm` and whose `add_one` is `sub/task.wasm`, the same name as the parent's
/// `double`) and `dag` (`dag.toml`, a failing task).
fn code_flow(dir: &Path, parameters: &str, code_extra: &str) -> PathBuf {
    let copy = |from: PathBuf, to: &str| {
        let to = dir.join(to);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(from, to).expect("copy a component");
    };
    copy(guest("flow_body"), "body.wasm");
    copy(guest("double"), "task.wasm");
    copy(guest("add_one"), "sub/task.wasm");
    std::fs::write(
        dir.join("sub/child.toml"),
        "name = \"child\"\ncode = \"../body.wasm\"\n[parameters]\nscenario = \"chain\"\nn = 1\n\
         [tasks.add_one]\ncomponent = \"task.wasm\"\n",
    )
    .expect("the child");
    std::fs::write(
        dir.join("dag.toml"),
        format!(
            "name = \"dag\"\n[tasks.fail]\ncomponent = \"{}\"\n",
            guest("signal_fail").display()
        ),
    )
    .expect("the dag");
    let flow = dir.join("flow.toml");
    std::fs::write(
        &flow,
        format!(
            r#"name = "code"
code = {{ path = "body.wasm"{code_extra} }}

[parameters]
{parameters}

[tasks.double]
component = "task.wasm"

[tasks.slow]
component = "{slow}"

[subflows]
child = "sub/child.toml"
dag = "dag.toml"
"#,
            slow = guest("hostile").display(),
        ),
    )
    .expect("the flow");
    flow
}

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_code_flow_and_its_subflows_run_on_the_server_as_embedded() {
    let server = ServerProcess::start(&[]);
    let a = server.add_tenant("a");
    let b = server.add_tenant("b");
    let dir = tempfile::tempdir().expect("dir");
    let flow = code_flow(dir.path(), "scenario = \"subflow\"\nn = 4", "");
    let out = server.cli(&a, &["run", utf8(&flow), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = json_of(&out);
    let v = &record["result"];
    assert_eq!(v["state"], "Completed", "{record:#}");
    assert_eq!(
        v["result"], 4,
        "the child's result: 4 calls of its own `task.wasm` (add_one), not the parent's (double)"
    );
    assert_eq!(v["failed"]["name"], "Failed", "{v}");
    assert_eq!(v["as_task"], "the flow declares no task `child`");
    let parent = record["id"].as_str().expect("id").to_owned();
    let tasks = record["tasks"].as_array().expect("tasks");
    let names: Vec<&str> = tasks.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["child", "dag"]);

    // The journal, the children as runs of their own naming their parent, their lines.
    let out = server.cli(&a, &["show", &parent]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("subflow child → #0"), "the journal: {shown}");
    assert!(!shown.contains("Grants: unknown"), "{shown}");
    let runs = json_of(&server.cli(&a, &["runs", "--json"]));
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 3, "{runs:#?}");
    let mut children = Vec::new();
    for (name, state, task) in [
        ("child", "Completed", &tasks[0]),
        ("dag", "Failed", &tasks[1]),
    ] {
        let child = runs
            .iter()
            .find(|r| r["flow"] == name)
            .unwrap_or_else(|| panic!("no run of {name}: {runs:#?}"));
        assert_eq!(child["state"], state);
        let id = child["id"].as_str().expect("id").to_owned();
        let shown = json_of(&server.cli(&a, &["show", &id, "--json"]));
        assert_eq!(shown["context"]["parent_flow_run_id"], parent.as_str());
        assert_eq!(shown["context"]["parent_task_run_id"], task["id"]);
        let logs = server.cli(&a, &["logs", &parent, name]);
        let logs = String::from_utf8_lossy(&logs.stdout);
        assert!(
            logs.contains(&format!("subflow run {id} of `{name}` ended {state}")),
            "{logs}"
        );
        // A child is resumed by resuming its parent.
        let out = server.cli(&a, &["resume", &id]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "flow run {id} is a subflow's run of flow run {parent}: resume that one"
            )),
            "{}",
            stderr(&out)
        );
        children.push(id);
    }

    // Tenant b reaches none of the three runs, by the CLI or by HTTP.
    for id in std::iter::once(&parent).chain(&children) {
        let out = server.cli(&b, &["show", id]);
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("no flow run"), "{}", stderr(&out));
        let (status, _, body) = get(&server.api(&format!("/runs/{id}")), Some(&b)).await;
        assert_eq!((status, body["code"].as_str()), (404, Some("not-found")));
    }
    let (_, _, list) = get(&server.api("/runs"), Some(&b)).await;
    assert_eq!(list, json!([]));
}

/// `args` of the CLI against `server`, or a panic when they have not ended within two minutes
/// (a run that waits for ever).
fn cli_within(server: &ServerProcess, token: &str, args: &[&str]) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .args(["--server", &server.url, "--token", token])
        .env("SLUICE_HOME", server.home.join("client-home"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run sluice");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`sluice {}` did not end within 2 minutes", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

/// A task run standing for a subflow holds no slot while its child runs: with one slot on the
/// server and one running task run allowed to the tenant, a body running two subflows, one
/// after the other, completes (held, the child's task run would wait for ever).
#[test]
fn a_subflow_holds_no_slot_while_its_child_runs() {
    let server = ServerProcess::start(&["--task-slots", "1"]);
    let a = server.add_tenant("a");
    crate::server_quotas::set(&server, "a", &["--max-running-tasks", "1"]);
    let dir = tempfile::tempdir().expect("dir");
    let flow = code_flow(dir.path(), "scenario = \"subflow\"\nn = 2", "");
    let out = cli_within(&server, &a, &["run", utf8(&flow), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = json_of(&out);
    assert_eq!(record["result"]["result"], 2, "{record:#}");
    assert_eq!(record["result"]["failed"]["name"], "Failed", "{record:#}");
}

/// Over HTTP, a request naming a subflow it does not bring is refused at the subflow's line,
/// naming the key it lacks; the server reads no file of a tenant's paths.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_request_without_its_subflows_manifest_is_refused_naming_it() {
    let server = ServerProcess::start(&[]);
    let a = server.add_tenant("a");
    let dir = tempfile::tempdir().expect("dir");
    // The file exists on the server's disk: still not read.
    let flow = code_flow(dir.path(), "scenario = \"subflow\"\nn = 1", "");
    let mut components = serde_json::Map::new();
    let slow = guest("hostile").display().to_string();
    let fail = guest("signal_fail").display().to_string();
    for name in ["body.wasm", "task.wasm", &slow, "sub/task.wasm", &fail] {
        // Relative keys as written beside `flow.toml`; an absolute one as it is.
        let bytes = std::fs::read(dir.path().join(name)).expect("component");
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let resp = client()
            .put(server.api(&format!("/components/{digest}")))
            .bearer_auth(&a)
            .body(bytes)
            .send()
            .await
            .expect("put");
        assert!(resp.status().is_success(), "{resp:?}");
        components.insert(name.to_owned(), json!(digest));
    }
    let resp = client()
        .post(server.api("/runs"))
        .bearer_auth(&a)
        .json(&json!({
            "manifest": std::fs::read_to_string(&flow).expect("manifest"),
            "manifest_path": "flow.toml",
            "components": components,
        }))
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.expect("problem");
    assert_eq!(body["code"], "invalid-manifest");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("flow.toml:15:")
            && detail.contains(
                "subflow `child`: has no manifest in the request's `subflows` (expected the key \
                 `sub/child.toml`)"
            ),
        "{body:#}"
    );
    // With both manifests it runs; a manifest no manifest names is refused, not stored.
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).expect("manifest");
    let mut subflows =
        json!({"sub/child.toml": read("sub/child.toml"), "dag.toml": read("dag.toml")});
    let post = |subflows: &Value| {
        client()
            .post(server.api("/runs"))
            .bearer_auth(&a)
            .json(&json!({
                "manifest": read("flow.toml"),
                "manifest_path": "flow.toml",
                "components": components,
                "subflows": subflows,
            }))
            .send()
    };
    let resp = post(&subflows).await.expect("post");
    assert!(resp.status().is_success(), "{:?}", resp.text().await);
    subflows["extra.toml"] = json!("name = \"extra\"\n");
    let resp = post(&subflows).await.expect("post");
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.expect("problem");
    assert_eq!(
        body["detail"],
        "the request's `subflows` has `extra.toml`, which no manifest names as a subflow"
    );
}

/// The tenant's ceilings on each task's fuel, memory and deadline hold for a code flow's body
/// (its `code` table) and for its subflows' bodies and tasks: at the ceiling a run passes, one
/// over is refused naming the quota and what is over it.
#[test]
fn a_code_flows_body_and_subflows_are_held_to_the_tenants_ceilings() {
    let server = ServerProcess::start(&[]);
    let t = server.add_tenant("c");
    crate::server_quotas::set(
        &server,
        "c",
        &[
            "--max-task-fuel",
            "100000000",
            "--max-task-memory",
            "64MiB",
            "--max-task-timeout",
            "20s",
        ],
    );
    let budget = |fuel: u64, memory: &str, timeout: &str| {
        format!("fuel = {fuel}\nmemory = {memory}\ntimeout = \"{timeout}\"\n")
    };
    let at = budget(100_000_000, "\"64MiB\"", "20s");
    let code_at = ", fuel = 100000000, memory = \"64MiB\", timeout = \"20s\"";
    // Every body and task at the ceilings.
    let flow_at = |dir: &Path, code_extra: &str| {
        let flow = code_flow(dir, "scenario = \"subflow\"\nn = 2", code_extra);
        for (file, task) in [("flow.toml", "double"), ("flow.toml", "slow")] {
            let path = dir.join(file);
            let text = std::fs::read_to_string(&path).expect("read");
            let text = text.replace(
                &format!("[tasks.{task}]\n"),
                &format!("[tasks.{task}]\n{at}"),
            );
            std::fs::write(&path, text).expect("write");
        }
        let child = dir.join("sub/child.toml");
        let text = std::fs::read_to_string(&child)
            .expect("read")
            .replace(
                "code = \"../body.wasm\"",
                &format!("code = {{ path = \"../body.wasm\"{code_at} }}"),
            )
            .replace("[tasks.add_one]\n", &format!("[tasks.add_one]\n{at}"));
        std::fs::write(&child, text).expect("write");
        let dag = dir.join("dag.toml");
        let text = std::fs::read_to_string(&dag)
            .expect("read")
            .replace("[tasks.fail]\n", &format!("[tasks.fail]\n{at}"));
        std::fs::write(&dag, text).expect("write");
        flow
    };
    let dir = tempfile::tempdir().expect("dir");
    let flow = flow_at(dir.path(), code_at);
    let out = server.cli(&t, &["run", utf8(&flow), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_of(&out)["result"]["result"], 2, "at the ceilings");

    let refused = |out: &std::process::Output, quota: &str, what: &str| {
        assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
        let err = stderr(out);
        assert!(
            err.contains(&format!("quota `{quota}`")) && err.contains(what),
            "{quota}, {what}: {err}"
        );
    };
    // The body one over each ceiling; then left to its defaults (unlimited fuel, 1 h).
    for (code_extra, quota, what) in [
        (
            ", fuel = 100000001, memory = \"64MiB\", timeout = \"20s\"",
            "max_task_fuel",
            "the body of flow `code` is given 100000001 fuel: set its `code.fuel`",
        ),
        (
            ", fuel = 100000000, memory = 67108865, timeout = \"20s\"",
            "max_task_memory",
            "the body of flow `code` is given 67108865 bytes of memory",
        ),
        (
            ", fuel = 100000000, memory = \"64MiB\", timeout = \"20001ms\"",
            "max_task_timeout_ms",
            "the body of flow `code` is given a 20001 ms deadline: set its `code.timeout`",
        ),
        ("", "max_task_fuel", "the body of flow `code` is given"),
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let flow = flow_at(dir.path(), code_extra);
        refused(&server.cli(&t, &["run", utf8(&flow)]), quota, what);
    }
    // A subflow's task, and a subflow's body, one over.
    let dir = tempfile::tempdir().expect("dir");
    let flow = flow_at(dir.path(), code_at);
    let child = dir.path().join("sub/child.toml");
    let text = std::fs::read_to_string(&child).expect("read");
    std::fs::write(
        &child,
        text.replace("fuel = 100000000\nmemory", "fuel = 100000001\nmemory"),
    )
    .expect("write");
    refused(
        &server.cli(&t, &["run", utf8(&flow)]),
        "max_task_fuel",
        "task `add_one` is given 100000001 fuel",
    );
    std::fs::write(
        &child,
        text.replace("timeout = \"20s\" }", "timeout = \"21s\" }"),
    )
    .expect("write");
    refused(
        &server.cli(&t, &["run", utf8(&flow)]),
        "max_task_timeout_ms",
        "the body of flow `child` is given a 21000 ms deadline",
    );
}

/// A server killed (SIGKILL) while a code flow's third step runs records the run Crashed;
/// `sluice resume --server` replays its body from the journal: no completed task run runs
/// again, and the run completes with the same result as one never interrupted.
#[test]
fn a_code_flow_on_a_killed_server_resumes_by_replay() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("t");
    let dir = tempfile::tempdir().expect("dir");
    let flow = code_flow(dir.path(), "scenario = \"durable\"\nn = 4\nms = 1500", "");
    let (id, home) = kill_when(server, &token, &flow, |tasks| {
        tasks["Completed"].as_u64() >= Some(4) && tasks["Running"] == 1
    });

    let server = ServerProcess::start_in(home, &[]);
    let shown = json_of(&server.cli(&token, &["show", &id, "--json"]));
    assert_eq!(shown["state"], "Crashed", "{shown:#}");
    let out = server.cli(&token, &["resume", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = json_of(&out);
    assert_eq!(record["state"], "Completed", "{record:#}");
    assert_eq!(record["result"]["x"], 16, "1 doubled 4 times");
    let tasks = record["tasks"].as_array().expect("tasks");
    assert_eq!(tasks.len(), 8, "4 steps of 2 task runs: none made twice");
    let again: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t["attempts"] != 1)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        again.len(),
        1,
        "only the task run killed ran again: {record:#}"
    );
    assert!(history(&tasks[again[0]]).contains(&"Crashed".to_owned()));
    let journal = record["journal"].as_array().expect("journal");
    assert!(
        journal.iter().any(|e| e["call"] == "replayed"),
        "the journal marks the replay: {journal:#?}"
    );
}
