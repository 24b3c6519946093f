//! Always raises FAIL.

use sluice_guest::serde::de::IgnoredAny;
use sluice_guest::{Signal, export_task};

fn run(_: IgnoredAny) -> Result<(), Signal> {
    Err(Signal::fail("failing on purpose"))
}

export_task!(run);
