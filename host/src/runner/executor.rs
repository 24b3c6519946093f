//! Executors run task runs: the driver hands each attempt the flow state machine decides on to an
//! [`Executor`] as a [`Job`], and the executor answers once per job with a [`Finished`]. The
//! in-process executor ([`LocalExecutor`]) runs jobs on this process's sandbox; a shared fair
//! queue and remote workers implement the same interface.

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;

use crate::json::Json;
use futures_util::FutureExt;
use tokio::sync::mpsc;

use super::machine::Unit;
use crate::context::TaskContext;
use crate::ids::FlowRunId;
use crate::sandbox::{
    CancelToken, Ending, RunBudget, RunGrants, RunOutcome, Sandbox, TaskComponent,
};

/// One attempt of one task run, with everything needed to run it.
#[derive(Debug)]
pub struct Job {
    /// The flow run.
    pub run: FlowRunId,
    /// Which unit of the flow run it is.
    pub unit: Unit,
    /// The task's component.
    pub component: TaskComponent,
    /// Its input.
    pub input: Json,
    /// What the task run sees of its context.
    pub ctx: TaskContext,
    /// Its limits.
    pub budget: RunBudget,
    /// What it may reach besides its input.
    pub grants: Arc<RunGrants>,
    /// Stops it when the flow run is cancelled.
    pub cancel: CancelToken,
    /// The executor's slot it was granted ([`Executor::acquire`]), for an executor that queues.
    pub slot: Option<Slot>,
    /// Only workers carrying every one of these may run it (an executor of workers routes by
    /// them; others ignore them).
    pub tags: Vec<String>,
}

/// One of an executor's slots, granted to a unit by [`Executor::acquire`] and handed back with
/// its job ([`Job::slot`]); dropping it gives it back to the executor. Opaque to the runner.
pub struct Slot(pub Box<dyn std::any::Any + Send>);

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Slot")
    }
}

/// A slot for a unit ([`Executor::acquire`]).
#[derive(Debug)]
pub struct Grant {
    /// The unit.
    pub unit: Unit,
    /// Its slot.
    pub slot: Slot,
}

/// A job's result.
#[derive(Debug)]
pub struct Finished {
    /// The unit.
    pub unit: Unit,
    /// How the attempt ended.
    pub outcome: RunOutcome,
}

/// A code flow's body, running: how it ended, once it has.
pub type BodyRun = Pin<Box<dyn Future<Output = RunOutcome> + Send>>;

/// Runs jobs.
pub trait Executor: Send + Sync {
    /// Run `job` and send its result to `done`, exactly once, whatever happens to the job (a run
    /// the executor loses is a host fault, never silence).
    fn submit(&self, job: Job, done: mpsc::UnboundedSender<Finished>);

    /// Whether attempts wait for one of this executor's slots before they start: an executor
    /// that queues them (a server's fair queue) says so, and a task run then stays Pending
    /// while it waits and becomes Running when it is given a slot, not when it joins the queue.
    fn queues(&self) -> bool {
        false
    }

    /// Ask for a slot for `unit` of flow run `run`: when one is free, send it to `granted`;
    /// the attempt's job then brings it back ([`Job::slot`]). A request of a cancelled flow run
    /// (`cancel`) may be dropped unanswered. Only called when [`Executor::queues`].
    fn acquire(
        &self,
        run: FlowRunId,
        unit: Unit,
        cancel: CancelToken,
        granted: mpsc::UnboundedSender<Grant>,
    ) {
        let _ = (run, cancel);
        let _ = granted.send(Grant {
            unit,
            slot: Slot(Box::new(())),
        });
    }

    /// Run `body`, the body of code flow run `run`. By default it runs where the returned
    /// future is polled (the driver's own task, so its calls and their answers never cross
    /// threads); an executor that shares the cores between tenants runs it with its guests,
    /// paced and accounted as they are. It needs no slot: it mostly waits for its task runs.
    fn body(&self, run: FlowRunId, body: BodyRun) -> BodyRun {
        let _ = run;
        body
    }
}

/// Runs jobs on this process's sandbox, each on its own tokio task.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    sandbox: Sandbox,
}

impl LocalExecutor {
    /// An executor using `sandbox`.
    pub fn new(sandbox: Sandbox) -> Self {
        Self { sandbox }
    }
}

impl LocalExecutor {
    /// Run `job` on the caller's task: for an attempt nothing else runs beside (a step of a
    /// chain), this saves the hand-off to another task and the wake-up back, most of a
    /// dependent step's latency on a multi-threaded runtime. A panic in the run is a host
    /// fault, as on a task of its own.
    pub fn run_here(&self, job: Job) -> impl Future<Output = Finished> + Send + 'static {
        let sandbox = self.sandbox.clone();
        let unit = job.unit;
        let run = AssertUnwindSafe(async move {
            let Job {
                component,
                input,
                ctx,
                budget,
                grants,
                cancel,
                ..
            } = job;
            sandbox
                .run_granted(&component, &input, &ctx, &budget, &grants, Some(&cancel))
                .await
        });
        async move {
            let outcome = run
                .catch_unwind()
                .await
                .unwrap_or_else(|_| host_fault("the task run failed in the host: it panicked"));
            Finished { unit, outcome }
        }
    }
}

impl Executor for LocalExecutor {
    fn submit(&self, job: Job, done: mpsc::UnboundedSender<Finished>) {
        let mut reply = Reply {
            done: Some(done),
            unit: job.unit,
        };
        let run = self.run_here(job);
        tokio::spawn(async move {
            let finished = run.await;
            reply.send(finished.outcome);
        });
    }
}

fn host_fault(message: &str) -> RunOutcome {
    RunOutcome {
        ending: Ending::HostFault {
            message: message.into(),
        },
        logs: Vec::new(),
        logs_dropped_bytes: 0,
        usage: Default::default(),
    }
}

/// Answers a job once: with its outcome, or (dropped unanswered: the task panicked or was
/// dropped) with a host fault.
struct Reply {
    done: Option<mpsc::UnboundedSender<Finished>>,
    unit: Unit,
}

impl Reply {
    fn send(&mut self, outcome: RunOutcome) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Finished {
                unit: self.unit,
                outcome,
            });
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.send(host_fault(
            "the task run failed in the host: it ended without a result",
        ));
    }
}
