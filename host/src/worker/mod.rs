//! `sluice worker`: a process that runs task-run attempts for a server (`sluice server
//! --database URL --workers`). It claims attempts in batches through the server's worker API
//! (long polls: the server answers as soon as attempts are enqueued), runs each in its own
//! sandbox, extends its claims while they run (every third of the lease, at most every
//! second), and reports results in batches. A claim the server says it no longer gives it (it
//! lapsed: the worker was stopped or cut off for a lease) is stopped when the worker hears so,
//! and its result not counted (until then it may run beside its retry on another worker); an
//! attempt whose flow run was cancelled is stopped and reported Cancelled. A component is
//! fetched by digest once and kept under the worker's directory; the sandbox keeps its
//! precompiled form in the per-user artifact cache, so nothing is compiled twice on one machine.
//! While the server is unreachable the worker keeps running what it holds and keeps its results
//! (at most its concurrency: it claims nothing new until they are reported), reporting them
//! once the server is back.

pub mod wire;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::json::Json;
use crate::runner::executor::{Job, LocalExecutor};
use crate::runner::machine::Unit;
use crate::sandbox::{CancelToken, Ending, RunGrants, RunOutcome, Sandbox, TaskComponent};
use wire::{
    ClaimRef, ClaimRequest, ClaimResponse, ClaimedJob, ExtendRequest, ExtendResponse,
    FinishRequest, FinishResponse, FinishedJob, WireOutcome,
};

/// How long a claim waits at the server for work.
const CLAIM_WAIT: Duration = Duration::from_secs(20);

/// The most results reported in one call.
const REPORT_BATCH: usize = 512;

/// The most bytes of results reported in one call (a larger result goes alone).
const REPORT_BYTES: usize = 8 << 20;

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server refused the worker's token.
    #[error("the server {server} refused the worker token: {detail}")]
    Unauthorized {
        /// The server.
        server: String,
        /// What it said.
        detail: String,
    },
    /// The server does not give task runs to workers.
    #[error("the server {server} does not give task runs to workers: {detail}")]
    NoWorkers {
        /// The server.
        server: String,
        /// What it said.
        detail: String,
    },
    /// The server refused a request as not valid (a bug of one side, or versions that do not
    /// match).
    #[error("the server {server} refused a request: {detail}")]
    Refused {
        /// The server.
        server: String,
        /// What it said.
        detail: String,
    },
    /// Setting up failed.
    #[error("{0}")]
    Setup(String),
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The server's base URL (`http://host:port`).
    pub server: String,
    /// The worker token.
    pub token: String,
    /// Attempts run at once.
    pub concurrency: u32,
    /// Tags carried: attempts that need them may be claimed.
    pub tags: Vec<String>,
    /// Where fetched components are kept.
    pub dir: PathBuf,
}

/// A claim being run: stopped through its token.
struct Held {
    cancel: CancelToken,
    /// The server no longer gives it to this worker.
    lost: bool,
}

struct Shared {
    config: WorkerConfig,
    instance: String,
    http: reqwest::Client,
    sandbox: Sandbox,
    local: LocalExecutor,
    held: Mutex<HashMap<ClaimRef, Held>>,
    /// Components by digest, each loaded once (concurrent jobs of one digest wait for the
    /// first; a failed load is tried again by the next job).
    components: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<TaskComponent>>>>,
    /// The lease the server gives claims.
    lease: Mutex<Duration>,
}

/// A result waiting to be reported, with the slot it holds until it is.
struct Report {
    result: FinishedJob,
    _slot: OwnedSemaphorePermit,
}

