//! The rows every store backend writes and reads, in their backend-neutral form: times as
//! microseconds, states and histories as JSON text (a task run's state left out when its last
//! history line says it all), ids parsed back with the run they belong to named in any error,
//! and a batch of queued writes with each task run's writes merged into one (group commit).
//! The SQLite store uses them, and the PostgreSQL store will, so both read and write the same
//! values.

use chrono::{DateTime, Utc};

use crate::cache::CacheKey;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::runner::Transition;
use crate::state::{State, StateName};
use crate::store::{Blob, CacheEntry, CacheLookup, StoreError, TailLimits, TaskWrite, Write};

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

pub(super) fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) fn parse_state(run: &str, json: &str) -> Result<State, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("state {json:?}: {e}"),
    })
}

pub(super) fn parse_history(run: &str, text: &str) -> Result<Vec<Transition>, StoreError> {
    text.lines()
        .map(|l| {
            serde_json::from_str(l).map_err(|e| StoreError::Corrupt {
                run: run.to_owned(),
                detail: format!("history line {l:?}: {e}"),
            })
        })
        .collect()
}

pub(super) fn parse_name(run: &str, s: &str) -> Result<StateName, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("unknown state name {s:?}"),
    })
}

pub(super) fn parse_id<T: std::str::FromStr>(run: &str, s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt {
        run: run.to_owned(),
        detail: format!("bad id {s:?}"),
    })
}

/// A task run's state from its row: its `state_json`, or, written compactly (empty), its last
/// transition.
pub(super) fn task_state(
    run: &str,
    json: &str,
    history: &[Transition],
) -> Result<State, StoreError> {
    match (json.is_empty(), history.last()) {
        (true, Some(t)) => Ok(State {
            name: t.to,
            message: t.message.clone(),
            timestamp: t.time,
            result: None,
            scheduled_for: None,
        }),
        _ => parse_state(run, json),
    }
}

/// Writes ready to commit as one transaction: writes other than task-run changes, in order, then
/// each task run's changes merged into one write (a task that went Pending → Running → Completed
/// within a batch costs one row write). Kept as it is when it cannot be committed, to be
/// committed later in order.
pub(super) struct Batch {
    /// Tells this batch from every other (random): a backend whose commit can end without
    /// saying whether it happened (PostgreSQL's connection lost during the `COMMIT`) records
    /// it, so committing the batch again does nothing.
    pub(super) id: String,
    pub(super) others: Vec<Write>,
    /// Boxed: a batch holds up to its writer's most (20,000 for SQLite's), and growing the map
    /// moves its entries.
    /// With each, what the writes merged into it cost.
    pub(super) tasks:
        indexmap::IndexMap<TaskRunId, (Box<TaskWrite>, u64), foldhash::fast::RandomState>,
    pub(super) writes: usize,
    /// What the batch's writes cost ([`cost`]).
    pub(super) bytes: u64,
}

impl Default for Batch {
    fn default() -> Self {
        let mut id = [0u8; 16];
        // Without randomness, the time and a counter still tell batches apart.
        if getrandom::fill(&mut id).is_err() {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            id[..8].copy_from_slice(&Utc::now().timestamp_micros().to_le_bytes());
            id[8..].copy_from_slice(&n.to_le_bytes());
        }
        Batch {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            others: Vec::new(),
            tasks: Default::default(),
            writes: 0,
            bytes: 0,
        }
    }
}

