//! The sandbox benchmark: per-task cost of a trivial Rust task, in one run,
//!
//! (a) the raw wasmtime floor: pooling allocator (tuned as the sandbox's), one `InstancePre`, a
//!     fresh `Store` and instance per call, no fuel, no epochs, no limits, an empty WASI context,
//!     typed call of `run`;
//! (b) the same task through `Sandbox::run` (fuel, epoch deadline, limiter, log capture,
//!     context, output validation, state-ready outcome);
//!
//! and the ratio (b)/(a). Also: Cranelift compile time and the warm load time of a precompiled
//! artifact (mapping and linking it), for a small and a larger component, and the wall time of a
//! warm `load_file` (through the artifact directory's file index: the file is not read).
//!
//! HTTP: one GET of a 1 KiB body from a loopback server inside a Rust task (granted), against the
//! same task with nothing to fetch, and against the same GET from native Rust in this process;
//! the cost Sluice adds per request is (with GET − without) − native.
//!
//! Run: `cargo bench --bench sandbox` (add `-- --iterations N` to change the sample size).

#[path = "../../tests/common/guests.rs"]
mod guests;
#[path = "../../tests/common/loopback.rs"]
#[allow(dead_code)] // the tests use more of it
mod loopback;
#[path = "support/raw_floor.rs"]
mod raw_floor;

use raw_floor::{Stats, ms, raw_floor, stats, us};

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice::context::TaskContext;
use sluice::grants::HttpGrant;
use sluice::json::Json;
use sluice::sandbox::{Ending, LoadSource, RunBudget, RunGrants, Sandbox};

fn print_row(name: &str, s: &Stats) {
    println!(
        "{name:<34} p50 {:>8.1} µs   p90 {:>8.1} µs   p99 {:>8.1} µs   mean {:>8.1} µs",
        us(s.p50),
        us(s.p90),
        us(s.p99),
        us(s.mean)
    );
}

async fn through_sluice(wasm: &Path, warmup: usize, iterations: usize) -> Stats {
    let sandbox = Sandbox::builder().build().expect("sandbox");
    let component = sandbox.load_file(wasm).await.expect("load");
    let ctx = TaskContext::new("add_one");
    let budget = RunBudget::default();
    let input: Json = json!(1).into();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let started = Instant::now();
        let out = sandbox.run(&component, &input, &ctx, &budget, None).await;
        let elapsed = started.elapsed();
        assert_eq!(out.ending, Ending::Output(json!(2).into()));
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    stats(samples)
}

/// The grants guest doing `steps` under an HTTP grant of the loopback address, `iterations`
/// times: the wall time of each run.
async fn granted_runs(wasm: &Path, steps: &serde_json::Value, iterations: usize) -> Stats {
    let sandbox = Sandbox::builder().build().expect("sandbox");
    let component = sandbox.load_file(wasm).await.expect("load");
    let ctx = TaskContext::new("fetch");
    let budget = RunBudget {
        http_requests: u32::MAX,
        http_response_bytes: u64::MAX,
        ..RunBudget::default()
    };
    let mut grants = RunGrants::default();
    grants.http(vec![
        HttpGrant::parse("http://127.0.0.1:*", None).expect("grant"),
    ]);
    let input: Json = steps.clone().into();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let out = sandbox
            .run_granted(&component, &input, &ctx, &budget, &grants, None)
            .await;
        let elapsed = started.elapsed();
        match &out.ending {
            Ending::Output(v) => assert!(!v.as_str().contains("\"err\""), "{}", v.as_str()),
            other => panic!("{other:?}"),
        }
        if i >= iterations / 10 {
            samples.push(elapsed);
        }
    }
    stats(samples)
}