/// Run a worker until `shutdown` completes: then it claims nothing more, finishes and reports
/// what it holds, and returns.
pub async fn run(
    config: WorkerConfig,
    sandbox: Sandbox,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), WorkerError> {
    std::fs::create_dir_all(config.dir.join("components")).map_err(|e| {
        WorkerError::Setup(format!(
            "cannot create the worker's directory {}: {e}",
            config.dir.display()
        ))
    })?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let instance = format!(
        "{}/{}/{}",
        host.trim(),
        std::process::id(),
        ulid::Ulid::new()
    );
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(CLAIM_WAIT + Duration::from_secs(30))
        .build()
        .map_err(|e| WorkerError::Setup(format!("cannot start the HTTP client: {e}")))?;
    let concurrency = config.concurrency.max(1);
    let shared = Arc::new(Shared {
        local: LocalExecutor::new(sandbox.clone()),
        sandbox,
        config,
        instance,
        http,
        held: Mutex::default(),
        components: Mutex::default(),
        lease: Mutex::new(Duration::from_secs(30)),
    });
    let slots = Arc::new(Semaphore::new(concurrency as usize));
    let (reports, reported) = mpsc::unbounded_channel::<Report>();
    let reporter = tokio::spawn(report_loop(shared.clone(), reported));
    let extender = tokio::spawn(extend_loop(shared.clone()));
    tokio::pin!(shutdown);
    let mut backoff = Backoff::default();
    let mut stopping = false;
    let outcome = loop {
        if stopping {
            break Ok(());
        }
        // A slot first: nothing is claimed that could not start at once.
        let first = tokio::select! {
            () = &mut shutdown => break Ok(()),
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
        };
        let mut permits = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            permits.push(p);
        }
        let req = ClaimRequest {
            instance: shared.instance.clone(),
            tags: shared.config.tags.clone(),
            max: u32::try_from(permits.len()).unwrap_or(u32::MAX),
            concurrency,
            wait_ms: u64::try_from(CLAIM_WAIT.as_millis()).unwrap_or(u64::MAX),
        };
        // A claim in flight when the worker is told to stop is waited for (its attempts run):
        // dropped, what the server claimed for it would lapse and count as lost.
        let claim = shared.post::<_, ClaimResponse>("claim", &req, None);
        tokio::pin!(claim);
        let claimed = tokio::select! {
            () = &mut shutdown => {
                stopping = true;
                (&mut claim).await
            }
            claimed = &mut claim => claimed,
        };
        let response = match claimed {
            Ok(r) => {
                backoff.reset(&shared.config.server);
                r
            }
            Err(Call::Fatal(e)) => break Err(e),
            Err(Call::Retry(_)) if stopping => break Ok(()),
            Err(Call::Retry(e)) => {
                backoff.wait("claiming", &e).await;
                continue;
            }
        };
        *shared.lease.lock().unwrap_or_else(|p| p.into_inner()) =
            Duration::from_millis(response.lease_ms.max(1));
        let parameters: HashMap<_, Arc<str>> = response
            .parameters
            .into_iter()
            .map(|(run, p)| (run, Arc::from(p)))
            .collect();
        for (job, permit) in response.jobs.into_iter().zip(permits.drain(..)) {
            let params = parameters.get(&job.job.ctx.flow_run_id).cloned();
            let cancel = CancelToken::new();
            shared
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    job.claim,
                    Held {
                        cancel: cancel.clone(),
                        lost: false,
                    },
                );
            let (shared, reports) = (shared.clone(), reports.clone());
            tokio::spawn(async move {
                let claim = job.claim;
                let outcome = shared.run_job(job, params, cancel).await;
                let lost = shared
                    .held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&claim)
                    .is_some_and(|h| h.lost);
                if lost {
                    tracing::warn!(
                        "task run {} attempt {}: its claim lapsed while it ran; its result \
                         is dropped (the server retries it)",
                        claim.task_run,
                        claim.attempt
                    );
                    shared
                        .held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&claim);
                    drop(permit);
                    return;
                }
                let _ = reports.send(Report {
                    result: FinishedJob {
                        claim,
                        outcome: WireOutcome::from(&outcome),
                    },
                    _slot: permit,
                });
            });
        }
        // Unused permits (fewer attempts than asked) drop here.
    };
    // Finish what is held: every slot back means every attempt ran and was reported.
    drop(reports);
    let _ = slots.acquire_many(concurrency).await;
    extender.abort();
    let _ = reporter.await;
    outcome
}

/// Why a call failed: worth trying again, or not.
enum Call {
    Retry(String),
    Fatal(WorkerError),
}

/// Waits between failed calls: 100 ms doubling to 5 s; says once when the server is
/// unreachable and once when it is back.
#[derive(Default)]
struct Backoff {
    next: Option<Duration>,
}

impl Backoff {
    async fn wait(&mut self, what: &str, e: &str) {
        let d = match self.next {
            None => {
                tracing::warn!("{what}: {e}; trying again");
                Duration::from_millis(100)
            }
            Some(d) => (d * 2).min(Duration::from_secs(5)),
        };
        self.next = Some(d);
        tokio::time::sleep(d).await;
    }

    fn reset(&mut self, server: &str) {
        if self.next.take().is_some() {
            tracing::info!("{server} answers again");
        }
    }
}

impl Shared {
    fn url(&self, path: &str) -> String {
        format!(
            "{}/api/v1/worker/{path}",
            self.config.server.trim_end_matches('/')
        )
    }

