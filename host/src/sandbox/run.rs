//! One run in a fresh store: admission, the per-run [`RunState`] (WASI context, limiter, log
//! sink, host-call limits), fuel, deadline and cancellation, running a task or a state handler,
//! and the outcome with its usage, given back only after the store returns its pool slots.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::sockets::WasiSocketsCtxView;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::admission::{Admitted, Needs};
use super::bindings::{WitSignal, WitState, WitStateType};
use super::capture::{self, Capture, LogSink, SharedSink};
use super::ending::{error_ending, output_ending, signal_ending};
use super::flow_body::{FixedWallClock, FlowBody, KeyedStream, Orchestrator, StillClock};
use super::grants::RunGrants;
use super::http::{GrantHooks, HttpLimits};
use super::limiter::Limiter;
use super::sockets::{GrantedLookupView, TcpAllow};
use super::{
    Ending, FlowComponent, HandlerComponent, LimitExceeded, LogRecord, LogSource, RunBudget,
    RunOutcome, Sandbox, TaskComponent, TimeLimit, Usage,
};
use crate::context::TaskContext;
use crate::json::Json;
use crate::state::{State, StateName, StateType};

/// What a state handler decided, with its logs.
#[derive(Debug, Clone, PartialEq)]
pub struct HandlerOutcome {
    /// A replacement state, none to keep the new state, or why the handler failed.
    pub result: Result<Option<State>, String>,
    /// The handler's logs.
    pub logs: Vec<LogRecord>,
}

/// A signal to stop a running task. Cloning shares the signal.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Debug, Default)]
struct CancelInner {
    cancelled: AtomicBool,
    notify: Notify,
}

impl CancelToken {
    /// A token that has not been cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel: running guests are interrupted within one epoch tick.
    pub fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        self.0.notify.notify_waiters();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Resolves once the token is cancelled.
    pub async fn cancelled(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_cancelled() {
                return;
            }
            notified.await;
        }
    }
}

/// Per-run state inside the wasmtime store.
pub(crate) struct RunState {
    wasi: WasiCtx,
    pub(super) table: ResourceTable,
    http: WasiHttpCtx,
    http_hooks: GrantHooks,
    tcp: Arc<TcpAllow>,
    pub(super) limiter: Limiter,
    pub(super) logs: SharedSink,
    pub(super) ctx: TaskContext,
    pub(super) host_call_bytes: u64,
    pub(super) host_call_violation: Option<LimitExceeded>,
    pub(super) interrupted: Option<Interruption>,
    /// A flow body's orchestrator (none for a task or a handler).
    pub(super) body: Option<Arc<dyn Orchestrator>>,
}

impl WasiView for RunState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl RunState {
    /// The view Sluice's `ip-name-lookup` works on: wasmtime-wasi's, and the run's TCP grants.
    pub(super) fn lookup_view(&mut self) -> GrantedLookupView<'_> {
        GrantedLookupView {
            inner: WasiSocketsCtxView {
                ctx: self.wasi.sockets(),
                table: &mut self.table,
            },
            allow: &self.tcp,
        }
    }
}

impl WasiHttpView for RunState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.http_hooks,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Interruption {
    Deadline,
    Cancelled,
    /// Never admitted: the run's budget can never fit the host.
    Refused(LimitExceeded),
    /// Its grants could not be given (a directory that cannot be opened).
    Ungranted(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Instantiate,
    Call,
}

/// How often (in fuel units) a running guest's fuel count is written back to its store, and the
/// guest yields to other tasks: the accuracy of the fuel a stopped run reports.
const FUEL_FLUSH: u64 = 1_000_000;

/// Handles a flow body may hold beyond one per task run it may submit
/// ([`FlowBody::max_handles`]): those it lends for calls, and its WASI resources.
const BODY_SPARE_HANDLES: usize = 1024;

impl Sandbox {
    /// Run `component` once with `input`, in a fresh store and instance, under `budget`, with
    /// nothing granted. Never fails: every problem, the host's included, is an [`Ending`].
    pub async fn run(
        &self,
        component: &TaskComponent,
        input: &Json,
        ctx: &TaskContext,
        budget: &RunBudget,
        cancel: Option<&CancelToken>,
    ) -> RunOutcome {
        self.run_granted(component, input, ctx, budget, &RunGrants::default(), cancel)
            .await
    }

