//! The CLI as a client of `sluice server` (`--server URL --token TOKEN`, or `SLUICE_SERVER` and
//! `SLUICE_TOKEN`): `run` uploads the components the server lacks and runs the flow there;
//! `runs`, `show`, `logs` and `cancel` read and act on the server's runs. Output and exit codes
//! are those of embedded mode: the same views are printed from the same records.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use sluice::flow::manifest::{self, ComponentFiles, LocalFiles};
use sluice::ids::FlowRunId;
use sluice::runner::FlowEvent;
use sluice::server::wire::{
    CacheCleared, CacheItem, CacheValue, Cancelled, Deploy, DeploymentRuns, DeploymentView,
    LogPage, Problem, ResumeRun, RunItem, RunStarted, RunView, StartRun, Usage,
};
use sluice::store::{ChangeCursor, RunFilter, TaskChange};

use crate::UsageError;

/// How long a read is tried again while the server is unreachable or says so (503).
const RETRY_READS_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// A server and the tenant token to call it with.
#[derive(Debug)]
pub(crate) struct Remote {
    base: String,
    token: String,
    http: reqwest::Client,
    /// For event streams: no limit on a request's whole time (a stream lasts as long as its
    /// run), only on silence (the server sends a keep-alive every second).
    streams: reqwest::Client,
    /// The server answered once: a read that cannot connect later is tried again (it is
    /// restarting), where a first one fails at once (a wrong address).
    reached: std::sync::atomic::AtomicBool,
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

/// How long the client waits for the server to answer one request (a run's end is waited for
/// in requests of at most a minute each).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The longest an event stream may stay silent before the client gives up on it (the server
/// sends a keep-alive every second).
const STREAM_SILENCE: Duration = Duration::from_secs(30);

impl Remote {
    pub(crate) fn new(url: &str, token: Option<&str>) -> Result<Remote, UsageError> {
        let token = token.ok_or_else(|| {
            UsageError(anyhow!(
                "--server {url} needs a tenant token: --token TOKEN or SLUICE_TOKEN"
            ))
        })?;
        let base = url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(UsageError(anyhow!(
                "--server `{url}` is not an http:// or https:// URL"
            )));
        }
        let client_err = |e: reqwest::Error| UsageError(anyhow!("cannot make an HTTP client: {e}"));
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(client_err)?;
        let streams = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(STREAM_SILENCE)
            .build()
            .map_err(client_err)?;
        Ok(Remote {
            base,
            token: token.to_owned(),
            http,
            streams,
            reached: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.base)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<reqwest::Body>,
        json: Option<&impl serde::Serialize>,
    ) -> Result<reqwest::Response, UsageError> {
        // A read is tried again while the server is unreachable or says it is (503: its
        // database restarting), for up to [`RETRY_READS_FOR`]; a write is not (it may have
        // been done).
        let retry = method == Method::GET && body.is_none();
        let mut body = body;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let mut req = self
                .http
                .request(method.clone(), self.url(path))
                .bearer_auth(&self.token);
            if let Some(body) = body.take() {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, "application/wasm")
                    .body(body);
            }
            if let Some(json) = json {
                req = req.json(json);
            }
            let again = retry && started.elapsed() < RETRY_READS_FOR;
            let response = match req.send().await {
                Ok(r) => r,
                Err(e)
                    if again
                        && (e.is_connect() || e.is_timeout())
                        && self.reached.load(std::sync::atomic::Ordering::Relaxed) =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                    continue;
                }
                Err(e) => return Err(UsageError(anyhow!("server {}: {e}", self.base))),
            };
            self.reached
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if response.status().is_success() || response.status() == StatusCode::NOT_FOUND {
                return Ok(response);
            }
            if again && response.status() == StatusCode::SERVICE_UNAVAILABLE {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(2));
                continue;
            }
            return Err(self.problem(response).await);
        }
    }

    /// A request answered without a body (204).
    pub(crate) async fn no_content(
        &self,
        method: Method,
        path: &str,
        json: Option<&impl serde::Serialize>,
    ) -> Result<(), UsageError> {
        let response = self.send(method, path, None, json).await?;
        match response.status() {
            StatusCode::NOT_FOUND => Err(self.problem(response).await),
            _ => Ok(()),
        }
    }

    /// The error a server's answer carries.
    async fn problem(&self, response: reqwest::Response) -> UsageError {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<Problem>(&text) {
            // A quota is not a usage error: the same command may pass later (exit 1).
            Ok(p) if status == StatusCode::TOO_MANY_REQUESTS => UsageError(anyhow::Error::new(
                QuotaRefused(format!("server {}: {} ({})", self.base, p.detail, p.code)),
            )),
            Ok(p) => UsageError(anyhow!("server {}: {} ({})", self.base, p.detail, p.code)),
            Err(_) => UsageError(anyhow!("server {}: HTTP {status}: {text}", self.base)),
        }
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, UsageError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        json: Option<&impl serde::Serialize>,
    ) -> Result<T, UsageError> {
        let response = self.send(method, path, None, json).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(self.problem(response).await);
        }
        response
            .json()
            .await
            .map_err(|e| UsageError(anyhow!("server {}: unreadable answer: {e}", self.base)))
    }

    pub(crate) async fn runs(&self, filter: &RunFilter) -> Result<Vec<RunItem>, UsageError> {
        let mut query = format!("/runs?limit={}", filter.limit);
        if let Some(state) = filter.state {
            query.push_str(&format!("&state={}", state.as_str()));
        }
        if let Some(flow) = &filter.flow {
            query.push_str(&format!("&flow={}", encode(flow)));
        }
        self.get(&query).await
    }

    pub(crate) async fn show(&self, run: &str, wait: Option<u64>) -> Result<RunView, UsageError> {
        let mut path = format!("/runs/{}", encode(run));
        if let Some(wait) = wait {
            path.push_str(&format!("?wait={wait}"));
        }
        self.get(&path).await
    }

    pub(crate) async fn resolve(&self, run: &str) -> Result<FlowRunId, UsageError> {
        Ok(self.show(run, None).await?.run.id)
    }

    pub(crate) async fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
    ) -> Result<LogPage, UsageError> {
        let mut path = format!("/runs/{run}/logs?after={after}");
        if let Some(task) = task {
            path.push_str(&format!("&task={}", encode(task)));
        }
        self.get(&path).await
    }

    /// The event stream of `run` (`GET /runs/{id}/events`), of one task when `task` is set,
    /// after `after`.
    pub(crate) async fn events(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<EventStream, UsageError> {
        let mut path = format!("/runs/{run}/events?after={after}");
        if let Some(task) = task {
            path.push_str(&format!("&task={}", encode(task)));
        }
        let response = self
            .streams
            .get(self.url(&path))
            .bearer_auth(&self.token)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|e| UsageError(anyhow!("server {}: {e}", self.base)))?;
        if !response.status().is_success() {
            return Err(self.problem(response).await);
        }
        Ok(EventStream {
            response,
            buffer: Vec::new(),
            event: SseEvent::default(),
            has_data: false,
        })
    }

    pub(crate) async fn usage(&self, json: bool) -> Result<ExitCode, UsageError> {
        let usage: Usage = self.get("/usage").await?;
        if json {
            crate::print_stdout(&format!("{:#}\n", serde_json::json!(usage)));
            return Ok(ExitCode::SUCCESS);
        }
        let q = &usage.quotas;
        let of = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
        let rows = [
            (
                "running tasks",
                usage.running_tasks,
                q.max_running_tasks,
                "max_running_tasks",
            ),
            (
                "queued tasks",
                usage.queued_tasks,
                q.max_queued_tasks,
                "max_queued_tasks",
            ),
            (
                "runs in the last minute",
                usage.runs_last_minute,
                q.runs_per_minute,
                "runs_per_minute",
            ),
            (
                "fuel in the last minute",
                usage.fuel_last_minute,
                q.fuel_per_minute,
                "fuel_per_minute",
            ),
            (
                "stored bytes",
                usage.stored_bytes,
                q.max_stored_bytes,
                "max_stored_bytes",
            ),
        ];
        let mut out = format!("tenant {} (weight {})\n", usage.tenant, usage.weight);
        for (what, used, quota, name) in rows {
            out.push_str(&format!(
                "  {what:<24} {used:>14} of {:<12} ({name})\n",
                of(quota)
            ));
        }
        for (what, quota, name) in [
            ("task fuel", q.max_task_fuel, "max_task_fuel"),
            ("task memory", q.max_task_memory, "max_task_memory"),
            (
                "task deadline (ms)",
                q.max_task_timeout_ms,
                "max_task_timeout_ms",
            ),
        ] {
            out.push_str(&format!(
                "  {what:<24} {:>14} at most ({name})\n",
                of(quota)
            ));
        }
        crate::print_stdout(&out);
        Ok(ExitCode::SUCCESS)
    }

    pub(crate) async fn cancel(&self, run: &str) -> Result<ExitCode, UsageError> {
        let id = self.resolve(run).await?;
        let outcome: Cancelled = self
            .call(Method::POST, &format!("/runs/{id}/cancel"), None::<&()>)
            .await?;
        match outcome {
            Cancelled::AlreadyFinished { state } => {
                crate::print_stdout(&format!("flow run {id} already ended {state}\n"));
            }
            Cancelled::Cancelled => crate::print_stdout(&format!(
                "flow run {id} was not running in any process; recorded Cancelled\n"
            )),
            Cancelled::Requested => {
                eprintln!("cancel requested; waiting for flow run {id} to stop…");
                let view = self.wait(id, None).await?;
                crate::print_stdout(&format!(
                    "flow run {id}: {} — {}\n",
                    view.run.state.name,
                    view.run.state.message.unwrap_or_default()
                ));
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Wait until run `id` is no longer live; its view then.
    /// Wait for the end of run `id` following its event stream (each task run's state goes to
    /// `view`), and read it. A broken stream (the server restarting) is followed by one long
    /// poll for the end, which says whether the server is back, then by a new stream from where
    /// the last one stopped.
    async fn wait(
        &self,
        id: FlowRunId,
        view: Option<tokio::sync::mpsc::UnboundedSender<FlowEvent>>,
    ) -> Result<RunView, UsageError> {
        let mut cursor = ChangeCursor::STATES_ONLY;
        loop {
            if let Ok(mut stream) = self.events(id, None, cursor).await {
                while let Ok(Some(event)) = stream.next().await {
                    if let Some(c) = event.id.as_deref().and_then(|c| c.parse().ok()) {
                        cursor = c;
                    }
                    match event.kind.as_str() {
                        "end" => return self.show(&id.to_string(), None).await,
                        "task" => {
                            let Some(tx) = &view else { continue };
                            if let Ok(t) = serde_json::from_str::<TaskChange>(&event.data) {
                                let _ = tx.send(FlowEvent::Task {
                                    name: t.task,
                                    map_index: t.map_index,
                                    state: t.state.name,
                                });
                            }
                        }
                        _ => {}
                    }
                }
            }
            let shown = self.show(&id.to_string(), Some(60)).await?;
            if !shown.live {
                return Ok(shown);
            }
        }
    }

    /// Upload the component at `path` unless the server has it; its digest.
    async fn upload(&self, path: &Path, max: u64) -> Result<String, UsageError> {
        let err = |e: &dyn fmt::Display| UsageError(anyhow!("component {}: {e}", path.display()));
        let meta = std::fs::metadata(path).map_err(|e| err(&e))?;
        if meta.len() > max {
            return Err(err(&format!(
                "it is larger than the component size limit of {max} bytes"
            )));
        }
        let bytes = tokio::fs::read(path).await.map_err(|e| err(&e))?;
        let digest = blake3::hash(&bytes).to_hex().to_string();
        let path_of = format!("/components/{digest}");
        let head = self
            .http
            .head(self.url(&path_of))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| UsageError(anyhow!("server {}: {e}", self.base)))?;
        match head.status() {
            StatusCode::OK => return Ok(digest),
            StatusCode::NOT_FOUND => {}
            _ => return Err(self.problem(head).await),
        }
        self.send(Method::PUT, &path_of, Some(bytes.into()), None::<&()>)
            .await?;
        Ok(digest)
    }

    /// The request of a run (or deployment) of the manifest `flow`: its components built when
    /// `build` (`None` when a build failed: it said why) and uploaded when the server lacks them.
    pub(crate) async fn flow_request(
        &self,
        flow: &Path,
        max_component_bytes: u64,
        build: bool,
        parameters: BTreeMap<String, serde_json::Value>,
        context: BTreeMap<String, String>,
    ) -> Result<Option<StartRun>, UsageError> {
        let usage = |e: anyhow::Error| UsageError(e);
        let text = manifest::read(flow).map_err(|e| usage(e.into()))?;
        let path = std::path::absolute(flow).unwrap_or_else(|_| flow.to_owned());
        let files = Recording::default();
        let def =
            manifest::parse_with_files(&path, &text, None, &files).map_err(|e| usage(e.into()))?;
        if build && !crate::build::build_flow(&def, &path).await {
            return Ok(None);
        }
        let mut components = BTreeMap::new();
        let mut digests: BTreeMap<PathBuf, String> = BTreeMap::new();
        let Recording { files, subflows } = files;
        for (written, local) in files.into_inner() {
            let digest = match digests.get(&local) {
                Some(d) => d.clone(),
                None => {
                    let d = self.upload(&local, max_component_bytes).await?;
                    digests.insert(local, d.clone());
                    d
                }
            };
            components.insert(written, digest);
        }
        // Sent as parsed here: the server resolves the paths it names as this parse did, so the
        // keys of `components` and `subflows` are what it looks for.
        Ok(Some(StartRun {
            manifest: text,
            manifest_path: path.display().to_string(),
            components,
            subflows: subflows.into_inner(),
            parameters,
            context,
        }))
    }

    /// `sluice run --server`: upload what the server lacks, start the run there, wait for its
    /// end (Ctrl-C cancels it on the server), print it as embedded mode does.
    pub(crate) async fn run(
        &self,
        flow: &Path,
        max_component_bytes: u64,
        build: bool,
        parameters: BTreeMap<String, serde_json::Value>,
        context: BTreeMap<String, String>,
        json: bool,
    ) -> Result<ExitCode, UsageError> {
        let Some(req) = self
            .flow_request(flow, max_component_bytes, build, parameters, context)
            .await?
        else {
            return Ok(ExitCode::from(1));
        };
        let started: RunStarted = self.call(Method::POST, "/runs", Some(&req)).await?;
        eprintln!(
            "flow run {} of {} ({} tasks) started on {}",
            started.id, started.flow, started.tasks, self.base
        );
        self.follow(started.id, started.tasks, json).await
    }

    /// `sluice resume RUN [--start T] --server`: resume it there, then as `run`.
    pub(crate) async fn resume(
        &self,
        run: &str,
        start: Vec<String>,
        json: bool,
    ) -> Result<ExitCode, UsageError> {
        let id = self.resolve(run).await?;
        let started: RunStarted = self
            .call(
                Method::POST,
                &format!("/runs/{id}/resume"),
                Some(&ResumeRun { start }),
            )
            .await?;
        eprintln!(
            "flow run {} of {} resumed on {}",
            started.id, started.flow, self.base
        );
        self.follow(started.id, started.tasks, json).await
    }

    /// Wait for the end of run `id` (Ctrl-C cancels it on the server) and print it as embedded
    /// mode does.
    async fn follow(
        &self,
        id: FlowRunId,
        tasks: usize,
        json: bool,
    ) -> Result<ExitCode, UsageError> {
        let signals = crate::run::interrupt_signals();
        tokio::pin!(signals);
        // The live view embedded runs show, from the run's events.
        let (tx, live) = if !json && std::io::stderr().is_terminal() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            (
                Some(tx),
                Some(tokio::spawn(crate::run::live_view(rx, tasks))),
            )
        } else {
            (None, None)
        };
        let wait = self.wait(id, tx);
        tokio::pin!(wait);
        let view = tokio::select! {
            view = &mut wait => view?,
            name = &mut signals => {
                eprintln!("\ncancelling ({name}): asking the server to stop the run…");
                let _: Cancelled = self
                    .call(Method::POST, &format!("/runs/{id}/cancel"), None::<&()>)
                    .await?;
                wait.await?
            }
        };
        if let Some(live) = live {
            let _ = live.await;
        }
        let report = if json {
            format!(
                "{:#}\n",
                crate::report::run_json(&view.run, &view.log_tails)
            )
        } else {
            crate::report::summary(&view.run, false)
        };
        crate::print_stdout(&report);
        Ok(crate::exit_code(view.run.state.state_type()))
    }
}

