//! Sluice's integration tests, in one binary so guests are built and components compiled once.
//! Guests are built from source (Rust guests under `examples/` and `tests/guests/`, WebAssembly
//! text under `tests/fixtures/`) by the helpers in [`support`].

mod alloc_meter;
mod cli;
mod cli_more;
mod code_flows;
mod deployments;
mod flow_body;
mod flows;
mod grants;
mod hostile;
mod input;
mod limits;
mod loading;
mod logs;
mod memory;
mod polyglot;
mod polyglot_grants;
mod polyglot_rebuild;
mod pool;
mod postgres;
mod postgres_store;
mod recovery;
mod scheduling;
mod semantics;
mod server;
mod server_code;
mod server_postgres;
mod server_quotas;
mod signals;
mod store;
mod store_faults;
mod store_suite;
mod support;
mod time;
mod ui;
mod workers;
