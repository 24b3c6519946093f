//! Returns its input unchanged: the very text it received (numbers exactly as written), not a
//! re-serialization of a parsed value.

use sluice_guest::serde_json::value::RawValue;
use sluice_guest::{Signal, export_task};

fn run(input: Box<RawValue>) -> Result<Box<RawValue>, Signal> {
    Ok(input)
}

export_task!(run);
