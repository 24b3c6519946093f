//! The records of a run as the engine keeps and returns them: `FlowRun`, `TaskRun` (one per task
//! and per mapped child), each state change as a `Transition`, and the live `FlowEvent`s. Plain
//! data: serialized into the store's run records, printed by the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cache::CacheInfo;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::sandbox::LogRecord;
use crate::state::{State, StateName};

/// One recorded state change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The state before (none for the first).
    pub from: Option<StateName>,
    /// The state after.
    pub to: StateName,
    /// When.
    #[serde(serialize_with = "crate::timestamp::serialize")]
    pub time: DateTime<Utc>,
    /// The new state's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The record of one task run (or one child of a mapped task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRun {
    /// The task's name.
    pub name: String,
    /// This run's id.
    pub id: TaskRunId,
    /// For a child of a mapped task, its index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_index: Option<u32>,
    /// The current state.
    pub state: State,
    /// How many times the task's component ran.
    pub attempts: u32,
    /// Every transition, in order.
    pub history: Vec<Transition>,
    /// The output, while something may still need it (consumed outputs are released).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Json>,
    /// Whether the output was dropped after every consumer received it.
    #[serde(default)]
    pub output_released: bool,
    /// The resolved input, kept until the task completes (input caching): a retry, a resume or
    /// a paused task runs with it instead of recomputing upstream tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input: Option<Json>,
    /// Time spent running, over all attempts.
    pub run_time: Duration,
    /// Fuel consumed, over all attempts.
    pub fuel_consumed: u64,
    /// The most linear memory any one attempt held at once, in bytes.
    #[serde(default)]
    pub memory_peak_bytes: u64,
    /// Logs of every attempt, and of the state handlers, in order, when the run has no store
    /// (within the flow's `max_log_bytes`). A run with a store hands its logs to the store as
    /// they come and keeps none here: read them with `Store::logs` (paged) or
    /// `Store::log_tails`; a run loaded from a store has none here either.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRecord>,
    /// Whether the output cache was used, and why (tasks with `cache_for`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheInfo>,
    /// The child runs of a mapped task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<TaskRun>,
}

impl TaskRun {
    /// A task run that has not started: Pending at `now`, with that one transition.
    pub fn new(name: &str, map_index: Option<u32>, now: DateTime<Utc>) -> Self {
        let state = State::new(StateName::Pending, now);
        Self {
            name: name.to_owned(),
            id: TaskRunId::new(),
            map_index,
            history: vec![Transition {
                from: None,
                to: state.name,
                time: now,
                message: None,
            }],
            state,
            attempts: 0,
            output: None,
            output_released: false,
            cached_input: None,
            run_time: Duration::ZERO,
            fuel_consumed: 0,
            memory_peak_bytes: 0,
            logs: Vec::new(),
            cache: None,
            children: Vec::new(),
        }
    }
}

/// The record of a flow run: everything needed to show it, and to resume it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRun {
    /// This run's id.
    pub id: FlowRunId,
    /// The flow's name.
    pub flow: String,
    /// The flow run's state.
    pub state: State,
    /// Every transition of the flow run.
    pub history: Vec<Transition>,
    /// The parameters in effect.
    pub parameters: BTreeMap<String, Value>,
    /// The context in effect.
    pub context: BTreeMap<String, String>,
    /// The task runs, in definition order (a code flow's: in the order its body submitted
    /// them).
    pub tasks: Vec<TaskRun>,
    /// A code flow's body's logs, when the run has no store (see [`TaskRun::logs`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogRecord>,
    /// A code flow's journal: each call of its body that submitted task runs or observed
    /// something, in order (a resumed run replays it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub journal: Vec<JournalEntry>,
}

/// One entry of a code flow's journal: a call of its body, and what it was answered. A
/// resumed run runs its body again from the start; each call must match the next entry (else
/// the body is not deterministic, and the run fails naming the entry) and is answered from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum JournalEntry {
    /// Submitted `count` task runs of `task` (a map when `mapped`), the first with index
    /// `first`; `inputs` is the blake3 of their inputs.
    Submit {
        /// The declared task.
        task: String,
        /// How many task runs.
        count: usize,
        /// A map (each with its map index).
        mapped: bool,
        /// The blake3 (hex) of the inputs, in order.
        inputs: String,
        /// The task runs they wait for.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        wait_for: Vec<usize>,
        /// The trigger given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trigger: Option<String>,
        /// The index of the first task run made.
        first: usize,
        /// `task` is a subflow (its task run a child flow run).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        subflow: bool,
    },
    /// A submission of `task` refused, with why.
    Refused {
        /// The task named.
        task: String,
        /// Why.
        why: String,
    },
    /// `get-state` of a task run answered `state`.
    State {
        /// The task run.
        of: usize,
        /// The state's name.
        state: StateName,
    },
    /// `wait-any` answered `index`.
    WaitAny {
        /// The task runs.
        all: Vec<usize>,
        /// The answer: an index into `all`.
        index: usize,
    },
    /// `now` answered `at`.
    Now {
        /// The time.
        #[serde(serialize_with = "crate::timestamp::serialize")]
        at: DateTime<Utc>,
    },
    /// The run was resumed: the body's first `calls` calls were answered from the journal.
    Replayed {
        /// How many.
        calls: usize,
    },
}

impl FlowRun {
    /// A new run of `def`: Pending at `now`, every task run Pending (a code flow's body
    /// submits its task runs as it goes: none yet), with the parameters and context in effect.
    pub fn new(
        def: &crate::flow::FlowDef,
        parameters: BTreeMap<String, Value>,
        context: BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Self {
        Self {
            id: FlowRunId::new(),
            flow: def.name.clone(),
            state: State::new(StateName::Pending, now),
            history: vec![Transition {
                from: None,
                to: StateName::Pending,
                time: now,
                message: None,
            }],
            parameters,
            context,
            tasks: match def.body {
                Some(_) => Vec::new(),
                None => def
                    .tasks
                    .iter()
                    .map(|t| TaskRun::new(&t.name, None, now))
                    .collect(),
            },
            logs: Vec::new(),
            journal: Vec::new(),
        }
    }

    /// The task run named `name`.
    pub fn task(&self, name: &str) -> Option<&TaskRun> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

/// What happened, as it happens (for live views).
#[derive(Debug, Clone, PartialEq)]
pub enum FlowEvent {
    /// A task run (or mapped child) changed state.
    Task {
        /// The task.
        name: String,
        /// The child index, for mapped children.
        map_index: Option<u32>,
        /// The new state.
        state: StateName,
    },
    /// The flow run changed state.
    Flow(StateName),
}
