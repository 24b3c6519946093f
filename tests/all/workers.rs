//! `sluice worker`: task runs of a server on PostgreSQL (`--database URL --workers`) run by
//! worker processes, through the CLI as users start them. A 2,000-task map on three workers
//! with one SIGKILLed mid-run; a worker stopped (SIGSTOP) past its lease whose late result is
//! refused; PostgreSQL restarted mid-run; a cancel reaching a running worker; a bad worker
//! token.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::postgres::pg::PgCluster;
use crate::server::{ServerProcess, stderr};
use crate::server_postgres::admin;
use crate::store::write_flow;
use crate::support::{guest, history, json_of, task};

/// The last line of a successful admin command: a token.
fn token_of(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("a token line")
        .to_owned()
}

/// A server on a new database of `cluster` giving task runs to workers (claims leased for
/// `lease`), a tenant's token, and a worker token.
fn setup(cluster: &PgCluster, hint: &str, lease: &str) -> (ServerProcess, String, String) {
    let url = cluster.database(hint);
    let tenant = token_of(&admin(&url, &["tenant", "add", "acme"]));
    let worker = token_of(&admin(&url, &["worker-token", "add", "rack-1"]));
    let server = ServerProcess::start(&["--database", &url, "--workers", "--worker-lease", lease]);
    (server, tenant, worker)
}

/// A `sluice worker` process, killed when dropped; its log in `<dir>/worker.log`.
struct WorkerProcess {
    child: Child,
    dir: PathBuf,
}

impl WorkerProcess {
    fn start(server: &ServerProcess, token: &str, concurrency: u32) -> WorkerProcess {
        Self::start_with(server, token, concurrency, &[])
    }

    fn start_with(
        server: &ServerProcess,
        token: &str,
        concurrency: u32,
        args: &[&str],
    ) -> WorkerProcess {
        let dir = tempfile::tempdir().expect("worker dir").keep();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["worker", "--server", &server.url, "--token", token])
            .args(["--concurrency", &concurrency.to_string()])
            .args(args)
            .arg("--dir")
            .arg(dir.join("components"))
            .env("SLUICE_HOME", dir.join("home"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("worker.log")).expect("worker.log"))
            .spawn()
            .expect("start sluice worker");
        WorkerProcess { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal the worker");
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's worker queue statistics (worker token `token`).
fn stats(server: &ServerProcess, token: &str) -> Value {
    call(server, token, "/worker/stats", None)
}

/// A call of the worker API as a worker makes it: GET, or POST with `body`.
fn call(server: &ServerProcess, token: &str, path: &str, body: Option<Value>) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = crate::server::client();
        let request = match body {
            Some(b) => client.post(server.api(path)).json(&b),
            None => client.get(server.api(path)),
        };
        let response = request.bearer_auth(token).send().await.expect("call");
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json::<Value>().await.expect("JSON")
    })
}

/// Wait for `child` (at most `limit`), its output (read as it comes: a large run's JSON fills
/// a pipe); a run that does not end is a failure that says what the server and the workers
/// logged.
fn finish(
    child: Child,
    limit: Duration,
    server: &ServerProcess,
    workers: &[&WorkerProcess],
) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("output"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "the run did not end within {limit:?}\nserver: {}\nworkers: {logs:#?}",
                std::fs::read_to_string(server.home.join("server.log")).unwrap_or_default()
            );
        }
    }
}

