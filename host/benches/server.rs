//! The server benchmark, in one run, against an in-process `sluice server` on a loopback port
//! (the library's `Server`, served by axum; the client is reqwest, as the CLI's):
//!
//! 1. submit → Completed latency of a trivial one-task run through the API (POST the run, then
//!    GET it with `?wait=` until it ends): p50 and p99 of 200 runs, one after another;
//! 2. a 10,000-task mapped run (`add_one` over 0..10000) through the server against the same
//!    flow embedded (a `FlowRunner` over a store in a temporary home): from submitting (POST, or
//!    parsing the manifest) to the run's last transition as recorded, in pairs (server then
//!    embedded, `BENCH_PAIRS`, 7 by default, after one to warm up): the medians and the median
//!    of the pairs' ratios; then the web UI's page of the last server run (request to last
//!    byte, signed in by the cookie), and that page, the mapped task's and the runs list in
//!    Chromium (`tests/ui/bench.mjs`: navigation to interactive and to `load`; skipped, saying
//!    so, where `scripts/setup` has not installed Chromium and the test's packages);
//! 3. a noisy neighbour: tenant A keeps 4 infinite loops and 5,000 CPU-bound tasks queued while
//!    tenant B starts 50 one-task runs one after another: B's p50, p90 and p99 submit → Completed
//!    latency, against B alone on the same server just before; A's loops must end TimedOut.
//!    Twice: A arriving while B is active, then A alone for a while before B comes.
//!
//! 4. the web UI's runs list over 100,000 runs of one tenant (written to its store directly, a
//!    second apart, a tenth of them Failed): the newest page, a page 50,000 runs deep (its
//!    cursor), the same filtered by state, and a day's window by creation time; request to last
//!    byte, 10 loads each after one to warm up.
//!
//! Run: `cargo bench --bench server` (`-- latency`, `-- mapped`, `-- noisy` or `-- runs` for
//! one part).

#[path = "../src/bin/sluice/alloc.rs"]
mod alloc;
#[path = "../../tests/common/guests.rs"]
mod guests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::runner::{FlowRunner, RunOptions};
use sluice::sandbox::Sandbox;
use sluice::server::Server;
use sluice::server::wire::{RunStarted, RunView, StartRun};
use sluice::state::StateName;
use sluice::store::{SqliteStore, Store};

struct Bench {
    url: String,
    http: reqwest::Client,
}

struct Tenant {
    token: String,
    /// Component path (as manifests name it) → digest, uploaded.
    components: BTreeMap<String, String>,
}

impl Bench {
    async fn tenant(&self, server: &Server, name: &str, files: &[&Path]) -> Tenant {
        let (_, token) = server
            .tenants()
            .add(name, chrono::Utc::now())
            .expect("tenant");
        let mut components = BTreeMap::new();
        for f in files {
            let bytes = std::fs::read(f).expect("component");
            let digest = blake3::hash(&bytes).to_hex().to_string();
            let resp = self
                .http
                .put(format!("{}/api/v1/components/{digest}", self.url))
                .bearer_auth(&token)
                .body(bytes)
                .send()
                .await
                .expect("upload");
            assert!(resp.status().is_success(), "{}", resp.status());
            components.insert(f.display().to_string(), digest);
        }
        Tenant { token, components }
    }

    async fn start(&self, t: &Tenant, manifest: &str) -> RunStarted {
        let req = StartRun {
            manifest: manifest.to_owned(),
            manifest_path: "flow.toml".into(),
            components: t.components.clone(),
            subflows: BTreeMap::new(),
            parameters: BTreeMap::new(),
            context: BTreeMap::new(),
        };
        let resp = self
            .http
            .post(format!("{}/api/v1/runs", self.url))
            .bearer_auth(&t.token)
            .json(&req)
            .send()
            .await
            .expect("start");
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        resp.json().await.expect("started")
    }

