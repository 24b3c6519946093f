//! Sluice: a workflow engine in which every task is a WebAssembly component, run in its own
//! sandbox under a fuel budget, a wall-clock deadline and a memory cap, with Prefect's execution
//! model (states, signals, retries, context).
//!
//! The crate's layers, bottom up:
//! - [`sandbox`]: the only module that touches wasmtime; loads components and runs one task run.
//! - [`state`]: the state model and the mapping from a run's ending to a state.
//! - [`flow`]: flow definitions, from TOML manifests or the builder; triggers.
//! - [`grants`]: what a task may reach beyond its input (directories, env, secrets).
//! - [`runner`]: executes flow runs: scheduling, triggers, retries, mapping, handlers.
//! - [`store`]: durable runs, transitions, logs, results and the output cache ([`cache`]).
//! - [`schedule`]: when a deployment's runs are due, and what its scheduler does about them.
//! - [`server`]: `sluice server`: tenants, quotas, fair scheduling, deployments, the HTTP API.
//! - [`context`], [`ids`], [`clock`], [`json`]: plain types shared by every layer.

pub mod cache;
pub mod clock;
pub mod context;
pub mod flow;
pub mod grants;
pub mod ids;
pub mod json;
pub mod runner;
pub mod sandbox;
pub mod schedule;
pub mod server;
pub mod state;
pub mod store;
mod timestamp;
pub mod worker;
