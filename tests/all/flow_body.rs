//! Flow bodies in the sandbox (world `flow`), against an orchestrator written here: every type
//! of submission of seed 004 reaches the orchestrator as it should and its answers reach the
//! body; the body is deterministic (clock, random numbers) and granted nothing; handles are
//! released when dropped; a body that never returns ends at its deadline; a task component
//! cannot orchestrate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use sluice::context::TaskContext;
use sluice::json::Json;
use sluice::sandbox::{
    Answer, Ending, FlowBody, FlowComponent, Orchestrator, RunBudget, Submitted, TimeLimit,
};
use sluice::state::{State, StateName};

use super::support::{guest, sandbox};

/// Task runs decided at once: `double` completes with twice its input, `fail` fails, `sleep`
/// never ends (waiting for it waits for ever); with
/// `wait_for`, the trigger decides (`all_finished` runs, the default `all_successful` needs
/// every upstream Completed). A task run's first `get_state` is Pending, as if it had not run
/// yet.
#[derive(Default)]
struct Script {
    runs: Mutex<Vec<Run>>,
    calls: Mutex<Vec<String>>,
    released: Mutex<Vec<u64>>,
}

struct Run {
    state: State,
    asked: bool,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0)
        .single()
        .expect("time")
}

impl Script {
    fn decide(
        &self,
        task: &str,
        input: &Json,
        upstream: &[Submitted],
        trigger: Option<&str>,
    ) -> Result<State, String> {
        let runs = self.runs.lock().expect("runs");
        let all_ok = upstream
            .iter()
            .all(|s| runs[s.0 as usize].state.name == StateName::Completed);
        if trigger != Some("all_finished") && !all_ok {
            return Ok(State::new(StateName::TriggerFailed, t0())
                .with_message("an upstream task run did not succeed"));
        }
        match task {
            "double" => {
                let x = input
                    .to_value()
                    .ok()
                    .and_then(|v| v.as_i64())
                    .ok_or("double takes an integer")?;
                Ok(State::new(StateName::Completed, t0()).with_result(json!(2 * x).into()))
            }
            "fail" => Ok(State::new(StateName::Failed, t0()).with_message("it always fails")),
            "sleep" => Ok(State::new(StateName::Running, t0())),
            other => Err(format!("the flow declares no task `{other}`")),
        }
    }

    fn add(&self, state: State) -> Submitted {
        let mut runs = self.runs.lock().expect("runs");
        runs.push(Run {
            state,
            asked: false,
        });
        Submitted(runs.len() as u64 - 1)
    }

    fn call(&self, c: String) {
        self.calls.lock().expect("calls").push(c);
    }
}

struct Scripted(Arc<Script>);

impl Orchestrator for Scripted {
    fn submit(
        &self,
        task: String,
        input: Json,
        wait_for: Vec<Submitted>,
        trigger: Option<String>,
    ) -> Answer<Result<Submitted, String>> {
        let s = self.0.clone();
        s.call(format!(
            "submit {task} {} {wait_for:?} {trigger:?}",
            input.as_string()
        ));
        let r = s
            .decide(&task, &input, &wait_for, trigger.as_deref())
            .map(|st| s.add(st));
        Box::pin(async move { r })
    }

    fn map(
        &self,
        task: String,
        inputs: Vec<Json>,
        wait_for: Vec<Submitted>,
    ) -> Answer<Result<Vec<Submitted>, String>> {
        let s = self.0.clone();
        s.call(format!("map {task} {}", inputs.len()));
        let r = inputs
            .iter()
            .map(|i| s.decide(&task, i, &wait_for, None).map(|st| s.add(st)))
            .collect();
        Box::pin(async move { r })
    }

    fn subflow(&self, flow: String, parameters: Json) -> Answer<Result<Submitted, String>> {
        self.0
            .call(format!("subflow {flow} {}", parameters.as_string()));
        Box::pin(async move { Err(format!("no subflow `{flow}` in this script")) })
    }

    fn id(&self, of: Submitted) -> String {
        format!("run-{}", of.0)
    }

    fn state(&self, of: Submitted) -> Answer<State> {
        let mut runs = self.0.runs.lock().expect("runs");
        let run = &mut runs[of.0 as usize];
        let state = match std::mem::replace(&mut run.asked, true) {
            false => State::new(StateName::Pending, t0()),
            true => run.state.clone(),
        };
        Box::pin(async move { state })
    }

