//! The server API's bodies: plain serde types that the server writes and the CLI's client reads,
//! and the views of a run that `sluice show`, `runs` and `logs` print, gathered the same way
//! from a local store ([`RunView::load`]) as the server gathers them for `GET /api/v1/runs/{id}`.
//! So a command prints the same thing, byte for byte, in embedded mode and against a server.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{FlowRunId, TaskRunId};
use crate::runner::FlowRun;
use crate::state::StateName;
use crate::store::{LogTail, RunSummary, Store, StoreError, StoredLog, TailLimits};

/// `POST /api/v1/runs`: run a flow manifest whose components were uploaded.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StartRun {
    /// The manifest's TOML text.
    pub manifest: String,
    /// The manifest's path as the client knows it: positions in errors name it, and the paths
    /// the manifest names are resolved against its directory (lexically: the server reads no
    /// file there).
    pub manifest_path: String,
    /// Each component file the manifest and its subflows name (tasks, handlers, a code flow's
    /// body), resolved against the directory of the manifest naming it and lexically
    /// normalized (with a bare file name as `manifest_path`: as written) → the blake3 digest (64
    /// hex digits) of the component uploaded with `PUT /api/v1/components/{digest}`.
    pub components: BTreeMap<String, String>,
    /// Each subflow manifest a code flow's `[subflows]` (and theirs) name, resolved as
    /// `components` are → its TOML text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subflows: BTreeMap<String, String>,
    /// Parameter values (override the manifest's defaults).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: BTreeMap<String, Value>,
    /// Context values (override the manifest's `[context]`).
    #[serde(default)]
    pub context: BTreeMap<String, String>,
}

/// The answer to `POST /api/v1/runs`: the run is recorded (durably) and executing.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunStarted {
    /// The new flow run.
    #[schema(value_type = String)]
    pub id: FlowRunId,
    /// Its flow.
    pub flow: String,
    /// How many tasks the flow has.
    pub tasks: usize,
}

/// One task's grants, as `sluice show` prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskGrants {
    /// The task.
    pub task: String,
    /// Its grants, serialized.
    pub grants: Value,
    /// One line per grant.
    pub lines: Vec<String>,
}

/// One task of a flow and the tasks it depends on: an edge list of the flow's graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskUpstream {
    /// The task.
    pub task: String,
    /// Its upstream tasks: data dependencies first, then state-only ones.
    pub upstream: Vec<String>,
}

/// A flow run as `sluice show` prints it (and `GET /api/v1/runs/{id}` returns it).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunView {
    /// The record: task runs, states, histories, outputs (no logs).
    #[schema(value_type = Object)]
    pub run: FlowRun,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Whether a process is executing it now.
    pub live: bool,
    /// When cancellation was requested, if it was.
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// The manifest's path as recorded.
    pub manifest: Option<String>,
    /// Blobs that could not be read.
    pub problems: Vec<String>,
    /// Each task's grants, from the recorded manifest.
    #[schema(value_type = Option<Vec<Object>>)]
    pub grants: Option<Vec<TaskGrants>>,
    /// Why the grants are not known, when they are not.
    pub grants_unknown: Option<String>,
    /// The flow's graph, from the recorded manifest (in its order), when it parses.
    #[schema(value_type = Option<Vec<Object>>)]
    pub graph: Option<Vec<TaskUpstream>>,
    /// The newest log records of each task run (see [`TailLimits::default`]).
    #[schema(value_type = Object)]
    pub log_tails: HashMap<TaskRunId, LogTail>,
}

