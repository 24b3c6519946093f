//! How the PostgreSQL store commits a batch of writes: one transaction, a few statements
//! whatever the batch holds (the values of many rows sent as arrays and read back with
//! `unnest`), each task run's merged write one row (`MERGE`: inserted, or its history appended
//! and its state replaced). Every write transaction of a schema first takes the schema's write
//! lock (a transaction-scoped advisory lock) and then its change number, so change numbers and
//! log positions become visible in the order they were taken; recording a run not fully recorded,
//! crash recovery and cancellation write the same way.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Transaction};

use super::PgDatabase;
use super::store::{Failure, NOW_US, Sql, col};
use crate::cache::CacheInfo;
use crate::ids::FlowRunId;
use crate::json::Json;
use crate::runner::Transition;
use crate::state::{State, StateName};
use crate::store::rows::{
    Batch, history_lines, i64_of, micros, parse_name, state_json, task_state_json,
};
use crate::store::writer::Commit;
use crate::store::{Blob, RunHeader, StoreError, TaskWrite, Write};

/// The writer thread's side of a PostgreSQL store. It keeps a connection of its own while it
/// works (readers filling the pool never hold a commit back), taking a new one when it closed.
pub(super) struct PgCommit {
    pub(super) db: PgDatabase,
    pub(super) sql: Sql,
    pub(super) client: Option<Object>,
}

impl PgCommit {
    /// The writer's connection.
    async fn client(&mut self) -> Result<Object, StoreError> {
        match self.client.take() {
            Some(c) if !c.is_closed() => Ok(c),
            _ => self.db.client().await,
        }
    }
}

impl Commit for PgCommit {
    fn patience(&self) -> std::time::Duration {
        self.db.outage_patience()
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let (name, db) = (self.db.name().to_owned(), self.db.clone());
        db.block_on(async {
            let mut client = self.client().await?;
            let done = commit(&mut client, &self.sql, batch)
                .await
                .map_err(|f| f.store(&name));
            self.client = Some(client);
            done
        })?
    }

    fn not_recorded(
        &mut self,
        run: FlowRunId,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<State>, StoreError> {
        let (name, db) = (self.db.name().to_owned(), self.db.clone());
        db.block_on(async {
            let mut client = self.client().await?;
            let done = not_recorded(&mut client, &self.sql, run, now, reason)
                .await
                .map_err(|f| f.store(&name));
            self.client = Some(client);
            done
        })?
    }
}

/// Begin a write transaction of the schema: its write lock, then its change number.
pub(super) async fn begin_write<'a>(
    client: &'a mut Object,
    sql: &Sql,
) -> Result<(Transaction<'a>, i64), Failure> {
    let tx = client.transaction().await?;
    let change: i64 = tx
        .query_one(
            &tx.prepare_cached(&sql.q("SELECT nextval('{s}.changes') FROM (SELECT pg_advisory_xact_lock(hashtext('sluice-write:' || $1))) AS l")).await?,
            &[&&*sql.schema],
        )
        .await?
        .try_get(0)?;
    Ok((tx, change))
}

/// Values to store as blobs, each once.
#[derive(Default)]
struct Blobs<'a> {
    seen: HashSet<String>,
    hashes: Vec<String>,
    sizes: Vec<i64>,
    data: Vec<&'a [u8]>,
}

impl<'a> Blobs<'a> {
    fn value(&mut self, v: &'a Json) -> String {
        let hash = v.hash();
        if self.seen.insert(hash.clone()) {
            self.hashes.push(hash.clone());
            self.sizes.push(i64_of(v.len() as u64));
            self.data.push(v.as_str().as_bytes());
        }
        hash
    }

    fn blob(&mut self, b: &'a Blob) -> String {
        match b {
            Blob::Stored(hash) => hash.clone(),
            Blob::Value(v) => self.value(v),
        }
    }
}

/// Task runs' writes as the columns of [`MERGE_TASKS`].
#[derive(Default)]
struct TaskRows {
    id: Vec<String>,
    flow_run: Vec<String>,
    task_index: Vec<i32>,
    name: Vec<String>,
    parent: Vec<Option<String>>,
    map_index: Vec<Option<i32>>,
    state: Vec<&'static str>,
    state_json: Vec<String>,
    attempts: Vec<i32>,
    run_time: Vec<i64>,
    fuel: Vec<i64>,
    memory_peak: Vec<i64>,
    output: Vec<Option<String>>,
    cached_input: Vec<Option<String>>,
    clear_input: Vec<bool>,
    cache: Vec<Option<String>>,
    history: Vec<String>,
}

