//! A flow body that uses every type of submission of seed 004 and returns what it observed, for
//! the tests to compare with what they scheduled. Parameter `scenario`:
//! - `types`: each construct once (see `types`);
//! - `loop`: never returns (its deadline ends it);
//! - `hold`: submits `n` task runs of `double` and keeps every handle until the end;
//! - `stuck`: waits for a task run of `sleep` (which never ends);
//! - `any`: `wait_any` of a `sleep` task run and a `double` one: returns the index;
//! - `state`: `get_state` of a task run of `slow` (the hostile guest, sleeping `ms`) right
//!   after submitting it, then its state once waited for;
//! - `durable`: `n` steps, each a `slow` task run (its state observed at once), then `double`
//!   of the last result waiting for it, `wait_any` of the two, and the result; returns the
//!   last result, the states seen and `now()` (for a run killed and resumed: each observation
//!   replayed from the journal);
//! - `chain`: `n` calls of `add_one`, each on the last result (the benchmark's steps);
//! - `map`: `add_one` mapped over 0..n, each result read and its handle dropped at once;
//!   returns their sum.
//! - `now`: `n` calls of `now()` (the benchmark's round trip to the driver), returning how
//!   many answered a time;
//! - `subflow`: runs subflow `child` (`n` passed on) and `dag` (which fails), and tries an
//!   undeclared subflow, parameters that are not an object, a task as a subflow and a subflow
//!   as a task;
//! - `subflow_long`: waits for subflow `long`;
//! - `flood`: submits ten million task runs of `double`, dropping each handle;
//! - `flood_map`: maps `double` over 0..n, returning how many it submitted;
//! - `dropped`, `forged`: wait on a raw handle after its submission was dropped, and on one
//!   never given to the body (the host must trap the body, naming the handle).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_guest::flow::{self, Error};
use sluice_guest::flow_bindings::sluice::task::orchestrate as o;
use sluice_guest::serde_json::{Value, json};
use sluice_guest::{Signal, export_flow};

fn body(p: Value) -> Result<Value, Signal> {
    match p["scenario"].as_str() {
        Some("types") => types(),
        Some("loop") => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        Some("stuck") => Ok(json!(flow::submit("sleep", 0)?.wait().name)),
        Some("any") => {
            let sleeping = flow::submit("sleep", 0)?;
            let doubled = flow::submit("double", 1)?;
            Ok(json!(flow::wait_any(&[&sleeping, &doubled])))
        }
        Some("hold") => {
            let n = p["n"].as_u64().unwrap_or(0);
            let held: Vec<flow::Future> = (0..n)
                .map(|i| flow::submit("double", i))
                .collect::<Result<_, _>>()?;
            let sum: i64 = held
                .iter()
                .map(|f| f.result::<i64>())
                .sum::<Result<_, Error>>()?;
            Ok(json!(sum))
        }
        Some("state") => {
            let slow = flow::submit("slow", json!({"do": "sleep", "ms": p["ms"]}))?;
            let before = slow.get_state().name;
            let after = slow.wait().name;
            Ok(json!({"before": before, "after": after}))
        }
        Some("durable") => {
            let mut x: i64 = 1;
            let mut seen = Vec::new();
            for _ in 0..p["n"].as_u64().unwrap_or(0) {
                let slow = flow::submit("slow", json!({"do": "sleep", "ms": p["ms"]}))?;
                seen.push(slow.get_state().name);
                let doubled = flow::submit_with("double", x, &[&slow], None)?;
                seen.push(format!("any {}", flow::wait_any(&[&slow, &doubled])));
                x = doubled.result()?;
            }
            Ok(json!({"x": x, "seen": seen, "now": flow::now()}))
        }
        Some("chain") => {
            let mut x: i64 = 0;
            for _ in 0..p["n"].as_u64().unwrap_or(0) {
                x = flow::call("add_one", x)?;
            }
            Ok(json!(x))
        }
        Some("now") => {
            let mut calls: u64 = 0;
            for _ in 0..p["n"].as_u64().unwrap_or(0) {
                calls += u64::from(!flow::now().is_empty());
            }
            Ok(json!(calls))
        }
        Some("map") => {
            let n = p["n"].as_i64().unwrap_or(0);
            let mut sum: i64 = 0;
            for f in flow::map("add_one", 0..n)? {
                sum += f.result::<i64>()?;
            }
            Ok(json!(sum))
        }
        Some("subflow") => {
            // A code flow as a child (its result), a DAG child that fails, and refusals.
            let child = flow::subflow("child", json!({"n": p["n"]}))?;
            let state = child.wait();
            let result: Value = child.result()?;
            let failed = match flow::subflow("dag", json!({}))?.result::<Value>() {
                Err(Error::Failed(s)) => json!({"name": s.name, "message": s.message}),
                other => json!(format!("unexpected: {other:?}")),
            };
            let refused: Vec<String> = [
                flow::subflow("nope", json!({})),
                flow::subflow("child", 5),
                flow::subflow("double", json!({})),
            ]
            .into_iter()
            .map(|r| match r {
                Err(Error::Refused(why)) => why,
                other => format!("unexpected: {other:?}"),
            })
            .collect();
            let as_task = match flow::submit("child", 1) {
                Err(Error::Refused(why)) => why,
                other => format!("unexpected: {other:?}"),
            };
            Ok(json!({
                "state": state.name,
                "result": result,
                "failed": failed,
                "refused": refused,
                "as_task": as_task,
            }))
        }
        Some("subflow_long") => Ok(json!(flow::subflow("long", json!({}))?.wait().name)),
        Some("flood") => {
            // Ten million submissions, each handle dropped at once: the run's task limit stops
            // it (the refusal, raised with `?`, fails the flow run).
            for i in 0..10_000_000_u64 {
                flow::submit("double", i)?;
            }
            Ok(json!("every submission was accepted"))
        }
        Some("flood_map") => {
            let n = p["n"].as_u64().unwrap_or(0);
            Ok(json!(flow::map("double", 0..n)?.len()))
        }
        Some("dropped") => {
            // The raw handle of a submission, used after the submission was dropped.
            let f = o::submit("double", "1", &[], None).map_err(Signal::fail)?;
            let handle = f.handle();
            drop(f);
            // SAFETY: deliberately not: the handle was dropped; the host must refuse it.
            #[allow(unsafe_code)]
            let stale = unsafe { o::Submission::from_handle(handle) };
            Ok(json!(stale.wait().name))
        }
        Some("forged") => {
            // A handle this body was never given (as another flow run's would be).
            // SAFETY: deliberately not: the host must refuse it.
            #[allow(unsafe_code)]
            let forged = unsafe { o::Submission::from_handle(0x00AB_CDEF) };
            Ok(json!(forged.wait().name))
        }
        other => Err(Signal::fail(format!("unknown scenario {other:?}"))),
    }
}

