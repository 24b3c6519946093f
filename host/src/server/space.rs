//! One tenant's space on a server: its directory (a Sluice home: `sluice.db`, blobs, run
//! leases), its uploaded components (`components/<blake3>.wasm`, content-addressed), its
//! runner, and the runs this process executes for it. Everything a request of the tenant
//! reads or changes is here, so nothing of another tenant can be reached.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use futures_util::StreamExt;
use tokio::sync::watch;

use super::ServerError;
use super::deployments::Deployments;
use super::events::StreamCount;
use super::fair::{FairQueue, WINDOW};
use super::problem::ApiError;
use super::secrets::{ServerKey, TenantSecrets};
use super::sources::{RunFiles, RunSources};
use super::tenants::Tenant;
use super::wire::{Cancelled, RunStarted, StartRun, Usage};
use crate::clock::ClockRef;
use crate::flow::manifest::{ComponentFiles, Policy};
use crate::grants::SecretSource;
use crate::ids::FlowRunId;
use crate::runner::{
    FlowRunner, PrepareError, PreparedFlow, RunOptions, ScheduledStart, resumable,
};
use crate::sandbox::{CancelToken, Sandbox};
use crate::store::{CancelOutcome, PgStore, SqliteStore, Store};

/// A tenant's space.
#[derive(Debug)]
pub struct Space {
    tenant: Tenant,
    dir: PathBuf,
    store: Arc<dyn Store>,
    runner: FlowRunner,
    live: Mutex<HashMap<FlowRunId, LiveRun>>,
    /// When its flow runs started, over the last minute (`runs_per_minute`).
    starts: Mutex<VecDeque<Instant>>,
    queue: FairQueue,
    clock: ClockRef,
    deployments: Deployments,
    sources: RunSources,
    secrets: Arc<TenantSecrets>,
    /// Runs found Crashed when the space opened (the server died running them), for
    /// [`Space::resume_crashed`].
    crashed: Mutex<Vec<FlowRunId>>,
    /// Its open event streams (`max_event_streams`).
    streams: StreamCount,
}

/// A run this process executes.
#[derive(Debug, Clone)]
struct LiveRun {
    cancel: CancelToken,
    /// Becomes true when the run has ended and is recorded.
    done: watch::Receiver<bool>,
}

/// The longest a request waits for a run to end (`?wait=`).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