/// The tenant's output cache on the server.
impl Remote {
    /// `GET /cache`.
    pub(crate) async fn cache_entries(
        &self,
        task: Option<&str>,
    ) -> Result<Vec<CacheItem>, UsageError> {
        let query = task.map_or_else(String::new, |t| format!("?task={}", encode(t)));
        self.get(&format!("/cache{query}")).await
    }

    /// `GET /cache/{key}`.
    pub(crate) async fn cache_entry(&self, key: &str) -> Result<CacheValue, UsageError> {
        self.get(&format!("/cache/{}", encode(key))).await
    }

    /// `DELETE /cache`: how many entries were removed.
    pub(crate) async fn clear_cache(
        &self,
        task: Option<&str>,
        expired: bool,
    ) -> Result<u64, UsageError> {
        let mut query = format!("/cache?expired={expired}");
        if let Some(t) = task {
            query.push_str(&format!("&task={}", encode(t)));
        }
        let cleared: CacheCleared = self.call(Method::DELETE, &query, None::<&()>).await?;
        Ok(cleared.removed)
    }
}

/// Deployments on the server.
impl Remote {
    /// `POST /deployments`.
    pub(crate) async fn deploy(&self, req: &Deploy) -> Result<DeploymentView, UsageError> {
        self.call(Method::POST, "/deployments", Some(req)).await
    }