impl Batch {
    pub(super) fn push(&mut self, w: Write) {
        self.writes += 1;
        let bytes = cost(&w);
        self.bytes += bytes;
        match w {
            Write::Task(t) => match self.tasks.get_mut(&t.id) {
                Some((existing, cost)) => {
                    merge(existing, *t);
                    *cost += bytes;
                }
                None => {
                    self.tasks.insert(t.id, (t, bytes));
                }
            },
            other => self.others.push(other),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.others.is_empty() && self.tasks.is_empty()
    }

    /// Drop the writes of `run`.
    pub(super) fn drop_run(&mut self, run: FlowRunId) {
        self.others.retain(|w| write_run(w) != run);
        self.tasks.retain(|_, (t, _)| t.run != run);
        self.bytes = self.others.iter().map(cost).sum::<u64>()
            + self.tasks.values().map(|(_, c)| c).sum::<u64>();
    }
}

/// What write `w` costs while it is queued: about the memory it holds (log records by their
/// [`LogRecord::cost`](crate::sandbox::LogRecord::cost)).
pub(super) fn cost(w: &Write) -> u64 {
    const HEADER: u64 = 256;
    let blob = |b: &Option<Blob>| match b {
        Some(Blob::Value(v)) => v.len() as u64,
        Some(Blob::Stored(h)) => h.len() as u64,
        None => 0,
    };
    match w {
        Write::Logs { records, .. } => records.iter().map(|r| r.cost()).sum(),
        Write::Task(t) => {
            size_of::<TaskWrite>() as u64
                + (t.transitions.len() * size_of::<Transition>()) as u64
                + t.transitions
                    .iter()
                    .map(|t| t.message.as_ref().map_or(0, String::len) as u64)
                    .sum::<u64>()
                + t.state.message.as_ref().map_or(0, String::len) as u64
                + blob(&t.output)
                + blob(&t.cached_input)
        }
        Write::RunCreated(h) => {
            HEADER * 4
                + h.manifest.as_ref().map_or(0, |(_, text)| text.len() as u64)
                + h.files.as_ref().map_or(0, |f| f.len() as u64)
        }
        Write::Journal { entry, .. } => HEADER + entry.len() as u64,
        Write::Cache(c) => HEADER + c.output.len() as u64,
        Write::FlowState { .. } => HEADER,
    }
}

/// The flow run a write belongs to.
pub(super) fn write_run(w: &Write) -> FlowRunId {
    match w {
        Write::RunCreated(h) => h.id,
        Write::FlowState { run, .. } | Write::Logs { run, .. } | Write::Journal { run, .. } => *run,
        Write::Task(t) => t.run,
        Write::Cache(c) => c.flow_run,
    }
}

/// Merge `next` (a later write of the same task run) into `into`: the latest state and counters,
/// every transition in order, the latest output, input and cache information.
pub(super) fn merge(into: &mut TaskWrite, next: TaskWrite) {
    into.state = next.state;
    into.transitions.extend(next.transitions);
    into.attempts = next.attempts;
    into.run_time = next.run_time;
    into.fuel_consumed = next.fuel_consumed;
    into.memory_peak_bytes = next.memory_peak_bytes;
    if next.output.is_some() {
        into.output = next.output;
    }
    if next.clear_input {
        into.cached_input = None;
        into.clear_input = true;
    } else if next.cached_input.is_some() {
        into.cached_input = next.cached_input;
        into.clear_input = false;
    }
    if next.cache.is_some() {
        into.cache = next.cache;
    }
}

pub(super) fn state_json(s: &State) -> String {
    let mut s = s.clone();
    s.result = None;
    serde_json::to_string(&s).unwrap_or_default()
}

/// A task run's `state_json`: empty when the state says no more than `last`, the transition
/// into it (its name, time and message; a reader takes the state from the last history line),
/// else the state as JSON.
pub(super) fn task_state_json(s: &State, last: Option<&Transition>) -> String {
    match last {
        Some(t)
            if t.to == s.name
                && t.time == s.timestamp
                && t.message == s.message
                && s.scheduled_for.is_none() =>
        {
            String::new()
        }
        _ => state_json(s),
    }
}

/// Transitions as history lines: one JSON object per line, appended to a run's `history`.
pub(super) fn history_lines(ts: &[Transition]) -> String {
    let mut out = Vec::with_capacity(ts.len() * 128);
    for t in ts {
        // A transition is strings and a timestamp: writing it to memory cannot fail.
        let _ = serde_json::to_writer(&mut out, t);
        out.push(b'\n');
    }
    String::from_utf8(out).unwrap_or_default()
}

/// A blob's bytes as read (`None`: no such blob), checked against its hash: the value, or why
/// it cannot be read (`what` says what it holds, e.g. "output of task `a`").
pub(super) fn checked_blob(
    hash: &str,
    what: &str,
    data: Option<&[u8]>,
) -> Result<Json, StoreError> {
    let blob_err = |problem: String| StoreError::Blob {
        hash: hash.to_owned(),
        what: what.to_owned(),
        problem,
    };
    let data = data.ok_or_else(|| blob_err("missing from the store".into()))?;
    if blake3::hash(data).to_hex().as_str() != hash {
        return Err(blob_err(
            "corrupt: its content does not match its hash".into(),
        ));
    }
    // Blobs are written in canonical form and the hash matched: the text is that form.
    std::str::from_utf8(data)
        .map(Json::from_canonical)
        .map_err(|e| blob_err(format!("not valid UTF-8: {e}")))
}

/// A valid cache entry found, with its blob's bytes as read: a hit, or a miss saying why the
/// blob cannot be used (missing, not matching its hash, not UTF-8).
pub(super) fn cached(entry: CacheEntry, data: Option<&[u8]>) -> CacheLookup {
    let Some(data) = data else {
        return CacheLookup::Miss(format!(
            "the entry from flow run {} refers to blob {} which is missing from the store",
            entry.flow_run, entry.blob
        ));
    };
    if blake3::hash(data).to_hex().as_str() != entry.blob {
        return CacheLookup::Miss(format!(
            "the entry from flow run {} refers to blob {} whose content does not match its hash",
            entry.flow_run, entry.blob
        ));
    }
    match std::str::from_utf8(data) {
        Ok(v) => CacheLookup::Hit {
            output: Json::from_canonical(v),
            blob: entry.blob.clone(),
            entry: Box::new(entry),
        },
        Err(e) => CacheLookup::Miss(format!(
            "the entry from flow run {} has an unreadable blob {}: {e}",
            entry.flow_run, entry.blob
        )),
    }
}

/// The newest cache entry of a task (of the same configuration when there is one), which a
/// miss is explained against.
#[derive(Clone)]
pub(super) struct NewestEntry {
    pub(super) key: String,
    pub(super) component: String,
    pub(super) config: String,
    pub(super) inputs: Option<String>,
    pub(super) parameters: Option<String>,
    pub(super) validator: String,
    pub(super) expires_at: i64,
    pub(super) flow_run: String,
    pub(super) grants: String,
    pub(super) secrets: String,
}

/// Why `key` missed, against the newest entry of its task (`None`: the task has none): the
/// first part of the key that differs, or that the entry expired.
pub(super) fn explain_miss(key: &CacheKey, newest: Option<&NewestEntry>) -> String {
    let Some(n) = newest else {
        return format!("no cached output of task `{}` yet", key.task);
    };
    let short = |h: &str| h.chars().take(12).collect::<String>();
    let run = &n.flow_run;
    if n.key == key.key {
        format!(
            "the entry from flow run {run} expired at {}",
            from_micros(n.expires_at).to_rfc3339()
        )
    } else if n.component != key.component {
        format!(
            "the component changed (cached from {}…, now {}…)",
            short(&n.component),
            short(&key.component)
        )
    } else if n.validator != key.validator {
        format!(
            "the validator changed (cached under {}, now {})",
            n.validator, key.validator
        )
    } else if n.config != key.config {
        "the task's limits or map index, the flow (or cache namespace) or the context values \
         changed"
            .to_owned()
    } else if n.grants != key.grants {
        "the grants changed (files, env or secrets granted to the task)".to_owned()
    } else if n.secrets != key.secrets {
        "the value of a granted secret changed".to_owned()
    } else if n.inputs != key.inputs {
        format!(
            "the inputs differ from the newest entry's (flow run {run}; {})",
            key.validator
        )
    } else if n.parameters != key.parameters {
        format!(
            "the parameters differ from the newest entry's (flow run {run}; {})",
            key.validator
        )
    } else {
        "no valid entry for this key".to_owned()
    }
}

/// The entry of `entries` (newest first) whose key starts with `prefix` (lowercase): one key,
/// or an error saying none or how many match.
pub(super) fn entry_by_prefix(
    entries: Vec<CacheEntry>,
    prefix: &str,
) -> Result<CacheEntry, StoreError> {
    let mut matching = entries.into_iter().filter(|e| e.key.starts_with(prefix));
    let Some(first) = matching.next() else {
        return Err(StoreError::CacheKey(format!(
            "no cache entry with key `{prefix}` (see `sluice cache ls`)"
        )));
    };
    let mut others: Vec<String> = matching
        .filter(|e| e.key != first.key)
        .map(|e| e.key)
        .collect();
    others.sort_unstable();
    others.dedup();
    match others.len() {
        0 => Ok(first),
        n => Err(StoreError::CacheKey(format!(
            "`{prefix}` matches {} cache keys; give more of the key",
            n + 1
        ))),
    }
}

/// Chooses each task run's log tail from a run's records offered newest first (by position and
/// size): a record is kept while its task run's tail and the run's total stay within the
/// limits; the first that does not fit ends its task run's tail (a tail is never a selection).
pub(super) struct TailPicker {
    limits: TailLimits,
    total: u64,
    /// By task run: the positions kept (newest first), their bytes, and how many were left out.
    tails: std::collections::HashMap<String, (Vec<i64>, u64, u64)>,
}

impl TailPicker {
    pub(super) fn new(limits: TailLimits) -> TailPicker {
        TailPicker {
            limits,
            total: 0,
            tails: std::collections::HashMap::new(),
        }
    }

    /// The next record, older than every one offered before.
    pub(super) fn offer(&mut self, seq: i64, task_run: String, len: u64) {
        let (seqs, bytes, omitted) = self.tails.entry(task_run).or_default();
        let fits = *omitted == 0
            && seqs.len() < self.limits.records
            && *bytes + len <= self.limits.bytes
            && self.total + len <= self.limits.total_bytes;
        if fits {
            seqs.push(seq);
            *bytes += len;
            self.total += len;
        } else {
            *omitted += 1;
        }
    }

    /// By task run: the positions to read, oldest first, and how many older records were left
    /// out.
    pub(super) fn tails(self) -> impl Iterator<Item = (String, Vec<i64>, u64)> {
        self.tails
            .into_iter()
            .map(|(task_run, (mut seqs, _, omitted))| {
                seqs.reverse();
                (task_run, seqs, omitted)
            })
    }
}
