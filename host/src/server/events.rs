//! A run's changes as server-sent events (`GET /runs/{id}/events`): the flow run's state, each
//! task run's state as it changes, and new log lines, read from the store's change feed
//! ([`Store::changes`]) and woken by its commit counter (polled as well, for runs another
//! process writes to the same home). The stream opens with the run as it is (or as it was after
//! the `Last-Event-ID` a reconnecting client sends) and ends with an `end` event once the run
//! is no longer live and everything recorded was sent.
//!
//! Events: `flow` ([`FlowChange`]), `task` ([`TaskChange`]: its state now and its whole
//! history), `log` ([`StoredLog`]), `end` (`{"state": …}`). The last event of each batch carries
//! the cursor after it as its id; a client reconnecting with it gets what followed (perhaps
//! the last batch again: every event says how things are, so it is safe to apply twice).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio::sync::watch;

use super::problem::ApiError;
use super::{Space, Tenant};
use crate::ids::{FlowRunId, TaskRunId};
use crate::store::{ChangeCursor, LOG_PAGE_LINES, RunChanges, Store};

/// At most this many event streams are open per tenant (`max_event_streams`).
pub const MAX_EVENT_STREAMS: usize = 16;

/// How often a stream reads the store when nothing woke it: changes another process commits
/// are seen this late at most.
const POLL: Duration = Duration::from_millis(500);

/// How long a stream stays silent before it sends a keep-alive comment.
const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The open event streams of one tenant.
#[derive(Debug, Default)]
pub(super) struct StreamCount(Arc<AtomicUsize>);

/// One open stream: counted until dropped (the client went away, or the stream ended).
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl StreamCount {
    /// A slot for one more stream, unless `max_event_streams` are open.
    fn open(&self, tenant: &Tenant) -> Result<StreamSlot, ApiError> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_EVENT_STREAMS).then_some(n + 1)
            })
            .map_err(|n| {
                ApiError::quota(
                    tenant,
                    "max_event_streams",
                    MAX_EVENT_STREAMS as u64,
                    format!("{n} event streams are open; close one first"),
                )
            })?;
        Ok(StreamSlot(self.0.clone()))
    }
}

/// What a stream follows of its run.
#[derive(Debug, Clone)]
pub(super) enum Scope {
    /// The run's changes and lines (of one task's, when set).
    Changes(Option<String>),
    /// The log lines of one task run (the web UI's tail of a task's page), `log` events only.
    Lines(TaskRunId),
}

/// The event stream of run `id` (of one task's changes and lines when `task` is set), from
/// `after`.
pub(super) fn stream(
    space: &Space,
    tenant: &Tenant,
    id: FlowRunId,
    task: Option<String>,
    after: ChangeCursor,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    scoped(space, tenant, id, Scope::Changes(task), after)
}

/// The event stream of run `id`'s `scope`, from `after`.
pub(super) fn scoped(
    space: &Space,
    tenant: &Tenant,
    id: FlowRunId,
    scope: Scope,
    after: ChangeCursor,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ApiError> {
    let slot = space.streams().open(tenant)?;
    let reader = Reader {
        store: space.store().clone(),
        changed: space.store().watch_changes(),
        id,
        scope,
        cursor: after,
        ready: VecDeque::new(),
        ended: false,
        _slot: slot,
    };
    let events = futures_util::stream::unfold(reader, |mut r| async move {
        let event = r.next().await?;
        Some((Ok(event), r))
    });
    // A keep-alive every second: the server learns that a client went away (and frees its
    // slot) when a write to it fails, within a few seconds even while the run is quiet.
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

struct Reader {
    store: Arc<dyn Store>,
    changed: watch::Receiver<u64>,
    id: FlowRunId,
    scope: Scope,
    cursor: ChangeCursor,
    ready: VecDeque<Event>,
    ended: bool,
    _slot: StreamSlot,
}

impl Reader {
    /// The next event; `None` after `end` (or when the store cannot be read: the stream ends,
    /// and a client reconnects).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            if self.ended {
                return None;
            }
            // Marked seen before reading: a commit after this wakes the wait below.
            self.changed.borrow_and_update();
            let (store, id, scope, cursor) =
                (self.store.clone(), self.id, self.scope.clone(), self.cursor);
            let read = tokio::task::spawn_blocking(move || {
                // Whether the run was live before reading: what it wrote before it ended is in
                // this read.
                let live = store.is_live(id);
                let changes = match scope {
                    Scope::Changes(task) => store.changes(id, task.as_deref(), cursor),
                    Scope::Lines(task_run) => store
                        .task_run_logs(id, task_run, cursor.log, LOG_PAGE_LINES)
                        .map(|logs| RunChanges {
                            flow: None,
                            tasks: Vec::new(),
                            cursor: ChangeCursor {
                                log: logs.last().map_or(cursor.log, |l| l.seq),
                                ..cursor
                            },
                            logs,
                        }),
                };
                changes.map(|c| (live, c))
            })
            .await;
            let (live, changes) = match read {
                Ok(Ok(read)) => read,
                Ok(Err(e)) => return self.failed(&e),
                Err(e) => return self.failed(&e),
            };
            if !changes.is_empty() {
                self.push(changes);
                continue;
            }
            if !live {
                self.ended = true;
                let (store, id) = (self.store.clone(), self.id);
                let state = tokio::task::spawn_blocking(move || {
                    store.changes(id, None, ChangeCursor::FLOW_ONLY)
                })
                .await
                .ok()
                .and_then(Result::ok)
                .and_then(|c| c.flow)
                .map(|f| f.state);
                let data = serde_json::json!({ "state": state });
                return Some(Event::default().event("end").data(data.to_string()));
            }
            let _ = tokio::time::timeout(POLL, self.changed.changed()).await;
        }
    }

    /// The store could not be read: the stream ends (a client reconnects).
    fn failed(&mut self, e: &dyn std::fmt::Display) -> Option<Event> {
        tracing::warn!("event stream of run {}: {e}", self.id);
        None
    }

    /// Queue the events of `changes`; the last carries the cursor after them.
    fn push(&mut self, changes: RunChanges) {
        let json = |v: Result<String, serde_json::Error>| v.unwrap_or_default();
        if let Some(f) = &changes.flow {
            self.ready.push_back(
                Event::default()
                    .event("flow")
                    .data(json(serde_json::to_string(f))),
            );
        }
        for t in &changes.tasks {
            self.ready.push_back(
                Event::default()
                    .event("task")
                    .data(json(serde_json::to_string(t))),
            );
        }
        for l in &changes.logs {
            self.ready.push_back(
                Event::default()
                    .event("log")
                    .data(json(serde_json::to_string(l))),
            );
        }
        self.cursor = changes.cursor;
        if let Some(last) = self.ready.pop_back() {
            self.ready.push_back(last.id(self.cursor.to_string()));
        }
    }
}
