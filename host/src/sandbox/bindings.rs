//! The host side of the `sluice:task` WIT contract: the one `bindgen!` in the host, and the
//! implementations of the `context` and `log` imports. Every string a guest passes in is checked
//! against the run's host-call limit before it is used.

use super::RunState;
use super::capture;
use super::outcome::{Limit, LimitExceeded, LogLevel, LogSource};

wasmtime::component::bindgen!({
    world: "task",
    path: "../wit",
    imports: { default: trappable },
    exports: { default: async },
});

/// The state-handler world reuses the task world's interfaces (and so the imports below).
pub(super) mod handler {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit",
        imports: { default: trappable },
        exports: { default: async },
        with: {
            "sluice:task/types": super::sluice::task::types,
            "sluice:task/context": super::sluice::task::context,
            "sluice:task/log": super::sluice::task::log,
        },
    });
}

/// The flow world: a flow body, with the `orchestrate` interface (implemented in
/// [`super::flow_body`]) beside the task world's.
pub(super) mod flow {
    wasmtime::component::bindgen!({
        world: "flow",
        path: "../wit",
        imports: {
            "sluice:task/orchestrate": async | trappable,
            default: trappable,
        },
        exports: { default: async },
        with: {
            "sluice:task/types": super::sluice::task::types,
            "sluice:task/context": super::sluice::task::context,
            "sluice:task/log": super::sluice::task::log,
            "sluice:task/orchestrate.submission": super::super::flow_body::SubmissionHandle,
        },
    });
}

pub(super) use self::sluice::task::types::{
    Signal as WitSignal, State as WitState, StateType as WitStateType,
};

impl RunState {
    /// Refuse a guest-provided string longer than the host-call limit.
    pub(super) fn check_host_call(&mut self, len: usize) -> wasmtime::Result<()> {
        let len = len as u64;
        if len > self.host_call_bytes {
            let v = LimitExceeded {
                limit: Limit::HostCallBytes,
                max: self.host_call_bytes,
                requested: Some(len),
            };
            self.host_call_violation.get_or_insert(v);
            return Err(wasmtime::Error::msg(v.to_string()));
        }
        Ok(())
    }
}

impl self::sluice::task::types::Host for RunState {}

impl self::sluice::task::context::Host for RunState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.check_host_call(key.len())?;
        Ok(self.ctx.get(&key))
    }

    fn flow_run_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.flow_run_id.to_string())
    }

    fn task_run_id(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.task_run_id.to_string())
    }

    fn task_name(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.task_name.to_string())
    }

    fn attempt(&mut self) -> wasmtime::Result<u32> {
        Ok(self.ctx.attempt)
    }

    fn map_index(&mut self) -> wasmtime::Result<Option<u32>> {
        Ok(self.ctx.map_index)
    }

    fn parameters(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.parameters.to_string())
    }
}

impl self::sluice::task::log::Host for RunState {
    fn log(
        &mut self,
        level: self::sluice::task::log::Level,
        message: String,
    ) -> wasmtime::Result<()> {
        use self::sluice::task::log::Level;
        self.check_host_call(message.len())?;
        let level = match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        };
        capture::lock(&self.logs).push(LogSource::Log, level, message);
        Ok(())
    }
}
