//! A code flow's body as the driver runs it: the [`Orchestrator`] its `orchestrate` calls reach
//! (each call a [`BodyCall`] message to the driver, answered on a oneshot channel, so the flow
//! state machine stays owned by the driver's task alone), and the calls waiting for task runs
//! to become final ([`Waiting`]), answered as the machine reports them settled.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use foldhash::HashMap;
use tokio::sync::{mpsc, oneshot};

use super::machine::{FlowMachine, Submission};
use crate::ids::TaskRunId;
use crate::json::Json;
use crate::sandbox::{Answer, Orchestrator, Submitted};
use crate::state::{State, StateName};

/// One `orchestrate` call of the body, for the driver.
pub(super) enum BodyCall {
    /// Submit task runs (one, or a map's).
    Submit {
        task: String,
        inputs: Vec<Json>,
        mapped: bool,
        wait_for: Vec<usize>,
        trigger: Option<String>,
        /// `task` is a subflow.
        subflow: bool,
        reply: oneshot::Sender<Result<Vec<(usize, TaskRunId)>, String>>,
    },
    /// A task run's state now.
    State(usize, oneshot::Sender<State>),
    /// A task run's final state, once it has one.
    Wait(usize, oneshot::Sender<State>),
    /// The index of the first final one of these, once one is.
    WaitAny(Vec<usize>, oneshot::Sender<usize>),
    /// The body dropped its handle.
    Release(usize),
    /// The time.
    Now(oneshot::Sender<DateTime<Utc>>),
}

/// The body's orchestrator: every call goes to the driver.
pub(super) struct DriverOrchestrator {
    calls: mpsc::UnboundedSender<BodyCall>,
    /// Each submitted task run's id, by its index (for the synchronous `id`).
    ids: Arc<Mutex<Vec<TaskRunId>>>,
}

impl DriverOrchestrator {
    pub(super) fn new(calls: mpsc::UnboundedSender<BodyCall>) -> Arc<Self> {
        Arc::new(Self {
            calls,
            ids: Arc::default(),
        })
    }

    fn ask<T: Send + 'static>(
        &self,
        call: impl FnOnce(oneshot::Sender<T>) -> BodyCall,
        gone: impl FnOnce() -> T + Send + 'static,
    ) -> Answer<T> {
        let (tx, rx) = oneshot::channel();
        let sent = self.calls.send(call(tx)).is_ok();
        Box::pin(async move {
            match sent {
                true => rx.await.unwrap_or_else(|_| gone()),
                false => gone(),
            }
        })
    }
}

/// The one task run a submission of one input made.
fn one(answer: Answer<Result<Vec<Submitted>, String>>) -> Answer<Result<Submitted, String>> {
    Box::pin(async move {
        let mut runs = answer.await?;
        runs.pop()
            .ok_or_else(|| "the submission made no task run".to_owned())
    })
}

/// What a body waiting on a run that is over sees.
fn over() -> State {
    State::new(StateName::Crashed, Utc::now()).with_message("the flow run is over")
}

fn index(of: Submitted) -> usize {
    usize::try_from(of.0).unwrap_or(usize::MAX)
}

impl Orchestrator for DriverOrchestrator {
    fn submit(
        &self,
        task: String,
        input: Json,
        wait_for: Vec<Submitted>,
        trigger: Option<String>,
    ) -> Answer<Result<Submitted, String>> {
        one(self.map_inner(task, vec![input], false, wait_for, trigger, false))
    }

    fn map(
        &self,
        task: String,
        inputs: Vec<Json>,
        wait_for: Vec<Submitted>,
    ) -> Answer<Result<Vec<Submitted>, String>> {
        self.map_inner(task, inputs, true, wait_for, None, false)
    }

    fn subflow(&self, flow: String, parameters: Json) -> Answer<Result<Submitted, String>> {
        one(self.map_inner(flow, vec![parameters], false, Vec::new(), None, true))
    }