    /// The run `id` (after waiting up to `wait` seconds for it to end).
    async fn view(&self, t: &Tenant, id: &str, wait: u64) -> RunView {
        self.http
            .get(format!("{}/api/v1/runs/{id}?wait={wait}", self.url))
            .bearer_auth(&t.token)
            .send()
            .await
            .expect("show")
            .json()
            .await
            .expect("view")
    }

    async fn wait(&self, t: &Tenant, id: &str) -> RunView {
        loop {
            let view = self.view(t, id, 60).await;
            if !view.live {
                return view;
            }
        }
    }

    /// Cancel run `id` and wait for it to end.
    async fn cancel(&self, t: &Tenant, id: &str) {
        let cancel = self
            .http
            .post(format!("{}/api/v1/runs/{id}/cancel", self.url))
            .bearer_auth(&t.token)
            .send()
            .await
            .expect("cancel");
        assert!(cancel.status().is_success());
        self.wait(t, id).await;
    }

    /// Submit → Completed of one run of `manifest`.
    async fn latency(&self, t: &Tenant, manifest: &str) -> Duration {
        let began = Instant::now();
        let started = self.start(t, manifest).await;
        let view = self.wait(t, &started.id.to_string()).await;
        let took = began.elapsed();
        assert_eq!(view.run.state.name, StateName::Completed);
        took
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// The web UI's pages of run `run` in Chromium (`tests/ui/bench.mjs`), printing its lines.
fn browser(url: &str, token: &str, run: &str) {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/ui");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() || !ui.join("node_modules/playwright-core").exists() {
        println!(
            "its web UI in Chromium: skipped (run scripts/setup for Chromium and tests/ui's packages)"
        );
        return;
    }
    let out = match std::process::Command::new("node")
        .arg(ui.join("bench.mjs"))
        .current_dir(&ui)
        .env("SLUICE_URL", url)
        .env("TOKEN", token)
        .env("RUN", run)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            println!("its web UI in Chromium: skipped (node: {e}; run scripts/setup)");
            return;
        }
    };
    assert!(
        out.status.success(),
        "tests/ui/bench.mjs failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("its web UI in Chromium, {line}");
    }
}

/// The runs list's pages over 100,000 runs (part 4).
async fn runs_list(bench: &Bench, server: &Server) {
    use sluice::ids::FlowRunId;
    use sluice::runner::Transition;
    use sluice::state::State;
    use sluice::store::{RunHeader, Write};
    let n: i64 = 100_000;
    let t = bench.tenant(server, "many", &[]).await;
    let tenant = server.tenants().get("many").expect("tenant");
    let store = server.space(&tenant).expect("space").store().clone();
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(n + 60);
    let mut ids = Vec::with_capacity(n as usize);
    let began = Instant::now();
    for i in 0..n {
        let at = t0 + chrono::Duration::seconds(i);
        let name = if i % 10 == 0 {
            StateName::Failed
        } else {
            StateName::Completed
        };
        let id = FlowRunId::new();
        ids.push((id, at));
        store.submit(Write::RunCreated(Box::new(RunHeader {
            id,
            flow: format!("flow-{}", i % 7),
            state: State::new(name, at),
            history: vec![Transition {
                from: None,
                to: name,
                time: at,
                message: None,
            }],
            parameters: BTreeMap::new(),
            context: BTreeMap::new(),
            manifest: None,
            files: None,
            // Not this process: no run is live.
            pid: 1_000_000_000,
            tasks: Vec::new(),
        })));
    }
    store.flush().expect("flush");
    println!(
        "100,000 runs written to the tenant's store in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let (mid, mid_at) = ids[(n / 2) as usize];
    let day = |from: i64| (t0 + chrono::Duration::seconds(from)).format("%Y-%m-%dT%H:%M:%S");
    let pages = [
        ("newest page", String::new()),
        (
            "50,000 runs deep",
            format!("before={}.{mid}", mid_at.timestamp_micros()),
        ),
        (
            "50,000 deep, Failed only",
            format!("state=Failed&before={}.{mid}", mid_at.timestamp_micros()),
        ),
        (
            "a day's window, ending 20,000 runs deep",
            format!("since={}&until={}", day(80_000 - 86_400), day(80_000)),
        ),
    ];
    for (what, query) in pages {
        let mut times = Vec::new();
        for i in 0..11 {
            let began = Instant::now();
            let resp = bench
                .http
                .get(format!("{}/ui/runs?{query}", bench.url))
                .header("cookie", format!("sluice_token={}", t.token))
                .send()
                .await
                .expect("runs page");
            assert_eq!(resp.status().as_u16(), 200, "{what}");
            let page = resp.text().await.expect("page");
            assert_eq!(
                page.matches("<tr><td><a href=\"/ui/runs/").count(),
                50,
                "{what}: a full page (50 runs)"
            );
            if i > 0 {
                times.push(began.elapsed());
            }
        }
        times.sort();
        println!(
            "runs list of 100,000 runs, {what}: p50 {}, max {}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 1.0))
        );
    }
}

fn one_task(add_one: &Path) -> String {
    format!(
        "name = \"one\"\n[tasks.a]\ncomponent = {:?}\ninput = 41\n",
        add_one.display().to_string()
    )
}

fn mapped(add_one: &Path, n: usize) -> String {
    format!(
        "name = \"mapped\"\n[tasks.add]\ncomponent = {:?}\ninput = {}\nmap = true\n",
        add_one.display().to_string(),
        json!((0..n).collect::<Vec<_>>())
    )
}

async fn series(bench: &Bench, t: &Tenant, manifest: &str, n: usize) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        times.push(bench.latency(t, manifest).await);
    }
    times.sort();
    times
}

