//! `sluice server` as its users reach it: a real server process on an ephemeral loopback port,
//! tenants added with `sluice tenant add`, flows run with `sluice run --server`, and raw HTTP
//! for what the CLI does not show (status codes, problem documents, other tenants' ids).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use crate::store::write_flow;
use crate::support::{guest, json_of};

/// A running `sluice server`, killed when dropped.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) home: PathBuf,
    pub(crate) url: String,
}

impl ServerProcess {
    /// Start a server over a new home, with `args` after `server`.
    pub(crate) fn start(args: &[&str]) -> ServerProcess {
        let home = tempfile::tempdir().expect("home").keep();
        Self::start_in(home, args)
    }

    pub(crate) fn start_in(home: PathBuf, args: &[&str]) -> ServerProcess {
        Self::start_on(home, "127.0.0.1:0", args)
    }

    /// [`ServerProcess::start_in`], listening on `listen`.
    pub(crate) fn start_on(home: PathBuf, listen: &str, args: &[&str]) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["server", "--listen", listen])
            .args(args)
            .env("SLUICE_HOME", &home)
            .stdout(Stdio::piped())
            // Its log, for a failing test to be read: <home>/server.log.
            .stderr(std::fs::File::create(home.join("server.log")).expect("server.log"))
            .spawn()
            .expect("start sluice server");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the server's first line");
        let url = line
            .trim()
            .strip_prefix("sluice server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        ServerProcess { child, home, url }
    }

    /// `sluice tenant add NAME` against this server's home: the token (the last line).
    pub(crate) fn add_tenant(&self, name: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["tenant", "add", name])
            .env("SLUICE_HOME", &self.home)
            .output()
            .expect("sluice tenant add");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let token = stdout.lines().last().expect("a token line").to_owned();
        assert!(
            token.starts_with("sluice_") && token.len() == 71,
            "{stdout}"
        );
        token
    }

    /// `sluice tenant <args>` against this server's home, which must succeed.
    pub(crate) fn tenant(&self, args: &[&str]) -> Output {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("tenant")
            .args(args)
            .env("SLUICE_HOME", &self.home)
            .output()
            .expect("sluice tenant");
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        out
    }

    /// `sluice <args> --server URL --token TOKEN`, from a home of its own (nothing local).
    pub(crate) fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .args(["--server", &self.url, "--token", token])
            .env("SLUICE_HOME", self.home.join("client-home"))
            .output()
            .expect("run sluice")
    }

    /// `sluice run FLOW [--json] --server URL --token TOKEN` in the background; its stdout and
    /// stderr piped (read them with `wait_with_output`) when `output`, else discarded.
    pub(crate) fn spawn_run(&self, token: &str, flow: &Path, json: bool, output: bool) -> Child {
        let pipe = || match output {
            true => Stdio::piped(),
            false => Stdio::null(),
        };
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", flow.to_str().expect("utf-8")])
            .args(json.then_some("--json"))
            .args(["--server", &self.url, "--token", token])
            .env("SLUICE_HOME", self.home.join("client-home"))
            .stdout(pipe())
            .stderr(pipe())
            .spawn()
            .expect("sluice run --server")
    }

    pub(crate) fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.url)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A two-task flow (add_one twice) with a cached first task, in a directory of its own.
pub(crate) fn chain_flow(dir: &Path) -> PathBuf {
    let add_one = guest("add_one").display().to_string();
    write_flow(
        dir,
        &format!(
            r#"
name = "server-chain"
[parameters]
x = 1
[tasks.first]
component = "{add_one}"
input = "$params.x"
cache_for = "1h"
[tasks.second]
component = "{add_one}"
input = "$tasks.first"
"#
        ),
    )
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub(crate) async fn get(url: &str, token: Option<&str>) -> (u16, String, Value) {
    let mut req = client().get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let ty = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, ty, body)
}

