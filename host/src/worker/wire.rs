//! What the server and its workers say to each other (`/api/v1/worker/…`): a claimed attempt's
//! job, its outcome, and the requests that claim, extend and finish attempts. Plain serde types;
//! JSON values travel as JSON text, so numbers keep every digit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::context::TaskContext;
use crate::ids::{FlowRunId, TaskRunId, TenantId};
use crate::json::Json;
use crate::sandbox::{
    Ending, Limit, LimitExceeded, LogRecord, RunBudget, RunOutcome, Signal, TimeLimit, Usage,
    WireGrants,
};

/// One attempt of one task run, as a worker runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireJob {
    /// The tenant whose component it is (where the worker fetches it).
    pub tenant: TenantId,
    /// blake3 of the component's bytes, in hex.
    pub component: String,
    /// The component's name, for messages.
    pub name: String,
    /// The input, JSON text.
    pub input: String,
    /// What the task run sees of its context.
    pub ctx: WireContext,
    /// Its limits.
    pub budget: RunBudget,
    /// What it may reach besides its input.
    pub grants: WireGrants,
}

/// A [`TaskContext`] as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireContext {
    /// The flow run.
    pub flow_run_id: FlowRunId,
    /// The task run.
    pub task_run_id: TaskRunId,
    /// The task's name.
    pub task_name: String,
    /// The attempt (from 1).
    pub attempt: u32,
    /// The index of a mapped child.
    pub map_index: Option<u32>,
    /// The flow run's parameters, a JSON object in text; empty in a claimed job, whose flow
    /// run's parameters come once per claim ([`ClaimResponse::parameters`]).
    #[serde(default)]
    pub parameters: String,
    /// User keys.
    pub values: BTreeMap<String, String>,
}

impl From<&TaskContext> for WireContext {
    fn from(c: &TaskContext) -> Self {
        Self {
            flow_run_id: c.flow_run_id,
            task_run_id: c.task_run_id,
            task_name: c.task_name.to_string(),
            attempt: c.attempt,
            map_index: c.map_index,
            parameters: c.parameters.to_string(),
            values: (*c.values).clone(),
        }
    }
}

impl From<WireContext> for TaskContext {
    fn from(c: WireContext) -> Self {
        Self {
            flow_run_id: c.flow_run_id,
            task_run_id: c.task_run_id,
            task_name: c.task_name.into(),
            attempt: c.attempt,
            map_index: c.map_index,
            parameters: c.parameters.into(),
            values: Arc::new(c.values),
        }
    }
}

/// How an attempt ended, as a worker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireOutcome {
    /// How it ended.
    pub ending: WireEnding,
    /// Its log records.
    pub logs: Vec<LogRecord>,
    /// Log bytes dropped over its budget.
    pub logs_dropped_bytes: u64,
    /// What it used.
    pub usage: Usage,
}

/// An [`Ending`] as plain data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WireEnding {
    /// An output (JSON text).
    Output { json: String },
    /// A signal.
    Signal {
        /// FAIL, RETRY, SKIP, PAUSE or SUCCESS.
        signal: String,
        /// Its message.
        message: String,
        /// RETRY's delay.
        delay_ms: Option<u64>,
        /// SUCCESS's output (JSON text).
        output: Option<String>,
    },
    /// A guest fault.
    GuestFault { message: String },
    /// A limit other than time.
    LimitExceeded {
        /// Which (`memory`, `table`, `instance`, `output`, `host-call`, `host memory`).
        limit: String,
        /// Its value.
        max: u64,
        /// What was asked for.
        requested: Option<u64>,
    },
    /// The fuel budget ran out.
    OutOfFuel { fuel: u64 },
    /// The deadline passed.
    Deadline { ms: u64 },
    /// Cancelled.
    Cancelled,
    /// A host fault.
    HostFault { message: String },
    /// Lost.
    Lost { message: String },
}

