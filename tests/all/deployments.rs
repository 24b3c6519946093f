//! Deployments and their schedules, through the HTTP API of a server in this process whose
//! clock is a `SimClock`: the test sets the time and runs the scheduler's tick (what a real
//! server does every second), so nothing sleeps. "Restarting" drops the server and opens its
//! home again. The CLI's `deploy` and `deployments` commands against a real server process are
//! at the end.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sluice::clock::SimClock;
use sluice::server::Server;

use crate::server::{ServerProcess, stderr};
use crate::store::write_flow;
use crate::support::{guest, json_of, sandbox};

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test time")
        .with_timezone(&Utc)
}

/// A server on a simulated clock, serving its API on a loopback port.
struct Scheduled {
    home: tempfile::TempDir,
    clock: SimClock,
    server: Server,
    serving: tokio::task::JoinHandle<()>,
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Scheduled {
    async fn start(now: &str) -> Scheduled {
        let home = tempfile::tempdir().expect("home");
        let clock = SimClock::new(t(now));
        let server = open(home.path(), &clock);
        let (tenant, token) = server
            .tenants()
            .add("acme", clock_now(&clock))
            .expect("tenant");
        server.space(&tenant).expect("space");
        let (serving, base) = serve(&server).await;
        Scheduled {
            home,
            clock,
            server,
            serving,
            base,
            token,
            http: reqwest::Client::new(),
        }
    }

    /// Stop the server (as if killed: nothing is flushed but what is already written) and open
    /// its home again at the clock's time.
    async fn restart(&mut self) {
        self.serving.abort();
        let _ = (&mut self.serving).await;
        let old = std::mem::replace(&mut self.server, open(self.home.path(), &self.clock));
        drop(old);
        let (serving, base) = serve(&self.server).await;
        self.serving = serving;
        self.base = base;
    }

    /// Set the time and run one tick of the scheduler.
    async fn at(&self, now: &str) {
        self.clock.set(t(now));
        self.server.tick().await;
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Deploy `schedule` (the `[schedule]` table's body) of a one-task flow (add_one of its
    /// parameter `x`); the deployment's view.
    async fn deploy(&self, name: &str, schedule: &str) -> Value {
        let bytes = std::fs::read(guest("add_one")).expect("add_one");
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let put = self
            .http
            .put(format!("{}/api/v1/components/{digest}", self.base))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await
            .expect("upload");
        assert!(put.status().is_success(), "{}", put.status());
        let manifest = format!(
            "name = \"nightly\"\n[parameters]\nx = 1\n[tasks.add]\ncomponent = \"add_one.wasm\"\n\
             input = \"$params.x\"\n[schedule]\n{schedule}\n"
        );
        let (status, view) = self
            .call(
                reqwest::Method::POST,
                "/deployments",
                Some(json!({
                    "name": name,
                    "manifest": manifest,
                    "manifest_path": "nightly.toml",
                    "components": { "add_one.wasm": digest },
                })),
            )
            .await;
        assert_eq!(status, 201, "{view}");
        view
    }

    /// The deployment's slots: (time, state) of the upcoming ones and of the past ones.
    async fn slots(&self, name: &str) -> (Vec<(String, String)>, Vec<(String, String)>, Value) {
        let (status, runs) = self
            .call(
                reqwest::Method::GET,
                &format!("/deployments/{name}/runs?limit=100"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{runs}");
        let list = |key: &str| {
            runs[key]
                .as_array()
                .expect("slots")
                .iter()
                .map(|s| {
                    let at = t(s["at"].as_str().expect("at"));
                    (
                        at.format("%m-%dT%H:%M").to_string(),
                        s["state"].as_str().expect("state").to_owned(),
                    )
                })
                .collect::<Vec<_>>()
        };
        (list("upcoming"), list("past"), runs)
    }

    /// Wait (on the server, up to a minute) until run `id` ends; its record.
    async fn finished(&self, id: &str) -> Value {
        let (status, view) = self
            .call(reqwest::Method::GET, &format!("/runs/{id}?wait=60"), None)
            .await;
        assert_eq!(status, 200, "{view}");
        view
    }

    /// Every flow run the tenant has.
    async fn run_count(&self) -> usize {
        let (_, runs) = self
            .call(reqwest::Method::GET, "/runs?limit=1000", None)
            .await;
        runs.as_array().expect("runs").len()
    }
}

fn clock_now(clock: &SimClock) -> DateTime<Utc> {
    use sluice::clock::Clock as _;
    clock.now()
}

fn open(home: &std::path::Path, clock: &SimClock) -> Server {
    Server::open_with_clock(home, sandbox().clone(), 2, Arc::new(clock.clone())).expect("server")
}

async fn serve(server: &Server) -> (tokio::task::JoinHandle<()>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let base = format!("http://{}", listener.local_addr().expect("address"));
    let router = server.router();
    let serving = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (serving, base)
}

fn history(run: &Value) -> Vec<String> {
    run["run"]["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["to"].as_str().expect("state").to_owned())
        .collect()
}

fn states(slots: &[(String, String)]) -> Vec<String> {
    slots.iter().map(|(at, s)| format!("{at} {s}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn cron_slots_follow_the_wall_clock_of_their_zone_across_a_dst_change() {
    // Berlin springs forward on Sunday 2026-03-29: 06:00 is 05:00 UTC before, 04:00 after.
    let s = Scheduled::start("2026-03-27T12:00:00Z").await;
    let view = s
        .deploy(
            "daily",
            "cron = \"0 6 * * *\"\ntimezone = \"Europe/Berlin\"",
        )
        .await;
    assert_eq!(
        view["upcoming"],
        json!([
            "2026-03-28T05:00:00Z",
            "2026-03-29T04:00:00Z",
            "2026-03-30T04:00:00Z"
        ]),
        "{view}"
    );
    assert_eq!(view["schedule"], "cron \"0 6 * * *\" (Europe/Berlin)");
    s.at("2026-03-27T12:00:01Z").await;
    let (upcoming, past, _) = s.slots("daily").await;
    assert_eq!(
        states(&upcoming),
        [
            "03-28T05:00 Scheduled",
            "03-29T04:00 Scheduled",
            "03-30T04:00 Scheduled"
        ]
    );
    assert!(past.is_empty());
    // A second before its time nothing starts; at its time it does.
    s.at("2026-03-28T04:59:59Z").await;
    assert_eq!(s.run_count().await, 0);
    s.at("2026-03-28T05:00:00Z").await;
    s.at("2026-03-29T04:00:00Z").await;
    let (upcoming, _, runs) = s.slots("daily").await;
    assert_eq!(upcoming[0].0, "03-30T04:00");
    let past = runs["past"].as_array().expect("past");
    assert_eq!(past.len(), 2, "{runs}");
    for (slot, at) in past
        .iter()
        .zip(["2026-03-29T04:00:00Z", "2026-03-28T05:00:00Z"])
    {
        assert_eq!(slot["at"], at);
        let run = s.finished(slot["run"].as_str().expect("a run")).await;
        assert_eq!(run["run"]["state"]["name"], "Completed", "{run}");
        // On time: never Late.
        assert_eq!(
            history(&run),
            ["Scheduled", "Pending", "Running", "Completed"]
        );
        assert_eq!(run["run"]["context"]["scheduled_start"], t(at).to_rfc3339());
        assert_eq!(run["run"]["tasks"][0]["output"], 2, "{run}");
    }
    // The deployment's list says how its runs ended (read by their ids).
    let (_, past, _) = s.slots("daily").await;
    assert_eq!(
        past,
        [
            ("03-29T04:00".to_owned(), "Completed".to_owned()),
            ("03-28T05:00".to_owned(), "Completed".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_is_late_after_fifteen_seconds_and_a_paused_deployment_starts_nothing() {
    let s = Scheduled::start("2026-12-01T10:00:00Z").await;
    s.deploy(
        "every10",
        "interval = \"10m\"\ncatchup = \"all\"\nparameters = { x = 41 }",
    )
    .await;
    s.at("2026-12-01T10:00:00Z").await;
    let (status, paused) = s
        .call(reqwest::Method::POST, "/deployments/every10/pause", None)
        .await;
    assert_eq!((status, &paused["paused"]), (200, &json!(true)), "{paused}");
    assert_eq!(
        paused["upcoming"],
        json!([]),
        "a paused deployment has no next runs"
    );
    // Exactly 15 s after its time the slot is not Late yet; a second later it is.
    s.at("2026-12-01T10:10:15Z").await;
    let (upcoming, _, _) = s.slots("every10").await;
    assert_eq!(upcoming[0], ("12-01T10:10".into(), "Scheduled".into()));
    s.at("2026-12-01T10:10:16Z").await;
    let (upcoming, past, runs) = s.slots("every10").await;
    assert_eq!(upcoming[0], ("12-01T10:10".into(), "Late".into()));
    assert!(
        runs["upcoming"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("the deployment is paused")),
        "{runs}"
    );
    assert!(past.is_empty());
    assert_eq!(s.run_count().await, 0, "a paused deployment starts nothing");
    // Resumed (catchup = all): the late slot and 10:20 (missed while paused) start.
    s.clock.set(t("2026-12-01T10:25:00Z"));
    let (status, _) = s
        .call(reqwest::Method::POST, "/deployments/every10/resume", None)
        .await;
    assert_eq!(status, 200);
    s.server.tick().await;
    let (upcoming, past, runs) = s.slots("every10").await;
    assert_eq!(past.len(), 2, "{runs}");
    assert_eq!(upcoming[0].0, "12-01T10:30");
    let first = s
        .finished(runs["past"][1]["run"].as_str().expect("run"))
        .await;
    assert_eq!(runs["past"][1]["at"], "2026-12-01T10:10:00Z");
    assert_eq!(
        history(&first),
        ["Scheduled", "Late", "Pending", "Running", "Completed"],
        "{first}"
    );
    assert_eq!(
        first["run"]["tasks"][0]["output"], 42,
        "the schedule's parameters"
    );
}

/// Slots every 10 minutes from 10:00; the server records the next hour's at 10:00 and is down
/// from 10:05 to 10:47: 10:10, 10:20, 10:30 and 10:40 are missed.
async fn after_outage(catchup: &str) -> (Scheduled, Vec<String>) {
    let mut s = Scheduled::start("2026-12-01T10:00:00Z").await;
    s.deploy("etl", &format!("interval = \"10m\"\ncatchup = {catchup}"))
        .await;
    s.at("2026-12-01T10:00:00Z").await;
    s.at("2026-12-01T10:05:00Z").await;
    s.clock.set(t("2026-12-01T10:47:00Z"));
    s.restart().await;
    s.server.tick().await;
    let (upcoming, past, _) = s.slots("etl").await;
    assert!(upcoming.iter().all(|(at, _)| at.as_str() > "12-01T10:47"));
    let mut past = states(&past);
    past.reverse();
    for p in &mut past {
        // A started run's state is its run's, Pending to Completed depending on the moment.
        if !p.ends_with("Cancelled") {
            *p = format!("{} started", &p[..11]);
        }
    }
    (s, past)
}

#[tokio::test(flavor = "multi_thread")]
async fn catchup_all_starts_every_missed_slot_after_a_restart() {
    let (s, past) = after_outage("\"all\"").await;
    assert_eq!(
        past,
        [
            "12-01T10:10 started",
            "12-01T10:20 started",
            "12-01T10:30 started",
            "12-01T10:40 started"
        ]
    );
    assert_eq!(s.run_count().await, 4);
    // Each run's context names its deployment and its slot's time; the runs list finds them
    // by deployment (all four were recorded at 10:00, when their slots were: in any order).
    let (status, runs) = s
        .call(reqwest::Method::GET, "/runs?deployment=etl&limit=10", None)
        .await;
    assert_eq!(status, 200, "{runs}");
    let ids: Vec<&str> = runs
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| r["id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids.len(), 4, "{runs}");
    let mut slots = Vec::new();
    for id in ids {
        let run = s.finished(id).await;
        assert_eq!(run["run"]["context"]["deployment"], "etl", "{run}");
        slots.push(run["run"]["context"]["scheduled_start"].to_string());
    }
    slots.sort();
    assert_eq!(
        slots,
        ["10:10", "10:20", "10:30", "10:40"].map(|t| format!("\"2026-12-01T{t}:00+00:00\""))
    );
    let (_, none) = s
        .call(reqwest::Method::GET, "/runs?deployment=other", None)
        .await;
    assert_eq!(none, serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn catchup_none_skips_every_missed_slot_after_a_restart() {
    let (s, past) = after_outage("\"none\"").await;
    assert_eq!(
        past,
        [
            "12-01T10:10 Cancelled",
            "12-01T10:20 Cancelled",
            "12-01T10:30 Cancelled",
            "12-01T10:40 Cancelled"
        ]
    );
    assert_eq!(s.run_count().await, 0);
    let (_, _, runs) = s.slots("etl").await;
    assert!(
        runs["past"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("catchup = none")),
        "{runs}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn catchup_n_starts_the_latest_n_missed_slots_after_a_restart() {
    let (s, past) = after_outage("2").await;
    assert_eq!(
        past,
        [
            "12-01T10:10 Cancelled",
            "12-01T10:20 Cancelled",
            "12-01T10:30 started",
            "12-01T10:40 started"
        ]
    );
    assert_eq!(s.run_count().await, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_never_fires_twice_across_restarts() {
    let mut s = Scheduled::start("2026-12-01T10:00:00Z").await;
    s.deploy("once", "interval = \"10m\"\ncatchup = \"all\"")
        .await;
    s.at("2026-12-01T10:00:00Z").await;
    s.at("2026-12-01T10:10:00Z").await;
    let (_, past, runs) = s.slots("once").await;
    assert_eq!(past.len(), 1);
    let id = runs["past"][0]["run"].as_str().expect("run").to_owned();
    s.finished(&id).await;
    // A restart at the same moment: the slot is not started again.
    s.restart().await;
    s.server.tick().await;
    assert_eq!(s.run_count().await, 1);
    // The server died after starting the run but before recording that it had: the slot still
    // reads Scheduled. The run store has the run, so it is not started again either.
    let db = s.home.path().join("tenants");
    let dir = std::fs::read_dir(&db)
        .expect("tenants")
        .next()
        .expect("a tenant")
        .expect("entry")
        .path();
    s.serving.abort();
    let conn = rusqlite::Connection::open(dir.join("space.db")).expect("db");
    let changed = conn
        .execute("UPDATE slots SET state = 'Scheduled' WHERE run = ?1", [&id])
        .expect("update");
    assert_eq!(changed, 1);
    drop(conn);
    s.restart().await;
    s.server.tick().await;
    assert_eq!(s.run_count().await, 1, "the slot fired twice");
    let (_, past, runs) = s.slots("once").await;
    assert_eq!(past.len(), 1, "{runs}");
    assert_eq!(runs["past"][0]["run"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_needs_a_schedule_and_a_valid_one() {
    let s = Scheduled::start("2026-12-01T10:00:00Z").await;
    let refused = |manifest: &'static str| {
        let s = &s;
        async move {
            let (status, problem) = s
                .call(
                    reqwest::Method::POST,
                    "/deployments",
                    Some(json!({
                        "manifest": manifest,
                        "manifest_path": "x.toml",
                        "components": {},
                    })),
                )
                .await;
            assert_eq!(status, 422, "{problem}");
            problem["detail"].as_str().expect("detail").to_owned()
        }
    };
    let detail = refused("name = \"x\"\n").await;
    assert!(detail.contains("no `[schedule]`"), "{detail}");
    let detail =
        refused("name = \"x\"\n[schedule]\ncron = \"0 6 * * *\"\ntimezone = \"Mars/Olympus\"\n")
            .await;
    assert!(
        detail.starts_with("x.toml:4:12:")
            && detail.contains("\"Mars/Olympus\" is not a time zone"),
        "{detail}"
    );
    let (status, _) = s
        .call(reqwest::Method::GET, "/deployments/nothing/runs", None)
        .await;
    assert_eq!(status, 404);
}

/// The CLI against a real server process: deploy, list, pause, resume, runs, remove; another
/// tenant sees none of it.
#[test]
fn the_cli_deploys_and_manages_deployments_on_a_server() {
    let server = ServerProcess::start(&[]);
    let token = server.add_tenant("acme");
    let other = server.add_tenant("other");
    let dir = tempfile::tempdir().expect("dir");
    let add_one = guest("add_one").display().to_string();
    let flow: PathBuf = write_flow(
        dir.path(),
        &format!(
            "name = \"report\"\n[parameters]\nx = 1\n[tasks.add]\ncomponent = \"{add_one}\"\n\
             input = \"$params.x\"\n[schedule]\ncron = \"0 6 1 1 *\"\ntimezone = \"America/New_York\"\n\
             catchup = \"none\"\n"
        ),
    );
    let flow = flow.to_str().expect("path");
    let out = server.cli(&token, &["deploy", flow, "--name", "yearly"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("yearly  flow report  cron \"0 6 1 1 *\" (America/New_York)")
            && text.contains("catchup none, late after 15s")
            && text.contains("next 2027-01-01T11:00:00+00:00"),
        "{text}"
    );
    let out = server.cli(&token, &["deployments", "ls", "--json"]);
    let list = json_of(&out);
    assert_eq!(list[0]["name"], "yearly", "{list}");
    let out = server.cli(&token, &["deployments", "pause", "yearly"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PAUSED"));
    let out = server.cli(&token, &["deployments", "resume", "yearly"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("PAUSED"));
    // Deploying recorded the next slots.
    let out = server.cli(&token, &["deployments", "runs", "yearly", "--json"]);
    let runs = json_of(&out);
    assert_eq!(runs["upcoming"].as_array().map(Vec::len), Some(3), "{runs}");
    assert_eq!(runs["upcoming"][0]["state"], "Scheduled");
    assert_eq!(runs["upcoming"][0]["at"], "2027-01-01T11:00:00Z");
    let out = server.cli(&token, &["deployments", "runs", "yearly"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2027-01-01T11:00:00+00:00 Scheduled"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Another tenant: nothing there, and not by name either.
    let out = server.cli(&other, &["deployments", "ls"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no deployments\n");
    let out = server.cli(&other, &["deployments", "runs", "yearly"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no deployment named `yearly`"),
        "{}",
        stderr(&out)
    );
    let out = server.cli(&token, &["deployments", "rm", "yearly"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = server.cli(&token, &["deployments", "ls"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no deployments\n");
    // No schedule, or no server: refused with the reason.
    let plain = write_flow(
        dir.path(),
        &format!("name = \"plain\"\n[tasks.add]\ncomponent = \"{add_one}\"\ninput = 1\n"),
    );
    let out = server.cli(&token, &["deploy", plain.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("has no `[schedule]` table"),
        "{}",
        stderr(&out)
    );
    let out = crate::support::sluice(dir.path(), &["deployments", "ls"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("needs a server"), "{}", stderr(&out));
}