impl RunView {
    /// Gather the view of `id` from `store`. Log tails that cannot be read are left out, with a
    /// warning in `problems`.
    pub fn load(store: &dyn Store, id: FlowRunId) -> Result<RunView, StoreError> {
        let stored = store.load_run(id)?;
        let live = store.is_live(id);
        let mut problems: Vec<String> = stored.problems.iter().map(ToString::to_string).collect();
        let (grants, grants_unknown, graph) = match &stored.manifest {
            None => (
                None,
                Some("the run was not started from a manifest".to_owned()),
                None,
            ),
            Some((path, text)) => {
                match crate::flow::manifest::parse_with_files(path, text, None, &AnyFiles) {
                    Ok(def) => (
                        Some(
                            def.tasks
                                .iter()
                                .map(|t| TaskGrants {
                                    grants: serde_json::to_value(&t.grants).unwrap_or(Value::Null),
                                    lines: t.grants.lines(),
                                    task: t.name.clone(),
                                })
                                .collect(),
                        ),
                        None,
                        Some(
                            def.tasks
                                .iter()
                                .map(|t| TaskUpstream {
                                    task: t.name.clone(),
                                    upstream: t.upstream().into_iter().map(str::to_owned).collect(),
                                })
                                .collect(),
                        ),
                    ),
                    Err(e) => (
                        None,
                        Some(format!("the recorded manifest no longer parses: {e}")),
                        None,
                    ),
                }
            }
        };
        let log_tails = store
            .log_tails(id, &TailLimits::default())
            .unwrap_or_else(|e| {
                problems.push(format!("the logs of flow run {id} cannot be read: {e}"));
                HashMap::new()
            });
        Ok(RunView {
            run: stored.run,
            created_at: stored.created_at,
            live,
            cancel_requested_at: stored.cancel_requested_at,
            manifest: stored
                .manifest
                .as_ref()
                .map(|(p, _)| p.display().to_string()),
            problems,
            grants,
            grants_unknown,
            graph,
            log_tails,
        })
    }
}

/// Component paths taken as they are written, whether or not the files exist, and subflows
/// not read: reading a recorded manifest for its grants needs neither.
struct AnyFiles;

impl crate::flow::manifest::ComponentFiles for AnyFiles {
    fn file(
        &self,
        _written: &std::path::Path,
        local: &std::path::Path,
        _build: bool,
    ) -> Result<std::path::PathBuf, String> {
        Ok(local.to_owned())
    }

    /// Not read: a subflow's task run has no grants of its own, and each child run records
    /// its own manifest. An empty flow stands for it.
    fn subflow(&self, _local: &std::path::Path) -> Result<String, String> {
        Ok("name = \"subflow\"\n".into())
    }
}

/// One line of `sluice runs` (`GET /api/v1/runs`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunItem {
    /// The run.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub summary: RunSummary,
    /// Whether a process is executing it now.
    pub live: bool,
}

/// A page of a run's logs (`GET /api/v1/runs/{id}/logs`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogPage {
    /// The lines, in order; the next page starts after the last one's `seq`. Empty: no more
    /// lines now.
    #[schema(value_type = Vec<Object>)]
    pub lines: Vec<StoredLog>,
    /// Whether the run was live before the page was read: more lines may come.
    pub live: bool,
}

/// `POST /api/v1/runs/{id}/resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResumeRun {
    /// Tasks to run as roots, without their trigger check (e.g. a `manual_only` task that
    /// paused the run).
    #[serde(default)]
    pub start: Vec<String>,
}

/// What `POST /api/v1/runs/{id}/cancel` did.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Cancelled {
    /// The run was executing: it was told to stop and records Cancelled.
    Requested,
    /// The run was not executing: it was recorded Cancelled.
    Cancelled,
    /// The run had already ended in this state.
    AlreadyFinished {
        /// Its state.
        #[schema(value_type = String)]
        state: StateName,
    },
}

/// An uploaded component.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ComponentInfo {
    /// Its blake3 digest (64 hex digits).
    pub digest: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// An error, as `application/problem+json` (RFC 9457), with a stable `code`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:sluice:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, naming the run, task, field, quota or limit.
    pub detail: String,
    /// The stable code: `unauthorized`, `not-found`, `bad-request`, `invalid-manifest`,
    /// `digest-mismatch`, `too-large`, `quota-exceeded`, `internal`.
    pub code: String,
}