    /// [`run`](Self::run) with `grants`: the directories, environment variables and secrets
    /// the run may reach. Secret values are redacted from the outcome.
    pub async fn run_granted(
        &self,
        component: &TaskComponent,
        input: &Json,
        ctx: &TaskContext,
        budget: &RunBudget,
        grants: &RunGrants,
        cancel: Option<&CancelToken>,
    ) -> RunOutcome {
        let input = input.as_string();
        let pre = &component.0.1;
        let ex = self
            .execute(
                ctx,
                budget,
                Reach { grants, body: None },
                cancel,
                component.0.0.needs,
                async |store: &mut Store<RunState>| {
                    let task = pre
                        .instantiate_async(&mut *store)
                        .await
                        .map_err(|e| (Phase::Instantiate, e))?;
                    task.call_run(&mut *store, input)
                        .await
                        .map_err(|e| (Phase::Call, e))
                },
            )
            .await;
        let mut outcome = ex.finish(budget, |r| returned(r, budget));
        grants.redact(&mut outcome.ending, &mut outcome.logs);
        outcome
    }

    /// Run a flow body once with the flow run's `parameters`, under `budget` (its deadline
    /// counts the time it waits for its task runs too), granted nothing: every task run it
    /// submits goes to `body`'s orchestrator. Never fails: every problem is an [`Ending`].
    pub async fn run_flow(
        &self,
        component: &FlowComponent,
        parameters: &Json,
        ctx: &TaskContext,
        budget: &RunBudget,
        body: &FlowBody,
        cancel: Option<&CancelToken>,
    ) -> RunOutcome {
        let parameters = parameters.as_string();
        let pre = &component.0.1;
        let ex = self
            .execute(
                ctx,
                budget,
                Reach {
                    grants: &RunGrants::default(),
                    body: Some(body),
                },
                cancel,
                component.0.0.needs,
                async |store: &mut Store<RunState>| {
                    let flow = pre
                        .instantiate_async(&mut *store)
                        .await
                        .map_err(|e| (Phase::Instantiate, e))?;
                    flow.call_run(&mut *store, parameters)
                        .await
                        .map_err(|e| (Phase::Call, e))
                },
            )
            .await;
        ex.finish(budget, |r| returned(r, budget))
    }

    /// Run a state handler on the transition `old` → `new` of `task`, in a fresh sandbox under
    /// `budget`. A handler that fails, or returns something invalid, is reported in the
    /// outcome; it never fails the caller.
    pub async fn run_handler(
        &self,
        handler: &HandlerComponent,
        task: &str,
        old: &State,
        new: &State,
        ctx: &TaskContext,
        budget: &RunBudget,
    ) -> HandlerOutcome {
        let (old_w, new_w) = (wit_state(old), wit_state(new));
        let pre = &handler.0.1;
        let task_name = task.to_owned();
        let ex = self
            .execute(
                ctx,
                budget,
                Reach {
                    grants: &RunGrants::default(),
                    body: None,
                },
                None,
                handler.0.0.needs,
                async |store: &mut Store<RunState>| {
                    let h = pre
                        .instantiate_async(&mut *store)
                        .await
                        .map_err(|e| (Phase::Instantiate, e))?;
                    h.call_handle(&mut *store, &task_name, &old_w, &new_w)
                        .await
                        .map_err(|e| (Phase::Call, e))
                },
            )
            .await;
        let mut decided = None;
        let now = self.0.clock.now();
        let outcome = ex.finish(budget, |r| {
            decided = Some(r);
            Ending::Output(Json::null())
        });
        let result = match (decided, &outcome.ending) {
            (Some(None), _) => Ok(None),
            (Some(Some(w)), _) => from_wit_state(w, now),
            (None, ending) => Err(describe(ending)),
        };
        HandlerOutcome {
            result,
            logs: outcome.logs,
        }
    }