const LIMITS: [Limit; 6] = [
    Limit::Memory,
    Limit::TableElements,
    Limit::Instances,
    Limit::OutputBytes,
    Limit::HostCallBytes,
    Limit::HostMemory,
];

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl From<&RunOutcome> for WireOutcome {
    fn from(o: &RunOutcome) -> Self {
        let ending = match &o.ending {
            Ending::Output(v) => WireEnding::Output {
                json: v.as_str().to_owned(),
            },
            Ending::Signal(s) => {
                let (signal, message, delay_ms, output) = match s {
                    Signal::Fail { message } => ("FAIL", message, None, None),
                    Signal::Retry { message, delay } => ("RETRY", message, delay.map(millis), None),
                    Signal::Skip { message } => ("SKIP", message, None, None),
                    Signal::Pause { message } => ("PAUSE", message, None, None),
                    Signal::Success { output, message } => {
                        ("SUCCESS", message, None, Some(output.as_str().to_owned()))
                    }
                };
                WireEnding::Signal {
                    signal: signal.into(),
                    message: message.clone(),
                    delay_ms,
                    output,
                }
            }
            Ending::GuestFault { message } => WireEnding::GuestFault {
                message: message.clone(),
            },
            Ending::LimitExceeded(l) => WireEnding::LimitExceeded {
                limit: l.limit.to_string(),
                max: l.max,
                requested: l.requested,
            },
            Ending::TimedOut(TimeLimit::Fuel(fuel)) => WireEnding::OutOfFuel { fuel: *fuel },
            Ending::TimedOut(TimeLimit::Deadline(d)) => WireEnding::Deadline { ms: millis(*d) },
            Ending::Cancelled => WireEnding::Cancelled,
            Ending::HostFault { message } => WireEnding::HostFault {
                message: message.clone(),
            },
            Ending::Lost { message } => WireEnding::Lost {
                message: message.clone(),
            },
        };
        WireOutcome {
            ending,
            logs: o.logs.clone(),
            logs_dropped_bytes: o.logs_dropped_bytes,
            usage: o.usage,
        }
    }
}

impl WireOutcome {
    /// About how many bytes this is as JSON (its texts and a margin per part), without
    /// serializing it: to batch results by size.
    pub fn size_hint(&self) -> usize {
        let ending = match &self.ending {
            WireEnding::Output { json } => json.len(),
            WireEnding::Signal {
                message, output, ..
            } => message.len() + output.as_ref().map_or(0, String::len),
            WireEnding::GuestFault { message }
            | WireEnding::HostFault { message }
            | WireEnding::Lost { message } => message.len(),
            _ => 0,
        };
        // Escaping may double a text; 128 bytes for each record's other fields.
        2 * ending
            + self
                .logs
                .iter()
                .map(|r| 2 * r.message.len() + 128)
                .sum::<usize>()
            + 256
    }

    /// The outcome, or why it is not one (a value that is not JSON, an unknown signal or limit).
    pub fn into_outcome(self) -> Result<RunOutcome, String> {
        let json = |text: &str| Json::parse(text).map_err(|e| format!("not JSON: {e}"));
        let ending = match self.ending {
            WireEnding::Output { json: text } => Ending::Output(json(&text)?),
            WireEnding::Signal {
                signal,
                message,
                delay_ms,
                output,
            } => Ending::Signal(match signal.as_str() {
                "FAIL" => Signal::Fail { message },
                "RETRY" => Signal::Retry {
                    message,
                    delay: delay_ms.map(Duration::from_millis),
                },
                "SKIP" => Signal::Skip { message },
                "PAUSE" => Signal::Pause { message },
                "SUCCESS" => Signal::Success {
                    output: match output {
                        Some(text) => json(&text)?,
                        None => Json::null(),
                    },
                    message,
                },
                other => return Err(format!("unknown signal {other:?}")),
            }),
            WireEnding::GuestFault { message } => Ending::GuestFault { message },
            WireEnding::LimitExceeded {
                limit,
                max,
                requested,
            } => Ending::LimitExceeded(LimitExceeded {
                limit: LIMITS
                    .into_iter()
                    .find(|l| l.to_string() == limit)
                    .ok_or_else(|| format!("unknown limit {limit:?}"))?,
                max,
                requested,
            }),
            WireEnding::OutOfFuel { fuel } => Ending::TimedOut(TimeLimit::Fuel(fuel)),
            WireEnding::Deadline { ms } => {
                Ending::TimedOut(TimeLimit::Deadline(Duration::from_millis(ms)))
            }
            WireEnding::Cancelled => Ending::Cancelled,
            WireEnding::HostFault { message } => Ending::HostFault { message },
            WireEnding::Lost { message } => Ending::Lost { message },
        };
        Ok(RunOutcome {
            ending,
            logs: self.logs,
            logs_dropped_bytes: self.logs_dropped_bytes,
            usage: self.usage,
        })
    }
}

/// A claim's token, and which attempt it is: every call about a claimed attempt carries it,
/// and counts only while the claim is still the worker's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClaimRef {
    /// The queue row.
    pub id: i64,
    /// The claim's fence.
    pub fence: i64,
    /// The task run.
    pub task_run: TaskRunId,
    /// Its attempt.
    pub attempt: u32,
}

/// `POST /api/v1/worker/claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// This worker process (unique per process; the token's name is put before it).
    pub instance: String,
    /// The tags it carries.
    #[serde(default)]
    pub tags: Vec<String>,
    /// At most this many attempts.
    pub max: u32,
    /// How many attempts it runs at once (what the server may give it).
    pub concurrency: u32,
    /// How long to wait for work when there is none, in milliseconds (at most 30 s).
    pub wait_ms: u64,
}