/// The same GET from native Rust: a connection, the request, the whole 1 KiB response.
fn native_get(server: &loopback::Loopback, iterations: usize) -> Stats {
    use std::io::{Read as _, Write as _};
    let addr = format!("127.0.0.1:{}", server.port());
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations + iterations / 10 {
        let started = Instant::now();
        let mut conn = std::net::TcpStream::connect(&addr).expect("connect");
        conn.write_all(format!("GET /json HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .expect("request");
        let mut response = Vec::new();
        conn.read_to_end(&mut response).expect("response");
        let elapsed = started.elapsed();
        assert!(response.ends_with(b" ") && response.len() > 1024);
        if i >= iterations / 10 {
            samples.push(elapsed);
        }
    }
    stats(samples)
}

/// Compile once into a fresh artifact directory, then load the artifact from fresh sandboxes
/// (as new processes would): from the bytes, and with `load_file` (wall time, and how many
/// loads the file index served).
async fn compile_and_warm_load(wasm: &Path, loads: usize) -> (Duration, Stats, Stats, usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let bytes = std::fs::read(wasm).expect("read");
    // Each load uses a new sandbox, as a new process would.
    let load = || async {
        let sandbox = Sandbox::builder()
            .artifact_dir(dir.path())
            .build()
            .expect("sandbox");
        let c = sandbox
            .load_bytes("bench", bytes.clone())
            .await
            .expect("load");
        c.load_info()
    };
    let first = load().await;
    assert_eq!(first.source, LoadSource::Compiled);
    let mut samples = Vec::with_capacity(loads);
    for _ in 0..loads {
        let warm = load().await;
        assert_eq!(warm.source, LoadSource::Precompiled);
        samples.push(warm.duration);
    }
    let (mut files, mut indexed) = (Vec::with_capacity(loads), 0);
    for _ in 0..loads {
        let sandbox = Sandbox::builder()
            .artifact_dir(dir.path())
            .build()
            .expect("sandbox");
        let started = Instant::now();
        let c = sandbox.load_file(wasm).await.expect("load");
        files.push(started.elapsed());
        assert_ne!(c.load_info().source, LoadSource::Compiled);
        indexed += usize::from(c.load_info().source == LoadSource::Indexed);
    }
    (first.duration, stats(samples), stats(files), indexed)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(5000);
    let warmup = (iterations / 10).max(50);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let add_one = guests::guest("add_one");
    let hostile = guests::guest("hostile");
    runtime.block_on(async {
        println!(
            "trivial task: add_one ({} KiB), {iterations} iterations after {warmup} warm-up",
            std::fs::metadata(&add_one).map_or(0, |m| m.len() >> 10)
        );
        // Interleave the two a few times so drift on a noisy machine hits both alike.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            a.push(raw_floor(&add_one, warmup, iterations / 3).await);
            b.push(through_sluice(&add_one, warmup, iterations / 3).await);
        }
        let a = a.into_iter().min_by_key(|s| s.p50).expect("runs");
        let b = b.into_iter().min_by_key(|s| s.p50).expect("runs");
        print_row("(a) raw wasmtime floor", &a);
        print_row("(b) Sluice sandbox run", &b);
        println!(
            "ratio (b)/(a) at p50: {:.2}   targets: p50 (b) <= 100 µs, ratio <= 2",
            us(b.p50) / us(a.p50)
        );
        println!();
        let grants = guests::guest("grants");
        let server = loopback::Loopback::start([127, 0, 0, 1].into());
        let n = (iterations / 10).max(100);
        let get = json!([{ "do": "http", "url": server.url("/json") }]);
        let (mut with, mut without, mut native) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..3 {
            with.push(granted_runs(&grants, &get, n).await);
            without.push(granted_runs(&grants, &json!([]), n).await);
            native.push(native_get(&server, n));
        }
        let best = |v: Vec<Stats>| v.into_iter().min_by_key(|s| s.p50).expect("runs");
        let (with, without, native) = (best(with), best(without), best(native));
        print_row("(c) task with one HTTP GET (1 KiB)", &with);
        print_row("(d) the same task, no request", &without);
        print_row("(e) native GET, same server", &native);
        println!(
            "added per request at p50: (c) - (d) - (e) = {:.1} µs   target: <= 200 µs",
            us(with.p50) - us(without.p50) - us(native.p50)
        );
        println!();
        for (name, wasm) in [("add_one", &add_one), ("hostile", &hostile)] {
            let size = std::fs::metadata(wasm).map_or(0, |m| m.len());
            let (compile, warm, file, indexed) = compile_and_warm_load(wasm, 20).await;
            println!(
                "{name:<8} {:>6} KiB   compile {:>8.1} ms   warm load (precompiled) p50 {:>6.2} ms  p90 {:>6.2} ms   load_file p50 {:>6.2} ms  p90 {:>6.2} ms ({indexed}/20 indexed)",
                size >> 10,
                ms(compile),
                ms(warm.p50),
                ms(warm.p90),
                ms(file.p50),
                ms(file.p90),
            );
        }
    });
}