    /// Run `call` in a fresh store under `budget`, stopping it at the deadline or on cancel.
    /// The run first waits to be admitted (its slot, the memories and tables of a component
    /// that `needs` them, its memory budget under the host's ceiling); the deadline counts from
    /// admission, a cancel stops the wait too.
    async fn execute<R>(
        &self,
        ctx: &TaskContext,
        budget: &RunBudget,
        reach: Reach<'_>,
        cancel: Option<&CancelToken>,
        needs: Needs,
        call: impl AsyncFnOnce(&mut Store<RunState>) -> Result<R, (Phase, wasmtime::Error)>,
    ) -> Execution<R> {
        let admitted = tokio::select! {
            biased;
            () = cancelled(cancel) => Err(Interruption::Cancelled),
            a = self.0.admission.admit(needs, budget.memory_bytes, reach.body.is_some()) => a.map_err(Interruption::Refused),
        };
        let started = Instant::now();
        // A deadline too far away to represent is as good as none: about a century.
        let deadline = started
            .checked_add(budget.timeout)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));
        let sink: SharedSink = Arc::new(Mutex::new(LogSink::new(
            budget.log_bytes,
            self.0.clock.clone(),
        )));
        let (mut store, granted) = self.new_store(ctx, budget, reach, &sink, deadline, cancel);
        let (result, admitted) = match (admitted, granted) {
            (Err(why), _) => (Err(why), None),
            (Ok(_), Err(why)) => (Err(Interruption::Ungranted(why)), None),
            (Ok(admitted), Ok(())) => {
                let call = call(&mut store);
                let result = tokio::select! {
                    biased;
                    r = call => Ok(r),
                    () = tokio::time::sleep_until(deadline.into()) => Err(Interruption::Deadline),
                    () = cancelled(cancel) => Err(Interruption::Cancelled),
                };
                (result, Some(admitted))
            }
        };
        Execution {
            result,
            duration: started.elapsed(),
            store,
            sink,
            admitted,
        }
    }

    fn new_store(
        &self,
        ctx: &TaskContext,
        budget: &RunBudget,
        reach: Reach<'_>,
        sink: &SharedSink,
        deadline: Instant,
        cancel: Option<&CancelToken>,
    ) -> (Store<RunState>, Result<(), String>) {
        let Reach { grants, body } = reach;
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(Capture::new(
            sink.clone(),
            LogSource::Stdout,
            budget.host_call_bytes,
        ))
        .stderr(Capture::new(
            sink.clone(),
            LogSource::Stderr,
            budget.host_call_bytes,
        ))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        // Random bytes are made in host memory before they are copied in: one call gets at most
        // what any other host call may carry.
        .max_random_size(budget.host_call_bytes);
        if let Some(b) = body {
            // Deterministic: the same clocks and random numbers on every replay.
            wasi.wall_clock(FixedWallClock::at(b.started))
                .monotonic_clock(StillClock)
                .secure_random(KeyedStream::new(&b.seed, "secure"))
                .insecure_random(KeyedStream::new(&b.seed, "insecure"))
                .insecure_random_seed(KeyedStream::seed128(&b.seed, "insecure-seed"));
        }
        let granted = grants.apply(&mut wasi);
        let tcp = Arc::new(TcpAllow::new(grants.tcp_grants(), sink.clone()));
        if !grants.tcp_grants().is_empty() {
            let check = tcp.clone();
            // Lookups: Sluice's `ip-name-lookup` refuses every name that is not granted before
            // wasmtime-wasi sees it; an address is answered without a query.
            wasi.allow_tcp(true)
                .allow_ip_name_lookup(true)
                .socket_addr_check(move |addr, use_| {
                    Box::pin(std::future::ready(check.check(addr, use_)))
                });
        }
        let limits = HttpLimits {
            requests: budget.http_requests,
            response_bytes: budget.http_response_bytes,
            connect_timeout: budget.http_connect_timeout,
            read_timeout: budget.http_read_timeout,
        };
        let state = RunState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            http_hooks: GrantHooks::new(grants.http_grants(), limits, sink.clone()),
            tcp,
            limiter: Limiter::new(budget.memory_bytes, budget.table_elements, budget.instances),
            logs: sink.clone(),
            ctx: ctx.clone(),
            host_call_bytes: budget.host_call_bytes,
            host_call_violation: None,
            interrupted: None,
            body: body.map(|b| b.orchestrator.clone()),
        };
        let mut store = Store::new(&self.0.engine, state);
        store.limiter(|s| &mut s.limiter);
        if let Some(b) = body {
            // A body may hold a handle to each task run it submits (and lend one per call).
            store.set_max_component_handles(b.max_handles.saturating_add(BODY_SPARE_HANDLES));
        }
        // Fuel is always enabled in the engine; "unlimited" is the largest amount.
        if let Err(e) = store.set_fuel(budget.fuel.unwrap_or(u64::MAX)) {
            tracing::error!("cannot set fuel: {e}");
        }
        // Compiled code keeps a function's fuel in a register and writes it back only at calls,
        // returns and fuel checks, not before an epoch interruption: a loop stopped by its
        // deadline or a cancel would report only the fuel used before it started. Refuelling
        // every `FUEL_FLUSH` units writes it back, so usage is exact to within that.
        if let Err(e) = store.fuel_async_yield_interval(Some(FUEL_FLUSH)) {
            tracing::error!("cannot set the fuel yield interval: {e}");
        }
        // Caps every transfer from guest to host (the output, a log line, one write) before the
        // host allocates it; the finer per-kind limits are checked after.
        let transfer = budget.output_bytes.max(budget.host_call_bytes);
        store.set_hostcall_fuel(usize::try_from(transfer).unwrap_or(usize::MAX));
        store.set_epoch_deadline(1);
        let cancel = cancel.cloned();
        store.epoch_deadline_callback(move |mut cx| {
            let why = if cancel.as_ref().is_some_and(CancelToken::is_cancelled) {
                Interruption::Cancelled
            } else if Instant::now() >= deadline {
                Interruption::Deadline
            } else {
                // Let other tasks on this thread run (or the pacer of a server decide when
                // this guest runs again), then check again after the next tick.
                return Ok(match super::pacing::pause() {
                    Some(pause) => UpdateDeadline::YieldCustom(1, pause),
                    None => UpdateDeadline::Yield(1),
                });
            };
            cx.data_mut().interrupted = Some(why);
            Ok(UpdateDeadline::Interrupt)
        });
        (store, granted)
    }
}

