//! Raises RETRY when its input is negative, else returns it (the seeds' retry_if_negative).

use sluice_guest::{Signal, export_task};

fn run(x: i64) -> Result<i64, Signal> {
    if x < 0 {
        return Err(Signal::retry(format!("{x} is negative")));
    }
    Ok(x)
}

export_task!(run);