#[test]
fn a_flow_runs_on_the_server_and_reads_back_as_in_embedded_mode() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("acme");
    let dir = tempfile::tempdir().expect("dir");
    let flow = chain_flow(dir.path());
    let flow = flow.to_str().expect("utf-8");

    let out = server.cli(&token, &["run", flow, "--param", "x=41", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run}");
    assert_eq!(crate::support::task(&run, "second")["output"], 43);
    let id = run["id"].as_str().expect("id").to_owned();

    // The same run, through `runs`, `show` and `logs` against the server.
    let out = server.cli(&token, &["runs", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let runs = json_of(&out);
    assert_eq!(runs[0]["id"], id.as_str());
    assert_eq!(runs[0]["live"], false);
    let out = server.cli(&token, &["show", &id[..10], "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let shown = json_of(&out);
    assert_eq!(shown["id"], id.as_str());
    let mut tasks = shown["tasks"].clone();
    for t in tasks.as_array_mut().expect("tasks") {
        assert_eq!(t["grants"], serde_json::json!({}), "{t}");
        t.as_object_mut().expect("task").remove("grants");
    }
    assert_eq!(tasks, run["tasks"]);
    assert_eq!(shown["live"], false);
    let out = server.cli(&token, &["show", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("second") && text.contains("Completed"),
        "{text}"
    );
    let out = server.cli(&token, &["logs", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A second run hits the tenant's cache for `first`.
    let out = server.cli(&token, &["run", flow, "--param", "x=41", "--json"]);
    let again = json_of(&out);
    assert_eq!(
        crate::support::task(&again, "first")["state"],
        "Cached",
        "{again}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_see_nothing_of_each_other() {
    let server = ServerProcess::start(&[]);
    let a = server.add_tenant("a");
    let b = server.add_tenant("b");
    let dir = tempfile::tempdir().expect("dir");
    let flow = chain_flow(dir.path());
    let flow = flow.to_str().expect("utf-8");
    let out = server.cli(&a, &["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_a = json_of(&out);
    let id = run_a["id"].as_str().expect("id").to_owned();

    // B: every route that names A's run answers 404 with a problem document; B's list is empty.
    for path in [
        format!("/runs/{id}"),
        format!("/runs/{id}/logs"),
        format!("/runs/{id}/events"),
        format!("/runs/{}", &id[..8]),
    ] {
        let (status, ty, body) = get(&server.api(&path), Some(&b)).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(ty, "application/problem+json");
        assert_eq!(body["code"], "not-found");
        assert_eq!(body["type"], "urn:sluice:problem:not-found");
    }
    let resp = client()
        .post(server.api(&format!("/runs/{id}/cancel")))
        .bearer_auth(&b)
        .send()
        .await
        .expect("cancel");
    assert_eq!(resp.status().as_u16(), 404);
    let (status, _, list) = get(&server.api("/runs"), Some(&b)).await;
    assert_eq!(status, 200);
    assert_eq!(list, serde_json::json!([]));
    let out = server.cli(&b, &["show", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no flow run"), "{}", stderr(&out));
    let out = server.cli(&b, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(2));
    let resp = client()
        .post(server.api(&format!("/runs/{id}/resume")))
        .bearer_auth(&b)
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("resume");
    assert_eq!(resp.status().as_u16(), 404);
    let out = server.cli(&b, &["resume", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no flow run"), "{}", stderr(&out));

    // A's component: A reads it by digest, B does not.
    let digest = blake3::hash(&std::fs::read(guest("add_one")).expect("guest"))
        .to_hex()
        .to_string();
    let url = server.api(&format!("/components/{digest}"));
    let resp = client()
        .get(&url)
        .bearer_auth(&a)
        .send()
        .await
        .expect("get");
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(
        &bytes[..],
        &std::fs::read(guest("add_one")).expect("guest")[..]
    );
    let (status, _, _) = get(&url, Some(&b)).await;
    assert_eq!(status, 404);

    // B runs the same flow with the same inputs: no hit on A's cache (a miss, then its own run).
    let out = server.cli(&b, &["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_b = json_of(&out);
    let first = crate::support::task(&run_b, "first");
    assert_eq!(first["state"], "Completed", "{run_b}");
    assert_eq!(first["cache"]["status"], "miss", "{first}");
    let key_a = crate::support::task(&run_a, "first")["cache"]["key"].clone();
    assert!(key_a.is_string());
    assert_ne!(first["cache"]["key"], key_a, "the same key in two tenants");
    // `sluice cache` on the server: each tenant lists, shows and clears its own entries only.
    let key_a = key_a.as_str().expect("key").to_owned();
    let list = json_of(&server.cli(&a, &["cache", "ls", "--json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(
        (&list[0]["key"], &list[0]["valid"]),
        (&Value::from(key_a.as_str()), &Value::from(true))
    );
    let shown = json_of(&server.cli(&a, &["cache", "show", &key_a[..12], "--json"]));
    assert_eq!(shown["value"], 2, "{shown}");
    let out = server.cli(&b, &["cache", "show", &key_a[..12]]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = server.cli(&a, &["cache", "clear"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "removed 1 cache entry\n"
    );
    let list = json_of(&server.cli(&b, &["cache", "ls", "--json"]));
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(1),
        "B's entry stays: {list}"
    );
    assert_eq!(list[0]["key"], first["cache"]["key"]);

    // No token, a wrong token, a malformed header: 401 with a problem document.
    for token in [None, Some("sluice_wrong")] {
        let (status, ty, body) = get(&server.api("/runs"), token).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(ty, "application/problem+json");
        assert_eq!(body["code"], "unauthorized");
    }
    let resp = client()
        .get(server.api("/runs"))
        .header("authorization", "Basic eDp5")
        .send()
        .await
        .expect("basic");
    assert_eq!(resp.status().as_u16(), 401);
    assert!(resp.headers().contains_key("www-authenticate"));
    let out = server.cli("sluice_wrong", &["runs"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("token is not valid"),
        "{}",
        stderr(&out)
    );

    // A removed tenant's token stops working at once.
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["tenant", "rm", "b"])
        .env("SLUICE_HOME", &server.home)
        .output()
        .expect("tenant rm");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let (status, _, _) = get(&server.api("/runs"), Some(&b)).await;
    assert_eq!(status, 401);
    let (status, _, _) = get(&server.api("/runs"), Some(&a)).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_are_checked_against_their_digest_and_the_size_limit() {
    let server = ServerProcess::start(&["--max-component-size", "1KiB"]);
    let token = server.add_tenant("t");
    let put = |bytes: Vec<u8>, digest: String| {
        let req = client()
            .put(server.api(&format!("/components/{digest}")))
            .bearer_auth(&token)
            .body(bytes);
        async move {
            let resp = req.send().await.expect("put");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let at_limit = vec![7u8; 1024];
    let digest = blake3::hash(&at_limit).to_hex().to_string();
    let (status, body) = put(at_limit.clone(), digest.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["bytes"], 1024);
    // Idempotent.
    let (status, _) = put(at_limit, digest.clone()).await;
    assert_eq!(status, 200);

    let over = vec![7u8; 1025];
    let (status, body) = put(over.clone(), blake3::hash(&over).to_hex().to_string()).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "too-large");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("1024 bytes")),
        "{body}"
    );

    let (status, body) = put(vec![1u8; 10], digest).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "digest-mismatch");
    let (status, body) = put(vec![1u8; 10], "not-a-digest".into()).await;
    assert_eq!(status, 400, "{body}");
}

#[test]
fn a_server_grants_nothing_without_a_policy_and_bad_manifests_name_their_place() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("t");
    let dir = tempfile::tempdir().expect("dir");
    let add_one = guest("add_one").display().to_string();
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"f\"\n[tasks.a]\ncomponent = \"{add_one}\"\n[tasks.a.grants]\nenv = {{ REGION = \"eu\" }}\n"
        ),
    );
    let out = server.cli(&token, &["run", flow.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("flow.toml:5:") && err.contains("without one nothing may be granted"),
        "{err}"
    );
    assert!(err.contains("(invalid-manifest)"), "{err}");
    let flow = write_flow(
        dir.path(),
        &format!("name = \"f\"\n[tasks.a]\ncomponent = \"{add_one}\"\n"),
    );
    let out = server.cli(
        &token,
        &["run", flow.to_str().expect("utf-8"), "--param", "nope=1"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown parameter `nope`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_every_route() {
    let server = ServerProcess::start(&[]);
    let (status, _, doc) = get(&server.api("/openapi.json"), None).await;
    assert_eq!(status, 200);
    let paths = doc["paths"].as_object().expect("paths");
    for p in [
        "/api/v1/components/{digest}",
        "/api/v1/runs",
        "/api/v1/runs/{id}",
        "/api/v1/runs/{id}/logs",
        "/api/v1/runs/{id}/events",
        "/api/v1/runs/{id}/cancel",
        "/api/v1/runs/{id}/resume",
        "/api/v1/usage",
        "/api/v1/cache",
        "/api/v1/cache/{key}",
        "/api/v1/deployments",
        "/api/v1/deployments/{name}",
        "/api/v1/deployments/{name}/pause",
        "/api/v1/deployments/{name}/resume",
        "/api/v1/deployments/{name}/runs",
        "/api/v1/secrets",
        "/api/v1/secrets/{name}",
    ] {
        assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

#[test]
fn a_run_on_the_server_is_cancelled_from_the_cli() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("t");
    let dir = tempfile::tempdir().expect("dir");
    let flow = crate::store::slow_chain(dir.path(), "slow");
    let run = server.spawn_run(&token, &flow, true, true);
    // Wait until the run is there and live.
    let id = loop {
        let out = server.cli(&token, &["runs", "--json"]);
        let runs = json_of(&out);
        if let Some(r) = runs.as_array().and_then(|r| r.first())
            && r["live"] == true
        {
            break r["id"].as_str().expect("id").to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = server.cli(&token, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cancelled"));
    let out = run.wait_with_output().expect("run ends");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(json_of(&out)["state"], "Cancelled");
}

/// Start a slow chain `name` (tasks `a`, `b`, `c`, `retries` each) on a new server for tenant
/// `t` and kill -9 the server once `b` runs (after `a` completed): the tenant's token, the run's
/// id, the server's home and the flow's directory.
fn kill_mid_run(name: &str, retries: u32) -> (String, String, PathBuf, tempfile::TempDir) {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("t");
    let dir = tempfile::tempdir().expect("dir");
    let flow = crate::store::slow_chain_with_retries(dir.path(), name, retries);
    let (id, home) = kill_when(server, &token, &flow, |tasks| {
        tasks["Running"] == 1 && tasks["Completed"] == 1
    });
    (token, id, home, dir)
}

/// Start `flow` on `server` in the background and kill -9 the server once `ready` holds for the
/// run's count of task runs by state (`sluice runs --json`); the run's id and the server's home.
pub(crate) fn kill_when(
    server: ServerProcess,
    token: &str,
    flow: &Path,
    ready: impl Fn(&Value) -> bool,
) -> (String, PathBuf) {
    let client = server.spawn_run(token, flow, true, false);
    let id = loop {
        let runs = json_of(&server.cli(token, &["runs", "--json"]));
        if let Some(r) = runs.as_array().and_then(|r| r.first())
            && ready(&r["tasks"])
        {
            break r["id"].as_str().expect("id").to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let home = server.home.clone();
    drop(server); // SIGKILL
    let mut client = client;
    let _ = client.kill();
    let _ = client.wait();
    (id, home)
}

#[test]
fn a_server_killed_mid_run_records_the_run_crashed_and_resume_continues_it() {
    let (token, id, home, _dir) = kill_mid_run("slow", 0);
    // `b` has no retries: the server does not resume the run by itself (it decided before it
    // printed its address).
    let server = ServerProcess::start_in(home, &[]);
    let out = server.cli(&token, &["show", &id, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Crashed", "{run}");
    assert_eq!(run["live"], false);
    let a = crate::support::task(&run, "a");
    assert_eq!(a["state"], "Completed", "a completed result is kept: {a}");
    assert_eq!(crate::support::task(&run, "b")["state"], "Crashed");
    // `sluice resume --server` continues it there: `a` keeps its result, `b` runs again.
    let out = server.cli(&token, &["resume", &id[..10], "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run}");
    assert_eq!(crate::support::task(&run, "a")["attempts"], 1);
    assert_eq!(crate::support::task(&run, "b")["attempts"], 2);
    assert_eq!(crate::support::task(&run, "c")["state"], "Completed");
    let out = server.cli(&token, &["resume", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is already Completed; nothing to resume")
            && stderr(&out).ends_with("(not-resumable)\n"),
        "{}",
        stderr(&out)
    );
}

/// A run recorded by a server before runs kept their files themselves (schema 11) has them in
/// its tenant's `space.db` only: it still resumes from them.
#[test]
fn a_run_whose_files_are_only_in_space_db_still_resumes() {
    let (token, id, home, _dir) = kill_mid_run("slow", 0);
    let tenant = std::fs::read_dir(home.join("tenants"))
        .expect("tenants")
        .next()
        .expect("a tenant")
        .expect("entry")
        .path();
    let runs = rusqlite::Connection::open(tenant.join("sluice.db")).expect("run store");
    let files: String = runs
        .query_row("SELECT files FROM flow_runs WHERE id = ?1", [&id], |r| {
            r.get(0)
        })
        .expect("the run's files, recorded with it");
    runs.execute("UPDATE flow_runs SET files = NULL WHERE id = ?1", [&id])
        .expect("forget them");
    drop(runs);
    let space = rusqlite::Connection::open(tenant.join("space.db")).expect("space.db");
    space
        .execute(
            "INSERT INTO run_sources (run, components) VALUES (?1, ?2)",
            [&id, &files],
        )
        .expect("the older server's record");
    drop(space);
    let server = ServerProcess::start_in(home, &[]);
    let out = server.cli(&token, &["resume", &id, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(json_of(&out)["state"], "Completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_run_resumes_it_by_itself_when_the_crashed_task_has_retries_left() {
    let (token, id, home, _dir) = kill_mid_run("slow-retried", 1);
    let server = ServerProcess::start_in(home, &[]);
    let (status, _, view) = get(&server.api(&format!("/runs/{id}?wait=60")), Some(&token)).await;
    assert_eq!(status, 200, "{view}");
    let run = &view["run"];
    assert_eq!(run["state"]["name"], "Completed", "{view}");
    let flow_states: Vec<&str> = run["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["to"].as_str().expect("state"))
        .collect();
    assert_eq!(
        flow_states,
        ["Pending", "Running", "Crashed", "Running", "Completed"],
        "{view}"
    );
    let task = |name: &str| {
        run["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .expect("task")
    };
    assert_eq!(
        task("a")["attempts"],
        1,
        "a completed task is not run again"
    );
    // b's retry is its second attempt: the crash counted as its first.
    assert_eq!(task("b")["attempts"], 2);
    assert_eq!(task("b")["state"]["name"], "Completed");
    // Killed again while b runs its last allowed attempt, it would stay Crashed: the rule is
    // the runner's (`resumes_after_crash`), tested there.
}

#[test]
fn tenant_add_takes_its_quotas_and_refuses_bad_ones_before_adding() {
    let home = tempfile::tempdir().expect("home");
    let tenant = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("tenant")
            .args(args)
            .env("SLUICE_HOME", home.path())
            .output()
            .expect("sluice tenant")
    };
    let out = tenant(&["add", "q", "--runs-per-minute", "7", "--weight", "3"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // A ceiling that is not a policy: refused, and no tenant is added.
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "[grants]\nnope = 1\n").expect("write");
    let out = tenant(&["add", "r", "--grants", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("grant ceiling"), "{}", stderr(&out));
    let list = json_of(&tenant(&["ls", "--json"]));
    let list = list.as_array().expect("list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["name"], "q");
    assert_eq!(list[0]["weight"], 3);
    assert_eq!(list[0]["quotas"]["runs_per_minute"], 7);
}

/// `sluice secret set NAME --server URL --token TOKEN` with `value` on stdin.
fn set_secret(server: &ServerProcess, token: &str, name: &str, value: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "secret",
            "set",
            name,
            "--server",
            &server.url,
            "--token",
            token,
        ])
        .env("SLUICE_HOME", server.home.join("client-home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice secret set");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(value.as_bytes())
        .expect("write the value");
    child.wait_with_output().expect("sluice secret set ends")
}

#[test]
fn secrets_are_set_on_the_server_stored_encrypted_and_read_only_where_granted() {
    use std::os::unix::fs::PermissionsExt as _;
    let home = tempfile::tempdir().expect("home").keep();
    std::fs::write(
        home.join("policy.toml"),
        "[grants]\nsecrets = [\"API_TOKEN\"]\n",
    )
    .expect("policy");
    let server = ServerProcess::start_in(home, &[]);
    let key = std::fs::metadata(server.home.join("server.key")).expect("the key file");
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    assert_eq!(key.len(), 32);
    let a = server.add_tenant("a");
    let b = server.add_tenant("b");
    let value = "s3cr3t-value-of-a";
    let out = set_secret(&server, &a, "API_TOKEN", &format!("{value}\n"));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "secret API_TOKEN set\n"
    );
    // Too short to redact, or a bad name: refused, naming why.
    let out = set_secret(&server, &a, "SHORT", "1234567");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("shorter than 8 bytes"),
        "{}",
        stderr(&out)
    );
    let out = set_secret(&server, &a, "no-dashes", "long enough value");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a secret name"),
        "{}",
        stderr(&out)
    );
    // Names only, and only the tenant's own.
    let list = json_of(&server.cli(&a, &["secret", "ls", "--json"]));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["name"], "API_TOKEN");
    assert!(list[0].get("value").is_none(), "{list}");
    assert_eq!(
        json_of(&server.cli(&b, &["secret", "ls", "--json"])),
        serde_json::json!([])
    );
    // Nowhere on disk in the clear.
    let mut files = vec![server.home.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(
                std::fs::read_dir(&path)
                    .expect("dir")
                    .map(|e| e.expect("entry").path()),
            );
        } else if let Ok(bytes) = std::fs::read(&path) {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "the secret is in the clear in {}",
                path.display()
            );
        }
    }
    // A's run reads it where granted (recorded as ***); B's run of the same flow has no value.
    let dir = tempfile::tempdir().expect("dir");
    let g = guest("grants").display().to_string();
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"secrets\"\n[tasks.t]\ncomponent = {g:?}\ninput = [{{ do = \"leak\", name = \"API_TOKEN\" }}]\n[tasks.t.grants]\nsecrets = [\"API_TOKEN\"]\n"
        ),
    );
    let flow = flow.to_str().expect("utf-8");
    let out = server.cli(&a, &["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(
        crate::support::task(&run, "t")["output"][0]["ok"],
        "***",
        "{run}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(value));
    let out = server.cli(&b, &["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("secret `API_TOKEN` is granted but has no value: set it with `sluice secret set API_TOKEN --server …`"),
        "{}",
        stderr(&out)
    );
    // Removed: gone for A's runs too.
    let out = server.cli(&a, &["secret", "rm", "API_TOKEN"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = server.cli(&a, &["secret", "rm", "API_TOKEN"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no secret named `API_TOKEN`"),
        "{}",
        stderr(&out)
    );
}

/// Server-sent events as a test reads them: (event, data, id) per event.
fn sse_events(text: &str) -> Vec<(String, Value, Option<String>)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let (mut kind, mut data, mut id) = (String::new(), String::new(), None);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event: ") {
                kind = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                data.push_str(v);
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            }
        }
        if !kind.is_empty() {
            let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
            out.push((kind, data, id));
        }
    }
    out
}

/// `a` logs two lines, `b` sleeps `ms`, then `c` logs two more.
fn talk_sleep_talk(dir: &Path, ms: u64) -> PathBuf {
    let h = guest("hostile").display().to_string();
    write_flow(
        dir,
        &format!(
            r#"name = "talky"
[tasks.a]
component = "{h}"
input = {{ do = "log", lines = 2, bytes = 8 }}
[tasks.b]
component = "{h}"
input = {{ do = "sleep", ms = {ms}, after = "$tasks.a" }}
[tasks.c]
component = "{h}"
input = {{ do = "log", lines = 2, bytes = 9, after = "$tasks.b" }}
"#
        ),
    )
}

/// The newest run of the tenant once it is live: its id.
fn live_run(server: &ServerProcess, token: &str) -> String {
    loop {
        let out = server.cli(token, &["runs", "--json"]);
        if let Some(r) = json_of(&out).as_array().and_then(|r| r.first())
            && r["live"] == true
        {
            return r["id"].as_str().expect("id").to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_events_stream_its_states_and_lines_live_then_end() {
    let server = ServerProcess::start(&[]);
    let a = server.add_tenant("a");
    let b = server.add_tenant("b");
    let dir = tempfile::tempdir().expect("dir");
    let flow = talk_sleep_talk(dir.path(), 1500);
    let mut run = server.spawn_run(&a, &flow, true, false);
    let id = {
        let (server, a) = (&server, &a);
        tokio::task::block_in_place(|| live_run(server, a))
    };
    let url = server.api(&format!("/runs/{id}/events"));
    let resp = client()
        .get(&url)
        .bearer_auth(&a)
        .send()
        .await
        .expect("events");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().expect("ascii"),
        "text/event-stream"
    );
    // The stream ends with the run.
    let text = resp.text().await.expect("the stream");
    let events = sse_events(&text);
    let (last, data, _) = events.last().expect("events");
    assert_eq!(last, "end", "{text}");
    assert_eq!(data["state"]["name"], "Completed", "{text}");
    // `b` was seen running (live), then completed; each task ends Completed.
    let states = |task: &str| -> Vec<String> {
        events
            .iter()
            .filter(|(k, d, _)| k == "task" && d["task"] == task)
            .map(|(_, d, _)| d["state"]["name"].as_str().expect("name").to_owned())
            .collect()
    };
    assert!(states("b").contains(&"Running".to_owned()), "{text}");
    for t in ["a", "b", "c"] {
        assert_eq!(
            states(t).last().map(String::as_str),
            Some("Completed"),
            "{t}: {text}"
        );
    }
    let flow_states: Vec<&Value> = events
        .iter()
        .filter(|(k, ..)| k == "flow")
        .map(|(_, d, _)| &d["state"]["name"])
        .collect();
    assert_eq!(flow_states.last().copied(), Some(&Value::from("Completed")));
    let lines: Vec<(&str, &str)> = events
        .iter()
        .filter(|(k, ..)| k == "log")
        .map(|(_, d, _)| {
            (
                d["task"].as_str().expect("task"),
                d["message"].as_str().expect("message"),
            )
        })
        .collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(
        lines.iter().map(|l| l.0).collect::<Vec<_>>(),
        ["a", "a", "c", "c"]
    );
    // Reconnecting after the last id: nothing new, the end again.
    let last_id = events
        .iter()
        .rev()
        .find_map(|(_, _, id)| id.clone())
        .expect("an event id");
    let again = client()
        .get(&url)
        .bearer_auth(&a)
        .header("Last-Event-ID", &last_id)
        .send()
        .await
        .expect("events")
        .text()
        .await
        .expect("stream");
    let kinds: Vec<String> = sse_events(&again).into_iter().map(|e| e.0).collect();
    assert_eq!(kinds, ["end"], "{again}");
    // One task's: its changes and lines only.
    let (status, _, _) = get(&format!("{url}?task=c"), Some(&a)).await;
    assert_eq!(status, 200);
    let only_c = client()
        .get(format!("{url}?task=c"))
        .bearer_auth(&a)
        .send()
        .await
        .expect("events")
        .text()
        .await
        .expect("stream");
    assert!(
        sse_events(&only_c)
            .iter()
            .all(|(k, d, _)| k == "end" || k == "flow" || d["task"] == "c"),
        "{only_c}"
    );
    // Another tenant, no token, a bad cursor, an unknown task.
    let (status, _, body) = get(&url, Some(&b)).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not-found")));
    let (status, _, _) = get(&url, None).await;
    assert_eq!(status, 401);
    let (status, _, body) = get(&format!("{url}?after=1.2"), Some(&a)).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("`1.2` is not a change cursor"),
        "{body}"
    );
    let (status, _, body) = get(&format!("{url}?task=cc"), Some(&a)).await;
    assert_eq!(status, 404);
    assert!(
        body["detail"]
            .as_str()
            .expect("detail")
            .contains("no task `cc`"),
        "{body}"
    );
    assert_eq!(run.wait().expect("run").code(), Some(0));
}

/// `max_event_streams`: 16 streams of a live run are open at once; the 17th is refused with
/// the limit's name; closing one makes room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_keeps_at_most_16_event_streams_open() {
    let server = ServerProcess::start(&[]);
    let a = server.add_tenant("a");
    let dir = tempfile::tempdir().expect("dir");
    let flow = talk_sleep_talk(dir.path(), 60_000);
    let mut run = server.spawn_run(&a, &flow, true, false);
    let id = {
        let (server, a) = (&server, &a);
        tokio::task::block_in_place(|| live_run(server, a))
    };
    // The client follows the run on a stream of its own: gone with it (the server sees it
    // closed at its next keep-alive, within a few seconds).
    run.kill().expect("kill the client");
    let _ = run.wait();
    let url = server.api(&format!("/runs/{id}/events"));
    let open = || client().get(&url).bearer_auth(&a).send();
    let open_when_free = || async {
        for _ in 0..100 {
            let resp = open().await.expect("events");
            if resp.status().as_u16() == 200 {
                return resp;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("no stream slot was freed in 10 s");
    };
    let mut streams = Vec::new();
    for _ in 0..16 {
        streams.push(open_when_free().await);
    }
    let refused = open().await.expect("events");
    assert_eq!(refused.status().as_u16(), 429);
    let body: Value = refused.json().await.expect("problem");
    assert_eq!(body["code"], "quota-exceeded");
    let detail = body["detail"].as_str().expect("detail");
    assert!(
        detail.contains("`max_event_streams`") && detail.contains("is 16"),
        "{detail}"
    );
    drop(streams.pop());
    streams.push(open_when_free().await);
    let out = server.cli(&a, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn logs_follow_prints_a_server_runs_lines_as_they_come_and_ends_with_it() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("t");
    let dir = tempfile::tempdir().expect("dir");
    let flow = talk_sleep_talk(dir.path(), 1500);
    let mut run = server.spawn_run(&token, &flow, true, false);
    let id = live_run(&server, &token);
    let out = server.cli(&token, &["logs", &id, "--follow"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Those of `c`, logged after `b` slept, too: followed, not read once.
    let tasks: Vec<&str> = stdout
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
        .collect();
    assert_eq!(tasks, ["a:", "a:", "c:", "c:"], "{stdout}");
    let out = server.cli(&token, &["logs", &id, "c", "--follow", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["task"] == "c"));
    assert_eq!(run.wait().expect("run").code(), Some(0));
}