impl Space {
    /// Open the space of `tenant` in `dir` (created, mode 0700), recording as Crashed the runs a
    /// previous process left executing.
    pub(super) fn open(
        tenant: &Tenant,
        dir: &Path,
        sandbox: &Sandbox,
        queue: &FairQueue,
        clock: &ClockRef,
        key: &ServerKey,
        backend: &super::Backend,
    ) -> Result<Space, ServerError> {
        let io = |what: &str, source| ServerError::Io {
            what: format!("tenant `{}`: {what} {}", tenant.name, dir.display()),
            source,
        };
        {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join("components"))
                .map_err(|e| io("creating", e))?;
        }
        let store_err = |source| ServerError::Store {
            tenant: tenant.name.clone(),
            source,
        };
        let store: Arc<dyn Store> = match backend {
            super::Backend::Sqlite => Arc::new(SqliteStore::open(dir).map_err(store_err)?),
            super::Backend::Postgres(db) => Arc::new(
                PgStore::open_as(
                    db,
                    &super::tenant_schema(tenant.id),
                    Some(&super::lease_owner(dir)),
                )
                .map_err(store_err)?,
            ),
        };
        let crashed = store.recover_dead(clock.now()).map_err(store_err)?;
        let secrets = Arc::new(
            TenantSecrets::open(&dir.join("space.db"), key.clone(), tenant.id)
                .map_err(|e| io("opening", std::io::Error::other(e)))?,
        );
        let runner = FlowRunner::new(sandbox.clone())
            .store(store.clone())
            .secrets(SecretSource::none().with_store(secrets.clone()))
            .tenant(tenant.id)
            .clock(clock.clone())
            .executor(queue.executor(tenant.id));
        let sources = RunSources::open(&dir.join("space.db"))
            .map_err(|e| io("opening", std::io::Error::other(e)))?;
        let deployments = Deployments::open(&dir.join("space.db"))
            .map_err(|e| io("opening", std::io::Error::other(e)))?;
        Ok(Space {
            tenant: tenant.clone(),
            dir: dir.to_owned(),
            store,
            runner,
            live: Mutex::default(),
            starts: Mutex::default(),
            queue: queue.clone(),
            clock: clock.clone(),
            deployments,
            sources,
            secrets,
            crashed: Mutex::new(crashed),
            streams: StreamCount::default(),
        })
    }

    /// Its run store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Its open event streams.
    pub(super) fn streams(&self) -> &StreamCount {
        &self.streams
    }

    /// Its secrets.
    pub fn secrets(&self) -> &TenantSecrets {
        &self.secrets
    }

    /// Its deployments.
    pub fn deployments(&self) -> &Deployments {
        &self.deployments
    }

    /// The server's clock.
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        self.clock.now()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<FlowRunId, LiveRun>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file of component `digest`, when it was uploaded.
    pub fn component_file(&self, digest: &str) -> Option<PathBuf> {
        let path = self.dir.join("components").join(format!("{digest}.wasm"));
        (is_digest(digest) && path.is_file()).then_some(path)
    }

    /// Store the component `digest` from `body`, at most `max` bytes, checking that its blake3
    /// digest is `digest`. Returns whether it is new (an upload of stored bytes changes
    /// nothing).
    pub async fn put_component(
        &self,
        tenant: &Tenant,
        digest: &str,
        body: axum::body::Body,
        max: u64,
    ) -> Result<bool, ApiError> {
        // What may still be stored, under the tenant's quota.
        let room = match tenant.quotas.max_stored_bytes {
            None => u64::MAX,
            Some(quota) => {
                let stored = self.stored_bytes();
                if stored > quota {
                    return Err(over_stored(tenant, quota, stored));
                }
                quota - stored
            }
        };
        if !is_digest(digest) {
            return Err(ApiError::bad_request(format!(
                "`{digest}` is not a component digest: 64 lowercase hex digits of blake3"
            )));
        }
        let dir = self.dir.join("components");
        let mut file = tempfile::NamedTempFile::new_in(&dir)
            .map_err(|e| ApiError::internal("storing a component", &e))?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("the upload of component {digest} broke off: {e}"))
            })?;
            size += chunk.len() as u64;
            if size > max {
                return Err(too_large(digest, max));
            }
            if size > room {
                let quota = tenant.quotas.max_stored_bytes.unwrap_or(u64::MAX);
                return Err(ApiError::quota(
                    tenant,
                    "max_stored_bytes",
                    quota,
                    format!(
                        "component {digest} does not fit: {} bytes stored, {size} bytes uploaded so far",
                        quota - room
                    ),
                ));
            }
            hasher.update(&chunk);
            std::io::Write::write_all(&mut file, &chunk)
                .map_err(|e| ApiError::internal("storing a component", &e))?;
        }
        let actual = hasher.finalize().to_hex();
        if actual.as_str() != digest {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "digest-mismatch",
                format!("the uploaded bytes have blake3 digest {actual}, not {digest}"),
            ));
        }
        // Stored already (the same bytes: they have its digest): nothing changes.
        if self.component_file(digest).is_some() {
            return Ok(false);
        }
        file.as_file()
            .sync_all()
            .map_err(|e| ApiError::internal("storing a component", &e))?;
        file.persist(dir.join(format!("{digest}.wasm")))
            .map_err(|e| ApiError::internal("storing a component", &e.error))?;
        Ok(true)
    }

    /// Parse the manifest of `req` (its components uploaded), without checking its grants.
    pub(super) fn parse(&self, req: &StartRun) -> Result<crate::flow::FlowDef, ApiError> {
        let files = Uploaded::new(self, req);
        crate::flow::manifest::parse_with_files(
            Path::new(&req.manifest_path),
            &req.manifest,
            None,
            &files,
        )
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-manifest",
                e.to_string(),
            )
        })
    }

    /// Parse and check the manifest of `req` (its components uploaded) for `tenant`: under the
    /// server's `policy` and the tenant's grant ceiling, within its per-task ceilings.
    pub fn check(
        &self,
        tenant: &Tenant,
        req: &StartRun,
        policy: &Policy,
    ) -> Result<crate::flow::FlowDef, ApiError> {
        let file = Path::new(&req.manifest_path);
        let files = Uploaded::new(self, req);
        let parse = |policy| {
            crate::flow::manifest::parse_with_files(file, &req.manifest, Some(policy), &files)
        };
        let def = parse(policy).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-manifest",
                e.to_string(),
            )
        })?;
        if let Some(key) = files.unused_subflow() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-manifest",
                format!(
                    "the request's `subflows` has `{key}`, which no manifest names as a subflow"
                ),
            ));
        }
        if let Some(ceiling) = &tenant.grants {
            let ceiling = Policy::parse(
                Path::new(&format!("grant ceiling of tenant `{}`", tenant.name)),
                ceiling,
            )
            .map_err(|e| ApiError::internal("reading the tenant's grant ceiling", &e))?;
            parse(&ceiling).map_err(|e| ApiError::quota(tenant, "grants", 0, e))?;
        }
        check_budgets(tenant, &def)?;
        Ok(def)
    }

    /// The quotas that refuse a flow run (started or resumed) whole: runs per minute, stored
    /// bytes, queued task runs; then the flow of `req` checked and prepared.
    async fn admit(
        &self,
        tenant: &Tenant,
        req: &StartRun,
        policy: &Policy,
    ) -> Result<PreparedFlow, ApiError> {
        let quotas = &tenant.quotas;
        if let Some(quota) = quotas.runs_per_minute {
            let started = self.runs_last_minute();
            if started >= quota {
                return Err(ApiError::quota(
                    tenant,
                    "runs_per_minute",
                    quota,
                    format!("{started} flow runs started in the last minute"),
                ));
            }
        }
        if let Some(quota) = quotas.max_stored_bytes {
            let stored = self.stored_bytes();
            if stored > quota {
                return Err(over_stored(tenant, quota, stored));
            }
        }
        let mut def = self.check(tenant, req, policy)?;
        if let Some(quota) = quotas.max_queued_tasks {
            let queued = self.queue.load(tenant.id).queued;
            let tasks = def.tasks.len() as u64;
            if queued + tasks > quota {
                return Err(ApiError::quota(
                    tenant,
                    "max_queued_tasks",
                    quota,
                    format!(
                        "{queued} task runs are queued, and flow `{}` has {tasks} tasks",
                        def.name
                    ),
                ));
            }
        }
        // The server never runs a manifest's build commands: components come uploaded.
        unbuilt(&mut def);
        self.runner
            .prepare(def, &self.dir)
            .await
            .map_err(prepare_error)
    }

    /// Execute `run` (the run `id`) in the background, live until it ends.
    fn spawn_live(
        self: &Arc<Self>,
        id: FlowRunId,
        cancel: CancelToken,
        run: impl Future<Output = Result<crate::runner::FlowRun, PrepareError>> + Send + 'static,
    ) {
        self.starts().push_back(Instant::now());
        let (done_tx, done) = watch::channel(false);
        self.live().insert(id, LiveRun { cancel, done });
        let space = self.clone();
        let in_flight = self.queue.run_in_flight(self.tenant.id);
        tokio::spawn(async move {
            let _in_flight = in_flight;
            if let Err(e) = run.await {
                tracing::warn!("tenant `{}`: flow run {id}: {e}", space.tenant.name);
            }
            space.live().remove(&id);
            let _ = done_tx.send(true);
        });
    }

    /// Start a run of the manifest in `req` (its components uploaded), under the server's
    /// `policy`; `scheduled` for a deployment's run (with the id its slot chose). Returns once
    /// the run is durably recorded; it executes on.
    pub async fn start_run(
        self: &Arc<Self>,
        tenant: &Tenant,
        req: StartRun,
        policy: &Policy,
        scheduled: Option<(FlowRunId, ScheduledStart)>,
    ) -> Result<RunStarted, ApiError> {
        let flow = Arc::new(self.admit(tenant, &req, policy).await?);
        let (id, scheduled) = match scheduled {
            Some((id, s)) => (id, Some(s)),
            None => (FlowRunId::new(), None),
        };
        // In the run's first write: a run is never without what resuming it needs.
        let files = RunFiles {
            components: req.components,
            subflows: req.subflows,
        };
        let options = RunOptions {
            parameters: req.parameters,
            context: req.context,
            cancel: CancelToken::new(),
            manifest: Some((PathBuf::from(&req.manifest_path), req.manifest)),
            files: Some(files.to_stored()),
            id: Some(id),
            scheduled,
            parent: None,
        };
        let cancel = options.cancel.clone();
        let started = self.runner.start(&flow, options).map_err(prepare_error)?;
        let (tasks, name) = (flow.def().tasks.len(), flow.def().name.clone());
        let space = self.clone();
        self.spawn_live(id, cancel, async move {
            space.runner.finish(&flow, started).await
        });
        self.store
            .flush_async()
            .await
            .map_err(|e| ApiError::internal("recording the run", &e))?;
        Ok(RunStarted {
            id,
            flow: name,
            tasks,
        })
    }

    /// Resume run `id` (as `sluice resume`: `start` tasks as roots), under the quotas that
    /// refuse a run; `after_crash` for the server's own resumption of a run it was executing
    /// when it died (only when [`resumable::resumes_after_crash`] allows, retries continuing).
    /// Returns once it executes.
    pub async fn resume_run(
        self: &Arc<Self>,
        tenant: &Tenant,
        id: FlowRunId,
        start: Vec<String>,
        policy: &Policy,
        after_crash: bool,
    ) -> Result<RunStarted, ApiError> {
        let conflict =
            |detail: String| ApiError::new(StatusCode::CONFLICT, "not-resumable", detail);
        if self.live().contains_key(&id) {
            return Err(conflict(format!(
                "flow run {id} is running; cancel it first (`sluice cancel {id}`)"
            )));
        }
        let store = self.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.load_run(id))
            .await
            .map_err(|e| ApiError::internal("reading the run", &e))?
            .map_err(|e| ApiError::store("reading the run", e))?;
        if let Some(parent) = stored.run.context.get(crate::runner::PARENT_FLOW_RUN) {
            return Err(conflict(format!(
                "flow run {id} is a subflow's run of flow run {parent}: resume that one (`sluice \
                 resume {parent}`), which resumes this run where it stopped"
            )));
        }
        let (path, text) =
            resumable::check(&stored, &start).map_err(|e| conflict(e.to_string()))?;
        // Recorded with the run; a run recorded before that (schema 11) has them in `space.db`.
        let files = match stored.files.as_deref() {
            Some(text) => RunFiles::from_stored(text),
            None => self.sources.get(id)?,
        };
        let files = files.ok_or_else(|| {
            conflict(format!(
                "flow run {id} has no recorded components, so its flow cannot be rebuilt"
            ))
        })?;
        let req = StartRun {
            manifest: text,
            manifest_path: path.display().to_string(),
            components: files.components,
            subflows: files.subflows,
            parameters: BTreeMap::new(),
            context: BTreeMap::new(),
        };
        let flow = Arc::new(self.admit(tenant, &req, policy).await?);
        let mut run = stored.run;
        if after_crash {
            resumable::resumes_after_crash(&run, flow.def())
                .map_err(|why| conflict(format!("flow run {id} stays Crashed: {why}")))?;
        }
        resumable::fill_missing_tasks(&mut run, flow.def(), self.clock.now());
        let (tasks, name) = (flow.def().tasks.len(), flow.def().name.clone());
        let cancel = CancelToken::new();
        let space = self.clone();
        let token = cancel.clone();
        self.spawn_live(id, cancel, async move {
            match after_crash {
                true => space.runner.resume_crashed(&flow, run, token).await,
                false => {
                    let start: Vec<&str> = start.iter().map(String::as_str).collect();
                    space.runner.resume(&flow, run, &start, token).await
                }
            }
        });
        Ok(RunStarted {
            id,
            flow: name,
            tasks,
        })
    }

    /// Resume the runs found Crashed when the space opened, those the rule of [`resumable`]
    /// allows (the others stay Crashed, for `sluice resume`).
    pub async fn resume_crashed(self: &Arc<Self>, tenant: &Tenant, policy: &Policy) {
        let crashed = std::mem::take(&mut *self.crashed.lock().unwrap_or_else(|p| p.into_inner()));
        for id in crashed {
            match self.resume_run(tenant, id, Vec::new(), policy, true).await {
                Ok(_) => tracing::info!("tenant `{}`: resumed crashed flow run {id}", tenant.name),
                Err(e) => tracing::info!("tenant `{}`: {}", tenant.name, e.detail),
            }
        }
    }

    fn starts(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.starts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Flow runs started in the last minute.
    pub fn runs_last_minute(&self) -> u64 {
        let mut starts = self.starts();
        let now = Instant::now();
        while starts
            .front()
            .is_some_and(|t| now.duration_since(*t) >= WINDOW)
        {
            starts.pop_front();
        }
        starts.len() as u64
    }

    /// Bytes stored for the tenant: its components, its space's files (deployments, secrets)
    /// and its run store (its files, or its schema's tables).
    pub fn stored_bytes(&self) -> u64 {
        let size = |dir: &Path, only: &dyn Fn(&str) -> bool| -> u64 {
            std::fs::read_dir(dir)
                .map(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .filter(|e| e.file_name().to_str().is_some_and(only))
                        .filter_map(|e| e.metadata().ok())
                        .filter(std::fs::Metadata::is_file)
                        .map(|m| m.len())
                        .sum()
                })
                .unwrap_or(0)
        };
        let store = self.store.stored_bytes().unwrap_or_else(|e| {
            tracing::warn!("tenant `{}`: the size of its store: {e}", self.tenant.name);
            0
        });
        size(&self.dir.join("components"), &|_| true)
            + size(&self.dir, &|name| name.starts_with("space.db"))
            + store
    }

    /// What the tenant uses now, against its quotas.
    pub fn usage(&self, tenant: &Tenant) -> Usage {
        let load = self.queue.load(tenant.id);
        Usage {
            tenant: tenant.name.clone(),
            weight: tenant.weight,
            quotas: tenant.quotas.clone(),
            queued_tasks: load.queued,
            running_tasks: load.running,
            runs_last_minute: self.runs_last_minute(),
            fuel_last_minute: load.fuel_last_minute,
            stored_bytes: self.stored_bytes(),
        }
    }

    /// Resolve a run id or unique prefix.
    pub fn resolve(&self, id: &str) -> Result<FlowRunId, ApiError> {
        self.store
            .resolve_run(id)
            .map_err(|e| ApiError::store("reading runs", e))
    }

    /// Wait until run `id` ends or `wait` passes, when this process executes it.
    pub async fn wait(&self, id: FlowRunId, wait: Duration) {
        let Some(mut done) = self.live().get(&id).map(|l| l.done.clone()) else {
            return;
        };
        let _ = tokio::time::timeout(wait.min(MAX_WAIT), done.wait_for(|d| *d)).await;
    }

    /// Cancel run `id`.
    pub fn cancel(&self, id: FlowRunId) -> Result<Cancelled, ApiError> {
        let live = self.live().get(&id).map(|l| l.cancel.clone());
        if let Some(cancel) = live {
            cancel.cancel();
            self.queue.cancelled();
            return Ok(Cancelled::Requested);
        }
        match self.store.cancel(id, self.clock.now()) {
            Ok(CancelOutcome::Requested) => Ok(Cancelled::Requested),
            Ok(CancelOutcome::Cancelled) => Ok(Cancelled::Cancelled),
            Ok(CancelOutcome::AlreadyFinished(state)) => Ok(Cancelled::AlreadyFinished { state }),
            Err(e) => Err(ApiError::store("cancelling the run", e)),
        }
    }
}