    fn wait(&self, of: Submitted) -> Answer<State> {
        let state = self.0.runs.lock().expect("runs")[of.0 as usize]
            .state
            .clone();
        // Waiting takes a while, as a task run does; for one that never ends, for ever.
        Box::pin(async move {
            if !state.is_terminal() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            state
        })
    }

    fn wait_any(&self, all: Vec<Submitted>) -> Answer<usize> {
        self.0.call(format!("wait_any {all:?}"));
        let runs = self.0.runs.lock().expect("runs");
        let first = all
            .iter()
            .position(|s| runs[s.0 as usize].state.is_terminal());
        Box::pin(async move {
            match first {
                Some(i) => i,
                None => std::future::pending().await,
            }
        })
    }

    fn release(&self, of: Submitted) {
        self.0.released.lock().expect("released").push(of.0);
    }

    fn now(&self) -> Answer<DateTime<Utc>> {
        Box::pin(async move { t0() + chrono::TimeDelta::seconds(5) })
    }
}

async fn body() -> FlowComponent {
    sandbox()
        .load_flow_file(&guest("flow_body"))
        .await
        .expect("the flow body loads")
}

async fn run_body(
    params: Value,
    budget: &RunBudget,
    seed: u8,
) -> (sluice::sandbox::RunOutcome, Arc<Script>) {
    run_component(&body().await, sandbox(), params, budget, seed).await
}

async fn run_component(
    component: &FlowComponent,
    sandbox: &sluice::sandbox::Sandbox,
    params: Value,
    budget: &RunBudget,
    seed: u8,
) -> (sluice::sandbox::RunOutcome, Arc<Script>) {
    let script = Arc::new(Script::default());
    let flow = FlowBody {
        orchestrator: Arc::new(Scripted(script.clone())),
        seed: [seed; 32],
        started: t0(),
        max_handles: 1000,
    };
    let out = sandbox
        .run_flow(
            component,
            &params.into(),
            &TaskContext::new("flow"),
            budget,
            &flow,
            None,
        )
        .await;
    (out, script)
}

fn output(out: &sluice::sandbox::RunOutcome) -> Value {
    match &out.ending {
        Ending::Output(v) => v.to_value().expect("the output is JSON"),
        other => panic!("the body did not complete: {other:?}; logs {:?}", out.logs),
    }
}

#[tokio::test]
async fn a_flow_body_uses_every_type_of_submission() {
    let (out, script) = run_body(json!({"scenario": "types"}), &RunBudget::default(), 1).await;
    every_type_of_submission(&out, &script, true);
}

/// The same flow body in Python (`sluice.flow`): the same calls reach the orchestrator and the
/// same answers the body.
#[tokio::test]
async fn a_python_flow_body_uses_every_type_of_submission() {
    polyglot_body("python").await;
}

/// And in JavaScript (`sluice/flow`).
#[tokio::test]
async fn a_javascript_flow_body_uses_every_type_of_submission() {
    polyglot_body("js").await;
}

async fn polyglot_body(lang: &str) {
    let sandbox = super::polyglot::sandbox();
    let component = sandbox
        .load_flow_file(&super::polyglot::builds::polyglot_guest(lang, "flow"))
        .await
        .unwrap_or_else(|e| panic!("the {lang} flow body loads: {e}"));
    let (out, script) = run_component(
        &component,
        sandbox,
        json!({"scenario": "types"}),
        &RunBudget::default(),
        1,
    )
    .await;
    every_type_of_submission(&out, &script, false);
}

