//! Pacing of running guests: a guest reaches a yield point at every epoch tick, and a
//! [`Pacer`] (the server's CPU scheduler) decides when it runs again. Plain types only: the
//! pacer sees a future to complete, never wasmtime. A task run executed inside [`paced`] is
//! paced by its pacer; any other yields to the other tasks of its thread and goes on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// Decides when a guest that reached a yield point runs again.
pub trait Pacer: Send + Sync {
    /// The guest continues when the returned future completes.
    fn pause(&self) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

tokio::task_local! {
    static PACER: Arc<dyn Pacer>;
}

/// Run `run` (a task run's future) with its guest paced by `pacer`.
pub async fn paced<F: Future>(pacer: Arc<dyn Pacer>, run: F) -> F::Output {
    PACER.scope(pacer, run).await
}

/// The pause of the current task's pacer, if it has one.
pub(super) fn pause() -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    PACER.try_with(|p| p.pause()).ok()
}