/// Wait (at most `secs`) until the server's queue statistic `key` reaches `n`; `what` says
/// what did not happen when it does not.
fn wait_for(server: &ServerProcess, worker: &str, key: &str, n: u64, what: &str, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = stats(server, worker);
        if s[key].as_u64().unwrap_or(0) >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The id of the tenant's first run, once the list shows it (its record is written in the
/// store's next group commit).
fn first_run(server: &ServerProcess, tenant: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let runs = json_of(&server.cli(tenant, &["runs", "--json"]));
        if let Some(id) = runs[0]["id"].as_str() {
            return id.to_owned();
        }
        assert!(Instant::now() < deadline, "no run listed: {runs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A flow mapping the hostile guest's sleep over `n` inputs (child `i` sleeps `ms + i % 5` ms
/// and outputs that), retried twice.
fn sleep_map(dir: &Path, n: usize, ms: u64) -> PathBuf {
    let hostile = guest("hostile").display().to_string();
    let items: Vec<String> = (0..n)
        .map(|i| format!("{{ do = \"sleep\", ms = {} }}", ms + (i % 5) as u64))
        .collect();
    write_flow(
        dir,
        &format!(
            r#"
name = "worker-map"
[parameters]
items = [{}]
[tasks.nap]
component = "{hostile}"
input = "$params.items"
map = true
retries = 2
"#,
            items.join(", ")
        ),
    )
}

/// Child `i` of `run`'s mapped task `nap`, its output what it slept; for each child, its
/// history.
fn check_children(run: &Value, n: usize, ms: u64) -> Vec<Vec<String>> {
    let children = task(run, "nap")["children"]
        .as_array()
        .expect("children")
        .clone();
    assert_eq!(children.len(), n);
    children
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["state"], "Completed", "child {i}: {c:#}");
            assert_eq!(c["output"], ms + (i % 5) as u64, "child {i}: {c:#}");
            let h = history(c);
            assert_eq!(
                h.iter().filter(|s| *s == "Completed").count(),
                1,
                "child {i} completed once: {h:?}"
            );
            h
        })
        .collect()
}

