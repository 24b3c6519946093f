//! The manifest as TOML gives it: the raw flow, task and backoff tables serde reads (unknown
//! keys refused), before any value is checked or converted.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::flow::Trigger;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlow {
    pub(super) name: String,
    #[serde(default)]
    pub(super) parameters: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub(super) context: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) reference_tasks: Vec<Spanned<String>>,
    pub(super) concurrency: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) tag_limits: BTreeMap<String, Spanned<usize>>,
    #[serde(default)]
    pub(super) tasks: indexmap::IndexMap<String, Spanned<RawTask>>,
    pub(super) cache_namespace: Option<String>,
    pub(super) max_mapped_children: Option<usize>,
    pub(super) max_log_bytes: Option<Spanned<toml::Value>>,
    pub(super) grants: Option<Spanned<RawGrants>>,
    pub(super) schedule: Option<Spanned<super::schedule::RawSchedule>>,
    pub(super) code: Option<Spanned<toml::Value>>,
    pub(super) max_task_runs: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) subflows: indexmap::IndexMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTask {
    pub(super) component: Spanned<toml::Value>,
    pub(super) input: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(super) upstream_tasks: Vec<Spanned<String>>,
    pub(super) trigger: Option<Trigger>,
    #[serde(default)]
    pub(super) retries: u32,
    pub(super) retry_delay: Option<Spanned<String>>,
    pub(super) backoff: Option<RawBackoff>,
    pub(super) fuel: Option<Spanned<toml::Value>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) memory: Option<Spanned<toml::Value>>,
    pub(super) map: Option<Spanned<toml::Value>>,
    #[serde(default = "yes")]
    pub(super) skip_on_upstream_skip: bool,
    #[serde(default)]
    pub(super) tags: Vec<String>,
    #[serde(default)]
    pub(super) worker_tags: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) on_completion: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) on_failure: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) on_retry: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) on_state: Vec<Spanned<String>>,
    pub(super) cache_for: Option<Spanned<String>>,
    pub(super) cache_validator: Option<Spanned<toml::Value>>,
    pub(super) max_retry_delay: Option<Spanned<String>>,
    pub(super) http_requests: Option<u32>,
    pub(super) http_response_bytes: Option<Spanned<toml::Value>>,
    pub(super) http_connect_timeout: Option<Spanned<String>>,
    pub(super) http_read_timeout: Option<Spanned<String>>,
    pub(super) grants: Option<Spanned<RawGrants>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    #[serde(default = "two")]
    pub(super) factor: f64,
    pub(super) max: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) jitter: f64,
}

fn two() -> f64 {
    2.0
}

/// `[grants]` or `[tasks.X.grants]`: each kind absent (inherited, for a task) or given.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrants {
    pub(super) http: Option<Vec<Spanned<toml::Value>>>,
    pub(super) tcp: Option<Vec<Spanned<String>>>,
    pub(super) files: Option<Vec<Spanned<RawFile>>>,
    pub(super) env: Option<BTreeMap<Spanned<String>, Spanned<String>>>,
    pub(super) secrets: Option<Vec<Spanned<String>>>,
}

/// One `files` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) host: Spanned<String>,
    pub(super) guest: Spanned<String>,
    pub(super) mode: Option<Spanned<String>>,
}
