//! What one task run may consume. A plain type: the rest of the host sets budgets without
//! touching wasmtime.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The resources one task run may use. Every field has a documented default
/// ([`RunBudget::default`]); a run that exceeds a limit ends TimedOut (fuel, deadline) or Failed
/// (every other limit), with a message naming the limit and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunBudget {
    /// Fuel: roughly one unit per WebAssembly instruction. `None` is unlimited (the wall-clock
    /// deadline still applies). Default: 10 000 000 000 (about 5–10 s of compute).
    pub fuel: Option<u64>,
    /// Wall-clock deadline from the start of instantiation. Default: 60 s.
    pub timeout: Duration,
    /// Linear memory, summed across all of the instance's memories, in bytes. Default: 256 MiB.
    pub memory_bytes: u64,
    /// Table elements, summed across all of the instance's tables. Default: 100 000.
    pub table_elements: u64,
    /// Core instances the component may create. Default: 64.
    pub instances: u32,
    /// Size of the task's output (JSON text), plus any signal message, in bytes. Default: 16 MiB.
    pub output_bytes: u64,
    /// Bytes of logs kept (the `log` import, stdout and stderr together; each line costs its
    /// length plus 64); the rest is dropped and counted. Default: 1 MiB.
    pub log_bytes: u64,
    /// Bytes a guest may pass to the host in one call other than its output (a log line, a
    /// context key, one write to stdout). Default: 1 MiB.
    pub host_call_bytes: u64,
    /// HTTP requests a run may send (only granted ones count; a refused one is not sent).
    /// Default: 100.
    pub http_requests: u32,
    /// Bytes of HTTP response bodies a run may receive, summed over its requests. Default:
    /// 64 MiB.
    pub http_response_bytes: u64,
    /// How long an HTTP request may take to connect. Default: 10 s.
    pub http_connect_timeout: Duration,
    /// How long an HTTP response may take to start, and to send each next part of its body.
    /// Default: 30 s.
    pub http_read_timeout: Duration,
}

impl RunBudget {
    /// The default fuel budget.
    pub const DEFAULT_FUEL: u64 = 10_000_000_000;
    /// The default wall-clock deadline.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// The default memory budget.
    pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;
}

impl Default for RunBudget {
    fn default() -> Self {
        Self {
            fuel: Some(Self::DEFAULT_FUEL),
            timeout: Self::DEFAULT_TIMEOUT,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            table_elements: 100_000,
            instances: 64,
            output_bytes: 16 << 20,
            log_bytes: 1 << 20,
            host_call_bytes: 1 << 20,
            http_requests: 100,
            http_response_bytes: 64 << 20,
            http_connect_timeout: Duration::from_secs(10),
            http_read_timeout: Duration::from_secs(30),
        }
    }
}
