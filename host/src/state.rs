//! The state model: every state a task run or flow run can be in, with its canonical type
//! (Prefect's names and types, seed 003, plus Prefect 1's Cached, Skipped, TriggerFailed,
//! TimedOut and Mapped), and the mapping from a sandbox [`Ending`] to the state it puts a task
//! run in.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::json::Json;
use crate::sandbox::{Ending, Signal};

/// A state's canonical type. Orchestration rules apply per type; the terminal types are
/// Completed, Cancelled, Failed and Crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum StateType {
    /// Will run at a time in the future.
    Scheduled,
    /// Waiting on preconditions.
    Pending,
    /// Executing.
    Running,
    /// Stopped until approved.
    Paused,
    /// Being cancelled.
    Cancelling,
    /// A user stopped it. Terminal.
    Cancelled,
    /// Finished successfully. Terminal.
    Completed,
    /// Finished because of a code issue. Terminal.
    Failed,
    /// Finished because of an infrastructure issue. Terminal.
    Crashed,
}

impl StateType {
    /// No orchestrated transitions leave a terminal state type.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StateType::Completed | StateType::Cancelled | StateType::Failed | StateType::Crashed
        )
    }

    /// The type's name as printed (`COMPLETED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StateType::Scheduled => "SCHEDULED",
            StateType::Pending => "PENDING",
            StateType::Running => "RUNNING",
            StateType::Paused => "PAUSED",
            StateType::Cancelling => "CANCELLING",
            StateType::Cancelled => "CANCELLED",
            StateType::Completed => "COMPLETED",
            StateType::Failed => "FAILED",
            StateType::Crashed => "CRASHED",
        }
    }
}

impl fmt::Display for StateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! state_names {
    ($($(#[$doc:meta])* $name:ident => $ty:ident,)*) => {
        /// A state's name. Each name has one canonical [`StateType`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum StateName {
            $($(#[$doc])* $name,)*
        }

        impl StateName {
            /// Every state name, in declaration order.
            pub const ALL: &'static [StateName] = &[$(StateName::$name,)*];

            /// The canonical type of this state.
            pub fn state_type(self) -> StateType {
                match self {
                    $(StateName::$name => StateType::$ty,)*
                }
            }

            /// The name as printed (`AwaitingRetry`, …).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(StateName::$name => stringify!($name),)*
                }
            }
        }

        impl FromStr for StateName {
            type Err = UnknownStateName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $(stringify!($name) => Ok(StateName::$name),)*
                    _ => Err(UnknownStateName(s.to_owned())),
                }
            }
        }
    };
}

state_names! {
    /// Will begin at a particular time in the future.
    Scheduled => Scheduled,
    /// Its scheduled start time has passed but it has not started.
    Late => Scheduled,
    /// Did not complete because of a code issue and has retry attempts left.
    AwaitingRetry => Scheduled,
    /// Submitted, waiting on preconditions.
    Pending => Pending,
    /// Executing.
    Running => Running,
    /// Executing after a previous attempt did not complete.
    Retrying => Running,
    /// Stopped until it receives approval to proceed (PAUSE signal or `manual_only`).
    Paused => Paused,
    /// Being cancelled.
    Cancelling => Cancelling,
    /// A user stopped it.
    Cancelled => Cancelled,
    /// Completed successfully.
    Completed => Completed,
    /// Completed by reusing a cached result.
    Cached => Completed,
    /// Skipped (SKIP signal or an upstream skip); counts as success downstream.
    Skipped => Completed,
    /// A mapped task whose children ran.
    Mapped => Completed,
    /// Did not complete because of a code issue and has no retry attempts left.
    Failed => Failed,
    /// Its trigger did not pass.
    TriggerFailed => Failed,
    /// Used up its fuel or passed its wall-clock deadline.
    TimedOut => Failed,
    /// Did not complete because of an infrastructure issue.
    Crashed => Crashed,
}

/// What happens after an attempt that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retries remain: FAIL and RETRY signals and failures (faults, limits, time-outs) go
    /// AwaitingRetry after `delay`; a RETRY signal's own delay wins, capped at `max_delay`.
    Remaining {
        /// The configured retry delay.
        delay: TimeDelta,
        /// The longest delay a RETRY signal may ask for (the task's `max_retry_delay`, and
        /// `backoff.max` when it has a backoff): a longer one is cut to this, so a guest cannot
        /// park a flow run for ever.
        max_delay: TimeDelta,
    },
    /// No retries remain: RETRY signals and failures are final.
    Exhausted,
    /// A single run outside a flow (`sluice task run`): a RETRY signal goes AwaitingRetry for
    /// the caller to act on; failures are final.
    OnSignal {
        /// The delay when the signal gives none.
        delay: TimeDelta,
    },
}

