//! Write Sluice tasks in Rust.
//!
//! This crate owns the Rust side of the `sluice:task` WIT contract. It hides the generated
//! bindings behind a small surface: a task is one function from a serde-deserializable input to
//! `Result<T, Signal>` where `T` is serializable, exported with [`export_task!`]:
//!
//! ```ignore
//! use sluice_guest::{export_task, Signal};
//!
//! fn run(x: i64) -> Result<i64, Signal> {
//!     if x < 0 {
//!         return Err(Signal::retry("x is negative"));
//!     }
//!     Ok(x)
//! }
//!
//! export_task!(run);
//! ```
//!
//! The task's input arrives as JSON and is deserialized into the function's argument type; an
//! input that does not fit fails the task run with a message naming the expected type. The
//! returned value is serialized to JSON as the task's output. Returning `Err(signal)` moves the
//! task run to the state the signal names (see [`Signal`]). A panic fails the task run; the panic
//! message is captured from stderr.
//!
//! Read-only run information lives in [`context`]; log lines go through [`log`] or the
//! [`info!`]-style macros.
//!
//! What the task's grants give it (see the manifest's `[tasks.X.grants]`) is reached with Rust's
//! own idioms: granted directories through `std::fs` at their guest paths, environment variables
//! and secrets through [`env`] and [`secret`] (or `std::env`), and outbound HTTP through [`http`]
//! (feature `http`). Without a grant, each of these fails as if the thing did not exist.

#[allow(unused_extern_crates)] // the generated bindings name the crate by path
extern crate self as sluice_guest;

use std::time::Duration;

pub use serde;
pub use serde_json;

/// The environment variable `name`, if the task is granted it (`env = { NAME = "…" }`).
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The value of secret `name`, if the task is granted it (`secrets = ["NAME"]`). Sluice replaces
/// the value with `***` wherever it shows up in the run's logs, output or messages.
pub fn secret(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Outbound HTTP over `wasi:http` (feature `http`): a re-export of `wstd`'s HTTP client, and
/// blocking helpers for a synchronous task. A request the task's `http` grants do not allow
/// fails with [`ErrorCode::HttpRequestDenied`]; one over the run's limits with
/// `HttpRequestDenied` (requests) or `HttpResponseBodySize` (response bytes). Redirects are not
/// followed: a 3xx comes back as it is (and a request to its `location` is checked like any
/// other).
///
/// ```ignore
/// let (status, body) = sluice_guest::http::get("https://api.example.com/items")?;
/// let items: Vec<Item> = sluice_guest::http::get_json("https://api.example.com/items")?;
/// ```
#[cfg(feature = "http")]
pub mod http {
    pub use wstd::http::{
        Body, BodyExt, Client, Error, ErrorCode, HeaderMap, HeaderValue, Method, Request, Response,
        StatusCode, Uri,
    };
    pub use wstd::runtime::block_on;

    /// Send `request` and read the whole response body: `(status, body)`.
    pub fn send(request: Request<Body>) -> Result<(u16, Vec<u8>), Error> {
        block_on(async move {
            let mut response = Client::new().send(request).await?;
            let status = response.status().as_u16();
            let body = response.body_mut().contents().await?.to_vec();
            Ok((status, body))
        })
    }

    /// GET `url`: `(status, body)`.
    pub fn get(url: &str) -> Result<(u16, Vec<u8>), Error> {
        send(Request::get(url).body(Body::empty())?)
    }

    /// GET `url` and parse the body as JSON; a status other than 2xx is an error.
    pub fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> Result<T, Error> {
        let (status, body) = get(url)?;
        json(url, status, &body)
    }

    /// POST `value` as JSON to `url` and parse the answer as JSON; a status other than 2xx is
    /// an error.
    pub fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        url: &str,
        value: &B,
    ) -> Result<T, Error> {
        let request = Request::post(url)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(value)?))?;
        let (status, body) = send(request)?;
        json(url, status, &body)
    }

    fn json<T: serde::de::DeserializeOwned>(
        url: &str,
        status: u16,
        body: &[u8],
    ) -> Result<T, Error> {
        if !(200..300).contains(&status) {
            return Err(Error::msg(format!("{url} answered {status}")));
        }
        Ok(serde_json::from_slice(body)?)
    }
}

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "task",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__sluice_export_task_world",
        default_bindings_module: "::sluice_guest::__private::bindings",
        runtime_path: "::sluice_guest::__private::wit_bindgen::rt",
    });
}

