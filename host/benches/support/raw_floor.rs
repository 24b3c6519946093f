//! The raw wasmtime floor shared by the benchmarks: the cheapest way to run a component once
//! with wasmtime (pooling allocator tuned as Sluice's sandbox, one `InstancePre`, a fresh `Store`
//! and instance per call, no fuel, no epochs, no limits, an empty WASI context), and sample
//! statistics.

use std::path::Path;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

// The raw floor's own bindings: the benchmark must not go through Sluice's.
mod raw {
    wasmtime::component::bindgen!({
        world: "task",
        path: "../wit",
        exports: { default: async },
    });
}

struct RawState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for RawState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl raw::sluice::task::types::Host for RawState {}
impl raw::sluice::task::context::Host for RawState {
    fn get(&mut self, _: String) -> Option<String> {
        None
    }
    fn flow_run_id(&mut self) -> String {
        String::new()
    }
    fn task_run_id(&mut self) -> String {
        String::new()
    }
    fn task_name(&mut self) -> String {
        String::new()
    }
    fn attempt(&mut self) -> u32 {
        1
    }
    fn map_index(&mut self) -> Option<u32> {
        None
    }
    fn parameters(&mut self) -> String {
        "{}".into()
    }
}
impl raw::sluice::task::log::Host for RawState {
    fn log(&mut self, _: raw::sluice::task::log::Level, _: String) {}
}

#[derive(Debug)]
pub struct Stats {
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

pub fn stats(mut samples: Vec<Duration>) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    let total: Duration = samples.iter().sum();
    Stats {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        mean: total / samples.len() as u32,
    }
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Per-call times of `add_one`-like `wasm` (input `1`, output `2`) through raw wasmtime.
pub async fn raw_floor(wasm: &Path, warmup: usize, iterations: usize) -> Stats {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(16)
        .total_core_instances(256)
        .total_memories(64)
        .total_tables(128)
        .total_stacks(16)
        // The same pooling tuning as the sandbox, so the ratio measures only what Sluice adds.
        .linear_memory_keep_resident(64 << 10)
        .table_keep_resident(16 << 10)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).expect("engine");
    let component = Component::from_file(&engine, wasm).expect("component");
    let mut linker = Linker::<RawState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).expect("wasi");
    raw::Task::add_to_linker::<_, HasSelf<RawState>>(&mut linker, |s| s).expect("link");
    let pre = raw::TaskPre::new(linker.instantiate_pre(&component).expect("pre")).expect("pre");
    let input = "1".to_owned();
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let started = Instant::now();
        let mut store = Store::new(
            &engine,
            RawState {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
            },
        );
        let task = pre
            .instantiate_async(&mut store)
            .await
            .expect("instantiate");
        let out = task.call_run(&mut store, &input).await.expect("call");
        drop(store);
        let elapsed = started.elapsed();
        assert_eq!(out.ok().as_deref(), Some("2"));
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    stats(samples)
}