    /// POST `body` to worker route `path`.
    async fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        within: Option<Duration>,
    ) -> Result<R, Call> {
        let mut request = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.config.token)
            .json(body);
        if let Some(d) = within {
            request = request.timeout(d);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Call::Retry(format!("{}: {e}", self.config.server)))?;
        self.answer(response).await
    }

    async fn answer<R: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<R, Call> {
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(|e| {
                Call::Retry(format!("{}: an unreadable answer: {e}", self.config.server))
            });
        }
        let detail = response
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["detail"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.to_string());
        let server = self.config.server.clone();
        Err(match status.as_u16() {
            401 => Call::Fatal(WorkerError::Unauthorized { server, detail }),
            404 => Call::Fatal(WorkerError::NoWorkers { server, detail }),
            408 | 429 => Call::Retry(format!("{server}: {status}: {detail}")),
            400..=499 => Call::Fatal(WorkerError::Refused { server, detail }),
            _ => Call::Retry(format!("{server}: {status}: {detail}")),
        })
    }

    /// Run one claimed attempt; a setup failure (its component cannot be fetched or loaded,
    /// its job is not valid) is a host fault.
    async fn run_job(
        &self,
        claimed: ClaimedJob,
        parameters: Option<Arc<str>>,
        cancel: CancelToken,
    ) -> RunOutcome {
        let ClaimedJob { job, .. } = claimed;
        let fault = |message: String| RunOutcome {
            ending: Ending::HostFault { message },
            logs: Vec::new(),
            logs_dropped_bytes: 0,
            usage: Default::default(),
        };
        let component = match self
            .component(&job.tenant.to_string(), &job.component)
            .await
        {
            Ok(c) => c,
            // Maybe passing (the server restarting) and maybe this machine's: retried, as an
            // attempt lost with its worker is, while retries remain.
            Err(e) => {
                return RunOutcome {
                    ending: Ending::Lost {
                        message: format!(
                            "worker {} could not get the task's component: {e}",
                            self.instance
                        ),
                    },
                    logs: Vec::new(),
                    logs_dropped_bytes: 0,
                    usage: Default::default(),
                };
            }
        };
        let input = match Json::parse(&job.input) {
            Ok(i) => i,
            Err(e) => return fault(format!("the job's input is not JSON: {e}")),
        };
        let grants = match RunGrants::from_wire(job.grants) {
            Ok(g) => g,
            Err(e) => return fault(format!("the job's grants: {e}")),
        };
        let mut ctx = crate::context::TaskContext::from(job.ctx);
        ctx.parameters = parameters.unwrap_or_else(|| Arc::from("{}"));
        let run = ctx.flow_run_id;
        self.local
            .run_here(Job {
                run,
                unit: Unit {
                    task: 0,
                    child: None,
                },
                component,
                input,
                ctx,
                budget: job.budget,
                grants: Arc::new(grants),
                cancel,
                slot: None,
                tags: Vec::new(),
            })
            .await
            .outcome
    }

    /// Component `digest` of `tenant`: loaded already, or from the worker's directory, or
    /// fetched from the server (checked against its digest, then kept).
    async fn component(&self, tenant: &str, digest: &str) -> Result<TaskComponent, String> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{digest:?} is not a component digest"));
        }
        // One fetch and load per digest at a time; jobs of other digests do not wait for it.
        let cell = self
            .components
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.to_owned())
            .or_default()
            .clone();
        cell.get_or_try_init(|| async {
            let path = self
                .config
                .dir
                .join("components")
                .join(format!("{digest}.wasm"));
            if !path.is_file() {
                self.fetch(tenant, digest, &path).await?;
            }
            self.sandbox
                .load_file(&path)
                .await
                .map_err(|e| format!("component {digest}: {e}"))
        })
        .await
        .cloned()
    }

    async fn fetch(&self, tenant: &str, digest: &str, path: &Path) -> Result<(), String> {
        let url = self.url(&format!("components/{tenant}/{digest}"));
        let mut last = String::new();
        for delay in [0, 200, 1000, 3000] {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let response = match self
                .http
                .get(&url)
                .bearer_auth(&self.config.token)
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    last = format!("fetching component {digest}: {e}");
                    continue;
                }
            };
            if !response.status().is_success() {
                last = format!(
                    "fetching component {digest}: the server answered {}",
                    response.status()
                );
                if response.status().is_client_error() {
                    break;
                }
                continue;
            }
            let max = self.sandbox.max_component_bytes();
            if response.content_length().is_some_and(|n| n > max) {
                return Err(format!(
                    "component {digest} is larger than the worker's limit of {max} bytes"
                ));
            }
            let bytes = match response.bytes().await {
                Ok(b) => b,
                Err(e) => {
                    last = format!("fetching component {digest}: {e}");
                    continue;
                }
            };
            if blake3::hash(&bytes).to_hex().as_str() != digest {
                return Err(format!(
                    "the server sent bytes for component {digest} that do not match its digest"
                ));
            }
            // Written aside, then renamed: a worker killed mid-write leaves no partial file.
            let tmp = path.with_extension(format!("wasm.{}", ulid::Ulid::new()));
            std::fs::write(&tmp, &bytes)
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| format!("keeping component {digest} at {}: {e}", path.display()))?;
            return Ok(());
        }
        Err(last)
    }
}