/// A state name that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown state `{0}`")]
pub struct UnknownStateName(pub String);

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of a task run or flow run at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The state's name.
    pub name: StateName,
    /// Why the run is in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the run entered this state.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub timestamp: DateTime<Utc>,
    /// The result the state carries (a Completed state's output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Json>,
    /// For Scheduled-type states: when the run should start.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::timestamp::serialize_option"
    )]
    pub scheduled_for: Option<DateTime<Utc>>,
}

impl State {
    /// A state named `name` entered at `timestamp`, with no message or result.
    pub fn new(name: StateName, timestamp: DateTime<Utc>) -> Self {
        Self {
            name,
            message: None,
            timestamp,
            result: None,
            scheduled_for: None,
        }
    }

    /// The same state with `message`.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    /// The same state carrying `result`.
    pub fn with_result(mut self, result: Json) -> Self {
        self.result = Some(result);
        self
    }

    /// The canonical type.
    pub fn state_type(&self) -> StateType {
        self.name.state_type()
    }

    /// Whether no orchestrated transition leaves this state.
    pub fn is_terminal(&self) -> bool {
        self.state_type().is_terminal()
    }

    /// The state a task run takes after a sandbox run ended with `ending` at `now`, under the
    /// retry policy `retry` (see [`Retry`]). As in Prefect 1's `check_for_retry`, every failure
    /// (FAIL included) retries while retries remain.
    ///
    /// | ending | state |
    /// |---|---|
    /// | output | Completed, carrying the output |
    /// | SUCCESS | Completed with its message and output |
    /// | FAIL | Failed, or AwaitingRetry with retries left |
    /// | RETRY | AwaitingRetry at now + the signal's delay (at most `max_delay`; else the policy's), or Failed when no retries remain |
    /// | SKIP | Skipped |
    /// | PAUSE | Paused |
    /// | guest fault (trap, invalid output) | Failed, or AwaitingRetry with retries left |
    /// | limit exceeded | Failed naming the limit, or AwaitingRetry with retries left |
    /// | fuel or deadline | TimedOut naming the budget, or AwaitingRetry with retries left |
    /// | cancelled | Cancelled |
    /// | host fault | Crashed |
    /// | lost (its worker stopped answering) | Crashed, or AwaitingRetry with retries left (the machine records the Crashed state first) |
    pub fn after_run(ending: &Ending, retry: Retry, now: DateTime<Utc>) -> State {
        let failed_or_retry = |name: StateName, message: String| match retry {
            Retry::Remaining { delay, .. } => State::awaiting_retry(now, delay, message),
            Retry::Exhausted | Retry::OnSignal { .. } => {
                State::new(name, now).with_message(message)
            }
        };
        match ending {
            Ending::Output(v) => State::new(StateName::Completed, now).with_result(v.clone()),
            Ending::Signal(Signal::Success { output, message }) => {
                State::new(StateName::Completed, now)
                    .with_message(message.clone())
                    .with_result(output.clone())
            }
            Ending::Signal(Signal::Fail { message }) => {
                failed_or_retry(StateName::Failed, message.clone())
            }
            Ending::Signal(Signal::Retry { message, delay }) => {
                let asked = delay.map(|d| TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX));
                match retry {
                    Retry::Remaining {
                        delay: policy,
                        max_delay,
                    } => match asked {
                        Some(d) if d > max_delay => State::awaiting_retry(
                            now,
                            max_delay,
                            format!(
                                "{message} (the requested delay of {} is capped at {}, the \
                                 task's longest retry delay: max_retry_delay, or backoff.max)",
                                human(d),
                                human(max_delay)
                            ),
                        ),
                        Some(d) => State::awaiting_retry(now, d, message.clone()),
                        None => State::awaiting_retry(now, policy, message.clone()),
                    },
                    Retry::OnSignal { delay: policy } => {
                        State::awaiting_retry(now, asked.unwrap_or(policy), message.clone())
                    }
                    Retry::Exhausted => State::new(StateName::Failed, now)
                        .with_message(format!("RETRY requested but no retries remain: {message}")),
                }
            }
            Ending::Signal(Signal::Skip { message }) => {
                State::new(StateName::Skipped, now).with_message(message.clone())
            }
            Ending::Signal(Signal::Pause { message }) => {
                State::new(StateName::Paused, now).with_message(message.clone())
            }
            Ending::GuestFault { message } => failed_or_retry(StateName::Failed, message.clone()),
            Ending::LimitExceeded(l) => failed_or_retry(StateName::Failed, l.to_string()),
            Ending::TimedOut(t) => failed_or_retry(StateName::TimedOut, t.to_string()),
            Ending::Cancelled => State::new(StateName::Cancelled, now)
                .with_message("the task run was cancelled while running"),
            Ending::HostFault { message } => {
                State::new(StateName::Crashed, now).with_message(message.clone())
            }
            Ending::Lost { message } => match retry {
                Retry::Remaining { delay, .. } => {
                    State::awaiting_retry(now, delay, message.clone())
                }
                Retry::Exhausted | Retry::OnSignal { .. } => {
                    State::new(StateName::Crashed, now).with_message(message.clone())
                }
            },
        }
    }

    fn awaiting_retry(now: DateTime<Utc>, delay: TimeDelta, message: String) -> State {
        let mut s = State::new(StateName::AwaitingRetry, now).with_message(message);
        // A guest may ask for any delay; the retry time saturates instead of overflowing.
        s.scheduled_for = Some(
            now.checked_add_signed(delay)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        );
        s
    }
}

