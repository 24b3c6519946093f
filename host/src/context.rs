//! The read-only context a task run sees (Prefect's context): who is running, which attempt, the
//! flow's parameters, and the user's keys. Cheap to clone: the shared parts are behind `Arc`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::ids::{FlowRunId, TaskRunId};

/// Read-only information for one task run.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The flow run this task run belongs to.
    pub flow_run_id: FlowRunId,
    /// This task run.
    pub task_run_id: TaskRunId,
    /// The task's name.
    pub task_name: Arc<str>,
    /// The attempt number, starting at 1.
    pub attempt: u32,
    /// The index of this child run within a mapped task.
    pub map_index: Option<u32>,
    /// The flow run's parameters, as a JSON object in text.
    pub parameters: Arc<str>,
    /// User keys (the flow's `[context]` table and `--context key=value`).
    pub values: Arc<BTreeMap<String, String>>,
}

impl TaskContext {
    /// The built-in keys, answered from the run itself; user keys cannot override them.
    pub const BUILT_IN_KEYS: &'static [&'static str] = &[
        "flow_run_id",
        "task_run_id",
        "task_name",
        "attempt",
        "map_index",
        "parameters",
    ];

    /// A context for a first attempt of `task_name` in a new flow run, with no parameters or
    /// user keys.
    pub fn new(task_name: &str) -> Self {
        Self {
            flow_run_id: FlowRunId::new(),
            task_run_id: TaskRunId::new(),
            task_name: task_name.into(),
            attempt: 1,
            map_index: None,
            parameters: "{}".into(),
            values: Arc::default(),
        }
    }

    /// The value of `key`: a built-in key, else a user key.
    pub fn get(&self, key: &str) -> Option<String> {
        match key {
            "flow_run_id" => Some(self.flow_run_id.to_string()),
            "task_run_id" => Some(self.task_run_id.to_string()),
            "task_name" => Some(self.task_name.to_string()),
            "attempt" => Some(self.attempt.to_string()),
            "map_index" => self.map_index.map(|i| i.to_string()),
            "parameters" => Some(self.parameters.to_string()),
            _ => self.values.get(key).cloned(),
        }
    }
}