    fn id(&self, of: Submitted) -> String {
        let ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ids.get(index(of))
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    fn state(&self, of: Submitted) -> Answer<State> {
        self.ask(|tx| BodyCall::State(index(of), tx), over)
    }

    fn wait(&self, of: Submitted) -> Answer<State> {
        self.ask(|tx| BodyCall::Wait(index(of), tx), over)
    }

    fn wait_any(&self, all: Vec<Submitted>) -> Answer<usize> {
        let all = all.into_iter().map(index).collect();
        self.ask(|tx| BodyCall::WaitAny(all, tx), || 0)
    }

    fn release(&self, of: Submitted) {
        let _ = self.calls.send(BodyCall::Release(index(of)));
    }

    fn now(&self) -> Answer<DateTime<Utc>> {
        self.ask(BodyCall::Now, Utc::now)
    }
}

impl DriverOrchestrator {
    fn map_inner(
        &self,
        task: String,
        inputs: Vec<Json>,
        mapped: bool,
        wait_for: Vec<Submitted>,
        trigger: Option<String>,
        subflow: bool,
    ) -> Answer<Result<Vec<Submitted>, String>> {
        let (tx, rx) = oneshot::channel();
        let call = BodyCall::Submit {
            task,
            inputs,
            mapped,
            wait_for: wait_for.into_iter().map(index).collect(),
            trigger,
            subflow,
            reply: tx,
        };
        let sent = self.calls.send(call).is_ok();
        let ids = self.ids.clone();
        Box::pin(async move {
            if !sent {
                return Err("the flow run is over".to_owned());
            }
            let runs = rx.await.map_err(|_| "the flow run is over".to_owned())??;
            let mut known = ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for &(i, id) in &runs {
                if known.len() <= i {
                    known.resize(i + 1, id);
                }
                known[i] = id;
            }
            Ok(runs.into_iter().map(|(i, _)| Submitted(i as u64)).collect())
        })
    }
}

/// The body's calls waiting for task runs to become final.
#[derive(Default)]
pub(super) struct Waiting {
    /// Per task run, the `wait`s for it.
    one: HashMap<usize, Vec<oneshot::Sender<State>>>,
    /// The `wait_any`s, each with its task runs.
    any: Vec<(Vec<usize>, oneshot::Sender<usize>)>,
}

impl Waiting {
    /// Carry out one call of the body on `machine` (at `now`).
    pub(super) fn call(&mut self, machine: &mut FlowMachine, call: BodyCall, now: DateTime<Utc>) {
        match call {
            BodyCall::Submit {
                task,
                inputs,
                mapped,
                wait_for,
                trigger,
                subflow,
                reply,
            } => {
                let answer = machine
                    .submit(Submission {
                        task: &task,
                        inputs,
                        mapped,
                        wait_for: &wait_for,
                        trigger: trigger.as_deref(),
                        subflow,
                    })
                    .map_err(|e| e.to_string());
                let _ = reply.send(answer);
            }
            BodyCall::State(i, reply) => {
                let _ = reply.send(machine.observe_state(i).unwrap_or_else(unknown));
            }
            BodyCall::Wait(i, reply) => match machine.is_final(i) {
                true => {
                    let _ = reply.send(machine.state_of(i).unwrap_or_else(unknown));
                }
                false => self.one.entry(i).or_default().push(reply),
            },
            BodyCall::WaitAny(all, reply) => {
                if let Some(k) = machine.replay_any(&all) {
                    let _ = reply.send(k);
                } else if let Some(k) = first_final(machine, &all) {
                    machine.answered_any(all, k);
                    let _ = reply.send(k);
                } else {
                    self.any.push((all, reply));
                }
            }
            BodyCall::Release(i) => machine.release(i),
            BodyCall::Now(reply) => {
                let _ = reply.send(machine.observe_now(now));
            }
        }
    }

    /// Task run `i` is final: answer whoever waits for it.
    pub(super) fn settled(&mut self, machine: &mut FlowMachine, i: usize) {
        if !machine.is_final(i) {
            // A handler moved it on again.
            return;
        }
        if let Some(waiters) = self.one.remove(&i) {
            let state = machine.state_of(i).unwrap_or_else(unknown);
            for w in waiters {
                let _ = w.send(state.clone());
            }
        }
        if self.any.is_empty() {
            return;
        }
        let mut k = 0;
        while k < self.any.len() {
            if self.any[k].0.contains(&i)
                && let Some(first) = first_final(machine, &self.any[k].0)
            {
                let (all, reply) = self.any.swap_remove(k);
                machine.answered_any(all, first);
                let _ = reply.send(first);
                continue;
            }
            k += 1;
        }
    }
}

/// The state of a task run this flow run does not have (a body can only hold handles the
/// orchestrator gave it, so this is never expected).
fn unknown() -> State {
    State::new(StateName::Crashed, Utc::now()).with_message("no such task run in this flow run")
}

fn first_final(machine: &FlowMachine, all: &[usize]) -> Option<usize> {
    all.iter().position(|&i| machine.is_final(i))
}