fn int(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

impl TaskRows {
    fn push<'a>(&mut self, t: &'a TaskWrite, blobs: &mut Blobs<'a>) {
        self.id.push(t.id.to_string());
        self.flow_run.push(t.run.to_string());
        self.task_index.push(int(t.index));
        self.name.push(t.name.to_string());
        self.parent.push(t.parent.map(|p| p.to_string()));
        self.map_index.push(t.map_index.map(int));
        self.state.push(t.state.name.as_str());
        self.state_json
            .push(task_state_json(&t.state, t.transitions.last()));
        self.attempts.push(int(t.attempts));
        self.run_time
            .push(i64::try_from(t.run_time.as_micros()).unwrap_or(i64::MAX));
        self.fuel.push(i64_of(t.fuel_consumed));
        self.memory_peak.push(i64_of(t.memory_peak_bytes));
        self.output.push(t.output.as_ref().map(|b| blobs.blob(b)));
        self.cached_input
            .push(t.cached_input.as_ref().map(|b| blobs.blob(b)));
        self.clear_input.push(t.clear_input);
        self.cache.push(t.cache.as_ref().map(CacheInfo::to_stored));
        self.history.push(history_lines(&t.transitions));
    }

    async fn merge(&self, tx: &Transaction<'_>, sql: &Sql, change: i64) -> Result<(), Failure> {
        if self.id.is_empty() {
            return Ok(());
        }
        tx.execute(
            &tx.prepare_cached(&sql.q(MERGE_TASKS)).await?,
            &[
                &self.id,
                &self.flow_run,
                &self.task_index,
                &self.name,
                &self.parent,
                &self.map_index,
                &self.state,
                &self.state_json,
                &self.attempts,
                &self.run_time,
                &self.fuel,
                &self.output,
                &self.cached_input,
                &self.clear_input,
                &self.cache,
                &self.history,
                &change,
                &self.memory_peak,
            ],
        )
        .await?;
        Ok(())
    }
}

/// A task run's write: a new row, or the row's history appended to and the rest replaced (its
/// output, input and cache information kept unless given; its input dropped when asked).
const MERGE_TASKS: &str = "MERGE INTO {s}.task_runs t
USING unnest($1::text[], $2::text[], $3::int4[], $4::text[], $5::text[], $6::int4[], $7::text[],
             $8::text[], $9::int4[], $10::int8[], $11::int8[], $12::text[], $13::text[],
             $14::bool[], $15::text[], $16::text[], $18::int8[])
    AS u(id, flow_run, task_index, name, parent, map_index, state, state_json, attempts,
         run_time_us, fuel, output, cached_input, clear_input, cache, history, memory_peak)
ON t.id = u.id
WHEN MATCHED THEN UPDATE SET
    history = t.history || u.history, changed = $17, state = u.state,
    state_json = u.state_json, attempts = u.attempts, run_time_us = u.run_time_us,
    fuel = u.fuel, memory_peak = u.memory_peak, output = coalesce(u.output, t.output),
    cached_input = CASE WHEN u.clear_input THEN NULL
                        ELSE coalesce(u.cached_input, t.cached_input) END,
    cache = coalesce(u.cache, t.cache)
WHEN NOT MATCHED THEN INSERT
    (id, flow_run, task_index, name, parent, map_index, state, state_json, history, attempts,
     run_time_us, fuel, memory_peak, output, cached_input, cache, changed)
    VALUES (u.id, u.flow_run, u.task_index, u.name, u.parent, u.map_index, u.state,
            u.state_json, u.history, u.attempts, u.run_time_us, u.fuel, u.memory_peak,
            u.output, u.cached_input, u.cache, $17)";

