//! Tenant quotas and fair scheduling on a real `sluice server`: every quota at its limit
//! (accepted) and one over (refused with HTTP 429 naming it, or waiting, as documented), and a
//! tenant's single task running at once beside another tenant's backlog that holds every slot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::server::{ServerProcess, stderr};
use crate::store::{hostile_path, write_flow};
use crate::support::{guest, json_of};

/// `sluice tenant set NAME ARGS` against the server's home.
pub(crate) fn set(server: &ServerProcess, name: &str, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["tenant", "set", name])
        .args(args)
        .env("SLUICE_HOME", &server.home)
        .output()
        .expect("tenant set");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// A flow of one add_one task with `extra` lines in its table.
fn one_task(dir: &Path, file: &str, extra: &str) -> PathBuf {
    let sub = dir.join(file);
    std::fs::create_dir_all(&sub).expect("dir");
    let add_one = guest("add_one").display().to_string();
    write_flow(
        &sub,
        &format!("name = \"one\"\n[tasks.a]\ncomponent = \"{add_one}\"\ninput = 1\n{extra}\n"),
    )
}

/// A flow of `n` independent hostile tasks sleeping `ms` each.
fn sleepers(dir: &Path, file: &str, n: usize, ms: u64) -> PathBuf {
    let sub = dir.join(file);
    std::fs::create_dir_all(&sub).expect("dir");
    let h = hostile_path();
    let mut text = format!("name = \"sleepers-{n}\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[tasks.s{i}]\ncomponent = {h:?}\ninput = {{ do = \"sleep\", ms = {ms} }}\n"
        ));
    }
    write_flow(&sub, &text)
}

/// The tenant's `GET /api/v1/usage`.
async fn usage(server: &ServerProcess, token: &str) -> Value {
    reqwest::Client::new()
        .get(server.api("/usage"))
        .bearer_auth(token)
        .send()
        .await
        .expect("usage")
        .json()
        .await
        .expect("json")
}

fn run(server: &ServerProcess, token: &str, flow: &Path) -> Output {
    server.cli(token, &["run", flow.to_str().expect("utf-8"), "--json"])
}

/// A refusal by quota `quota`: exit 1, the quota named.
fn refused(out: &Output, quota: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    let err = stderr(out);
    assert!(
        err.contains(&format!("quota `{quota}`")) && err.contains("(quota-exceeded)"),
        "{err}"
    );
}

fn completed(out: &Output) -> Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    let run = json_of(out);
    assert_eq!(run["state"], "Completed", "{run}");
    run
}

