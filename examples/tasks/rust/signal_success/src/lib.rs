//! Raises SUCCESS with the square of its input and a message.

use sluice_guest::{Signal, export_task, info};

fn run(x: i64) -> Result<i64, Signal> {
    info!("squaring {x}");
    Err(Signal::success(x.saturating_mul(x), "squared early"))
}

export_task!(run);
