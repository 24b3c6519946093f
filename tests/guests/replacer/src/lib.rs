//! A state handler that replaces states as its task's name says, to test what the engine
//! accepts as a replacement: task `to_Running` replaces every Completed-type state with
//! Running; task `Cached_to_Scheduled` (any `<From>_to_<To>`) replaces only the state named
//! `From` (here a cache hit's Cached) with `To`.

use sluice_guest::export_handler;
use sluice_guest::handler::State;

fn handle(task: &str, _old: &State, new: &State) -> Option<State> {
    let replace = |to: &str| State::named(to, "replaced by the handler");
    if let Some(to) = task.strip_prefix("to_") {
        return (new.state_type == "COMPLETED").then(|| replace(to));
    }
    let (from, to) = task.split_once("_to_")?;
    (new.name == from).then(|| replace(to))
}

export_handler!(handle);
