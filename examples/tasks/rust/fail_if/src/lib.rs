//! Raises FAIL when its input is true, else returns true (the seeds' Task A).

use sluice_guest::{Signal, export_task};

fn run(fail: bool) -> Result<bool, Signal> {
    if fail {
        return Err(Signal::fail("asked to fail"));
    }
    Ok(true)
}

export_task!(run);
