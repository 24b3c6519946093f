//! The web UI in a real browser: `tests/ui/browser.mjs` (playwright-core driving Debian's
//! chromium, both installed by `scripts/setup`) against a real `sluice server` with runs and a
//! deployment made through the CLI: sign in, a live task's log lines followed as they come,
//! the runs list, a failed run's graph, timeline and its failed task's log line and error, a
//! task's output downloaded, resuming the failed run from a chosen task, cancelling a running
//! run, pausing and resuming a deployment, the tenant's usage against its quotas, another
//! tenant's run unreachable, an operator viewing each tenant in turn, and axe-core on each
//! page. Screenshots go to `target/ui-screenshots/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::server::{ServerProcess, client, stderr};
use crate::store::{hostile_path, write_flow};
use crate::support::{guest, json_of};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository")
        .to_owned()
}

/// Run `flow` (text) as `token`'s tenant through the CLI and return the run's id.
fn run_flow(server: &ServerProcess, token: &str, flow: &str) -> String {
    let dir = tempfile::tempdir().expect("dir");
    let path = write_flow(dir.path(), flow);
    let out = server.cli(token, &["run", path.to_str().expect("utf-8"), "--json"]);
    let run = json_of(&out);
    run["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no run id: {}", stderr(&out)))
        .to_owned()
}

