//! What a task run produced: how it ended, its logs and what it cost. Plain types; the state
//! model (`crate::state`) turns an [`Ending`] into a state.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::json::Json;

/// The result of one task run in the sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// How the run ended.
    pub ending: Ending,
    /// Log records in the order they were made: the `log` import, stdout and stderr lines.
    pub logs: Vec<LogRecord>,
    /// Bytes of log output dropped because the run's log budget was full.
    pub logs_dropped_bytes: u64,
    /// What the run consumed.
    pub usage: Usage,
}

/// What a run consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Fuel consumed (instructions, roughly).
    pub fuel_consumed: u64,
    /// Wall time from the start of instantiation to the end of the call.
    pub duration: Duration,
    /// The largest total linear memory the instance held at once, in bytes.
    pub memory_peak_bytes: u64,
}

/// How a task run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// The task returned an output.
    Output(Json),
    /// The task raised a signal.
    Signal(Signal),
    /// The guest faulted: a trap (with the guest backtrace and the tail of its stderr), or an
    /// output that is not valid JSON.
    GuestFault {
        /// What happened, for people.
        message: String,
    },
    /// The run tried to exceed a limit other than time.
    LimitExceeded(LimitExceeded),
    /// The run used up its fuel or passed its deadline.
    TimedOut(TimeLimit),
    /// The run was cancelled from outside.
    Cancelled,
    /// The host failed, not the guest (the component could not be instantiated for a reason
    /// that is not a limit, or a host error).
    HostFault {
        /// What happened, for people.
        message: String,
    },
    /// The attempt was lost with what ran it: the worker holding it stopped renewing its lease
    /// (killed, stopped, cut off), or could not get its component, so nobody knows how it
    /// ended. Crashed; retried while the task has retries left (so run at least once, maybe
    /// more: a lost attempt may have had effects).
    Lost {
        /// What happened, for people.
        message: String,
    },
}

/// A signal raised by a task (Prefect's signals).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "signal", rename_all = "snake_case")]
pub enum Signal {
    /// FAIL: fail (retried while retries remain, as every failure).
    Fail {
        /// Why.
        message: String,
    },
    /// RETRY: retry (after `delay` if given), or fail when no retries remain.
    Retry {
        /// Why.
        message: String,
        /// Overrides the configured retry delay.
        delay: Option<Duration>,
    },
    /// SKIP: skip this task.
    Skip {
        /// Why.
        message: String,
    },
    /// PAUSE: pause until resumed.
    Pause {
        /// Why.
        message: String,
    },
    /// SUCCESS: complete with an explicit message.
    Success {
        /// The output (`null` when the task gave none).
        output: Json,
        /// The message.
        message: String,
    },
}

/// Which time budget ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeLimit {
    /// The fuel budget, with its value.
    Fuel(u64),
    /// The wall-clock deadline, with its value.
    Deadline(Duration),
}

impl fmt::Display for TimeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeLimit::Fuel(n) => write!(f, "fuel budget of {n} exhausted"),
            TimeLimit::Deadline(d) => write!(f, "wall-clock deadline of {d:?} passed"),
        }
    }
}

/// A limit the run tried to exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitExceeded {
    /// Which limit.
    pub limit: Limit,
    /// The limit's value.
    pub max: u64,
    /// What the run asked for, when known.
    pub requested: Option<u64>,
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = self.limit.unit();
        write!(f, "{} limit of {} {unit} exceeded", self.limit, self.max)?;
        if let Some(r) = self.requested {
            write!(f, " (asked for {r} {unit})")?;
        }
        Ok(())
    }
}

impl std::error::Error for LimitExceeded {}

/// The limits of a [`RunBudget`](super::RunBudget) other than time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Linear memory, summed across memories.
    Memory,
    /// Table elements, summed across tables.
    TableElements,
    /// Core instances.
    Instances,
    /// Output size.
    OutputBytes,
    /// Bytes passed to the host in one call.
    HostCallBytes,
    /// The host's memory ceiling ([`SandboxBuilder::memory_ceiling`](super::SandboxBuilder::memory_ceiling)):
    /// a run whose memory budget exceeds it can never be admitted.
    HostMemory,
}

impl Limit {
    fn unit(self) -> &'static str {
        match self {
            Limit::Memory | Limit::OutputBytes | Limit::HostCallBytes | Limit::HostMemory => {
                "bytes"
            }
            Limit::TableElements => "elements",
            Limit::Instances => "instances",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::Memory => "memory",
            Limit::TableElements => "table",
            Limit::Instances => "instance",
            Limit::OutputBytes => "output",
            Limit::HostCallBytes => "host-call",
            Limit::HostMemory => "host memory",
        })
    }
}

/// Where a log record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogSource {
    /// The `log` import.
    Log,
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
    /// Sluice, about the run (a refused HTTP request).
    Sluice,
}

/// A log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal progress.
    Info,
    /// Something unexpected.
    Warn,
    /// Something failed.
    Error,
}

/// One log line of a task run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    /// When the host received it.
    pub time: DateTime<Utc>,
    /// Where it came from.
    pub source: LogSource,
    /// Its level (`info` for stdout, `warn` for stderr).
    pub level: LogLevel,
    /// The text, without a trailing newline.
    pub message: String,
}

impl LogRecord {
    /// What a record costs against a log budget besides its text (a task run's
    /// [`RunBudget::log_bytes`](super::RunBudget::log_bytes), a flow run's `max_log_bytes`), so a
    /// flood of empty lines is bounded like any other.
    pub const OVERHEAD: u64 = 64;

    /// What this record costs against a log budget: its message's length plus
    /// [`LogRecord::OVERHEAD`].
    pub fn cost(&self) -> u64 {
        (self.message.len() as u64).saturating_add(Self::OVERHEAD)
    }
}