#[doc(hidden)]
pub mod handler_bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__sluice_export_handler_world",
        default_bindings_module: "::sluice_guest::handler_bindings",
        runtime_path: "::sluice_guest::__private::wit_bindgen::rt",
        with: {
            "sluice:task/types@0.1.0": crate::bindings::sluice::task::types,
            "sluice:task/context@0.1.0": crate::bindings::sluice::task::context,
            "sluice:task/log@0.1.0": crate::bindings::sluice::task::log,
        },
    });
}

#[doc(hidden)]
pub mod flow_bindings {
    wit_bindgen::generate!({
        world: "flow",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__sluice_export_flow_world",
        default_bindings_module: "::sluice_guest::flow_bindings",
        runtime_path: "::sluice_guest::__private::wit_bindgen::rt",
        with: {
            "sluice:task/types@0.1.0": crate::bindings::sluice::task::types,
            "sluice:task/context@0.1.0": crate::bindings::sluice::task::context,
            "sluice:task/log@0.1.0": crate::bindings::sluice::task::log,
        },
    });
}

use bindings::sluice::task::types as wit;

/// A signal overrides the state Sluice would infer from the task's return value (Prefect's
/// signals).
///
/// | signal | state of the task run |
/// |---|---|
/// | [`Signal::fail`] | Failed (AwaitingRetry first while the task has retries left, as for any failure) |
/// | [`Signal::retry`] | AwaitingRetry, or Failed when no retries remain |
/// | [`Signal::skip`] | Skipped (counts as success downstream) |
/// | [`Signal::pause`] | Paused until resumed |
/// | [`Signal::success`] | Completed with a message |
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// Fail the task run.
    Fail(String),
    /// Retry the task run, optionally after `delay` instead of the task's configured delay.
    Retry {
        /// Why the task asks to be retried.
        message: String,
        /// Overrides the configured retry delay.
        delay: Option<Duration>,
    },
    /// Skip the task run.
    Skip(String),
    /// Pause the task run until it is resumed.
    Pause(String),
    /// Complete the task run with an explicit message and optional output (JSON).
    Success {
        /// The output, already serialized to JSON; `None` means `null`.
        output: Option<String>,
        /// The message recorded on the Completed state.
        message: String,
    },
}

impl Signal {
    /// Fail the task run with `message`.
    pub fn fail(message: impl Into<String>) -> Self {
        Signal::Fail(message.into())
    }

    /// Ask for a retry after the task's configured delay.
    pub fn retry(message: impl Into<String>) -> Self {
        Signal::Retry {
            message: message.into(),
            delay: None,
        }
    }

