//! Always raises SKIP.

use sluice_guest::serde::de::IgnoredAny;
use sluice_guest::{Signal, export_task};

fn run(_: IgnoredAny) -> Result<(), Signal> {
    Err(Signal::skip("nothing to do"))
}

export_task!(run);
