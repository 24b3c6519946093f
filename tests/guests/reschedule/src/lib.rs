//! A hostile state handler: every time a task completes, it answers Scheduled, asking the engine
//! to run the task again, for ever. The retry policy must bound it.

use sluice_guest::export_handler;
use sluice_guest::handler::State;

fn handle(_task: &str, _old: &State, new: &State) -> Option<State> {
    (new.state_type == "COMPLETED").then(|| State::named("Scheduled", "run it again"))
}

export_handler!(handle);
