//! The flow body of examples/dynamic-flow/flow-rust.toml, as examples/dynamic-flow/flow.py is in
//! Python: it doubles `start` until it reaches `target`, maps `add_one` over the values it
//! collected, sums them, and branches on whether the budget check failed (a failed task run's
//! `result` is an `Err` to match on, Prefect's `result(raise_on_failure=False)`).

use serde::{Deserialize, Serialize};
use sluice_guest::flow::{self, Error};
use sluice_guest::{Signal, export_flow, warn};

#[derive(Deserialize)]
struct Parameters {
    start: i64,
    target: i64,
    budget: i64,
}

#[derive(Serialize)]
struct Outcome {
    grown: Vec<i64>,
    kept: Vec<i64>,
    total: i64,
    branch: &'static str,
}

fn body(p: Parameters) -> Result<Outcome, Signal> {
    // Loop until a condition: each call's output decides whether there is another.
    let mut x = p.start;
    let mut grown = Vec::new();
    while x < p.target {
        x = flow::call("double", x)?;
        grown.push(x);
    }
    // Map over what the loop collected: one mapped task run, a future per element.
    let bumped = flow::map("add_one", &grown)?
        .iter()
        .map(flow::Future::result)
        .collect::<Result<Vec<i64>, _>>()?;
    let total: i64 = flow::call("sum", &bumped)?;
    // Branch on a failed task: `over_budget` fails when the total is over the budget.
    let check = flow::submit("over_budget", total > p.budget)?;
    match check.result::<bool>() {
        Err(Error::Failed(state)) if state.is_failed() => {
            warn!(
                "{total} is over the budget of {} ({}): keeping the smaller half",
                p.budget,
                state.message.as_deref().unwrap_or("")
            );
            let mut kept = bumped;
            kept.sort_unstable();
            kept.truncate(kept.len() / 2);
            let total = flow::call("sum", &kept)?;
            Ok(Outcome {
                grown,
                kept,
                total,
                branch: "over budget",
            })
        }
        other => {
            other?;
            Ok(Outcome {
                grown,
                kept: bumped,
                total,
                branch: "within budget",
            })
        }
    }
}

export_flow!(body);
