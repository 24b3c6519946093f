//! Classifying how a run ended: a task's output or signal checked against the budget, and an
//! error turned into the limit it hit, a time-out, a cancel, or a guest or host fault with the
//! guest's stderr tail and backtrace.

use std::time::Duration;

use wasmtime::{Trap, WasmBacktrace};

use super::bindings::WitSignal;
use super::capture::LogSink;
use super::run::{Interruption, Phase, RunState};
use super::{Ending, Limit, LimitExceeded, RunBudget, Signal, TimeLimit};
use crate::json::Json;

pub(super) fn output_ending(output: String, budget: &RunBudget) -> Ending {
    let len = output.len() as u64;
    if len > budget.output_bytes {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: budget.output_bytes,
            requested: Some(len),
        });
    }
    match Json::parse(&output) {
        Ok(v) => Ending::Output(v),
        Err(e) => Ending::GuestFault {
            message: format!("the task's output is not valid JSON: {e}"),
        },
    }
}

pub(super) fn signal_ending(signal: WitSignal, budget: &RunBudget) -> Ending {
    let len = match &signal {
        WitSignal::Fail(m) | WitSignal::Skip(m) | WitSignal::Pause(m) => m.len(),
        WitSignal::Retry(r) => r.message.len(),
        WitSignal::Success(s) => s.message.len() + s.output.as_ref().map_or(0, String::len),
    } as u64;
    if len > budget.output_bytes {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: budget.output_bytes,
            requested: Some(len),
        });
    }
    Ending::Signal(match signal {
        WitSignal::Fail(message) => Signal::Fail { message },
        WitSignal::Retry(r) => Signal::Retry {
            message: r.message,
            delay: r.delay_ms.map(Duration::from_millis),
        },
        WitSignal::Skip(message) => Signal::Skip { message },
        WitSignal::Pause(message) => Signal::Pause { message },
        WitSignal::Success(s) => {
            let output = match s.output.as_deref().map(Json::parse).transpose() {
                Ok(v) => v.unwrap_or_else(Json::null),
                Err(e) => {
                    return Ending::GuestFault {
                        message: format!("the SUCCESS signal's output is not valid JSON: {e}"),
                    };
                }
            };
            Signal::Success {
                output,
                message: s.message,
            }
        }
    })
}

/// The marker of wasmtime's error when a guest hands the host more than the hostcall fuel.
const TRANSFER_TOO_LARGE: &str = "too much data is being copied between the host and the guest";

/// How wasmtime's backtrace context starts when displayed.
const BACKTRACE_CONTEXT: &str = "error while executing at wasm backtrace:";
/// How many guest stack frames wasmtime captures, and a trap message shows.
pub(super) const BACKTRACE_FRAMES: usize = 24;
/// How many of the guest's last stderr lines a trap message shows.
const STDERR_LINES: usize = 8;

pub(super) fn error_ending(
    state: &RunState,
    logs: &LogSink,
    phase: Phase,
    err: &wasmtime::Error,
    budget: &RunBudget,
) -> Ending {
    match &state.interrupted {
        Some(Interruption::Cancelled) => return Ending::Cancelled,
        Some(Interruption::Deadline) => {
            return Ending::TimedOut(TimeLimit::Deadline(budget.timeout));
        }
        Some(Interruption::Refused(l)) => return Ending::LimitExceeded(*l),
        Some(Interruption::Ungranted(message)) => {
            return Ending::HostFault {
                message: message.clone(),
            };
        }
        None => {}
    }
    let trap = err.downcast_ref::<Trap>().copied();
    if trap == Some(Trap::OutOfFuel) {
        return Ending::TimedOut(TimeLimit::Fuel(budget.fuel.unwrap_or(u64::MAX)));
    }
    if let Some(v) = state
        .limiter
        .violation
        .or(state.host_call_violation)
        .or(logs.violation)
    {
        return Ending::LimitExceeded(v);
    }
    let chain = error_chain(err);
    if chain.contains(TRANSFER_TOO_LARGE) {
        // A transfer during execution carries the guest's backtrace; the output is lifted after
        // the guest returned, with no guest frames left.
        let (limit, max) = if err.downcast_ref::<WasmBacktrace>().is_some() {
            (Limit::HostCallBytes, budget.host_call_bytes)
        } else {
            (Limit::OutputBytes, budget.output_bytes)
        };
        return Ending::LimitExceeded(LimitExceeded {
            limit,
            max,
            requested: None,
        });
    }
    if let Some(requested) = random_request(&chain) {
        return Ending::LimitExceeded(LimitExceeded {
            limit: Limit::HostCallBytes,
            max: budget.host_call_bytes,
            requested: Some(requested),
        });
    }
    if phase == Phase::Instantiate && trap.is_none() {
        if chain.contains("instance count too high") {
            return Ending::LimitExceeded(LimitExceeded {
                limit: Limit::Instances,
                max: u64::from(budget.instances),
                requested: None,
            });
        }
        return Ending::HostFault {
            message: format!("cannot instantiate the component: {chain}"),
        };
    }
    let stderr = logs.stderr_tail(STDERR_LINES);
    let mut message = match (trap, panic_message(&stderr)) {
        (_, Some(panic)) => format!("the task panicked{panic}"),
        (Some(Trap::StackOverflow), _) => {
            "stack overflow: the guest exhausted its call stack".into()
        }
        (Some(Trap::MemoryOutOfBounds), _) if let Some(f) = deep_recursion(err) => format!(
            "stack overflow: `{f}` recursed until the guest's stack in linear memory ran out \
             (trap: {})",
            Trap::MemoryOutOfBounds
        ),
        // The guest's own code trapped before `run` was called: a start function, or a data or
        // element segment out of bounds. Its fault, like any trap.
        (Some(t), _) if phase == Phase::Instantiate => {
            format!(
                "the component trapped while it was instantiated (its start function or segments): {t}"
            )
        }
        (Some(t), _) => format!("the guest trapped: {t}"),
        (None, _) => format!("the guest failed: {chain}"),
    };
    let stderr: Vec<&String> = stderr.iter().filter(|l| !l.trim().is_empty()).collect();
    if !stderr.is_empty() {
        message.push_str("\nstderr:");
        for line in stderr {
            message.push_str("\n  ");
            message.push_str(line);
        }
    }
    if let Some(bt) = err.downcast_ref::<WasmBacktrace>() {
        message.push_str("\nguest backtrace:");
        push_backtrace(&mut message, bt);
    }
    Ending::GuestFault { message }
}

