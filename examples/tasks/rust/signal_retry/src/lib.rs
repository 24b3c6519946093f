//! Raises RETRY (after 50 ms) on attempts 1 and 2, then returns the attempt number.

use std::time::Duration;

use sluice_guest::serde::de::IgnoredAny;
use sluice_guest::{Signal, context, export_task};

fn run(_: IgnoredAny) -> Result<u32, Signal> {
    let attempt = context::attempt();
    if attempt < 3 {
        return Err(Signal::retry_after(
            format!("attempt {attempt} is too early"),
            Duration::from_millis(50),
        ));
    }
    Ok(attempt)
}

export_task!(run);
