//! Returns its input unchanged.

use sluice_guest::serde_json::Value;
use sluice_guest::{Signal, export_task};

fn run(input: Value) -> Result<Value, Signal> {
    Ok(input)
}

export_task!(run);