/// A delay as people write it (`1h`, `30s`, `1h 30m`).
fn human(d: TimeDelta) -> String {
    d.to_std().map_or_else(
        |_| d.to_string(),
        |d| humantime::format_duration(d).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::sandbox::{Limit, LimitExceeded, TimeLimit};

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp")
    }

    #[test]
    fn every_name_has_the_seed_type_and_terminal_flag() {
        use StateName::*;
        let expected = [
            (Scheduled, "SCHEDULED", false),
            (Late, "SCHEDULED", false),
            (AwaitingRetry, "SCHEDULED", false),
            (Pending, "PENDING", false),
            (Running, "RUNNING", false),
            (Retrying, "RUNNING", false),
            (Paused, "PAUSED", false),
            (Cancelling, "CANCELLING", false),
            (Cancelled, "CANCELLED", true),
            (Completed, "COMPLETED", true),
            (Cached, "COMPLETED", true),
            (Skipped, "COMPLETED", true),
            (Mapped, "COMPLETED", true),
            (Failed, "FAILED", true),
            (TriggerFailed, "FAILED", true),
            (TimedOut, "FAILED", true),
            (Crashed, "CRASHED", true),
        ];
        assert_eq!(expected.len(), StateName::ALL.len());
        for (name, ty, terminal) in expected {
            assert_eq!(name.state_type().as_str(), ty, "{name}");
            // Printed and serialized (`"type"` in JSON) alike.
            assert_eq!(name.state_type().to_string(), ty, "{name}");
            assert_eq!(
                serde_json::to_value(name.state_type()).ok(),
                Some(serde_json::json!(ty))
            );
            assert_eq!(name.state_type().is_terminal(), terminal, "{name}");
            assert_eq!(name.as_str().parse::<StateName>(), Ok(name));
        }
        assert!("Bogus".parse::<StateName>().is_err());
    }

    #[test]
    fn signals_map_to_states() {
        let retry = Retry::Remaining {
            delay: TimeDelta::seconds(10),
            max_delay: TimeDelta::hours(1),
        };
        let none = Retry::Exhausted;
        let sig = |s: Signal| Ending::Signal(s);
        let m = || "m".to_owned();
        let cases = [
            (
                Ending::Output(serde_json::json!(3).into()),
                none,
                StateName::Completed,
            ),
            (
                sig(Signal::Success {
                    output: serde_json::json!(1).into(),
                    message: m(),
                }),
                none,
                StateName::Completed,
            ),
            // FAIL retries while retries remain (Prefect 1's check_for_retry), and is final
            // without them.
            (
                sig(Signal::Fail { message: m() }),
                retry,
                StateName::AwaitingRetry,
            ),
            (sig(Signal::Fail { message: m() }), none, StateName::Failed),
            (
                sig(Signal::Fail { message: m() }),
                Retry::OnSignal {
                    delay: TimeDelta::zero(),
                },
                StateName::Failed,
            ),
            (
                sig(Signal::Retry {
                    message: m(),
                    delay: None,
                }),
                retry,
                StateName::AwaitingRetry,
            ),
            (
                sig(Signal::Retry {
                    message: m(),
                    delay: None,
                }),
                none,
                StateName::Failed,
            ),
            (
                sig(Signal::Retry {
                    message: m(),
                    delay: None,
                }),
                Retry::OnSignal {
                    delay: TimeDelta::zero(),
                },
                StateName::AwaitingRetry,
            ),
            (
                Ending::TimedOut(TimeLimit::Fuel(5)),
                Retry::OnSignal {
                    delay: TimeDelta::zero(),
                },
                StateName::TimedOut,
            ),
            (
                sig(Signal::Skip { message: m() }),
                retry,
                StateName::Skipped,
            ),
            (
                sig(Signal::Pause { message: m() }),
                retry,
                StateName::Paused,
            ),
            (Ending::GuestFault { message: m() }, none, StateName::Failed),
            (
                Ending::GuestFault { message: m() },
                retry,
                StateName::AwaitingRetry,
            ),
            (
                Ending::TimedOut(TimeLimit::Fuel(5)),
                none,
                StateName::TimedOut,
            ),
            (
                Ending::LimitExceeded(LimitExceeded {
                    limit: Limit::Memory,
                    max: 1,
                    requested: None,
                }),
                none,
                StateName::Failed,
            ),
            (Ending::Cancelled, retry, StateName::Cancelled),
            (
                Ending::HostFault { message: m() },
                retry,
                StateName::Crashed,
            ),
        ];
        for (ending, retry, name) in cases {
            assert_eq!(
                State::after_run(&ending, retry, now()).name,
                name,
                "{ending:?}"
            );
        }
    }

    #[test]
    fn retry_delay_prefers_the_signal_then_the_policy() {
        let ten_seconds = Retry::Remaining {
            delay: TimeDelta::seconds(10),
            max_delay: TimeDelta::hours(1),
        };
        let ending = Ending::Signal(Signal::Retry {
            message: "later".into(),
            delay: Some(Duration::from_secs(3)),
        });
        let s = State::after_run(&ending, ten_seconds, now());
        assert_eq!(s.scheduled_for, Some(now() + TimeDelta::seconds(3)));
        let ending = Ending::Signal(Signal::Retry {
            message: "later".into(),
            delay: None,
        });
        let s = State::after_run(&ending, ten_seconds, now());
        assert_eq!(s.scheduled_for, Some(now() + TimeDelta::seconds(10)));
        assert_eq!(s.message.as_deref(), Some("later"));
    }

    #[test]
    fn a_signal_delay_is_capped_at_max_delay() {
        let policy = Retry::Remaining {
            delay: TimeDelta::seconds(10),
            max_delay: TimeDelta::minutes(5),
        };
        let retry = |d: Duration| {
            let ending = Ending::Signal(Signal::Retry {
                message: "later".into(),
                delay: Some(d),
            });
            State::after_run(&ending, policy, now())
        };
        // At the cap: taken as asked, the message untouched.
        let s = retry(Duration::from_secs(300));
        assert_eq!(s.scheduled_for, Some(now() + TimeDelta::minutes(5)));
        assert_eq!(s.message.as_deref(), Some("later"));
        // Over it (by a millisecond, or by centuries): cut to the cap, and the message says so.
        for d in [
            Duration::from_millis(300_001),
            Duration::from_millis(u64::MAX),
        ] {
            let s = retry(d);
            assert_eq!(s.name, StateName::AwaitingRetry);
            assert_eq!(s.scheduled_for, Some(now() + TimeDelta::minutes(5)));
            let m = s.message.expect("message");
            assert!(
                m.starts_with("later (the requested delay of ")
                    && m.ends_with(
                        "is capped at 5m, the task's longest retry delay: max_retry_delay, or \
                         backoff.max)"
                    ),
                "{m}"
            );
        }
    }

    /// A lost attempt (its worker gone) is retried while retries remain, and Crashed after;
    /// a host fault is Crashed at once.
    #[test]
    fn a_lost_attempt_is_retried_then_crashed() {
        let lost = Ending::Lost {
            message: "worker gone".into(),
        };
        let retry = Retry::Remaining {
            delay: TimeDelta::seconds(3),
            max_delay: TimeDelta::minutes(1),
        };
        let s = State::after_run(&lost, retry, now());
        assert_eq!(s.name, StateName::AwaitingRetry);
        assert_eq!(s.scheduled_for, Some(now() + TimeDelta::seconds(3)));
        let s = State::after_run(&lost, Retry::Exhausted, now());
        assert_eq!(
            (s.name, s.message.as_deref()),
            (StateName::Crashed, Some("worker gone"))
        );
        let fault = Ending::HostFault {
            message: "host".into(),
        };
        assert_eq!(
            State::after_run(&fault, retry, now()).name,
            StateName::Crashed
        );
    }

    #[test]
    fn limit_messages_name_the_limit_and_value() {
        let ending = Ending::LimitExceeded(LimitExceeded {
            limit: Limit::Memory,
            max: 1024,
            requested: Some(2048),
        });
        let s = State::after_run(&ending, Retry::Exhausted, now());
        assert_eq!(
            s.message.as_deref(),
            Some("memory limit of 1024 bytes exceeded (asked for 2048 bytes)")
        );
        let s = State::after_run(
            &Ending::TimedOut(TimeLimit::Fuel(7)),
            Retry::Exhausted,
            now(),
        );
        assert_eq!(s.message.as_deref(), Some("fuel budget of 7 exhausted"));
    }
}
