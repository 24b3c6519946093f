//! Adds one to its input (the seeds' add_one).

use sluice_guest::{Signal, export_task};

fn run(x: i64) -> Result<i64, Signal> {
    x.checked_add(1)
        .ok_or_else(|| Signal::fail(format!("{x} + 1 overflows a 64-bit integer")))
}

export_task!(run);