/// Report results as they come, in batches; a batch that cannot be delivered is tried again
/// until it is (its slots stay taken meanwhile).
async fn report_loop(shared: Arc<Shared>, mut reported: mpsc::UnboundedReceiver<Report>) {
    let mut backoff = Backoff::default();
    let mut carried: Option<Report> = None;
    loop {
        let first = match carried.take() {
            Some(r) => r,
            None => match reported.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        // At most REPORT_BATCH results and REPORT_BYTES of them (one larger result alone).
        let size = |r: &Report| r.result.outcome.size_hint();
        let mut bytes = size(&first);
        let mut batch = vec![first];
        while batch.len() < REPORT_BATCH
            && let Ok(more) = reported.try_recv()
        {
            let more_bytes = size(&more);
            if bytes + more_bytes > REPORT_BYTES {
                carried = Some(more);
                break;
            }
            bytes += more_bytes;
            batch.push(more);
        }
        let req = FinishRequest {
            instance: shared.instance.clone(),
            results: batch.iter().map(|r| r.result.clone()).collect(),
        };
        let answer = loop {
            match shared.post::<_, FinishResponse>("finish", &req, None).await {
                Ok(a) => {
                    backoff.reset(&shared.config.server);
                    break Some(a);
                }
                // Dropped: their claims lapse at the server, which retries the attempts.
                Err(Call::Fatal(e)) => {
                    tracing::error!(
                        "reporting {} results: {e}; they are dropped",
                        req.results.len()
                    );
                    break None;
                }
                Err(Call::Retry(e)) => backoff.wait("reporting results", &e).await,
            }
        };
        let mut held = shared.held.lock().unwrap_or_else(|p| p.into_inner());
        for (i, r) in req.results.iter().enumerate() {
            held.remove(&r.claim);
            if answer
                .as_ref()
                .is_some_and(|a| a.accepted.get(i) == Some(&false))
            {
                tracing::warn!(
                    "task run {} attempt {}: the server refused its result (the claim had \
                     lapsed; the attempt was recorded Crashed and retried)",
                    r.claim.task_run,
                    r.claim.attempt
                );
            }
        }
        // The slots go back with the batch.
    }
}

/// Extend the claims held, every third of the lease (at most every second); stop those the
/// server no longer gives this worker, and those whose flow run was cancelled.
async fn extend_loop(shared: Arc<Shared>) {
    loop {
        let lease = *shared.lease.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep((lease / 3).min(Duration::from_secs(1))).await;
        let claims: Vec<ClaimRef> = shared
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| !h.lost)
            .map(|(c, _)| *c)
            .collect();
        if claims.is_empty() {
            continue;
        }
        let req = ExtendRequest {
            instance: shared.instance.clone(),
            claims,
        };
        // Within a third of the lease: a call that hangs must not outlast the claims.
        let within = (lease / 3).max(Duration::from_millis(500));
        let answer = match shared
            .post::<_, ExtendResponse>("extend", &req, Some(within))
            .await
        {
            Ok(a) => a,
            Err(Call::Retry(e)) => {
                tracing::warn!("extending claims: {e}");
                continue;
            }
            Err(Call::Fatal(e)) => {
                tracing::warn!("extending claims: {e}");
                continue;
            }
        };
        let mut held = shared.held.lock().unwrap_or_else(|p| p.into_inner());
        for (i, claim) in req.claims.iter().enumerate() {
            let Some(h) = held.get_mut(claim) else {
                continue;
            };
            if answer.held.get(i) == Some(&false) {
                h.lost = true;
                h.cancel.cancel();
            } else if answer.cancel.get(i) == Some(&true) {
                h.cancel.cancel();
            }
        }
    }
}