#[test]
fn refused_quotas_refuse_one_over_their_limit_naming_it() {
    let server = ServerProcess::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();

    // runs_per_minute: two runs in the minute pass, the third is refused.
    let t = server.add_tenant("rpm");
    set(&server, "rpm", &["--runs-per-minute", "2"]);
    let flow = one_task(d, "rpm", "");
    completed(&run(&server, &t, &flow));
    completed(&run(&server, &t, &flow));
    refused(&run(&server, &t, &flow), "runs_per_minute");

    // Ceilings on each task's fuel, memory and deadline: at the ceiling passes, one over not.
    let t = server.add_tenant("ceilings");
    set(
        &server,
        "ceilings",
        &[
            "--max-task-fuel",
            "1000000",
            "--max-task-memory",
            "64MiB",
            "--max-task-timeout",
            "2s",
        ],
    );
    let at = "fuel = 1000000\nmemory = \"64MiB\"\ntimeout = \"2s\"";
    completed(&run(&server, &t, &one_task(d, "at", at)));
    let over_fuel = "fuel = 1000001\nmemory = \"64MiB\"\ntimeout = \"2s\"";
    let out = run(&server, &t, &one_task(d, "fuel", over_fuel));
    refused(&out, "max_task_fuel");
    assert!(stderr(&out).contains("task `a` is given 1000001 fuel"));
    let over_memory = "fuel = 1000000\nmemory = 67108865\ntimeout = \"2s\"";
    refused(
        &run(&server, &t, &one_task(d, "mem", over_memory)),
        "max_task_memory",
    );
    let over_timeout = "fuel = 1000000\nmemory = \"64MiB\"\ntimeout = \"2001ms\"";
    refused(
        &run(&server, &t, &one_task(d, "time", over_timeout)),
        "max_task_timeout_ms",
    );
    // Left to the defaults (10^10 fuel), a task is over the fuel ceiling: refused, not cut.
    refused(
        &run(&server, &t, &one_task(d, "default", "")),
        "max_task_fuel",
    );

    // max_queued_tasks: a flow of as many tasks as the quota passes, one more task is refused.
    let t = server.add_tenant("queued");
    set(&server, "queued", &["--max-queued-tasks", "3"]);
    completed(&run(&server, &t, &sleepers(d, "q3", 3, 1)));
    refused(
        &run(&server, &t, &sleepers(d, "q4", 4, 1)),
        "max_queued_tasks",
    );

    // The grant ceiling: the server allows any env value; the tenant only REGION.
    std::fs::write(server.home.join("policy.toml"), "[grants]\nenv = [\"*\"]\n").expect("policy");
    let home = server.home.clone();
    drop(server);
    let server = ServerProcess::start_in(home, &[]);
    let ceiling = d.join("ceiling.toml");
    std::fs::write(&ceiling, "[grants]\nenv = [\"REGION\"]\n").expect("ceiling");
    let t = server.add_tenant("ceiling");
    set(
        &server,
        "ceiling",
        &["--grants", ceiling.to_str().expect("utf-8")],
    );
    let grant = |name: &str| format!("[tasks.a.grants]\nenv = {{ {name} = \"eu\" }}");
    completed(&run(&server, &t, &one_task(d, "region", &grant("REGION"))));
    let out = run(&server, &t, &one_task(d, "other", &grant("OTHER")));
    refused(&out, "grants");
    assert!(stderr(&out).contains("OTHER"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_bytes_are_held_to_their_quota() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("s");
    let client = reqwest::Client::new();
    let usage = || usage(&server, &token);
    let stored = usage().await["stored_bytes"].as_u64().expect("stored");
    // Room for exactly 1,000 more bytes.
    set(
        &server,
        "s",
        &["--max-stored", &format!("{}", stored + 1000)],
    );
    let put = |bytes: Vec<u8>| {
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let req = client
            .put(server.api(&format!("/components/{digest}")))
            .bearer_auth(&token)
            .body(bytes);
        async move {
            let resp = req.send().await.expect("put");
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, body) = put(vec![1u8; 1000]).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(usage().await["stored_bytes"], stored + 1000);
    let (status, body) = put(vec![2u8; 1]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "quota-exceeded");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("quota `max_stored_bytes`"))
    );
}

/// When each task run of `run` was recorded Running (on a server: when it was given a slot)
/// and when it ended, in seconds since the epoch.
fn running_and_end(run: &Value) -> Vec<(f64, f64)> {
    let time = |t: &Value| {
        chrono::DateTime::parse_from_rfc3339(t.as_str().expect("time"))
            .expect("rfc3339")
            .timestamp_micros() as f64
            / 1e6
    };
    run["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            let h = t["history"].as_array().expect("history");
            let running = h.iter().find(|x| x["to"] == "Running").expect("Running");
            (
                time(&running["time"]),
                time(&h.last().expect("end")["time"]),
            )
        })
        .collect()
}