/// The function, when the trap's backtrace is one function calling itself over and over: the
/// signature of a shadow-stack overflow (compilers keep large frames in linear memory, below
/// the data, so overflowing them is an out-of-bounds access rather than a call-stack trap).
fn deep_recursion(err: &wasmtime::Error) -> Option<String> {
    let frames = err.downcast_ref::<WasmBacktrace>()?.frames();
    let first = frames.first()?;
    let recursive = frames.len() >= BACKTRACE_FRAMES
        && frames.iter().all(|f| f.func_index() == first.func_index());
    recursive.then(|| frame_name(first))
}

fn frame_name(frame: &wasmtime::FrameInfo) -> String {
    frame.func_name().map_or_else(
        || format!("<function {}>", frame.func_index()),
        |n| format!("{:#}", rustc_demangle::demangle(n)),
    )
}

/// The panic in a Rust guest's stderr (` at <location>: <message>`), if there is one.
fn panic_message(stderr: &[String]) -> Option<String> {
    let start = stderr.iter().rposition(|l| l.contains(" panicked at "))?;
    let location = stderr[start]
        .split_once(" panicked at ")
        .map_or("", |(_, loc)| loc.trim_end_matches(':'));
    let text: Vec<&str> = stderr[start + 1..]
        .iter()
        .map(String::as_str)
        .take_while(|l| !l.starts_with("note: "))
        .collect();
    Some(format!(" at {location}: {}", text.join("\n")))
}

fn push_backtrace(out: &mut String, bt: &WasmBacktrace) {
    for (i, frame) in bt.frames().iter().enumerate() {
        let module = frame.module().name().unwrap_or("<module>");
        out.push_str(&format!("\n  {i:>3}: {module}!{}", frame_name(frame)));
    }
}

/// The size of a `wasi:random` request that wasmtime-wasi refused for exceeding
/// `max_random_size` (the run's host-call limit), from its error text.
fn random_request(chain: &str) -> Option<u64> {
    let (_, rest) = chain.split_once("requested len ")?;
    let (n, _) = rest.split_once(" exceeds limit ")?;
    n.parse().ok()
}

/// An error and its causes, joined with `: `. The guest backtrace that wasmtime attaches as
/// context is left out (messages show it separately, after the reason).
pub(super) fn error_chain(e: &wasmtime::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) || text.starts_with(BACKTRACE_CONTEXT) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_checked_for_size_and_json() {
        let budget = RunBudget {
            output_bytes: 4,
            ..RunBudget::default()
        };
        assert_eq!(
            output_ending("[1]".into(), &budget),
            Ending::Output(serde_json::json!([1]).into())
        );
        assert!(matches!(
            output_ending("[1,2]".into(), &budget),
            Ending::LimitExceeded(LimitExceeded {
                limit: Limit::OutputBytes,
                max: 4,
                requested: Some(5)
            })
        ));
        assert!(matches!(
            output_ending("nope".into(), &budget),
            Ending::GuestFault { .. }
        ));
    }
}
