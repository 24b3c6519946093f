//! A flow body in the sandbox: the host side of the `orchestrate` interface (world `flow`) and
//! the seam to whatever schedules the body's task runs. The sandbox knows nothing of flows:
//! each call becomes a call on the run's [`Orchestrator`], in plain types, and each submitted
//! task run is a `submission` resource holding the orchestrator's [`Submitted`] number. Dropping a
//! handle tells the orchestrator ([`Orchestrator::release`]), which then keeps no copy of that
//! task run's output for the body.
//!
//! A body is deterministic: it is granted nothing, its wall clock reads the flow run's start and
//! its monotonic clock stands still, and its random numbers are a stream keyed by the run
//! ([`FlowBody::seed`]), the same on every replay. Everything else it observes comes through the
//! orchestrator, which can journal it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use wasmtime::component::Resource;

use super::bindings::WitState;
use super::bindings::flow::sluice::task::orchestrate::{Host, HostSubmission};
use super::run::{RunState, wit_state};
use crate::json::Json;
use crate::state::{State, StateType};

/// A future the orchestrator answers.
pub type Answer<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One submitted task run, as the orchestrator numbers them within a flow run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Submitted(pub u64);

/// What schedules a flow body's task runs (the flow runner, in plain types). Every method that
/// may wait returns a boxed future; the body is blocked on it, not the thread.
pub trait Orchestrator: Send + Sync {
    /// Submit one task run of the declared task `task` with `input`, starting once every one
    /// of `wait_for` is final (their states feed its trigger, `trigger` or the task's own).
    /// `Err`: why it is refused, for the body to see.
    fn submit(
        &self,
        task: String,
        input: Json,
        wait_for: Vec<Submitted>,
        trigger: Option<String>,
    ) -> Answer<Result<Submitted, String>>;

    /// Submit a mapped task run of `task`: one child per input, in order.
    fn map(
        &self,
        task: String,
        inputs: Vec<Json>,
        wait_for: Vec<Submitted>,
    ) -> Answer<Result<Vec<Submitted>, String>>;

    /// Run subflow `flow` as a child flow run with `parameters`: the task run standing for it.
    fn subflow(&self, flow: String, parameters: Json) -> Answer<Result<Submitted, String>>;

    /// The task run's id.
    fn id(&self, of: Submitted) -> String;

    /// Its state now, without waiting.
    fn state(&self, of: Submitted) -> Answer<State>;

    /// Its final state, once it has one; the result of a successful state is the output.
    fn wait(&self, of: Submitted) -> Answer<State>;

    /// The index in `all` of the first that is final, once one is.
    fn wait_any(&self, all: Vec<Submitted>) -> Answer<usize>;

    /// The body dropped its handle: it reads nothing of this task run again. Only an explicit
    /// drop is told: the handles a body still holds when it returns, traps or is stopped are
    /// not, and the orchestrator frees what it kept for them when the body's run ends.
    fn release(&self, of: Submitted);

    /// The time, as the body may observe it.
    fn now(&self) -> Answer<DateTime<Utc>>;
}

/// What a flow body is run with beside its budget.
#[derive(Clone)]
pub struct FlowBody {
    /// Schedules its task runs.
    pub orchestrator: Arc<dyn Orchestrator>,
    /// Keys its random numbers (the flow run's id, say): the same on every replay.
    pub seed: [u8; 32],
    /// What its wall clock reads (the flow run's start).
    pub started: DateTime<Utc>,
    /// The most task runs it may submit (the flow's `max_task_runs`): it may hold a handle to
    /// each (wasmtime's default store-wide limit is 100,000 handles).
    pub max_handles: usize,
}

impl std::fmt::Debug for FlowBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowBody")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

/// The host's side of a `future` handle.
#[derive(Debug)]
pub struct SubmissionHandle(Submitted);

/// A wall clock that always reads the same time.
pub(super) struct FixedWallClock(Duration);

impl FixedWallClock {
    pub(super) fn at(t: DateTime<Utc>) -> Self {
        let since_epoch = t.signed_duration_since(DateTime::UNIX_EPOCH);
        Self(since_epoch.to_std().unwrap_or_default())
    }
}

impl wasmtime_wasi::HostWallClock for FixedWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        self.0
    }
}

/// A monotonic clock that stands still.
pub(super) struct StillClock;

impl wasmtime_wasi::HostMonotonicClock for StillClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }

    fn now(&self) -> u64 {
        0
    }
}

/// Random bytes as a stream keyed by the run: blake3's extendable output.
pub(super) struct KeyedStream(blake3::OutputReader);

impl KeyedStream {
    /// The stream of `seed` for `purpose` (the secure and insecure generators differ).
    pub(super) fn new(seed: &[u8; 32], purpose: &str) -> Self {
        let mut h = blake3::Hasher::new_keyed(seed);
        h.update(purpose.as_bytes());
        Self(h.finalize_xof())
    }

    /// 128 bits of the stream of `seed` for `purpose`.
    pub(super) fn seed128(seed: &[u8; 32], purpose: &str) -> u128 {
        let mut b = [0u8; 16];
        Self::new(seed, purpose).0.fill(&mut b);
        u128::from_le_bytes(b)
    }
}

impl rand_core::TryRng for KeyedStream {
    type Error = std::convert::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0u8; 4];
        self.0.fill(&mut b);
        Ok(u32::from_le_bytes(b))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        Ok(u64::from_le_bytes(b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.0.fill(dst);
        Ok(())
    }
}