/// Run `flow` as `token` and watch the tenant's usage meanwhile: the most task runs it had
/// running at once.
async fn most_running(server: &ServerProcess, token: &str, flow: &Path) -> u64 {
    let mut child = server.spawn_run(token, flow, false, false);
    let mut most = 0;
    loop {
        let usage = usage(server, token).await;
        most = most.max(usage["running_tasks"].as_u64().unwrap_or(0));
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success());
            return most;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn max_running_tasks_holds_at_its_limit() {
    let server = ServerProcess::start(&["--task-slots", "8"]);
    let dir = tempfile::tempdir().expect("dir");
    let t = server.add_tenant("r");
    set(&server, "r", &["--max-running-tasks", "3"]);
    let flow = sleepers(dir.path(), "s", 6, 400);
    assert_eq!(most_running(&server, &t, &flow).await, 3);
    set(&server, "r", &["--max-running-tasks", "2"]);
    assert_eq!(most_running(&server, &t, &flow).await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn fuel_per_minute_holds_task_runs_in_the_queue_once_reached() {
    let server = ServerProcess::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    let t = server.add_tenant("f");
    let flow = one_task(dir.path(), "one", "");
    // The fuel of one run of the flow (deterministic).
    let first = completed(&run(&server, &t, &flow));
    let fuel = first["tasks"][0]["fuel_consumed"].as_u64().expect("fuel");
    let usage = || usage(&server, &t);
    // The quota is what was used plus exactly one more run: that run starts, the next waits.
    set(
        &server,
        "f",
        &["--fuel-per-minute", &format!("{}", 2 * fuel)],
    );
    completed(&run(&server, &t, &flow));
    assert_eq!(usage().await["fuel_last_minute"], 2 * fuel);
    let waiting = server.spawn_run(&t, &flow, true, true);
    let mut queued = 0;
    for _ in 0..200 {
        queued = usage().await["queued_tasks"].as_u64().unwrap_or(0);
        if queued == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(queued, 1, "the third run's task is not waiting");
    // It stays queued (nothing frees the minute); cancelling it ends it at once.
    let runs = json_of(&server.cli(&t, &["runs", "--json"]));
    let id = runs[0]["id"].as_str().expect("id").to_owned();
    assert_eq!(runs[0]["live"], true);
    let out = server.cli(&t, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = waiting.wait_with_output().expect("ends");
    assert_eq!(json_of(&out)["state"], "Cancelled");
    assert_eq!(usage().await["queued_tasks"], 0);
}

/// A task run waiting for a slot is Pending; it is Running from when it gets one. One slot,
/// two sleeping tasks of one tenant: the second is Pending while the first runs, and Running
/// only once the first's attempt (1 s) ended.
#[test]
fn a_task_run_waiting_for_a_slot_is_pending_until_it_gets_one() {
    let server = ServerProcess::start(&["--task-slots", "1"]);
    let dir = tempfile::tempdir().expect("dir");
    let t = server.add_tenant("p");
    let flow = sleepers(dir.path(), "s", 2, 1000);
    let child = server.spawn_run(&t, &flow, true, true);
    let mut seen = None;
    for _ in 0..400 {
        let runs = json_of(&server.cli(&t, &["runs", "--json"]));
        if let Some(id) = runs[0]["id"].as_str() {
            let shown = json_of(&server.cli(&t, &["show", id, "--json"]));
            let mut states: Vec<String> = shown["tasks"]
                .as_array()
                .expect("tasks")
                .iter()
                .map(|t| t["state"].as_str().unwrap_or_default().to_owned())
                .collect();
            states.sort();
            if states.contains(&"Running".to_owned()) {
                seen = Some(states);
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        seen.as_deref(),
        Some(&["Pending".to_owned(), "Running".to_owned()][..]),
        "while one task run held the slot"
    );
    let out = child.wait_with_output().expect("run ends");
    let run = completed(&out);
    let mut times = running_and_end(&run);
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(
        times[1].0 >= times[0].0 + 1.0,
        "the second task run was Running before the first's attempt ended: {times:?}"
    );
    for t in run["tasks"].as_array().expect("tasks") {
        let path: Vec<&str> = t["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["to"].as_str().expect("to"))
            .collect();
        assert_eq!(path, ["Pending", "Running", "Completed"], "{t}");
    }
}

#[test]
fn a_tenants_single_task_runs_at_once_beside_anothers_backlog() {
    // One slot, held by tenant A's backlog of 3-second tasks: tenant B's single task does not
    // wait for one of them to end (a tenant with nothing running gets one task run beyond the
    // slots), so it ends long before A's first task.
    let server = ServerProcess::start(&["--task-slots", "1"]);
    let dir = tempfile::tempdir().expect("dir");
    let a = server.add_tenant("a");
    let b = server.add_tenant("b");
    let backlog = sleepers(dir.path(), "a", 4, 3000);
    let mut a_run = server.spawn_run(&a, &backlog, true, false);
    let a_id = loop {
        let runs = json_of(&server.cli(&a, &["runs", "--json"]));
        if runs[0]["live"] == true {
            break runs[0]["id"].as_str().expect("id").to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let single = one_task(dir.path(), "b", "");
    let b_run = completed(&run(&server, &b, &single));
    let (_, b_end) = running_and_end(&b_run)[0];
    let out = server.cli(&a, &["cancel", &a_id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let _ = a_run.wait();
    let a_json = json_of(&server.cli(&a, &["show", &a_id, "--json"]));
    let a_first_end = a_json["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter(|t| t["state"] == "Completed")
        .count();
    assert!(
        a_first_end == 0,
        "B's task ended after {a_first_end} of A's 3-second tasks: it waited for the slot"
    );
    let a_started: f64 = {
        let h = a_json["history"].as_array().expect("history");
        chrono::DateTime::parse_from_rfc3339(h[0]["time"].as_str().expect("time"))
            .expect("rfc3339")
            .timestamp_micros() as f64
            / 1e6
    };
    assert!(
        b_end - a_started < 3.0,
        "B's task ended {:.1} s after A's run began",
        b_end - a_started
    );
}