/// Commit `batch` in one transaction, unless it already was (its id recorded: an earlier
/// commit's outcome was lost with its connection).
async fn commit(client: &mut Object, sql: &Sql, batch: &Batch) -> Result<(), Failure> {
    let (tx, change) = begin_write(client, sql).await?;
    let first = tx
        .execute(
            &tx.prepare_cached(&sql.q(&format!(
                "INSERT INTO {{s}}.commits (id, at) VALUES ($1, {NOW_US}) ON CONFLICT DO NOTHING"
            )))
            .await?,
            &[&batch.id],
        )
        .await?;
    if first == 0 {
        return Ok(());
    }
    if change % 1000 == 0 {
        tx.execute(
            &tx.prepare_cached(&sql.q(&format!(
                "DELETE FROM {{s}}.commits WHERE at < {NOW_US} - 86400000000"
            )))
            .await?,
            &[],
        )
        .await?;
    }
    let mut blobs = Blobs::default();
    let mut created = TaskRows::default();
    let mut runs: Vec<&RunHeader> = Vec::new();
    let mut states: Vec<(&FlowRunId, &State, &Transition, Option<String>)> = Vec::new();
    let mut logs = LogRows::default();
    let mut cache = CacheRows::default();
    let mut journal: HashMap<(FlowRunId, u64), &str> = HashMap::new();
    for w in &batch.others {
        match w {
            Write::RunCreated(h) => {
                runs.push(h);
                for t in &h.tasks {
                    created.push(t, &mut blobs);
                }
            }
            Write::FlowState {
                run,
                state,
                transition,
            } => {
                let result = state.result.as_ref().map(|v| blobs.value(v));
                states.push((run, state, transition, result));
            }
            Write::Task(t) => {
                // Never here (a batch keeps task writes apart), but written all the same.
                created.push(t, &mut blobs);
            }
            Write::Logs {
                run,
                task_run,
                task,
                map_index,
                records,
            } => {
                let (run, task_run) = (run.to_string(), task_run.to_string());
                for r in records {
                    logs.flow_run.push(run.clone());
                    logs.task_run.push(task_run.clone());
                    logs.task.push(task.to_string());
                    logs.map_index.push(map_index.map(int));
                    logs.record
                        .push(serde_json::to_string(r).unwrap_or_default());
                    logs.cost.push(i64_of(r.cost()));
                }
            }
            Write::Cache(c) => {
                let blob = blobs.value(&c.output);
                cache.push(c, blob);
            }
            Write::Journal { run, seq, entry } => {
                journal.insert((*run, *seq), entry);
            }
        }
    }
    let mut tasks = TaskRows::default();
    for (t, _) in batch.tasks.values() {
        tasks.push(t, &mut blobs);
    }
    if !blobs.hashes.is_empty() {
        tx.execute(
            &tx.prepare_cached(&sql.q("INSERT INTO {s}.blobs (hash, size, data)
                    SELECT * FROM unnest($1::text[], $2::int8[], $3::bytea[])
                    ON CONFLICT (hash) DO NOTHING"))
                .await?,
            &[&blobs.hashes, &blobs.sizes, &blobs.data],
        )
        .await?;
    }
    for h in runs {
        run_created(&tx, sql, h, change).await?;
    }
    created.merge(&tx, sql, change).await?;
    for (run, state, transition, result) in states {
        tx.execute(
            &tx.prepare_cached(&sql.q(
                "UPDATE {s}.flow_runs SET state = $2, state_json = $3, updated_at = $4,
                    history = history || $5, result = coalesce($6, result), changed = $7
                    WHERE id = $1",
            ))
            .await?,
            &[
                &run.to_string(),
                &state.name.as_str(),
                &state_json(state),
                &micros(state.timestamp),
                &history_lines(std::slice::from_ref(transition)),
                &result,
                &change,
            ],
        )
        .await?;
    }
    tasks.merge(&tx, sql, change).await?;
    logs.insert(&tx, sql).await?;
    cache.insert(&tx, sql).await?;
    if !journal.is_empty() {
        let (mut run, mut seq, mut entry) = (Vec::new(), Vec::new(), Vec::new());
        for ((r, s), e) in journal {
            run.push(r.to_string());
            seq.push(i64_of(s));
            entry.push(e);
        }
        tx.execute(
            &tx.prepare_cached(&sql.q("INSERT INTO {s}.journal (flow_run, seq, entry)
                    SELECT * FROM unnest($1::text[], $2::int8[], $3::text[])
                    ON CONFLICT (flow_run, seq) DO UPDATE SET entry = excluded.entry"))
                .await?,
            &[&run, &seq, &entry],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn run_created(
    tx: &Transaction<'_>,
    sql: &Sql,
    h: &RunHeader,
    change: i64,
) -> Result<(), Failure> {
    let (path, text) = match &h.manifest {
        Some((p, t)) => (Some(p.to_string_lossy().into_owned()), Some(t.as_str())),
        None => (None, None),
    };
    tx.execute(
        &tx.prepare_cached(&sql.q(
            "INSERT INTO {s}.flow_runs (id, flow, state, state_json, created_at, updated_at,
                parameters, context, manifest_path, manifest, history, parent_task_run, files,
                changed)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
        ))
        .await?,
        &[
            &h.id.to_string(),
            &h.flow,
            &h.state.name.as_str(),
            &state_json(&h.state),
            &micros(h.history.first().map_or(h.state.timestamp, |t| t.time)),
            &micros(h.state.timestamp),
            &serde_json::to_string(&h.parameters).unwrap_or_default(),
            &serde_json::to_string(&h.context).unwrap_or_default(),
            &path,
            &text,
            &history_lines(&h.history),
            &h.context.get(crate::runner::PARENT_TASK_RUN),
            &h.files,
            &change,
        ],
    )
    .await?;
    Ok(())
}

/// Log records as columns, inserted in order (their `seq` grows in the order written).
#[derive(Default)]
struct LogRows {
    flow_run: Vec<String>,
    task_run: Vec<String>,
    task: Vec<String>,
    map_index: Vec<Option<i32>>,
    record: Vec<String>,
    /// What each record costs ([`LogRecord::cost`](crate::sandbox::LogRecord::cost)).
    cost: Vec<i64>,
}

impl LogRows {
    async fn insert(&self, tx: &Transaction<'_>, sql: &Sql) -> Result<(), Failure> {
        if self.record.is_empty() {
            return Ok(());
        }
        tx.execute(
            &tx.prepare_cached(&sql.q(
                "INSERT INTO {s}.logs (flow_run, task_run, task, map_index, record, cost)
                    SELECT flow_run, task_run, task, map_index, record, cost
                    FROM unnest($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::int8[])
                        WITH ORDINALITY AS u(flow_run, task_run, task, map_index, record, cost, n)
                    ORDER BY n",
            ))
            .await?,
            &[
                &self.flow_run,
                &self.task_run,
                &self.task,
                &self.map_index,
                &self.record,
                &self.cost,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Cache entries as columns.
#[derive(Default)]
struct CacheRows {
    key: Vec<String>,
    task: Vec<String>,
    validator: Vec<String>,
    component: Vec<String>,
    config: Vec<String>,
    grants: Vec<String>,
    secrets: Vec<String>,
    inputs: Vec<Option<String>>,
    parameters: Vec<Option<String>>,
    blob: Vec<String>,
    created_at: Vec<i64>,
    expires_at: Vec<i64>,
    flow_run: Vec<String>,
    task_run: Vec<String>,
}

impl CacheRows {
    fn push(&mut self, c: &crate::store::CacheWrite, blob: String) {
        let k = &c.key;
        self.key.push(k.key.clone());
        self.task.push(k.task.clone());
        self.validator.push(k.validator.clone());
        self.component.push(k.component.clone());
        self.config.push(k.config.clone());
        self.grants.push(k.grants.clone());
        self.secrets.push(k.secrets.clone());
        self.inputs.push(k.inputs.clone());
        self.parameters.push(k.parameters.clone());
        self.blob.push(blob);
        self.created_at.push(micros(c.created_at));
        self.expires_at.push(micros(c.expires_at));
        self.flow_run.push(c.flow_run.to_string());
        self.task_run.push(c.task_run.to_string());
    }

    async fn insert(&self, tx: &Transaction<'_>, sql: &Sql) -> Result<(), Failure> {
        if self.key.is_empty() {
            return Ok(());
        }
        tx.execute(
            &tx.prepare_cached(&sql.q(
                "INSERT INTO {s}.cache (key, task, validator, component, config, grants,
                    secrets, inputs, parameters, blob, created_at, expires_at, flow_run, task_run)
                    SELECT key, task, validator, component, config, grants, secrets, inputs,
                           parameters, blob, created_at, expires_at, flow_run, task_run
                    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[],
                                $11::int8[], $12::int8[], $13::text[], $14::text[])
                        WITH ORDINALITY AS u(key, task, validator, component, config, grants,
                            secrets, inputs, parameters, blob, created_at, expires_at,
                            flow_run, task_run, n)
                    ORDER BY n",
            ))
            .await?,
            &[
                &self.key,
                &self.task,
                &self.validator,
                &self.component,
                &self.config,
                &self.grants,
                &self.secrets,
                &self.inputs,
                &self.parameters,
                &self.blob,
                &self.created_at,
                &self.expires_at,
                &self.flow_run,
                &self.task_run,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Record, in one transaction, that `run` is not fully recorded: Crashed with the reason, and
/// its running task runs Crashed (they run again on resume). `None` when the run has no record.
async fn not_recorded(
    client: &mut Object,
    sql: &Sql,
    run: FlowRunId,
    now: DateTime<Utc>,
    reason: &str,
) -> Result<Option<State>, Failure> {
    let (tx, change) = begin_write(client, sql).await?;
    let id = run.to_string();
    let Some(row) = tx
        .query_opt(
            &tx.prepare_cached(&sql.q("SELECT state FROM {s}.flow_runs WHERE id = $1 FOR UPDATE"))
                .await?,
            &[&id],
        )
        .await?
    else {
        return Ok(None);
    };
    let old: String = col(&id, &row, 0)?;
    let state = State::new(StateName::Crashed, now).with_message(format!(
        "not fully recorded: {reason}; the record stops at the last write that succeeded, and `sluice resume` continues from there"
    ));
    crash_run(
        &tx,
        sql,
        change,
        (run, &old),
        &state,
        "its end was not recorded (the store could not write); it will run again on resume",
    )
    .await?;
    tx.commit().await?;
    Ok(Some(state))
}

/// Record flow run `run`, last seen in state `old`, as `state` (Crashed) with its transition, and
/// its running task runs Crashed with `task_message`; false when the run is no longer in `old`.
pub(super) async fn crash_run(
    tx: &Transaction<'_>,
    sql: &Sql,
    change: i64,
    (run, old): (FlowRunId, &str),
    state: &State,
    task_message: &str,
) -> Result<bool, Failure> {
    let id = run.to_string();
    let from = parse_name(&id, old)?;
    let transition = Transition {
        from: Some(from),
        to: state.name,
        time: state.timestamp,
        message: state.message.clone(),
    };
    let changed = tx
        .execute(
            &tx.prepare_cached(&sql.q(
                "UPDATE {s}.flow_runs SET state = $2, state_json = $3, updated_at = $4,
                    history = history || $5, changed = $6
                    WHERE id = $1 AND state = $7",
            ))
            .await?,
            &[
                &id,
                &state.name.as_str(),
                &state_json(state),
                &micros(state.timestamp),
                &history_lines(std::slice::from_ref(&transition)),
                &change,
                &old,
            ],
        )
        .await?;
    if changed == 0 {
        return Ok(false);
    }
    set_tasks(
        tx,
        sql,
        change,
        run,
        &["Running", "Retrying"],
        &State::new(StateName::Crashed, state.timestamp).with_message(task_message),
    )
    .await?;
    Ok(true)
}

/// Move the task runs of `run` that are in one of the states `from` to `to`, each with its
/// transition.
pub(super) async fn set_tasks(
    tx: &Transaction<'_>,
    sql: &Sql,
    change: i64,
    run: FlowRunId,
    from: &[&str],
    to: &State,
) -> Result<(), Failure> {
    let id = run.to_string();
    let rows = tx
        .query(
            &tx.prepare_cached(&sql.q(
                "SELECT id, state FROM {s}.task_runs WHERE flow_run = $1 AND state = ANY($2)
                    FOR UPDATE",
            ))
            .await?,
            &[&id, &from],
        )
        .await?;
    for row in rows {
        let (tid, old): (String, String) = (col(&id, &row, 0)?, col(&id, &row, 1)?);
        let transition = Transition {
            from: Some(parse_name(&id, &old)?),
            to: to.name,
            time: to.timestamp,
            message: to.message.clone(),
        };
        tx.execute(
            &tx.prepare_cached(
                &sql.q("UPDATE {s}.task_runs SET state = $2, state_json = $3,
                    history = history || $4, changed = $5 WHERE id = $1"),
            )
            .await?,
            &[
                &tid,
                &to.name.as_str(),
                &state_json(to),
                &history_lines(std::slice::from_ref(&transition)),
                &change,
            ],
        )
        .await?;
    }
    Ok(())
}