/// How a task or a flow body ended by returning: its output, or the signal it raised.
fn returned(r: Result<String, WitSignal>, budget: &RunBudget) -> Ending {
    match r {
        Ok(output) => output_ending(output, budget),
        Err(signal) => signal_ending(signal, budget),
    }
}

/// What a run may reach beyond its own memory: its grants, and a flow body its orchestrator.
#[derive(Clone, Copy)]
struct Reach<'a> {
    grants: &'a RunGrants,
    body: Option<&'a FlowBody>,
}

/// A finished (or stopped) call in its store.
struct Execution<R> {
    result: Result<Result<R, (Phase, wasmtime::Error)>, Interruption>,
    duration: Duration,
    store: Store<RunState>,
    sink: SharedSink,
    /// The run's reservation, given back only once the store (and every pool slot it holds)
    /// is dropped.
    admitted: Option<Admitted>,
}

impl<R> Execution<R> {
    /// How the run ended (`returned` maps what the guest returned), with its logs and usage.
    /// The store goes first: the guest's memory is released before `returned` looks at the
    /// value (which is moved, never copied: an output may be large), and its instances,
    /// memories and tables go back to the pool before the reservation that guaranteed them is
    /// released.
    fn finish(self, budget: &RunBudget, returned: impl FnOnce(R) -> Ending) -> RunOutcome {
        let fuel = budget.fuel.unwrap_or(u64::MAX);
        let usage = Usage {
            fuel_consumed: fuel.saturating_sub(self.store.get_fuel().unwrap_or(0)),
            duration: self.duration,
            memory_peak_bytes: self.store.data().limiter.memory_peak,
        };
        let value = match self.result {
            Err(Interruption::Deadline) => {
                Err(Ending::TimedOut(TimeLimit::Deadline(budget.timeout)))
            }
            Err(Interruption::Cancelled) => Err(Ending::Cancelled),
            Err(Interruption::Refused(l)) => Err(Ending::LimitExceeded(l)),
            Err(Interruption::Ungranted(message)) => Err(Ending::HostFault { message }),
            Ok(Ok(r)) => Ok(r),
            Ok(Err((phase, e))) => {
                let log_sink = capture::lock(&self.sink);
                Err(error_ending(
                    self.store.data(),
                    &log_sink,
                    phase,
                    &e,
                    budget,
                ))
            }
        };
        drop(self.store);
        drop(self.admitted);
        let ending = value.map_or_else(|ending| ending, returned);
        let logs = capture::lock(&self.sink).finish();
        RunOutcome {
            ending,
            logs: logs.records,
            logs_dropped_bytes: logs.dropped_bytes,
            usage,
        }
    }
}

/// A sentence for an ending that is not a normal return.
fn describe(ending: &Ending) -> String {
    match ending {
        Ending::GuestFault { message }
        | Ending::HostFault { message }
        | Ending::Lost { message } => message.clone(),
        Ending::LimitExceeded(l) => l.to_string(),
        Ending::TimedOut(t) => t.to_string(),
        Ending::Cancelled => "cancelled".into(),
        Ending::Output(_) | Ending::Signal(_) => "returned".into(),
    }
}

pub(super) fn wit_state(s: &State) -> WitState {
    WitState {
        name: s.name.as_str().to_owned(),
        type_: match s.state_type() {
            StateType::Scheduled => WitStateType::Scheduled,
            StateType::Pending => WitStateType::Pending,
            StateType::Running => WitStateType::Running,
            StateType::Paused => WitStateType::Paused,
            StateType::Cancelling => WitStateType::Cancelling,
            StateType::Cancelled => WitStateType::Cancelled,
            StateType::Completed => WitStateType::Completed,
            StateType::Failed => WitStateType::Failed,
            StateType::Crashed => WitStateType::Crashed,
        },
        message: s.message.clone(),
        result: s.result.as_ref().map(|v| v.to_string()),
    }
}

/// A handler's returned state. Its type is implied by its name; a name Sluice does not know, or
/// a result that is not JSON, is an error.
fn from_wit_state(
    w: WitState,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<State>, String> {
    let name: StateName = w
        .name
        .parse()
        .map_err(|e| format!("the handler returned an invalid state: {e}"))?;
    let mut state = State::new(name, now);
    state.message = w.message;
    if let Some(r) = w.result {
        state.result = Some(
            Json::parse(&r)
                .map_err(|e| format!("the handler returned a result that is not JSON: {e}"))?,
        );
    }
    Ok(Some(state))
}

async fn cancelled(cancel: Option<&CancelToken>) {
    match cancel {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}
