//! Sums a list of integers.

use sluice_guest::{Signal, export_task, info};

fn run(xs: Vec<i64>) -> Result<i64, Signal> {
    info!("summing {} numbers", xs.len());
    xs.iter()
        .try_fold(0i64, |acc, x| acc.checked_add(*x))
        .ok_or_else(|| Signal::fail("the sum overflows a 64-bit integer"))
}

export_task!(run);
