//! Always raises PAUSE.

use sluice_guest::serde::de::IgnoredAny;
use sluice_guest::{Signal, export_task};

fn run(_: IgnoredAny) -> Result<(), Signal> {
    Err(Signal::pause("waiting for approval"))
}

export_task!(run);