fn over_stored(tenant: &Tenant, quota: u64, stored: u64) -> ApiError {
    ApiError::quota(
        tenant,
        "max_stored_bytes",
        quota,
        format!("{stored} bytes are stored"),
    )
}

/// Each task's fuel, memory and deadline within the tenant's ceilings, and those of a code
/// flow's body and of its subflows (and theirs).
fn check_budgets(tenant: &Tenant, def: &crate::flow::FlowDef) -> Result<(), ApiError> {
    if let Some(body) = &def.body {
        let what = format!("the body of flow `{}`", def.name);
        check_budget(tenant, &what, "code.", &body.budget)?;
    }
    for t in &def.tasks {
        match &t.subflow {
            Some(sub) => check_budgets(tenant, &sub.def)?,
            None => check_budget(tenant, &format!("task `{}`", t.name), "", &t.budget)?,
        }
    }
    Ok(())
}

/// The fuel, memory and deadline of `what` (whose keys start with `key`) within the tenant's
/// ceilings.
fn check_budget(
    tenant: &Tenant,
    what: &str,
    key: &str,
    b: &crate::sandbox::RunBudget,
) -> Result<(), ApiError> {
    let q = &tenant.quotas;
    if let Some(max) = q.max_task_fuel {
        match b.fuel {
            Some(fuel) if fuel <= max => {}
            fuel => {
                return Err(ApiError::quota(
                    tenant,
                    "max_task_fuel",
                    max,
                    format!(
                        "{what} is given {}: set its `{key}fuel` to at most {max}",
                        fuel.map_or_else(|| "unlimited fuel".to_owned(), |f| format!("{f} fuel"))
                    ),
                ));
            }
        }
    }
    if let Some(max) = q.max_task_memory
        && b.memory_bytes > max
    {
        return Err(ApiError::quota(
            tenant,
            "max_task_memory",
            max,
            format!(
                "{what} is given {} bytes of memory: set its `{key}memory` to at most {max} bytes",
                b.memory_bytes
            ),
        ));
    }
    if let Some(max) = q.max_task_timeout_ms
        && b.timeout > Duration::from_millis(max)
    {
        return Err(ApiError::quota(
            tenant,
            "max_task_timeout_ms",
            max,
            format!(
                "{what} is given a {} ms deadline: set its `{key}timeout` to at most {max} ms",
                b.timeout.as_millis()
            ),
        ));
    }
    Ok(())
}