/// The answer to a claim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// The claimed attempts.
    pub jobs: Vec<ClaimedJob>,
    /// How long a claim lasts unless extended, in milliseconds.
    pub lease_ms: u64,
    /// The parameters of the flow runs of these jobs (a JSON object in text each): sent once per
    /// claim, not with every job (a mapped flow's parameters hold the list it maps over).
    #[serde(default)]
    pub parameters: BTreeMap<FlowRunId, String>,
}

/// One claimed attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimedJob {
    /// Its claim.
    pub claim: ClaimRef,
    /// What to run.
    pub job: WireJob,
}

/// `POST /api/v1/worker/extend`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtendRequest {
    /// The worker process.
    pub instance: String,
    /// The claims it holds.
    pub claims: Vec<ClaimRef>,
}

/// The answer to an extension: per claim, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExtendResponse {
    /// Whether the claim is still the worker's (false: stop it; its result would not count).
    pub held: Vec<bool>,
    /// Whether its flow run was cancelled (stop it; report it Cancelled).
    pub cancel: Vec<bool>,
}

/// `POST /api/v1/worker/finish`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishRequest {
    /// The worker process.
    pub instance: String,
    /// Results.
    pub results: Vec<FinishedJob>,
}

/// One result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishedJob {
    /// Its claim.
    pub claim: ClaimRef,
    /// How it ended.
    pub outcome: WireOutcome,
}

/// The answer to a finish: per result, whether it was taken (false: the claim had lapsed; the
/// attempt was recorded Crashed and maybe run again, and this result does not count).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinishResponse {
    /// Per result, in order.
    pub accepted: Vec<bool>,
}

/// `GET /api/v1/worker/stats`: what the server's queue of worker attempts has done since it
/// started.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueStats {
    /// Attempts enqueued.
    pub enqueued: u64,
    /// Attempts claimed.
    pub claimed: u64,
    /// Results accepted.
    pub finished: u64,
    /// Results refused (their claim had lapsed).
    pub refused: u64,
    /// Attempts whose claim lapsed, recorded Crashed.
    pub lapsed: u64,
    /// Claim statements run.
    pub claims: u64,
    /// From enqueue to claim, in microseconds: median.
    pub wait_p50_us: u64,
    /// … 99th percentile.
    pub wait_p99_us: u64,
    /// One claim statement, in microseconds: median.
    pub claim_p50_us: u64,
    /// … 99th percentile.
    pub claim_p99_us: u64,
    /// Workers heard from within two leases.
    pub workers: u64,
    /// Their concurrency, summed.
    pub capacity: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{LogLevel, LogSource};

    /// Every ending survives the wire, JSON numbers to the last digit.
    #[test]
    fn every_ending_round_trips() {
        let endings = [
            Ending::Output(Json::parse(r#"{"n":12345678901234567890123}"#).expect("json")),
            Ending::Signal(Signal::Fail {
                message: "no".into(),
            }),
            Ending::Signal(Signal::Retry {
                message: "again".into(),
                delay: Some(Duration::from_millis(1500)),
            }),
            Ending::Signal(Signal::Skip {
                message: "s".into(),
            }),
            Ending::Signal(Signal::Pause {
                message: "p".into(),
            }),
            Ending::Signal(Signal::Success {
                output: Json::parse("[1,2]").expect("json"),
                message: "ok".into(),
            }),
            Ending::GuestFault {
                message: "trap".into(),
            },
            Ending::LimitExceeded(LimitExceeded {
                limit: Limit::HostCallBytes,
                max: 10,
                requested: Some(11),
            }),
            Ending::TimedOut(TimeLimit::Fuel(99)),
            Ending::TimedOut(TimeLimit::Deadline(Duration::from_millis(250))),
            Ending::Cancelled,
            Ending::HostFault {
                message: "host".into(),
            },
            Ending::Lost {
                message: "lost".into(),
            },
        ];
        for ending in endings {
            let outcome = RunOutcome {
                ending,
                logs: vec![LogRecord {
                    time: chrono::Utc::now(),
                    source: LogSource::Stdout,
                    level: LogLevel::Info,
                    message: "line".into(),
                }],
                logs_dropped_bytes: 3,
                usage: Usage {
                    fuel_consumed: 7,
                    duration: Duration::from_micros(1234),
                    memory_peak_bytes: 65536,
                },
            };
            let text = serde_json::to_string(&WireOutcome::from(&outcome)).expect("serialize");
            let back: WireOutcome = serde_json::from_str(&text).expect("deserialize");
            assert_eq!(back.into_outcome().expect("outcome"), outcome, "{text}");
        }
    }

    /// An unknown signal or limit is refused, named.
    #[test]
    fn unknown_signals_and_limits_are_refused() {
        let bad = WireOutcome {
            ending: WireEnding::LimitExceeded {
                limit: "disk".into(),
                max: 1,
                requested: None,
            },
            logs: Vec::new(),
            logs_dropped_bytes: 0,
            usage: Usage::default(),
        };
        assert!(bad.into_outcome().expect_err("refused").contains("disk"));
    }
}
