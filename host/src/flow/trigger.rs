//! Triggers (Prefect 1): whether a task runs, given the states of its upstream tasks. A trigger
//! is evaluated only once every upstream task is in a finished (terminal) state.

use serde::{Deserialize, Serialize};

use crate::state::{StateName, StateType};

/// A task's trigger. The default is [`Trigger::AllSuccessful`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Run when every upstream task succeeded (Completed-type states: Completed, Cached,
    /// Skipped, Mapped).
    #[default]
    AllSuccessful,
    /// Run when every upstream task failed (Failed-type states, and Crashed).
    AllFailed,
    /// Run when at least one upstream task succeeded.
    AnySuccessful,
    /// Run when at least one upstream task failed.
    AnyFailed,
    /// Always run once the upstream tasks finished (Prefect's `always_run`).
    AllFinished,
    /// Never run automatically: the task pauses until it is resumed as a start task.
    ManualOnly,
}

/// What a trigger decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerDecision {
    /// The task runs.
    Run,
    /// The task does not run: TriggerFailed.
    Fail,
    /// The task pauses (manual_only).
    Pause,
}

impl Trigger {
    /// All triggers.
    pub const ALL: [Trigger; 6] = [
        Trigger::AllSuccessful,
        Trigger::AllFailed,
        Trigger::AnySuccessful,
        Trigger::AnyFailed,
        Trigger::AllFinished,
        Trigger::ManualOnly,
    ];

    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::AllSuccessful => "all_successful",
            Trigger::AllFailed => "all_failed",
            Trigger::AnySuccessful => "any_successful",
            Trigger::AnyFailed => "any_failed",
            Trigger::AllFinished => "all_finished",
            Trigger::ManualOnly => "manual_only",
        }
    }

    /// Decide, given the (finished) states of the upstream tasks. With no upstream tasks every
    /// trigger but `manual_only` runs.
    pub fn decide(self, upstream: &[StateName]) -> TriggerDecision {
        self.decide_expanded(!upstream.is_empty(), upstream)
    }

    /// Decide, given the states the upstream tasks expand to (Prefect 1): a mapped upstream
    /// task counts as its children's states, none for an empty map. `has_upstream` says whether
    /// the task has upstream tasks at all: `any_successful` and `any_failed` pass without any,
    /// but fail for upstream tasks that expand to no state (an empty map), while
    /// `all_successful` and `all_failed` pass on no states.
    pub fn decide_expanded(self, has_upstream: bool, upstream: &[StateName]) -> TriggerDecision {
        let ok = |pass: bool| {
            if pass {
                TriggerDecision::Run
            } else {
                TriggerDecision::Fail
            }
        };
        let mut states = upstream.iter().copied();
        match self {
            Trigger::AllSuccessful => ok(states.all(is_successful)),
            Trigger::AllFailed => ok(states.all(is_failed)),
            Trigger::AnySuccessful => ok(!has_upstream || states.any(is_successful)),
            Trigger::AnyFailed => ok(!has_upstream || states.any(is_failed)),
            Trigger::AllFinished => TriggerDecision::Run,
            Trigger::ManualOnly => TriggerDecision::Pause,
        }
    }
}

/// A successful state for triggers: any Completed-type state (Skipped counts as success).
pub fn is_successful(s: StateName) -> bool {
    s.state_type() == StateType::Completed
}

/// A failed state for triggers: any Failed-type state (TriggerFailed and TimedOut included) and
/// Crashed.
pub fn is_failed(s: StateName) -> bool {
    matches!(s.state_type(), StateType::Failed | StateType::Crashed)
}

#[cfg(test)]
mod tests {
    use super::TriggerDecision::{Fail, Pause, Run};
    use super::*;
    use crate::state::StateName::{Completed, Failed, Skipped, TriggerFailed};

    /// Prefect 1's results for every trigger against mixes of upstream states.
    #[test]
    fn trigger_conformance() {
        let cases: &[(&[StateName], [TriggerDecision; 6])] = &[
            // upstream states          all_succ all_fail any_succ any_fail all_fin manual
            (&[Completed], [Run, Fail, Run, Fail, Run, Pause]),
            (&[Failed], [Fail, Run, Fail, Run, Run, Pause]),
            (&[Skipped], [Run, Fail, Run, Fail, Run, Pause]),
            (&[TriggerFailed], [Fail, Run, Fail, Run, Run, Pause]),
            (&[Completed, Failed], [Fail, Fail, Run, Run, Run, Pause]),
            (&[Completed, Skipped], [Run, Fail, Run, Fail, Run, Pause]),
            // all_failed with one Skipped upstream → TriggerFailed
            (&[Failed, Skipped], [Fail, Fail, Run, Run, Run, Pause]),
            (&[Failed, TriggerFailed], [Fail, Run, Fail, Run, Run, Pause]),
            // any_successful with failures and one Skipped → runs
            (
                &[Failed, Failed, Skipped],
                [Fail, Fail, Run, Run, Run, Pause],
            ),
            (&[Skipped, Skipped], [Run, Fail, Run, Fail, Run, Pause]),
            (
                &[StateName::TimedOut, StateName::Crashed],
                [Fail, Run, Fail, Run, Run, Pause],
            ),
            (
                &[StateName::Cached, StateName::Mapped],
                [Run, Fail, Run, Fail, Run, Pause],
            ),
            (&[], [Run, Run, Run, Run, Run, Pause]),
        ];
        for (upstream, expected) in cases {
            for (trigger, want) in Trigger::ALL.iter().zip(expected) {
                assert_eq!(
                    trigger.decide(upstream),
                    *want,
                    "{} with upstream {upstream:?}",
                    trigger.as_str()
                );
            }
        }
    }

    /// Prefect 1's results when upstream tasks are mapped: each mapped upstream task counts as
    /// its children's states (`_get_all_states_as_set`), and the `any_*` triggers check for
    /// upstream edges before looking at the states.
    #[test]
    fn trigger_conformance_with_mapped_upstream_tasks() {
        let cases: &[(&[StateName], [TriggerDecision; 6])] = &[
            // the children of one mapped upstream task
            //                           all_succ all_fail any_succ any_fail all_fin manual
            // some children failed: the parent is Failed, the children are what counts
            (&[Completed, Failed], [Fail, Fail, Run, Run, Run, Pause]),
            (&[Failed, Failed], [Fail, Run, Fail, Run, Run, Pause]),
            (&[Completed, Completed], [Run, Fail, Run, Fail, Run, Pause]),
            // an empty map: no states at all
            (&[], [Run, Run, Fail, Fail, Run, Pause]),
            // a skipped child is a success for triggers
            (&[Skipped, Failed], [Fail, Fail, Run, Run, Run, Pause]),
        ];
        for (states, expected) in cases {
            for (trigger, want) in Trigger::ALL.iter().zip(expected) {
                assert_eq!(
                    trigger.decide_expanded(true, states),
                    *want,
                    "{} with a mapped upstream task whose children are {states:?}",
                    trigger.as_str()
                );
            }
        }
    }
}