#[test]
fn a_tenant_signs_in_reads_a_failed_task_and_cancels_a_run_in_a_browser() {
    let server = ServerProcess::start(&[]);
    let alice = server.add_tenant("alice");
    let bob = server.add_tenant("bob");
    let hostile = hostile_path();
    let add_one = guest("add_one").display().to_string();
    let failed = run_flow(
        &server,
        &alice,
        &format!(
            r#"
name = "nightly"
[tasks.boom]
component = "{hostile}"
input = {{ do = "log_then_fail", log = "about to fail: the disk is full", message = "no space left on device" }}
[tasks.after]
component = "{add_one}"
input = "$tasks.boom"
[tasks.ok]
component = "{add_one}"
input = 41
"#
        ),
    );
    let other = run_flow(
        &server,
        &bob,
        &format!("name = \"bobs\"\n[tasks.a]\ncomponent = \"{add_one}\"\ninput = 1\n"),
    );
    // A run that sleeps until cancelled.
    let dir = tempfile::tempdir().expect("dir");
    let sleeper = write_flow(
        dir.path(),
        &format!(
            "name = \"sleeper\"\n[tasks.nap]\ncomponent = \"{hostile}\"\ninput = {{ do = \"sleep\", ms = 600000 }}\ntimeout = \"20m\"\n"
        ),
    );
    let mut client = server.spawn_run(&alice, &sleeper, true, false);
    let began = Instant::now();
    let running = loop {
        let runs = json_of(&server.cli(&alice, &["runs", "--json", "--flow", "sleeper"]));
        if let Some(r) = runs.as_array().and_then(|r| r.first())
            && r["state"] == "Running"
        {
            break r["id"].as_str().expect("id").to_owned();
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the sleeper never ran: {runs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // A deployment, and a quota to show usage against.
    let deployed = write_flow(
        dir.path(),
        &format!(
            "name = \"hourly\"\n[tasks.a]\ncomponent = \"{add_one}\"\ninput = 1\n[schedule]\ninterval = \"1h\"\n"
        ),
    );
    let out = server.cli(&alice, &["deploy", deployed.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    server.tenant(&["set", "alice", "--runs-per-minute", "100"]);
    // An operator, who sees every tenant.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["operator", "add", "ops"])
        .env("SLUICE_HOME", &server.home)
        .output()
        .expect("sluice operator add");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let operator = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("a token line")
        .to_owned();
    // A run whose task logs on each attempt, 20 s apart (time for the browser to start and
    // sign in): its page follows the second line.
    let dripping = write_flow(
        dir.path(),
        &format!(
            "name = \"drip\"\n[tasks.drip]\ncomponent = \"{hostile}\"\nretries = 1\n\
             input = {{ do = \"log_each_attempt\", log = \"drip attempt\", ms = 20000 }}\n"
        ),
    );
    let mut drip = server.spawn_run(&alice, &dripping, true, false);
    let began = Instant::now();
    let drip_run = loop {
        let runs = json_of(&server.cli(&alice, &["runs", "--json", "--flow", "drip"]));
        if let Some(r) = runs.as_array().and_then(|r| r.first())
            && let Some(id) = r["id"].as_str()
        {
            let shown = json_of(&server.cli(&alice, &["show", id, "--json"]));
            if shown["tasks"][0]["state"] == "AwaitingRetry" {
                break id.to_owned();
            }
        }
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the drip run never waited for its retry: {runs}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let ui = repo().join("tests/ui");
    let shots = repo().join("target/ui-screenshots");
    let out = Command::new("node")
        .arg(ui.join("browser.mjs"))
        .current_dir(&ui)
        .env("SLUICE_URL", &server.url)
        .env("TOKEN", &alice)
        .env("FAILED_RUN", &failed)
        .env("RUNNING_RUN", &running)
        .env("OTHER_RUN", &other)
        .env("DRIP_RUN", &drip_run)
        .env("OPERATOR_TOKEN", &operator)
        .env("SHOTS", &shots)
        .output()
        .expect("node tests/ui/browser.mjs (scripts/setup installs node's packages)");
    let said = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the browser test failed:\n{said}");
    assert!(
        said.contains("ok: the cancelled run turns Cancelled"),
        "{said}"
    );
    // The CLI that started the sleeper sees it end Cancelled.
    let status = client.wait().expect("sluice run");
    assert_ne!(status.code(), Some(0));
    assert_eq!(drip.wait().expect("the drip run").code(), Some(0));
    // The resume made in the browser ran the chosen task again, and kept `ok`'s result.
    let shown = json_of(&server.cli(&alice, &["show", &failed, "--json"]));
    let task = |name: &str| {
        shown["tasks"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["name"] == name))
            .unwrap_or_else(|| panic!("no task {name}: {shown}"))
            .clone()
    };
    assert_eq!(task("boom")["attempts"], 2, "{shown}");
    assert_eq!(task("ok")["attempts"], 1, "{shown}");
    assert_eq!(task("ok")["output"], 42, "{shown}");
    // Its peak memory was recorded (a component's linear memory is at least a page).
    assert!(
        task("ok")["memory_peak_bytes"].as_u64() >= Some(65536),
        "{shown}"
    );
    // The deployment was paused and resumed: active again, with its next runs.
    let d = json_of(&server.cli(&alice, &["deployments", "ls", "--json"]));
    assert_eq!(d[0]["paused"], false, "{d}");
    for page in [
        "sign-in",
        "task-live",
        "runs",
        "run",
        "task",
        "task-output",
        "resumed",
        "cancelled",
        "deployments",
        "deployment",
        "usage",
        "other-tenant",
        "tenants",
        "operator-runs",
    ] {
        assert!(shots.join(format!("{page}.png")).is_file(), "{page}.png");
    }
}

/// A flow written as code runs a task as many times as its body calls it: the run's page
/// shows each of those task runs (a timeline row and a link each), the graph's node counts
/// them, and each has its own page, reached by its id.
#[tokio::test(flavor = "multi_thread")]
async fn a_code_flows_task_runs_each_have_a_row_and_a_page() {
    let server = ServerProcess::start(&[]);
    let alice = server.add_tenant("alice");
    let dir = tempfile::tempdir().expect("dir");
    std::fs::copy(guest("flow_body"), dir.path().join("body.wasm")).expect("body");
    std::fs::copy(guest("add_one"), dir.path().join("task.wasm")).expect("task");
    let flow = dir.path().join("flow.toml");
    std::fs::write(
        &flow,
        "name = \"chain\"\ncode = \"body.wasm\"\n[parameters]\nscenario = \"chain\"\nn = 3\n\
         [tasks.add_one]\ncomponent = \"task.wasm\"\n",
    )
    .expect("flow");
    let out = server.cli(&alice, &["run", flow.to_str().expect("utf-8"), "--json"]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{}", stderr(&out));
    let id = run["id"].as_str().expect("id").to_owned();
    let ids: Vec<String> = run["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["id"].as_str().expect("task run id").to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{run}");

    let http = client();
    let page = async |path: String| {
        let resp = http
            .get(format!("{}{path}", server.url))
            .header("cookie", format!("sluice_token={alice}"))
            .send()
            .await
            .expect("page");
        (resp.status().as_u16(), resp.text().await.expect("body"))
    };
    let (status, html) = page(format!("/ui/runs/{id}")).await;
    assert_eq!(status, 200, "{html}");
    for (k, tr) in ids.iter().enumerate() {
        let href = format!("/ui/runs/{id}/tasks/add%5Fone?run={tr}");
        assert!(html.contains(&href), "a link to run {k} ({href}): {html}");
        assert!(
            html.contains(&format!(">add_one #{}<", k + 1)),
            "timeline row {k}: {html}"
        );
    }
    assert!(
        html.contains("3 Completed"),
        "the node counts its runs: {html}"
    );
    // Each run's page is its own: the second run's input is the first's output (1).
    let (status, second) = page(format!("/ui/runs/{id}/tasks/add%5Fone?run={}", ids[1])).await;
    assert_eq!(status, 200, "{second}");
    assert!(second.contains("Task add_one #2"), "{second}");
    assert!(second.contains("Runs of this task (3)"), "{second}");
    let (status, output) = page(format!(
        "/ui/runs/{id}/tasks/add%5Fone/output?run={}",
        ids[1]
    ))
    .await;
    assert_eq!((status, output.as_str()), (200, "2"));
    let (status, _) = page(format!("/ui/runs/{id}/tasks/add%5Fone?run=nope")).await;
    assert_eq!(status, 400);

    // Run more times than the timeline gives rows to: one row, the union of their attempts.
    let many = json_of(&server.cli(
        &alice,
        &[
            "run",
            flow.to_str().expect("utf-8"),
            "--param",
            "n=25",
            "--json",
        ],
    ));
    assert_eq!(many["state"], "Completed", "{many}");
    let id = many["id"].as_str().expect("id");
    let (status, html) = page(format!("/ui/runs/{id}")).await;
    assert_eq!(status, 200, "{html}");
    assert!(
        html.contains(">add_one (25 runs)<"),
        "one row for all: {html}"
    );
    assert!(!html.contains(">add_one #1<"), "no row each: {html}");
    assert!(
        html.contains("25 Completed"),
        "the node counts them: {html}"
    );
}
