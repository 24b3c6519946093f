//! Task runs through PostgreSQL and `sluice worker` processes: a `sluice server --database URL
//! --workers` on a throwaway cluster of this process (Unix socket, `fsync=off`), with 1, 2 and 4
//! workers on this machine, each run started with `sluice run --server` as a user starts it.
//!
//! 1. Trivial task runs per second: `add_one` mapped over N numbers (default 10,000), each
//!    worker running 32 at once (`--concurrency 32`).
//! 2. I/O-bound task runs: the hostile guest's 50 ms sleep mapped over 640 inputs, each worker
//!    running 16 at once; near-linear means the time halves as the workers double.
//! 3. For each, the server's queue statistics: from enqueue to claim (the wait) and one claim
//!    statement, p50 and p99.
//!
//! The time of a run is its flow run's own, from Running to its end (as recorded), not the
//! CLI's upload and start.
//!
//! Run: `cargo bench --bench workers` (`-- N` for another trivial map size).

#[path = "../../tests/common/guests.rs"]
mod guests;
#[path = "../../tests/common/pg.rs"]
mod pg;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn admin(url: &str, home: &Path, args: &[&str]) -> String {
    let out = Command::new(SLUICE)
        .args(args)
        .args(["--database", url])
        .env("SLUICE_HOME", home)
        .output()
        .expect("sluice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("a token")
        .to_owned()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One configuration's result.
struct Measured {
    tasks: usize,
    run: Duration,
    stats: Value,
}

/// Run `flow` (a manifest of `tasks` task runs) on a new database with `workers` workers, each
/// running `concurrency` at once.
fn measure(
    cluster: &pg::PgCluster,
    flow: &Path,
    tasks: usize,
    workers: usize,
    concurrency: u32,
) -> Measured {
    let url = cluster.database("bench_workers");
    let home = tempfile::tempdir().expect("home");
    let tenant = admin(&url, home.path(), &["tenant", "add", "bench"]);
    let token = admin(&url, home.path(), &["worker-token", "add", "bench"]);
    let mut server = Command::new(SLUICE)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "--database",
            &url,
        ])
        .env("SLUICE_HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("address");
    let _server = Killed(server);
    let base = line
        .trim()
        .strip_prefix("sluice server listening on ")
        .expect("address")
        .to_owned();
    let _workers: Vec<Killed> = (0..workers)
        .map(|i| {
            Killed(
                Command::new(SLUICE)
                    .args(["worker", "--server", &base, "--token", &token])
                    .args(["--concurrency", &concurrency.to_string()])
                    .arg("--dir")
                    .arg(home.path().join(format!("worker-{i}")))
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("worker"),
            )
        })
        .collect();
    let out = Command::new(SLUICE)
        .args(["run", flow.to_str().expect("utf-8"), "--json"])
        .args(["--server", &base, "--token", &tenant])
        .env("SLUICE_HOME", home.path().join("client"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run: Value = serde_json::from_slice(&out.stdout).expect("run JSON");
    let times: Vec<(String, chrono::DateTime<chrono::Utc>)> = run["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|t| {
            (
                t["to"].as_str().unwrap_or_default().to_owned(),
                t["time"]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("time"),
            )
        })
        .collect();
    let start = times
        .iter()
        .find(|(s, _)| s == "Running")
        .expect("Running")
        .1;
    let end = times.last().expect("end").1;
    let stats = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            reqwest::Client::new()
                .get(format!("{base}/api/v1/worker/stats"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("stats")
                .json::<Value>()
                .await
                .expect("stats JSON")
        });
    Measured {
        tasks,
        run: (end - start).to_std().unwrap_or_default(),
        stats,
    }
}

fn report(name: &str, workers: usize, m: &Measured) {
    let us = |k: &str| m.stats[k].as_u64().unwrap_or(0) as f64 / 1000.0;
    println!(
        "{name:<8} {workers} worker(s): {:>6} task runs in {:>7.3} s = {:>7.0}/s | enqueue→claim p50 {:.1} ms p99 {:.1} ms | claim p50 {:.2} ms p99 {:.2} ms | {} claims",
        m.tasks,
        m.run.as_secs_f64(),
        m.tasks as f64 / m.run.as_secs_f64(),
        us("wait_p50_us"),
        us("wait_p99_us"),
        us("claim_p50_us"),
        us("claim_p99_us"),
        m.stats["claims"]
    );
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let cluster = pg::PgCluster::start();
    let dir = tempfile::tempdir().expect("dir");
    let add_one = guests::guest("add_one");
    let hostile = guests::guest("hostile");
    let numbers: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    let trivial = dir.path().join("trivial.toml");
    std::fs::write(
        &trivial,
        format!(
            "name = \"trivial\"\n[parameters]\nxs = [{}]\n[tasks.add]\ncomponent = \"{}\"\ninput = \"$params.xs\"\nmap = true\n",
            numbers.join(","),
            add_one.display()
        ),
    )
    .expect("flow");
    let io_tasks = 640;
    let naps: Vec<&str> = (0..io_tasks)
        .map(|_| "{ do = \"sleep\", ms = 50 }")
        .collect();
    let io = dir.path().join("io.toml");
    std::fs::write(
        &io,
        format!(
            "name = \"io\"\n[parameters]\nxs = [{}]\n[tasks.nap]\ncomponent = \"{}\"\ninput = \"$params.xs\"\nmap = true\n",
            naps.join(","),
            hostile.display()
        ),
    )
    .expect("flow");
    // Compiled once before anything is timed (the per-user artifact cache).
    let _ = measure(&cluster, &trivial, n, 1, 32);
    for workers in [1, 2, 4] {
        report(
            "trivial",
            workers,
            &measure(&cluster, &trivial, n, workers, 32),
        );
    }
    for workers in [1, 2, 4] {
        report(
            "50 ms",
            workers,
            &measure(&cluster, &io, io_tasks, workers, 16),
        );
    }
}