    /// Ask for a retry after `delay`.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        Signal::Retry {
            message: message.into(),
            delay: Some(delay),
        }
    }

    /// Skip the task run with `message`.
    pub fn skip(message: impl Into<String>) -> Self {
        Signal::Skip(message.into())
    }

    /// Pause the task run with `message`.
    pub fn pause(message: impl Into<String>) -> Self {
        Signal::Pause(message.into())
    }

    /// Complete with `output` and `message`. If `output` cannot be serialized the task fails
    /// with the serialization error.
    pub fn success(output: impl serde::Serialize, message: impl Into<String>) -> Self {
        match serde_json::to_string(&output) {
            Ok(json) => Signal::Success {
                output: Some(json),
                message: message.into(),
            },
            Err(e) => Signal::Fail(format!("cannot serialize the SUCCESS output: {e}")),
        }
    }

    fn into_wit(self) -> wit::Signal {
        match self {
            Signal::Fail(m) => wit::Signal::Fail(m),
            Signal::Retry { message, delay } => wit::Signal::Retry(wit::RetryRequest {
                message,
                delay_ms: delay.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            Signal::Skip(m) => wit::Signal::Skip(m),
            Signal::Pause(m) => wit::Signal::Pause(m),
            Signal::Success { output, message } => {
                wit::Signal::Success(wit::SuccessReport { output, message })
            }
        }
    }
}

/// Read-only information about the current task run (Prefect's context).
pub mod context {
    use super::bindings::sluice::task::context as wit;

    /// The value of a context key: a built-in (`flow_run_id`, `task_run_id`, `task_name`,
    /// `attempt`, `map_index`, `parameters`) or one set by the flow or `--context key=value`.
    pub fn get(key: &str) -> Option<String> {
        wit::get(key)
    }

    /// The id of the flow run.
    pub fn flow_run_id() -> String {
        wit::flow_run_id()
    }

    /// The id of this task run.
    pub fn task_run_id() -> String {
        wit::task_run_id()
    }

    /// The task's name.
    pub fn task_name() -> String {
        wit::task_name()
    }

    /// The attempt number, starting at 1.
    pub fn attempt() -> u32 {
        wit::attempt()
    }

    /// The index of this child run within a mapped task.
    pub fn map_index() -> Option<u32> {
        wit::map_index()
    }

    /// The flow run's parameters, deserialized into `T`.
    pub fn parameters<T: serde::de::DeserializeOwned>() -> Result<T, serde_json::Error> {
        serde_json::from_str(&wit::parameters())
    }
}

/// Log lines recorded with the task run.
pub mod log {
    use super::bindings::sluice::task::log as wit;

    /// The severity of a log line.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        /// Very detailed tracing.
        Trace,
        /// Debugging detail.
        Debug,
        /// Normal progress.
        Info,
        /// Something unexpected that the task handled.
        Warn,
        /// Something failed.
        Error,
    }

    /// Record one log line.
    pub fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::Level::Trace,
            Level::Debug => wit::Level::Debug,
            Level::Info => wit::Level::Info,
            Level::Warn => wit::Level::Warn,
            Level::Error => wit::Level::Error,
        };
        wit::log(level, message);
    }
}

/// Log at trace level with `format!` arguments.
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Trace, &::std::format!($($t)*)) }; }
/// Log at debug level with `format!` arguments.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Debug, &::std::format!($($t)*)) }; }
/// Log at info level with `format!` arguments.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Info, &::std::format!($($t)*)) }; }
/// Log at warn level with `format!` arguments.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Warn, &::std::format!($($t)*)) }; }
/// Log at error level with `format!` arguments.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::log::Level::Error, &::std::format!($($t)*)) }; }