    /// `GET /deployments`.
    pub(crate) async fn deployments(&self) -> Result<Vec<DeploymentView>, UsageError> {
        self.get("/deployments").await
    }

    /// `POST /deployments/{name}/pause` or `/resume`.
    pub(crate) async fn set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<DeploymentView, UsageError> {
        let action = if paused { "pause" } else { "resume" };
        self.call(
            Method::POST,
            &format!("/deployments/{}/{action}", encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `DELETE /deployments/{name}`.
    pub(crate) async fn remove_deployment(&self, name: &str) -> Result<(), UsageError> {
        let path = format!("/deployments/{}", encode(name));
        self.no_content(Method::DELETE, &path, None::<&()>).await
    }

    /// `GET /deployments/{name}/runs`.
    pub(crate) async fn deployment_runs(
        &self,
        name: &str,
        limit: usize,
    ) -> Result<DeploymentRuns, UsageError> {
        self.get(&format!("/deployments/{}/runs?limit={limit}", encode(name)))
            .await
    }
}

/// A server's quota refused the request: the command exits 1, not 2 (its input was valid).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct QuotaRefused(String);

/// Component files and subflow manifests beside the manifest, each recorded under its path as
/// the parse resolved it (the key the server looks for).
#[derive(Default)]
struct Recording {
    /// Each component path (as the parse resolved it) → its local file.
    files: RefCell<BTreeMap<String, PathBuf>>,
    /// Each subflow manifest path → its text.
    subflows: RefCell<BTreeMap<String, String>>,
}

impl ComponentFiles for Recording {
    fn subflow(&self, local: &Path) -> Result<String, String> {
        let text = LocalFiles.subflow(local)?;
        self.subflows
            .borrow_mut()
            .insert(local.display().to_string(), text.clone());
        Ok(text)
    }

    fn file(&self, written: &Path, local: &Path, build: bool) -> Result<PathBuf, String> {
        let file = LocalFiles.file(written, local, build)?;
        self.files
            .borrow_mut()
            .insert(local.display().to_string(), file.clone());
        Ok(file)
    }
}

/// Percent-encode a path segment or query value.
pub(crate) fn encode(s: &str) -> String {
    let keep: BTreeSet<u8> = (b'a'..=b'z')
        .chain(b'A'..=b'Z')
        .chain(b'0'..=b'9')
        .chain(*b"-_.~")
        .collect();
    s.bytes()
        .map(|b| match keep.contains(&b) {
            true => (b as char).to_string(),
            false => format!("%{b:02X}"),
        })
        .collect()
}

/// One server-sent event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// Its type (`event:`; `message` when none was given).
    pub(crate) kind: String,
    /// Its data lines, joined by newlines.
    pub(crate) data: String,
    /// Its id, when it has one.
    pub(crate) id: Option<String>,
}

/// The events of one `text/event-stream` answer, parsed as they arrive.
pub(crate) struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    event: SseEvent,
    /// The event being read has a `data` line (perhaps empty).
    has_data: bool,
}

impl EventStream {
    /// The next event; `None` when the server ended the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<SseEvent>, UsageError> {
        loop {
            while let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if let Some(event) = self.line(line.trim_end_matches(['\n', '\r'])) {
                    return Ok(Some(event));
                }
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => self.buffer.extend_from_slice(&bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(UsageError(anyhow!("the event stream broke: {e}"))),
            }
        }
    }

    /// Take one line (the SSE format: `field: value`, a blank line ends an event, `:` starts a
    /// comment); the event it completes, if any.
    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let has_data = std::mem::take(&mut self.has_data);
            let mut done = std::mem::take(&mut self.event);
            if done.kind.is_empty() && !has_data && done.id.is_none() {
                return None;
            }
            if done.kind.is_empty() {
                done.kind = "message".into();
            }
            return Some(done);
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event.kind = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.event.data.push('\n');
                }
                self.has_data = true;
                self.event.data.push_str(value);
            }
            "id" => self.event.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}