fn types() -> Result<Value, Signal> {
    // r1 = t1(): call and get the result.
    let called: i64 = flow::call("double", 2)?;
    // f1 = t1.submit(); its state without waiting, then waited for, then its result.
    let f = flow::submit("double", 5)?;
    let before = f.get_state();
    let waited = f.wait();
    let result: i64 = f.result()?;
    // A failing task: result() raises (Err), unless matched as a value.
    let failing = flow::submit("fail", 1)?;
    let raised = match failing.result::<i64>() {
        Err(Error::Failed(s)) => json!({"name": s.name, "message": s.message}),
        other => json!(format!("unexpected: {other:?}")),
    };
    let failed_state = failing.wait();
    // wait_for with the default trigger (all_successful) and with all_finished.
    let after_default = flow::submit_with("double", 8, &[&failing], None)?.wait();
    let after_finished: i64 =
        flow::submit_with("double", 7, &[&failing], Some("all_finished"))?.result()?;
    // map: futures, and states.
    let mapped = flow::map("double", [1, 2, 3])?;
    let mapped_results: Vec<i64> = mapped
        .iter()
        .map(|f| f.result::<i64>())
        .collect::<Result<_, _>>()?;
    let mapped_states: Vec<String> = flow::map_states("fail", [1, 2])?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let any = flow::wait_any(&[&failing, &f]);
    flow::wait_all(&[&f, &failing]);
    // Refused: an undeclared task.
    let refused = match flow::submit("nope", 1) {
        Err(Error::Refused(why)) => why,
        other => format!("unexpected: {other:?}"),
    };
    // Determinism: the clock, random numbers.
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let hashed = RandomState::new().hash_one(42_u64);
    let map: HashMap<u32, u32> = (0..4).map(|i| (i, i)).collect();
    Ok(json!({
        "call": called,
        "get_state_before_wait": before.name,
        "wait": {"name": waited.name, "result": waited.result},
        "result": result,
        "raised": raised,
        "failed_state": failed_state.name,
        "failed_is_failed": failed_state.is_failed(),
        "after_default": after_default.name,
        "after_finished": after_finished,
        "map": mapped_results,
        "map_states": mapped_states,
        "wait_any": any,
        "refused": refused,
        "id": f.id(),
        "now": flow::now(),
        "clock": clock,
        "hashed": hashed.to_string(),
        "map_len": map.len(),
    }))
}

export_flow!(body);
