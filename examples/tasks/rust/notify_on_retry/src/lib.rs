//! A state handler that records every Retrying transition (the seeds' notify_on_retry).

use sluice_guest::handler::State;
use sluice_guest::{export_handler, info};

fn handle(task: &str, old: &State, new: &State) -> Option<State> {
    if new.name == "Retrying" {
        info!(
            "notify: `{task}` is retrying ({}) after {}: {}",
            new.message.as_deref().unwrap_or(""),
            old.name,
            old.message.as_deref().unwrap_or("")
        );
    }
    None
}

export_handler!(handle);