/// Export `run` as the component's task. `run` is any `fn(I) -> Result<O, Signal>` where `I` is
/// deserializable and `O` serializable.
#[macro_export]
macro_rules! export_task {
    ($run:expr) => {
        struct __SluiceTask;

        impl $crate::__private::Guest for __SluiceTask {
            fn run(
                input: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::__private::WitSignal> {
                $crate::__private::run_with(&input, $run)
            }
        }

        $crate::__private::bindings::__sluice_export_task_world!(__SluiceTask with_types_in $crate::__private::bindings);
    };
}

/// State handlers: components that see a task run's transitions and may replace the new state
/// (Prefect's state handlers). A handler is one function exported with [`export_handler!`]:
///
/// ```ignore
/// use sluice_guest::handler::State;
/// use sluice_guest::{export_handler, info};
///
/// fn handle(task: &str, old: &State, new: &State) -> Option<State> {
///     if new.name == "Retrying" {
///         info!("{task} is retrying after {}", old.name);
///     }
///     None // keep the new state
/// }
///
/// export_handler!(handle);
/// ```
pub mod handler {
    use super::wit;

    /// A task run's state as a handler sees it.
    #[derive(Debug, Clone, PartialEq)]
    pub struct State {
        /// The state's name: `Completed`, `Retrying`, `TimedOut`, …
        pub name: String,
        /// Its canonical type, e.g. `"RUNNING"` for `Retrying`.
        pub state_type: &'static str,
        /// Its message.
        pub message: Option<String>,
        /// Its result, as JSON text.
        pub result: Option<String>,
    }

    impl State {
        /// A replacement state named `name` with `message` (its type follows from the name).
        pub fn named(name: impl Into<String>, message: impl Into<String>) -> Self {
            Self {
                name: name.into(),
                state_type: "",
                message: Some(message.into()),
                result: None,
            }
        }

        /// Whether it is a successful final state (Completed, Cached, Skipped, …).
        pub fn is_completed(&self) -> bool {
            self.state_type == "COMPLETED"
        }

        /// Whether it is a Failed-type state (Failed, TimedOut, TriggerFailed, …).
        pub fn is_failed(&self) -> bool {
            self.state_type == "FAILED"
        }

        /// Whether it is final: nothing more happens to the task run.
        pub fn is_final(&self) -> bool {
            matches!(
                self.state_type,
                "COMPLETED" | "FAILED" | "CRASHED" | "CANCELLED"
            )
        }

        #[doc(hidden)]
        pub fn from_wit(s: wit::State) -> Self {
            let state_type = match s.type_ {
                wit::StateType::Scheduled => "SCHEDULED",
                wit::StateType::Pending => "PENDING",
                wit::StateType::Running => "RUNNING",
                wit::StateType::Paused => "PAUSED",
                wit::StateType::Cancelling => "CANCELLING",
                wit::StateType::Cancelled => "CANCELLED",
                wit::StateType::Completed => "COMPLETED",
                wit::StateType::Failed => "FAILED",
                wit::StateType::Crashed => "CRASHED",
            };
            Self {
                name: s.name,
                state_type,
                message: s.message,
                result: s.result,
            }
        }

        #[doc(hidden)]
        pub fn into_wit(self) -> wit::State {
            wit::State {
                name: self.name,
                // The host derives the type from the name.
                type_: wit::StateType::Pending,
                message: self.message,
                result: self.result,
            }
        }
    }
}

/// Export `handle` as the component's state handler: any
/// `fn(&str, &handler::State, &handler::State) -> Option<handler::State>`.
#[macro_export]
macro_rules! export_handler {
    ($handle:expr) => {
        struct __SluiceHandler;

        impl $crate::handler_bindings::Guest for __SluiceHandler {
            fn handle(
                task: ::std::string::String,
                old: $crate::__private::WitState,
                new: $crate::__private::WitState,
            ) -> ::std::option::Option<$crate::__private::WitState> {
                let old = $crate::handler::State::from_wit(old);
                let new = $crate::handler::State::from_wit(new);
                ($handle)(&task, &old, &new).map($crate::handler::State::into_wit)
            }
        }

        $crate::handler_bindings::__sluice_export_handler_world!(
            __SluiceHandler with_types_in $crate::handler_bindings
        );
    };
}

/// Flows written as code: a flow body submits the tasks its flow declares and decides what to
/// do from their states and results, one function per construct of Prefect 2's types of
/// submission:
///
/// | Prefect | here |
/// |---|---|
/// | `r1 = t1()` | [`flow::call`]`("t1", x)?` |
/// | `f1 = t1.submit()` | [`flow::submit`]`("t1", x)?` |
/// | `f1.wait()` → Completed/Failed | [`Future::wait`](flow::Future::wait) |
/// | `f1.get_state()` → Pending/Running | [`Future::get_state`](flow::Future::get_state) |
/// | `f1.result()` (raises) | [`Future::result`](flow::Future::result)`::<T>()?` |
/// | `f1.result(raise_on_failure=False)` | `match f1.result::<T>()` (`Err(Error::Failed(state))`) |
/// | `add_one.map([1, 2, 3])` | [`flow::map`]`("add_one", [1, 2, 3])?` |
/// | `add_one.map([...], return_state=True)` | [`flow::map_states`] |
///
/// ```ignore
/// use sluice_guest::flow::{self, Error};
/// use sluice_guest::{export_flow, Signal};
///
/// fn body(p: serde_json::Value) -> Result<i64, Signal> {
///     let mut x: i64 = flow::call("add_one", 0)?;
///     while x < 3 {
///         x = flow::call("add_one", x)?;
///     }
///     let doubled = flow::map("double", [x, x + 1])?;
///     let sum: i64 = doubled.iter().map(|f| f.result::<i64>()).sum::<Result<_, Error>>()?;
///     Ok(sum)
/// }
///
/// export_flow!(body);
/// ```
///
/// A body must be deterministic: it is replayed from the start when its run is resumed, and
/// each submission is matched with the one recorded at the same position. Its clocks and
/// random numbers are the run's (the same on every replay); [`flow::now`] is the time as the
/// run recorded it.
pub mod flow {
    use crate::flow_bindings::sluice::task::orchestrate as o;
    pub use crate::handler::State;

    /// Why a submission or a result did not give a value.
    #[derive(Debug, Clone, PartialEq)]
    pub enum Error {
        /// The host refused the submission (an undeclared task, the run's task limit, …).
        Refused(String),
        /// The task run ended in a state that is not successful.
        Failed(State),
        /// A value could not be converted to or from JSON.
        Json(String),
    }

    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Error::Refused(why) => write!(f, "the submission was refused: {why}"),
                Error::Failed(s) => match &s.message {
                    Some(m) => write!(f, "the task run ended {}: {m}", s.name),
                    None => write!(f, "the task run ended {}", s.name),
                },
                Error::Json(why) => write!(f, "{why}"),
            }
        }
    }

    impl std::error::Error for Error {}

    /// A failure in a flow body fails the flow run (FAIL), naming it.
    impl From<Error> for crate::Signal {
        fn from(e: Error) -> Self {
            crate::Signal::fail(e.to_string())
        }
    }

    /// A submitted task run (Prefect's `PrefectFuture`). Dropping it tells the host the body
    /// will not read its result again.
    #[derive(Debug)]
    pub struct Future(o::Submission);

    impl Future {
        /// The task run's id.
        pub fn id(&self) -> String {
            self.0.id()
        }

        /// Block until the task run is in a final state (Completed, Failed, …) and return it;
        /// its `result` is the output of a successful one.
        pub fn wait(&self) -> State {
            State::from_wit(self.0.wait())
        }

        /// The task run's state now, without waiting (Pending, Running, or final).
        pub fn get_state(&self) -> State {
            State::from_wit(self.0.get_state())
        }

        /// Block until the task run is final: its output, or `Error::Failed(state)` when the
        /// state is not successful (Prefect's `result()`; match on it for
        /// `raise_on_failure=False`).
        pub fn result<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
            let text = self
                .0
                .result()
                .map_err(|s| Error::Failed(State::from_wit(s)))?;
            serde_json::from_str(&text).map_err(|e| {
                Error::Json(format!(
                    "the output of task run {} does not fit `{}`: {e}",
                    self.id(),
                    std::any::type_name::<T>()
                ))
            })
        }
    }

    fn json(input: &impl serde::Serialize) -> Result<String, Error> {
        serde_json::to_string(input)
            .map_err(|e| Error::Json(format!("cannot serialize the input: {e}")))
    }

    /// Submit one task run of the declared task `task` (Prefect's `t1.submit(x)`).
    pub fn submit(task: &str, input: impl serde::Serialize) -> Result<Future, Error> {
        submit_with(task, input, &[], None)
    }

    /// Submit one task run that starts once every one of `wait_for` is final, their states
    /// feeding its trigger (`trigger`, e.g. `"all_finished"`, or the task's own).
    pub fn submit_with(
        task: &str,
        input: impl serde::Serialize,
        wait_for: &[&Future],
        trigger: Option<&str>,
    ) -> Result<Future, Error> {
        let waits: Vec<&o::Submission> = wait_for.iter().map(|f| &f.0).collect();
        o::submit(task, &json(&input)?, &waits, trigger)
            .map(Future)
            .map_err(Error::Refused)
    }

    /// Submit one task run of `task` per input, as one mapped task run (Prefect's
    /// `t.map(inputs)`).
    pub fn map<I: serde::Serialize>(
        task: &str,
        inputs: impl IntoIterator<Item = I>,
    ) -> Result<Vec<Future>, Error> {
        let inputs = inputs
            .into_iter()
            .map(|i| json(&i))
            .collect::<Result<Vec<_>, _>>()?;
        o::submit_map(task, &inputs, &[])
            .map(|all| all.into_iter().map(Future).collect())
            .map_err(Error::Refused)
    }

    /// [`map`], then wait for every child and return their final states (Prefect's
    /// `t.map(inputs, return_state=True)`).
    pub fn map_states<I: serde::Serialize>(
        task: &str,
        inputs: impl IntoIterator<Item = I>,
    ) -> Result<Vec<State>, Error> {
        Ok(map(task, inputs)?.iter().map(Future::wait).collect())
    }

    /// Submit `task` and return its output (Prefect's `r1 = t1(x)`): `Err` when it fails.
    pub fn call<T: serde::de::DeserializeOwned>(
        task: &str,
        input: impl serde::Serialize,
    ) -> Result<T, Error> {
        submit(task, input)?.result()
    }

    /// Run the subflow `flow` (a manifest's `[subflows]`) as a child flow run with
    /// `parameters` (a struct or map: over the subflow's defaults): the future of the task run
    /// standing for it, final when the child is, the child's result its output (Prefect's
    /// calling a flow from a flow).
    pub fn subflow(flow: &str, parameters: impl serde::Serialize) -> Result<Future, Error> {
        o::subflow(flow, &json(&parameters)?)
            .map(Future)
            .map_err(Error::Refused)
    }

    /// Block until every one of `futures` is final.
    pub fn wait_all(futures: &[&Future]) {
        let all: Vec<&o::Submission> = futures.iter().map(|f| &f.0).collect();
        o::wait_all(&all);
    }

    /// Block until one of `futures` is final; its index (the lowest of those final).
    pub fn wait_any(futures: &[&Future]) -> usize {
        let all: Vec<&o::Submission> = futures.iter().map(|f| &f.0).collect();
        o::wait_any(&all) as usize
    }

    /// The time, as the run recorded it (RFC 3339; the same when the body is replayed).
    pub fn now() -> String {
        o::now()
    }
}

