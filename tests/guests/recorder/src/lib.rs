//! A state handler that logs `OLD -> NEW` for every transition it is called on, unfiltered, and
//! keeps the new state: attached to one hook, its log is exactly what that hook saw.

use sluice_guest::handler::State;
use sluice_guest::{export_handler, info};

fn handle(_task: &str, old: &State, new: &State) -> Option<State> {
    info!("{} -> {}", old.name, new.name);
    None
}

export_handler!(handle);
