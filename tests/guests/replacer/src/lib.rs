//! A state handler that replaces every Completed with the state named after `to_` in its task's
//! name (task `to_Running`: Running), to test what the engine accepts as a replacement; with a
//! name after `cached_to_`, only a cache hit's Cached state.

use sluice_guest::export_handler;
use sluice_guest::handler::State;

fn handle(task: &str, _old: &State, new: &State) -> Option<State> {
    if let Some(name) = task.strip_prefix("cached_to_") {
        return (new.name == "Cached").then(|| State::named(name, "replaced by the handler"));
    }
    let name = task.strip_prefix("to_")?;
    (new.state_type == "COMPLETED").then(|| State::named(name, "replaced by the handler"))
}

export_handler!(handle);