/// What the `types` scenario must have observed and done; `released`: and every handle was
/// released by the time the body returned (Rust drops them at the end of their scope; Python's
/// collector may keep them until the instance goes).
fn every_type_of_submission(out: &sluice::sandbox::RunOutcome, script: &Script, released: bool) {
    let v = output(out);
    assert_eq!(v["call"], 4, "r1 = t1(): the result");
    assert_eq!(
        v["get_state_before_wait"], "Pending",
        "get_state does not wait"
    );
    assert_eq!(
        v["wait"],
        json!({"name": "Completed", "result": "10"}),
        "wait: the final state and its result"
    );
    assert_eq!(v["result"], 10);
    assert_eq!(
        v["raised"],
        json!({"name": "Failed", "message": "it always fails"}),
        "result() raises the failed state"
    );
    assert_eq!(v["failed_state"], "Failed");
    assert_eq!(v["failed_is_failed"], true);
    assert_eq!(
        v["after_default"], "TriggerFailed",
        "wait_for feeds the default trigger"
    );
    assert_eq!(v["after_finished"], 14, "all_finished runs after a failure");
    assert_eq!(v["map"], json!([2, 4, 6]));
    assert_eq!(v["map_states"], json!(["Failed", "Failed"]));
    assert_eq!(v["wait_any"], 0);
    assert_eq!(v["refused"], "the flow declares no task `nope`");
    assert_eq!(v["id"], "run-1");
    assert_eq!(
        v["now"], "2026-12-01T12:00:05.000000Z",
        "now() comes from the orchestrator"
    );
    assert_eq!(
        v["clock"],
        t0().timestamp(),
        "the wall clock reads the run's start"
    );
    assert_eq!(v["map_len"], 4);
    let calls = script.calls.lock().expect("calls").clone();
    assert_eq!(
        calls,
        [
            "submit double 2 [] None",
            "submit double 5 [] None",
            "submit fail 1 [] None",
            "submit double 8 [Submitted(2)] None",
            "submit double 7 [Submitted(2)] Some(\"all_finished\")",
            "map double 3",
            "map fail 2",
            "wait_any [Submitted(2), Submitted(1)]",
            "submit nope 1 [] None",
        ],
        "the orchestrator saw each call, in order, with its handles"
    );
    if released {
        let mut released = script.released.lock().expect("released").clone();
        released.sort_unstable();
        assert_eq!(
            released,
            (0..10).collect::<Vec<u64>>(),
            "each of the 10 task runs released once"
        );
    }
}

/// `wait_any` answers the index of the first final one, skipping one that never ends.
#[tokio::test]
async fn wait_any_answers_the_first_final_one() {
    let (out, _) = run_body(json!({"scenario": "any"}), &RunBudget::default(), 1).await;
    assert_eq!(output(&out), json!(1));
}

/// A body blocked waiting for a task run that never ends is stopped at its deadline too.
#[tokio::test]
async fn a_flow_body_waiting_past_its_deadline_ends_timed_out() {
    let budget = RunBudget {
        timeout: Duration::from_millis(300),
        ..RunBudget::default()
    };
    let (out, script) = run_body(json!({"scenario": "stuck"}), &budget, 1).await;
    assert!(
        matches!(out.ending, Ending::TimedOut(TimeLimit::Deadline(_))),
        "{:?}",
        out.ending
    );
    assert_eq!(
        script.calls.lock().expect("calls").len(),
        1,
        "it submitted, then waited"
    );
}

#[tokio::test]
async fn a_flow_body_is_deterministic_by_its_seed() {
    let hashed = |v: &Value| v["hashed"].clone();
    let (a, _) = run_body(json!({"scenario": "types"}), &RunBudget::default(), 7).await;
    let (b, _) = run_body(json!({"scenario": "types"}), &RunBudget::default(), 7).await;
    let (c, _) = run_body(json!({"scenario": "types"}), &RunBudget::default(), 8).await;
    assert_eq!(
        hashed(&output(&a)),
        hashed(&output(&b)),
        "the same seed, the same random numbers"
    );
    assert_ne!(
        hashed(&output(&a)),
        hashed(&output(&c)),
        "another seed, other random numbers"
    );
}

#[tokio::test]
async fn a_flow_body_that_never_returns_ends_at_its_deadline() {
    let budget = RunBudget {
        timeout: Duration::from_millis(300),
        ..RunBudget::default()
    };
    let (out, _) = run_body(json!({"scenario": "loop"}), &budget, 1).await;
    assert!(
        matches!(out.ending, Ending::TimedOut(TimeLimit::Deadline(_))),
        "{:?}",
        out.ending
    );
}

/// Only a flow body orchestrates: the same component run as a task has no orchestrator, and
/// its first submission traps with that said.
#[tokio::test]
async fn a_component_run_as_a_task_cannot_submit() {
    let task = sandbox()
        .load_file(&guest("flow_body"))
        .await
        .expect("it loads as a task: its `run` has the same signature");
    let out = sandbox()
        .run(
            &task,
            &json!({"scenario": "types"}).into(),
            &TaskContext::new("t"),
            &RunBudget::default(),
            None,
        )
        .await;
    let text = format!("{:?}", out.ending);
    assert!(
        text.contains("only a flow body may submit task runs"),
        "{text}"
    );
}