/// What a tenant uses now, against its quotas (`GET /api/v1/usage`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// The tenant.
    pub tenant: String,
    /// Its share of the run slots against other busy tenants.
    pub weight: u32,
    /// Its quotas (`null`: unlimited).
    #[schema(value_type = Object)]
    pub quotas: crate::server::tenants::Quotas,
    /// Task runs waiting in the server's queue.
    pub queued_tasks: u64,
    /// Task runs running.
    pub running_tasks: u64,
    /// Flow runs started in the last 60 s.
    pub runs_last_minute: u64,
    /// Fuel used by task runs that ended in the last 60 s.
    pub fuel_last_minute: u64,
    /// Bytes stored: components and the run store.
    pub stored_bytes: u64,
}

/// `POST /api/v1/deployments`: register a flow whose manifest has a `[schedule]` (a new
/// deployment, or a new version of one: its runs not started yet are planned again).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deploy {
    /// The deployment's name (default: the flow's name): 1 to 64 letters, digits, `-`, `_`, `.`.
    #[serde(default)]
    pub name: Option<String>,
    /// The flow, as for a run (its `parameters` and `context` are not used: the schedule's
    /// parameters are).
    #[serde(flatten)]
    pub flow: StartRun,
}

/// A deployment.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentView {
    /// Its name.
    pub name: String,
    /// The flow it runs.
    pub flow: String,
    /// When: `cron "0 6 * * 1-5" (Europe/Berlin)` or `every 10m`.
    pub schedule: String,
    /// What happens to runs missed while the server was down or the deployment paused.
    pub catchup: String,
    /// A run not started this many seconds after its time is Late.
    pub late_after_seconds: i64,
    /// Its runs' parameters.
    #[schema(value_type = Object)]
    pub parameters: BTreeMap<String, Value>,
    /// Whether it is paused (it starts nothing).
    pub paused: bool,
    /// When it was first deployed.
    pub created_at: DateTime<Utc>,
    /// When it was last deployed, paused or resumed.
    pub updated_at: DateTime<Utc>,
    /// Its next three slots (none while paused).
    pub upcoming: Vec<DateTime<Utc>>,
}

/// One slot of a deployment.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SlotView {
    /// Its time.
    pub at: DateTime<Utc>,
    /// `Scheduled` or `Late` (not started); `Cancelled` (skipped by the catch-up policy) or
    /// `Failed` (could not start: `message` says why); else its run's state (`Started` when the
    /// run is older than those listed).
    pub state: String,
    /// Its run, once started.
    #[schema(value_type = Option<String>)]
    pub run: Option<FlowRunId>,
    /// Why it is in that state, when the scheduler says.
    pub message: Option<String>,
}

/// `GET /api/v1/deployments/{name}/runs`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeploymentRuns {
    /// The deployment.
    pub deployment: String,
    /// Slots not started, oldest first.
    pub upcoming: Vec<SlotView>,
    /// Slots started, skipped or refused, newest first.
    pub past: Vec<SlotView>,
}

/// One entry of `GET /api/v1/cache`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheItem {
    /// The entry (key, task, validator, component, blob, size, created_at, expires_at,
    /// flow_run, task_run).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub entry: crate::store::CacheEntry,
    /// Whether it has not expired.
    pub valid: bool,
}

/// `GET /api/v1/cache/{key}`: an entry and its cached value.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheValue {
    /// The entry.
    #[serde(flatten)]
    pub item: CacheItem,
    /// The cached output.
    #[schema(value_type = Object)]
    pub value: Value,
}

/// `DELETE /api/v1/cache`: how many entries were removed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CacheCleared {
    /// Entries removed (runs keep their results).
    pub removed: u64,
}

/// `PUT /api/v1/secrets/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetSecret {
    /// The value (8 bytes to 64 KiB of UTF-8). It is never returned.
    pub value: String,
}

/// A secret of the tenant, without its value.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SecretInfo {
    /// Its name.
    pub name: String,
    /// When it was last set.
    pub updated_at: DateTime<Utc>,
}