/// Export `body` as the component's flow body: any `fn(P) -> Result<O, Signal>` where the
/// flow run's parameters (a JSON object) deserialize into `P` and `O` (the flow run's result)
/// serializes.
#[macro_export]
macro_rules! export_flow {
    ($body:expr) => {
        struct __SluiceFlow;

        impl $crate::flow_bindings::Guest for __SluiceFlow {
            fn run(
                parameters: ::std::string::String,
            ) -> ::std::result::Result<::std::string::String, $crate::__private::WitSignal> {
                $crate::__private::run_with(&parameters, $body)
            }
        }

        $crate::flow_bindings::__sluice_export_flow_world!(
            __SluiceFlow with_types_in $crate::flow_bindings
        );
    };
}

#[doc(hidden)]
pub mod __private {
    pub use super::bindings;
    pub use super::bindings::Guest;
    pub use super::wit::{Signal as WitSignal, State as WitState};
    pub use wit_bindgen;

    /// Deserialize the input, run the task, serialize its output.
    pub fn run_with<I, O>(
        input: &str,
        run: impl FnOnce(I) -> Result<O, super::Signal>,
    ) -> Result<String, WitSignal>
    where
        I: serde::de::DeserializeOwned,
        O: serde::Serialize,
    {
        let input: I = serde_json::from_str(input).map_err(|e| {
            WitSignal::Fail(format!(
                "the task's input does not fit `{}`: {e}",
                std::any::type_name::<I>()
            ))
        })?;
        let output = run(input).map_err(super::Signal::into_wit)?;
        serde_json::to_string(&output)
            .map_err(|e| WitSignal::Fail(format!("cannot serialize the task's output: {e}")))
    }
}