impl RunState {
    /// The run's orchestrator; a component that is not a flow body has none and may not
    /// orchestrate.
    fn orchestrator(&self) -> wasmtime::Result<Arc<dyn Orchestrator>> {
        self.body.clone().ok_or_else(|| {
            wasmtime::Error::msg("only a flow body may submit task runs (world `flow`)")
        })
    }

    fn held(&self, handle: &Resource<SubmissionHandle>) -> wasmtime::Result<Submitted> {
        Ok(self.table.get(handle)?.0)
    }

    fn held_all(&self, handles: &[Resource<SubmissionHandle>]) -> wasmtime::Result<Vec<Submitted>> {
        handles.iter().map(|h| self.held(h)).collect()
    }

    fn handle(&mut self, s: Submitted) -> wasmtime::Result<Resource<SubmissionHandle>> {
        Ok(self.table.push(SubmissionHandle(s))?)
    }
}

/// A JSON text from the guest (its size already checked), or why it is not JSON.
fn parse_json(what: &str, text: &str) -> Result<Json, String> {
    Json::parse(text).map_err(|e| format!("{what} is not JSON: {e}"))
}

impl HostSubmission for RunState {
    async fn id(&mut self, this: Resource<SubmissionHandle>) -> wasmtime::Result<String> {
        let s = self.held(&this)?;
        Ok(self.orchestrator()?.id(s))
    }

    async fn wait(&mut self, this: Resource<SubmissionHandle>) -> wasmtime::Result<WitState> {
        let s = self.held(&this)?;
        let state = self.orchestrator()?.wait(s).await;
        Ok(wit_state(&state))
    }

    async fn get_state(&mut self, this: Resource<SubmissionHandle>) -> wasmtime::Result<WitState> {
        let s = self.held(&this)?;
        let state = self.orchestrator()?.state(s).await;
        Ok(wit_state(&state))
    }

    async fn result(
        &mut self,
        this: Resource<SubmissionHandle>,
    ) -> wasmtime::Result<Result<String, WitState>> {
        let s = self.held(&this)?;
        let state = self.orchestrator()?.wait(s).await;
        Ok(match (state.state_type(), &state.result) {
            (StateType::Completed, Some(output)) => Ok(output.to_string()),
            (StateType::Completed, None) => Ok("null".to_owned()),
            _ => Err(wit_state(&state)),
        })
    }

    async fn drop(&mut self, this: Resource<SubmissionHandle>) -> wasmtime::Result<()> {
        let SubmissionHandle(s) = self.table.delete(this)?;
        if let Some(o) = &self.body {
            o.release(s);
        }
        Ok(())
    }
}

impl Host for RunState {
    async fn submit(
        &mut self,
        task: String,
        input: String,
        wait_for: Vec<Resource<SubmissionHandle>>,
        trigger: Option<String>,
    ) -> wasmtime::Result<Result<Resource<SubmissionHandle>, String>> {
        let o = self.orchestrator()?;
        // One limit for everything the call carries.
        self.check_host_call(task.len() + trigger.as_ref().map_or(0, String::len) + input.len())?;
        let input = match parse_json("the input", &input) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        let wait_for = self.held_all(&wait_for)?;
        match o.submit(task, input, wait_for, trigger).await {
            Ok(s) => Ok(Ok(self.handle(s)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    async fn submit_map(
        &mut self,
        task: String,
        inputs: Vec<String>,
        wait_for: Vec<Resource<SubmissionHandle>>,
    ) -> wasmtime::Result<Result<Vec<Resource<SubmissionHandle>>, String>> {
        let o = self.orchestrator()?;
        self.check_host_call(task.len() + inputs.iter().map(String::len).sum::<usize>())?;
        let mut values = Vec::with_capacity(inputs.len());
        for (i, text) in inputs.into_iter().enumerate() {
            match parse_json(&format!("input {i}"), &text) {
                Ok(v) => values.push(v),
                Err(e) => return Ok(Err(e)),
            }
        }
        let wait_for = self.held_all(&wait_for)?;
        match o.map(task, values, wait_for).await {
            Ok(all) => Ok(Ok(all
                .into_iter()
                .map(|s| self.handle(s))
                .collect::<wasmtime::Result<_>>()?)),
            Err(e) => Ok(Err(e)),
        }
    }

    async fn subflow(
        &mut self,
        flow: String,
        parameters: String,
    ) -> wasmtime::Result<Result<Resource<SubmissionHandle>, String>> {
        let o = self.orchestrator()?;
        self.check_host_call(flow.len() + parameters.len())?;
        let parameters = match parse_json("the parameters", &parameters) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        match o.subflow(flow, parameters).await {
            Ok(s) => Ok(Ok(self.handle(s)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    async fn wait_all(&mut self, futures: Vec<Resource<SubmissionHandle>>) -> wasmtime::Result<()> {
        let o = self.orchestrator()?;
        for s in self.held_all(&futures)? {
            o.wait(s).await;
        }
        Ok(())
    }

    async fn wait_any(
        &mut self,
        futures: Vec<Resource<SubmissionHandle>>,
    ) -> wasmtime::Result<u32> {
        let o = self.orchestrator()?;
        let all = self.held_all(&futures)?;
        if all.is_empty() {
            return Err(wasmtime::Error::msg(
                "wait-any of no futures would wait for ever",
            ));
        }
        let i = o.wait_any(all).await;
        Ok(u32::try_from(i).unwrap_or(u32::MAX))
    }

    async fn now(&mut self) -> wasmtime::Result<String> {
        let t = self.orchestrator()?.now().await;
        Ok(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
    }
}