#[test]
fn a_killed_worker_s_task_runs_crash_and_run_again_on_the_others() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_kill", "3s");
    let workers: Vec<WorkerProcess> = (0..3)
        .map(|_| WorkerProcess::start(&server, &worker, 4))
        .collect();
    let dir = tempfile::tempdir().expect("dir");
    let (n, ms) = (2000, 10);
    let flow = sleep_map(dir.path(), n, ms);
    let client = server.spawn_run(&tenant, &flow, true, true);
    // Mid-run: a few hundred results in, then one worker is killed holding its claims.
    wait_for(&server, &worker, "finished", 300, "no progress", 120);
    let mut workers = workers.into_iter();
    let mut killed = workers.next().expect("a worker");
    killed.child.kill().expect("SIGKILL");
    let _ = killed.child.wait();
    let rest: Vec<WorkerProcess> = workers.collect();
    let out = finish(
        client,
        Duration::from_secs(300),
        &server,
        &rest.iter().collect::<Vec<_>>(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed");
    let histories = check_children(&run, n, ms);
    // The killed worker's attempts: Crashed, then run again (and completed once).
    let crashed: Vec<&Vec<String>> = histories
        .iter()
        .filter(|h| h.iter().any(|s| s == "Crashed"))
        .collect();
    assert!(!crashed.is_empty(), "the killed worker held claims");
    assert!(
        crashed.len() <= 4,
        "at most its concurrency: {}",
        crashed.len()
    );
    for h in &crashed {
        let at = h.iter().position(|s| s == "Crashed").expect("crashed");
        assert_eq!(
            &h[at..],
            ["Crashed", "AwaitingRetry", "Retrying", "Completed"],
            "{h:?}"
        );
    }
    let s = stats(&server, &worker);
    assert_eq!(s["lapsed"].as_u64(), Some(crashed.len() as u64), "{s}");
    assert_eq!(s["finished"].as_u64(), Some(n as u64), "{s}");
}

#[test]
fn a_stopped_worker_s_late_result_is_refused() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_stop", "3s");
    let stale = WorkerProcess::start(&server, &worker, 1);
    let dir = tempfile::tempdir().expect("dir");
    let flow = sleep_map(dir.path(), 1, 1500);
    let client = server.spawn_run(&tenant, &flow, true, true);
    // The stale worker claims the only attempt, then is stopped past its lease.
    wait_for(&server, &worker, "claimed", 1, "never claimed", 60);
    stale.signal(nix::sys::signal::Signal::SIGSTOP);
    // Taken back and recorded Crashed; the retry goes to a fresh worker and completes.
    wait_for(&server, &worker, "lapsed", 1, "the claim never lapsed", 60);
    let fresh = WorkerProcess::start(&server, &worker, 1);
    let out = finish(client, Duration::from_secs(60), &server, &[&fresh]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    let h = &check_children(&run, 1, 1500)[0];
    assert_eq!(
        h,
        &[
            "Pending",
            "Running",
            "Crashed",
            "AwaitingRetry",
            "Retrying",
            "Completed"
        ],
        "{run:#}"
    );
    // Resumed, the stale worker finishes its attempt and reports it: refused, nothing changes.
    stale.signal(nix::sys::signal::Signal::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats(&server, &worker)["refused"].as_u64().unwrap_or(0) < 1
        && !stale.log().contains("lapsed")
    {
        assert!(
            Instant::now() < deadline,
            "the stale worker never reported: {}",
            stale.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = run["id"].as_str().expect("id");
    let again = json_of(&server.cli(&tenant, &["show", id, "--json"]));
    assert_eq!(
        history(&task(&again, "nap")["children"][0]),
        *h,
        "the late result changed nothing"
    );
    let child = &task(&again, "nap")["children"][0];
    assert_eq!(child["attempts"], 2, "{child:#}");
}

/// The fence, through the API itself: a claim taken and never extended lapses; the retry runs
/// on a worker and completes; the stale claim's report (another output) and extension are
/// refused, and the recorded run does not change.
#[test]
fn a_lapsed_claim_cannot_overwrite_the_newer_attempt() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_fence", "3s");
    let dir = tempfile::tempdir().expect("dir");
    let flow = sleep_map(dir.path(), 1, 10);
    let client = server.spawn_run(&tenant, &flow, true, true);
    let claimed = call(
        &server,
        &worker,
        "/worker/claim",
        Some(serde_json::json!({
            "instance": "stale", "max": 1, "concurrency": 1, "wait_ms": 20000
        })),
    );
    let claim = claimed["jobs"][0]["claim"].clone();
    assert_eq!(claim["attempt"], 1, "{claimed}");
    wait_for(&server, &worker, "lapsed", 1, "the claim never lapsed", 60);
    let fresh = WorkerProcess::start(&server, &worker, 1);
    let out = finish(client, Duration::from_secs(60), &server, &[&fresh]);
    let run = json_of(&out);
    let h = check_children(&run, 1, 10).remove(0);
    let late = serde_json::json!({
        "instance": "stale",
        "results": [{
            "claim": claim,
            "outcome": {
                "ending": {"kind": "output", "json": "999"},
                "logs": [],
                "logs_dropped_bytes": 0,
                "usage": {
                    "fuel_consumed": 0,
                    "duration": {"secs": 0, "nanos": 0},
                    "memory_peak_bytes": 0
                }
            }
        }]
    });
    let answer = call(&server, &worker, "/worker/finish", Some(late));
    assert_eq!(answer["accepted"], serde_json::json!([false]), "{answer}");
    let answer = call(
        &server,
        &worker,
        "/worker/extend",
        Some(serde_json::json!({"instance": "stale", "claims": [claim]})),
    );
    assert_eq!(answer["held"], serde_json::json!([false]), "{answer}");
    let id = run["id"].as_str().expect("id");
    let again = json_of(&server.cli(&tenant, &["show", id, "--json"]));
    let child = &task(&again, "nap")["children"][0];
    assert_eq!(child["output"], 10, "{child:#}");
    assert_eq!(child["attempts"], 2, "{child:#}");
    assert_eq!(history(child), h);
}

/// A cancel with no worker to hear it: the attempts waiting in the queue leave it Cancelled.
#[test]
fn a_cancel_takes_back_attempts_no_worker_claimed() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_unclaimed", "5s");
    let dir = tempfile::tempdir().expect("dir");
    let flow = sleep_map(dir.path(), 3, 10);
    let client = server.spawn_run(&tenant, &flow, true, true);
    wait_for(&server, &worker, "enqueued", 1, "nothing enqueued", 60);
    let id = first_run(&server, &tenant);
    let out = server.cli(&tenant, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = finish(client, Duration::from_secs(30), &server, &[]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Cancelled", "{run:#}");
    for c in task(&run, "nap")["children"].as_array().expect("children") {
        assert_eq!(c["state"], "Cancelled", "{c:#}");
    }
    assert_eq!(stats(&server, &worker)["claimed"], 0);
}

#[test]
fn postgresql_restarted_mid_run_the_run_completes() {
    let cluster = PgCluster::start();
    let (server, tenant, worker) = setup(&cluster, "workers_restart", "5s");
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|_| WorkerProcess::start(&server, &worker, 4))
        .collect();
    let dir = tempfile::tempdir().expect("dir");
    let (n, ms) = (300, 20);
    let flow = sleep_map(dir.path(), n, ms);
    let client = server.spawn_run(&tenant, &flow, true, true);
    wait_for(&server, &worker, "finished", 50, "no progress", 120);
    cluster.stop();
    std::thread::sleep(Duration::from_secs(2));
    cluster.resume();
    let out = finish(
        client,
        Duration::from_secs(180),
        &server,
        &workers.iter().collect::<Vec<_>>(),
    );
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}\n{}", stderr(&out));
    // Unnoticed by the runs: no claim lapsed, no attempt crashed.
    let histories = check_children(&run, n, ms);
    assert!(
        histories.iter().all(|h| !h.iter().any(|s| s == "Crashed")),
        "{histories:?}"
    );
    assert_eq!(stats(&server, &worker)["lapsed"], 0);
}

#[test]
fn a_cancel_reaches_the_worker_running_the_task() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_cancel", "5s");
    let w = WorkerProcess::start(&server, &worker, 2);
    let dir = tempfile::tempdir().expect("dir");
    let flow = sleep_map(dir.path(), 2, 60_000);
    let client = server.spawn_run(&tenant, &flow, true, true);
    wait_for(&server, &worker, "claimed", 2, "never claimed", 60);
    let id = first_run(&server, &tenant);
    let out = server.cli(&tenant, &["cancel", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // Stopped on the worker (within a second's extension), not after its minute of sleep.
    let out = finish(client, Duration::from_secs(30), &server, &[&w]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Cancelled", "{run:#}");
    for c in task(&run, "nap")["children"].as_array().expect("children") {
        assert_eq!(c["state"], "Cancelled", "{c:#}");
    }
}

#[test]
fn a_worker_with_a_bad_token_or_no_worker_server_stops_saying_why() {
    let (server, _tenant, _worker) = setup(PgCluster::shared(), "workers_token", "5s");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["worker", "--server", &server.url, "--token", "sluice_nope"])
        .output()
        .expect("worker");
    refused(&out, "refused the worker token");
    // A server that runs its task runs itself has no worker API.
    let local = ServerProcess::start(&[]);
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["worker", "--server", &local.url, "--token", "sluice_nope"])
        .output()
        .expect("worker");
    refused(&out, "does not give task runs to workers");
}

/// `--worker-lease` at its least (3s, as the other tests use) serves; one second less is refused
/// naming the flag; a second server giving the same database's task runs to workers is refused.
#[test]
fn a_lease_under_three_seconds_and_a_second_worker_server_are_refused() {
    let url = PgCluster::shared().database("workers_refused");
    let _first = ServerProcess::start(&["--database", &url, "--workers", "--worker-lease", "3s"]);
    let serve = |lease: &str| {
        let home = tempfile::tempdir().expect("home");
        Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["server", "--listen", "127.0.0.1:0", "--database", &url])
            .args(["--workers", "--worker-lease", lease])
            .env("SLUICE_HOME", home.path())
            .output()
            .expect("sluice server")
    };
    let out = serve("2s");
    refused(&out, "--worker-lease 2s: at least 3s");
    let out = serve("3s");
    refused(
        &out,
        "another server already gives this database's task runs to workers",
    );
}

/// A task run on a worker sees its whole context: the flow run's parameters (sent once per
/// claim), its names and ids, its map index and the flow's `[context]` keys.
#[test]
fn a_task_on_a_worker_sees_its_context() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_context", "5s");
    let _w = WorkerProcess::start(&server, &worker, 2);
    let dir = tempfile::tempdir().expect("dir");
    let hostile = guest("hostile").display().to_string();
    let flow = write_flow(
        dir.path(),
        &format!(
            r#"
name = "worker-context"
[parameters]
items = [{{ do = "context", keys = ["team"] }}, {{ do = "context", keys = ["team"] }}]
label = "ünïcode ✓"
[context]
team = "data"
[tasks.look]
component = "{hostile}"
input = "$params.items"
map = true
"#
        ),
    );
    let client = server.spawn_run(&tenant, &flow, true, true);
    let out = finish(client, Duration::from_secs(60), &server, &[]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    for (i, c) in task(&run, "look")["children"]
        .as_array()
        .expect("children")
        .iter()
        .enumerate()
    {
        let seen = &c["output"];
        assert_eq!(seen["parameters"]["Ok"]["label"], "ünïcode ✓", "{seen:#}");
        assert_eq!(
            seen["parameters"]["Ok"]["items"].as_array().map(Vec::len),
            Some(2),
            "{seen:#}"
        );
        assert_eq!(seen["map_index"], i, "{seen:#}");
        assert_eq!(seen["task_name"], "look", "{seen:#}");
        assert_eq!(seen["flow_run_id"], run["id"], "{seen:#}");
        assert_eq!(seen["task_run_id"], c["id"], "{seen:#}");
        assert_eq!(seen["attempt"], 1, "{seen:#}");
        assert_eq!(seen["get"]["team"], "data", "{seen:#}");
    }
}

/// A tenant's `max_running_tasks` holds across workers (decided by the server's fair queue
/// before anything is enqueued): six 500 ms task runs under a quota of 2, on a worker that
/// could run all six at once, take three waves. (A lower bound on time: a slower machine
/// cannot make it pass wrongly.)
#[test]
fn a_tenant_s_running_quota_holds_across_workers() {
    let url = PgCluster::shared().database("workers_quota");
    let tenant = token_of(&admin(
        &url,
        &["tenant", "add", "acme", "--max-running-tasks", "2"],
    ));
    let worker = token_of(&admin(&url, &["worker-token", "add", "rack-1"]));
    let server = ServerProcess::start(&["--database", &url, "--workers", "--worker-lease", "5s"]);
    let w = WorkerProcess::start(&server, &worker, 6);
    let dir = tempfile::tempdir().expect("dir");
    let (n, ms) = (6, 500);
    let flow = sleep_map(dir.path(), n, ms);
    let client = server.spawn_run(&tenant, &flow, true, true);
    let out = finish(client, Duration::from_secs(60), &server, &[&w]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    check_children(&run, n, ms);
    let times: Vec<chrono::DateTime<chrono::Utc>> = task(&run, "nap")["children"]
        .as_array()
        .expect("children")
        .iter()
        .flat_map(|c| c["history"].as_array().expect("history").clone())
        .filter_map(|t| t["time"].as_str().and_then(|s| s.parse().ok()))
        .collect();
    let span = *times.iter().max().expect("times") - *times.iter().min().expect("times");
    assert!(
        span >= chrono::TimeDelta::milliseconds(3 * 500 - 50),
        "six 500 ms task runs, two at a time, took {span}"
    );
}

/// `worker_tags` route: a task asking for `gpu` waits while only an untagged worker runs (which
/// runs the untagged task), and runs once a worker carrying `gpu` comes.
#[test]
fn worker_tags_route_task_runs_to_workers_carrying_them() {
    let (server, tenant, worker) = setup(PgCluster::shared(), "workers_tags", "5s");
    let plain = WorkerProcess::start(&server, &worker, 4);
    let dir = tempfile::tempdir().expect("dir");
    let hostile = guest("hostile").display().to_string();
    let flow = write_flow(
        dir.path(),
        &format!(
            r#"
name = "worker-tags"
[tasks.anywhere]
component = "{hostile}"
input = {{ do = "sleep", ms = 1 }}
[tasks.gpu]
component = "{hostile}"
input = {{ do = "sleep", ms = 2 }}
worker_tags = ["gpu"]
"#
        ),
    );
    let client = server.spawn_run(&tenant, &flow, true, true);
    wait_for(
        &server,
        &worker,
        "finished",
        1,
        "the untagged task never ran",
        60,
    );
    // Offered for a while (each claim of the plain worker passes it by): never claimed.
    std::thread::sleep(Duration::from_millis(1500));
    let s = stats(&server, &worker);
    assert_eq!(
        (s["enqueued"].as_u64(), s["claimed"].as_u64()),
        (Some(2), Some(1)),
        "{s}"
    );
    let gpu = WorkerProcess::start_with(&server, &worker, 1, &["--tags", "gpu,cuda"]);
    let out = finish(client, Duration::from_secs(60), &server, &[&plain, &gpu]);
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    assert_eq!(task(&run, "gpu")["output"], 2);
}

/// The server killed with `kill -9` while a worker runs its attempts, and started again over the
/// same home, database and address: the worker keeps running and reports once the server is
/// back; the new server took back its predecessor's attempts (those reports are refused) and
/// resumed the run (its task runs have a retry left), which the same worker completes.
#[test]
fn a_worker_outlives_a_server_restart_and_the_resumed_run_completes() {
    let url = PgCluster::shared().database("workers_server_restart");
    let tenant = token_of(&admin(&url, &["tenant", "add", "acme"]));
    let worker = token_of(&admin(&url, &["worker-token", "add", "rack-1"]));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let listen = format!("127.0.0.1:{port}");
    let home = tempfile::tempdir().expect("home").keep();
    let args = [
        "--database",
        url.as_str(),
        "--workers",
        "--worker-lease",
        "5s",
    ];
    let server = ServerProcess::start_on(home.clone(), &listen, &args);
    let w = WorkerProcess::start(&server, &worker, 4);
    let dir = tempfile::tempdir().expect("dir");
    let (n, ms) = (4, 2000);
    let flow = sleep_map(dir.path(), n, ms);
    let client = server.spawn_run(&tenant, &flow, false, false);
    wait_for(&server, &worker, "claimed", n as u64, "never claimed", 60);
    let id = first_run(&server, &tenant);
    drop(server); // SIGKILL
    let mut client = client;
    let _ = client.kill();
    let _ = client.wait();
    let server = ServerProcess::start_on(home, &listen, &args);
    let deadline = Instant::now() + Duration::from_secs(120);
    let run = loop {
        let out = server.cli(&tenant, &["show", &id, "--json"]);
        let run = json_of(&out);
        if run["state"] == "Completed" {
            break run;
        }
        assert!(
            Instant::now() < deadline,
            "not completed: {run:#}\nworker: {}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for c in task(&run, "nap")["children"].as_array().expect("children") {
        assert_eq!(c["state"], "Completed", "{c:#}");
        assert_eq!(c["attempts"], 2, "{c:#}");
    }
    // The same worker process ran the resumed attempts; the attempts it held across the
    // restart were not taken from it: their results refused, or (heard first at an extension)
    // stopped and dropped.
    let log = w.log();
    assert!(
        log.contains("the server refused its result")
            || log.contains("its claim lapsed while it ran"),
        "{log}"
    );
}

/// `out` is a refusal: exit code 2, and stderr says `says`.
fn refused(out: &std::process::Output, says: &str) {
    assert_eq!(out.status.code(), Some(2), "{}", stderr(out));
    assert!(stderr(out).contains(says), "{}", stderr(out));
}
