//! A slow state handler: every time a task completes, it sleeps for 3 seconds, then answers
//! Failed. Other tasks of the flow must not wait for it, and a cancelled run must not either
//! (its answer is then never applied).

use std::time::Duration;

use sluice_guest::export_handler;
use sluice_guest::handler::State;

fn handle(_task: &str, _old: &State, new: &State) -> Option<State> {
    if new.state_type != "COMPLETED" {
        return None;
    }
    std::thread::sleep(Duration::from_secs(3));
    Some(State::named("Failed", "the slow handler says no"))
}

export_handler!(handle);