/// B's one-task runs one after another beside A's noisy run (`noisy`), against `solo`; A's
/// loops must end TimedOut, and the rest of A's run is cancelled.
async fn beside_a(
    bench: &Bench,
    (a, b): (&Tenant, &Tenant),
    (noisy, single): (&str, &str),
    solo: &[Duration],
    how: &str,
) {
    let a_run = bench.start(a, noisy).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = series(bench, b, single, solo.len()).await;
    println!(
        "noisy neighbour, A {how} ({} runs each): B alone p50 {} p90 {} p99 {}; B beside A (4 loops, 5,000 CPU-bound tasks queued) p50 {} p90 {} p99 {}: p99 {:.1}x solo",
        solo.len(),
        ms(percentile(solo, 0.5)),
        ms(percentile(solo, 0.9)),
        ms(percentile(solo, 0.99)),
        ms(percentile(&loaded, 0.5)),
        ms(percentile(&loaded, 0.9)),
        ms(percentile(&loaded, 0.99)),
        percentile(&loaded, 0.99).as_secs_f64() / percentile(solo, 0.99).as_secs_f64()
    );
    // Of 50 (or 100), the p99 is the slowest (second slowest): show the tail it stands on.
    let tail =
        |s: &[Duration]| -> Vec<String> { s[s.len() - 5..].iter().map(|d| ms(*d)).collect() };
    println!(
        "  slowest 5: alone {:?}; beside A {:?}",
        tail(solo),
        tail(&loaded)
    );
    // A's loops reach their deadline; then the rest of A's run is cancelled.
    let view = loop {
        let view = bench.view(a, &a_run.id.to_string(), 0).await;
        if view.run.tasks[..4].iter().all(|t| t.state.is_terminal()) {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let loops: Vec<&str> = view.run.tasks[..4]
        .iter()
        .map(|t| t.state.name.as_str())
        .collect();
    println!("A's loops ended: {loops:?}");
    bench.cancel(a, &a_run.id.to_string()).await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let only = |name: &str| {
        let args: Vec<String> = std::env::args().collect();
        let parts = ["latency", "mapped", "noisy", "runs"];
        !args.iter().any(|a| parts.contains(&a.as_str())) || args.iter().any(|a| a == name)
    };
    let add_one = guests::guest("add_one");
    let hostile = guests::guest("hostile");
    runtime.block_on(async {
        let home = tempfile::tempdir().expect("home");
        // As `sluice server`: a 1 ms epoch tick (`BENCH_TICK_MS` to compare).
        let tick = std::env::var("BENCH_TICK_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let sandbox = Sandbox::builder()
            .epoch_tick(Duration::from_millis(tick))
            .build()
            .expect("sandbox");
        // The server's default (`DEFAULT_TASK_SLOTS`), or `BENCH_SLOTS`.
        let slots = std::env::var("BENCH_SLOTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(sluice::server::fair::DEFAULT_TASK_SLOTS);
        let server = Server::open(home.path(), sandbox.clone(), slots).expect("server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(server.clone().serve(listener, std::future::pending()));
        let bench = Bench {
            url,
            http: reqwest::Client::new(),
        };
        println!(
            "server: {slots} task slots, {} cores",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );

        if only("latency") {
            let t = bench.tenant(&server, "latency", &[&add_one]).await;
            let manifest = one_task(&add_one);
            series(&bench, &t, &manifest, 20).await; // warm-up
            let times = series(&bench, &t, &manifest, 200).await;
            println!(
                "one-task run through the API, submit -> Completed (200 runs): p50 {}, p99 {}",
                ms(percentile(&times, 0.5)),
                ms(percentile(&times, 0.99))
            );
        }

        if only("mapped") {
            let n = 10_000;
            let t = bench.tenant(&server, "mapped", &[&add_one]).await;
            let manifest = mapped(&add_one, n);
            let dir = tempfile::tempdir().expect("embedded home");
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path()).expect("store"));
            let runner = FlowRunner::new(sandbox.clone()).store(store);
            let file = dir.path().join("flow.toml");
            // Pairs, a server run then an embedded one, so that both see the same machine (a
            // shared VM's speed drifts by half within a minute): the ratio is each pair's, and
            // the figures are medians. Each side from its submission to the run's last
            // transition as recorded (the time to fetch 10,000 task runs afterwards is not the
            // run's): through the API, POST to Completed; embedded, as `sluice run` does it,
            // from parsing the manifest (the server parses and prepares it too).
            let pairs: usize = std::env::var("BENCH_PAIRS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(7);
            let (mut served, mut embedded, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut last_run = None;
            for i in 0..=pairs {
                let submitted = chrono::Utc::now();
                let started = bench.start(&t, &manifest).await;
                last_run = Some(started.id);
                let view = bench.wait(&t, &started.id.to_string()).await;
                assert_eq!(view.run.state.name, StateName::Completed);
                let end = view.run.history.last().expect("history").time;
                let s = (end - submitted).to_std().unwrap_or_default();

                let began = chrono::Utc::now();
                let def = sluice::flow::manifest::parse(&file, &manifest).expect("manifest");
                let flow = runner.prepare(def, dir.path()).await.expect("prepare");
                let run = runner.run(&flow, RunOptions::default()).await.expect("run");
                assert_eq!(run.state.name, StateName::Completed);
                let end = run.history.last().expect("history").time;
                let e = (end - began).to_std().unwrap_or_default();
                // The first pair warms both up (components loaded, stores' pages touched).
                if i > 0 {
                    served.push(s);
                    embedded.push(e);
                    ratios.push(s.as_secs_f64() / e.as_secs_f64());
                }
            }
            served.sort();
            embedded.sort();
            ratios.sort_by(f64::total_cmp);
            let (s, e) = (percentile(&served, 0.5), percentile(&embedded, 0.5));
            println!(
                "10,000-task mapped run (median of {pairs} pairs): server {} ({:.0} tasks/s), embedded {} ({:.0} tasks/s): server/embedded {:.2} (pairs {:.2}..{:.2})",
                ms(s),
                n as f64 / s.as_secs_f64(),
                ms(e),
                n as f64 / e.as_secs_f64(),
                ratios[ratios.len() / 2],
                ratios[0],
                ratios[ratios.len() - 1],
            );
            // The web UI's page of that run (signed in by the cookie): the server's part of
            // loading it, request to the last byte, 10 times after one to warm up.
            if let Some(id) = last_run {
                let mut times = Vec::new();
                for i in 0..11 {
                    let began = Instant::now();
                    let resp = bench
                        .http
                        .get(format!("{}/ui/runs/{id}", bench.url))
                        .header("cookie", format!("sluice_token={}", t.token))
                        .send()
                        .await
                        .expect("run page");
                    assert_eq!(resp.status().as_u16(), 200);
                    let page = resp.text().await.expect("page");
                    assert!(page.contains("data-task=\"add\""), "the page shows the task");
                    if i > 0 {
                        times.push(began.elapsed());
                    }
                }
                times.sort();
                println!(
                    "its web UI page (the server's part, 10 loads): p50 {}, max {}",
                    ms(percentile(&times, 0.5)),
                    ms(percentile(&times, 1.0))
                );
                let (url, token) = (bench.url.clone(), t.token.clone());
                tokio::task::spawn_blocking(move || browser(&url, &token, &id.to_string()))
                    .await
                    .expect("the browser's part");
            }
        }

        if only("runs") {
            runs_list(&bench, &server).await;
        }

        if only("noisy") {
            let b = bench.tenant(&server, "b", &[&add_one]).await;
            let a = bench.tenant(&server, "a", &[&hostile]).await;
            let single = one_task(&add_one);
            series(&bench, &b, &single, 10).await; // warm-up
            // 50 runs each (`BENCH_NOISY_RUNS` for more: the p99 of 50 is their slowest, of 100 the
            // second slowest).
            let n = std::env::var("BENCH_NOISY_RUNS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(50);
            let solo = series(&bench, &b, &single, n).await;
            // A: 4 loops (deadline 10 s) and 5,000 CPU-bound tasks (about 5 ms each).
            let h = hostile.display().to_string();
            let mut noisy = String::from("name = \"noisy\"\n");
            for i in 0..4 {
                noisy.push_str(&format!(
                    "[tasks.loop{i}]\ncomponent = {h:?}\ninput = {{ do = \"loop\" }}\ntimeout = \"10s\"\nfuel = 100000000000\n"
                ));
            }
            let spins = vec!["{ do = \"spin\", iterations = 3000000 }"; 5000].join(", ");
            noisy.push_str(&format!(
                "[tasks.spin]\ncomponent = {h:?}\ninput = [{spins}]\nmap = true\n"
            ));
            // Twice. First A arrives while B is active: B has a run in flight (its task
            // failed and waits 10 minutes for its retry), so tenants share the server from A's
            // start and A's guests run apart from the control path from their first poll.
            let hold = format!(
                "name = \"hold\"\n[tasks.a]\ncomponent = {:?}\ninput = \"not a number\"\nretries = 1\nretry_delay = \"10m\"\n",
                add_one.display().to_string()
            );
            let held = bench.start(&b, &hold).await;
            loop {
                let view = bench.view(&b, &held.id.to_string(), 0).await;
                if view.run.tasks[0].state.name == StateName::AwaitingRetry {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            beside_a(&bench, (&a, &b), (&noisy, &single), &solo, "arrives while B is active").await;
            bench.cancel(&b, &held.id.to_string()).await;
            // Then A alone first (nobody has shared the server for a while), and B arrives: A's
            // short attempts start beside their drivers (`server::placement`).
            tokio::time::sleep(sluice::server::SHARED_LINGER + Duration::from_secs(1)).await;
            beside_a(&bench, (&a, &b), (&noisy, &single), &solo, "ran alone first").await;
        }
    });
}