/// `def` without build commands (and sources), its body's and its subflows' too: the server
/// runs uploaded components and never builds.
fn unbuilt(def: &mut crate::flow::FlowDef) {
    if let Some(body) = &mut def.body {
        body.build = None;
        body.sources.clear();
    }
    for t in &mut def.tasks {
        t.build = None;
        t.sources.clear();
        if let Some(sub) = &mut t.subflow {
            unbuilt(&mut std::sync::Arc::make_mut(sub).def);
        }
    }
}

/// The answer to an upload over `max` bytes (declared or read).
pub(super) fn too_large(digest: &str, max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too-large",
        format!(
            "component {digest} is larger than the server's component size limit of {max} bytes ({})",
            bytesize::ByteSize(max)
        ),
    )
}

fn prepare_error(e: PrepareError) -> ApiError {
    match e {
        PrepareError::Store(e) => ApiError::store("recording the run", e),
        PrepareError::NotRecorded { .. } => ApiError::internal("recording the run", &e),
        e => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-flow",
            e.to_string(),
        ),
    }
}

/// 64 lowercase hex digits.
pub(super) fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A run request's files: each component path the manifest and its subflows name → an
/// uploaded component, and each subflow manifest path → its text.
struct Uploaded<'a> {
    space: &'a Space,
    req: &'a StartRun,
    /// The keys of `req.subflows` the parse looked up.
    used: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl<'a> Uploaded<'a> {
    fn new(space: &'a Space, req: &'a StartRun) -> Self {
        Uploaded {
            space,
            req,
            used: Default::default(),
        }
    }

    /// A subflow manifest the request brings that no manifest names: refused, not stored.
    fn unused_subflow(&self) -> Option<&str> {
        let used = self.used.borrow();
        self.req
            .subflows
            .keys()
            .find(|k| !used.contains(*k))
            .map(String::as_str)
    }
}

impl ComponentFiles for Uploaded<'_> {
    /// Never read from the server's disk: a tenant names no file there.
    fn subflow(&self, local: &Path) -> Result<String, String> {
        let key = local.display().to_string();
        let text = self.req.subflows.get(&key).cloned().ok_or_else(|| {
            format!("has no manifest in the request's `subflows` (expected the key `{key}`)")
        })?;
        self.used.borrow_mut().insert(key);
        Ok(text)
    }

    fn file(&self, written: &Path, local: &Path, _build: bool) -> Result<PathBuf, String> {
        // As resolved beside the manifest naming it; else as written (a client that keys the
        // top manifest's components so, with a `manifest_path` in a directory).
        let key = local.display().to_string();
        let digest = self
            .req
            .components
            .get(&key)
            .or_else(|| self.req.components.get(&written.display().to_string()));
        let Some(digest) = digest else {
            return Err(format!(
                "has no digest in the request's `components` (expected the key `{key}`)"
            ));
        };
        self.space.component_file(digest).ok_or_else(|| {
            format!(
                "is component {digest}, which was not uploaded (PUT /api/v1/components/{digest})"
            )
        })
    }
}
