//! The polyglot benchmark: the same trivial task (`add_one`) written in Python, JavaScript, C and
//! Rust, each measured for
//!
//! - size of the component;
//! - cold compile: `Sandbox::load_file` into a fresh artifact directory (Cranelift);
//! - warm start: a new `Sandbox` on the same artifact directory (as a new process), then
//!   `load_file` (look the file up in the artifact directory's file index, map the precompiled
//!   artifact, link), and that plus the first run; and, for comparison, a warm load that reads
//!   and hashes the file (`load_bytes` of the file's bytes, as a load missing the index does);
//! - per-task overhead: `Sandbox::run` on a fresh instance each run (p50/p99), against the raw
//!   wasmtime floor (see `support/raw_floor.rs`).
//!
//! Targets: warm start (`load_file`) <= 5 ms for the Python and JavaScript components.
//! Run: `cargo bench --bench polyglot` (add `-- --iterations N` to change the sample size).
//! Needs `scripts/setup-polyglot`; the guests are built by the repository's build scripts.

#[path = "../../tests/common/guests.rs"]
mod guests;
#[path = "../../tests/common/polyglot.rs"]
mod polyglot;
#[path = "support/raw_floor.rs"]
mod raw_floor;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use raw_floor::{Stats, ms, raw_floor, stats, us};
use serde_json::json;
use sluice::context::TaskContext;
use sluice::sandbox::{Ending, LoadSource, RunBudget, Sandbox};

const WARM_LOADS: usize = 20;

struct Row {
    language: &'static str,
    size: u64,
    compile: Duration,
    warm_load: Stats,
    indexed: usize,
    warm_link: Stats,
    warm_hashed: Stats,
    warm_first_run: Stats,
    run: Stats,
    floor: Stats,
}

fn sandbox(dir: &Path) -> Sandbox {
    Sandbox::builder()
        .artifact_dir(dir)
        .build()
        .expect("sandbox")
}

async fn run_once(sandbox: &Sandbox, component: &sluice::sandbox::TaskComponent) -> Duration {
    let started = Instant::now();
    let out = sandbox
        .run(
            component,
            &json!(1).into(),
            &TaskContext::new("add_one"),
            &RunBudget::default(),
            None,
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(out.ending, Ending::Output(json!(2).into()), "add_one(1)");
    elapsed
}

async fn measure(language: &'static str, wasm: PathBuf, warmup: usize, iterations: usize) -> Row {
    let size = std::fs::metadata(&wasm).map_or(0, |m| m.len());
    let dir = tempfile::tempdir().expect("temp dir");

    // Cold: compile into the fresh artifact directory.
    let started = Instant::now();
    let cold = sandbox(dir.path()).load_file(&wasm).await.expect("load");
    let compile = started.elapsed();
    assert_eq!(cold.load_info().source, LoadSource::Compiled);
    drop(cold);

    // Warm: new sandboxes on the same directory, as new processes would.
    let (mut loads, mut links, mut first_runs, mut indexed) = (vec![], vec![], vec![], 0);
    for _ in 0..WARM_LOADS {
        let s = sandbox(dir.path());
        let started = Instant::now();
        let component = s.load_file(&wasm).await.expect("warm load");
        let loaded = started.elapsed();
        let info = component.load_info();
        assert_ne!(info.source, LoadSource::Compiled);
        indexed += usize::from(info.source == LoadSource::Indexed);
        run_once(&s, &component).await;
        let first_run = started.elapsed();
        loads.push(loaded);
        links.push(info.duration);
        first_runs.push(first_run);
    }
    // The same, reading and hashing the file (no index).
    let mut hashed = vec![];
    for _ in 0..WARM_LOADS {
        let s = sandbox(dir.path());
        let started = Instant::now();
        let bytes = tokio::fs::read(&wasm).await.expect("read");
        let component = s.load_bytes("bench", bytes).await.expect("warm load");
        hashed.push(started.elapsed());
        assert_eq!(component.load_info().source, LoadSource::Precompiled);
    }

    // Per task: a fresh instance each run.
    let s = sandbox(dir.path());
    let component = s.load_file(&wasm).await.expect("load");
    let mut runs = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let elapsed = run_once(&s, &component).await;
        if i >= warmup {
            runs.push(elapsed);
        }
    }
    let floor = raw_floor(&wasm, warmup, iterations).await;
    Row {
        language,
        size,
        compile,
        warm_load: stats(loads),
        indexed,
        warm_link: stats(links),
        warm_hashed: stats(hashed),
        warm_first_run: stats(first_runs),
        run: stats(runs),
        floor,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    let warmup = (iterations / 10).max(20);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut guests: Vec<(&'static str, PathBuf)> = polyglot::LANGUAGES
        .iter()
        .map(|lang| (*lang, polyglot::polyglot_guest(lang, "add_one")))
        .collect();
    guests.push(("rust", guests::guest("add_one")));

    println!(
        "trivial task: add_one per language; per-task runs: {iterations} after {warmup} warm-up; \
         warm starts: {WARM_LOADS}"
    );
    println!(
        "{:<7} {:>9} {:>11} | {:>17} {:>7} {:>9} {:>11} {:>17} | {:>9} {:>9} {:>9} {:>9}",
        "",
        "size KiB",
        "compile ms",
        "warm load p50/p90",
        "indexed",
        "link p50",
        "hashed p50",
        "+1st run p50/p90",
        "run p50",
        "run p99",
        "run mean",
        "floor p50"
    );
    let rows: Vec<Row> = guests
        .into_iter()
        .map(|(lang, wasm)| runtime.block_on(measure(lang, wasm, warmup, iterations)))
        .collect();
    for r in &rows {
        println!(
            "{:<7} {:>9} {:>11.1} | {:>8.2} {:>5.2} ms {:>4}/{WARM_LOADS} {:>6.2} ms {:>8.2} ms {:>8.2} {:>5.2} ms | {:>6.0} µs {:>6.0} µs {:>6.0} µs {:>6.0} µs",
            r.language,
            r.size >> 10,
            ms(r.compile),
            ms(r.warm_load.p50),
            ms(r.warm_load.p90),
            r.indexed,
            ms(r.warm_link.p50),
            ms(r.warm_hashed.p50),
            ms(r.warm_first_run.p50),
            ms(r.warm_first_run.p90),
            us(r.run.p50),
            us(r.run.p99),
            us(r.run.mean),
            us(r.floor.p50),
        );
    }
    println!("(warm load: new Sandbox on the same artifact directory, load_file; indexed: warm");
    println!(" loads that found the file in the index, without reading it; link: mapping the");
    println!(" artifact and linking; hashed: a warm load that reads and hashes the file instead;");
    println!(" +1st run: warm load plus the first run)");
    for r in rows
        .iter()
        .filter(|r| r.language == "python" || r.language == "js")
    {
        let ok = r.warm_load.p50 <= Duration::from_millis(5);
        println!(
            "target warm start <= 5 ms, {}: p50 {:.2} ms {}",
            r.language,
            ms(r.warm_load.p50),
            if ok { "met" } else { "NOT met" }
        );
    }
}
