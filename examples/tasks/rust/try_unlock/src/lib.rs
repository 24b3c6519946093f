//! True when the context key `key` is `abc`, else FAIL (the seeds' try_unlock).

use sluice_guest::serde::de::IgnoredAny;
use sluice_guest::{Signal, context, export_task};

fn run(_: IgnoredAny) -> Result<bool, Signal> {
    match context::get("key").as_deref() {
        Some("abc") => Ok(true),
        _ => Err(Signal::fail(
            "the context key `key` does not unlock this task",
        )),
    }
}

export_task!(run);
