//! Doubles its input (an integer).

use sluice_guest::{Signal, export_task};

fn run(x: i64) -> Result<i64, Signal> {
    x.checked_mul(2)
        .ok_or_else(|| Signal::fail(format!("2 × {x} overflows a 64-bit integer")))
}

export_task!(run);
