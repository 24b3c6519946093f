//! Reading recorded runs back from a PostgreSQL store: run ids from prefixes, a run with its
//! task runs, histories and blobs (checked against their hashes), run lists, logs page by page
//! and each task run's newest, and a run's changes after a cursor (the run and its task runs
//! read in one snapshot).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Transaction};
use futures_util::{StreamExt, pin_mut};
use serde_json::Value;

use super::store::{Failure, PgStore, Sql, col};
use crate::cache::CacheInfo;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::runner::{FlowRun, TaskRun};
use crate::sandbox::LogRecord;
use crate::state::StateName;
use crate::store::rows::{
    TailPicker, checked_blob, from_micros, parse_history, parse_id, parse_state, task_state,
};
use crate::store::{
    CHANGE_PAGE_TASKS, ChangeCursor, FlowChange, LOG_PAGE_BYTES, LOG_PAGE_LINES, LogTail,
    RunChanges, RunFilter, RunSummary, StoreError, StoredLog, StoredRun, TailLimits, TaskChange,
};

/// Read blob `hash` (holding `what`), checked against its hash.
pub(super) async fn get_blob(
    client: &impl GenericClient,
    sql: &Sql,
    hash: &str,
    what: &str,
) -> Result<Json, Failure> {
    let row = client
        .query_opt(
            &client
                .prepare_cached(&sql.q("SELECT data FROM {s}.blobs WHERE hash = $1"))
                .await?,
            &[&hash],
        )
        .await?;
    let data: Option<Vec<u8>> = match row {
        Some(r) => Some(col("", &r, 0)?),
        None => None,
    };
    Ok(checked_blob(hash, what, data.as_deref())?)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn u32_of(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

impl PgStore {
    pub(super) fn resolve_run_impl(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        let prefix = id_or_prefix.trim().to_ascii_uppercase();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
        }
        let given = id_or_prefix.to_owned();
        self.read(move |client, sql| async move {
            // The ids starting with the prefix: a range of the primary key (ids compare byte by
            // byte).
            let rows = client
                .query(
                    &client
                        .prepare_cached(&sql.q("SELECT id FROM {s}.flow_runs
                            WHERE id >= $1 AND id < $1 || 'ZZZZZZZZZZZZZZZZZZZZZZZZZZ' LIMIT 2"))
                        .await?,
                    &[&prefix],
                )
                .await?;
            let ids: Vec<String> = rows
                .iter()
                .map(|r| col(&prefix, r, 0))
                .collect::<Result<_, _>>()?;
            let ids: Vec<&String> = ids.iter().filter(|i| i.starts_with(&prefix)).collect();
            match ids.as_slice() {
                [] => Err(StoreError::UnknownRun(given).into()),
                [one] => Ok(parse_id(one, one)?),
                _ => {
                    let row = client
                        .query_one(
                            &client
                                .prepare_cached(&sql.q(
                                    "SELECT count(*) FROM {s}.flow_runs WHERE starts_with(id, $1)",
                                ))
                                .await?,
                            &[&prefix],
                        )
                        .await?;
                    let count: i64 = col(&prefix, &row, 0)?;
                    Err(StoreError::AmbiguousRun {
                        prefix: given,
                        count: usize::try_from(count).unwrap_or(0),
                    }
                    .into())
                }
            }
        })
    }

    pub(super) fn child_run_impl(
        &self,
        parent: TaskRunId,
    ) -> Result<Option<FlowRunId>, StoreError> {
        self.read(move |client, sql| async move {
            let row = client
                .query_opt(
                    &client
                        .prepare_cached(
                            &sql.q("SELECT id FROM {s}.flow_runs WHERE parent_task_run = $1
                            ORDER BY id DESC LIMIT 1"),
                        )
                        .await?,
                    &[&parent.to_string()],
                )
                .await?;
            match row {
                Some(r) => {
                    let id: String = col("", &r, 0)?;
                    Ok(Some(parse_id(&id, &id)?))
                }
                None => Ok(None),
            }
        })
    }

    pub(super) fn load_run_impl(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        self.read(move |mut client, sql| async move {
            // One snapshot: the run, its task runs and its journal as of one moment.
            let tx = snapshot(&mut client).await?;
            let loaded = load_run(&tx, &sql, run).await;
            tx.commit().await?;
            loaded
        })
    }

    pub(super) fn list_runs_impl(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let limit = if filter.limit == 0 {
            i64::MAX
        } else {
            i64::try_from(filter.limit).unwrap_or(i64::MAX)
        };
        let (state, flow) = (filter.state.map(StateName::as_str), filter.flow.clone());
        // The bounds on creation (a cursor, a time window) as a range of the (created_at, id)
        // index, however deep the page: written into the statement only when given.
        let upper = filter.upper();
        let since = filter.since.map(|t| t.timestamp_micros());
        let query = format!(
            "SELECT id, flow, state_json, created_at, updated_at FROM {{s}}.flow_runs
            WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR flow = $2)
              AND {} AND {} AND {}
            ORDER BY created_at DESC, id DESC LIMIT $3",
            match upper {
                Some(_) => "(created_at, id) < ($4::bigint, $5::text)",
                None => "$4::bigint IS NULL AND $5::text IS NULL",
            },
            match since {
                Some(_) => "created_at >= $6::bigint",
                None => "$6::bigint IS NULL",
            },
            // As the index has it.
            match filter.deployment {
                Some(_) => "(context::jsonb ->> 'deployment') = $7::text",
                None => "$7::text IS NULL",
            },
        );
        let deployment = filter.deployment.clone();
        let (before, before_id) = upper.unzip();
        self.read(move |client, sql| async move {
            let rows = client
                .query(
                    &client.prepare_cached(&sql.q(&query)).await?,
                    &[
                        &state,
                        &flow,
                        &limit,
                        &before,
                        &before_id,
                        &since,
                        &deployment,
                    ],
                )
                .await?;
            let ids: Vec<String> = rows
                .iter()
                .map(|r| col("", r, 0))
                .collect::<Result<_, _>>()?;
            let counts = client
                .query(
                    &client
                        .prepare_cached(
                            &sql.q("SELECT flow_run, state, count(*) FROM {s}.task_runs
                            WHERE flow_run = ANY($1) AND parent IS NULL GROUP BY 1, 2"),
                        )
                        .await?,
                    &[&ids],
                )
                .await?;
            let mut tasks: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
            for r in &counts {
                let (run, state, n): (String, String, i64) =
                    (col("", r, 0)?, col("", r, 1)?, col("", r, 2)?);
                tasks.entry(run).or_default().insert(state, u64_of(n));
            }
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: String = col("", r, 0)?;
                let state: String = col(&id, r, 2)?;
                out.push(RunSummary {
                    id: parse_id(&id, &id)?,
                    flow: col(&id, r, 1)?,
                    state: parse_state(&id, &state)?,
                    created_at: from_micros(col(&id, r, 3)?),
                    updated_at: from_micros(col(&id, r, 4)?),
                    tasks: tasks.remove(&id).unwrap_or_default(),
                });
            }
            Ok(out)
        })
    }

    pub(super) fn changes_impl(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<RunChanges, StoreError> {
        let task = task.map(str::to_owned);
        self.read(move |mut client, sql| async move {
            let id = run.to_string();
            let mut out = RunChanges {
                cursor: after,
                ..RunChanges::default()
            };
            {
                // One snapshot for the rows: a change committed while this reads is wholly in
                // this answer or wholly in a later one.
                let tx = snapshot(&mut client).await?;
                let Some(flow) = tx
                    .query_opt(
                        &tx.prepare_cached(
                            &sql.q("SELECT state_json, history, changed FROM {s}.flow_runs
                                WHERE id = $1"),
                        )
                        .await?,
                        &[&id],
                    )
                    .await?
                else {
                    return Err(StoreError::UnknownRun(id).into());
                };
                let changed: i64 = col(&id, &flow, 2)?;
                if changed > after.flow {
                    let (state, history): (String, String) =
                        (col(&id, &flow, 0)?, col(&id, &flow, 1)?);
                    out.flow = Some(FlowChange {
                        state: parse_state(&id, &state)?,
                        history: parse_history(&id, &history)?,
                    });
                    out.cursor.flow = changed;
                }
                let rows = tx
                    .query(
                        &tx.prepare_cached(&sql.q(
                            "SELECT changed, seq, id, name, map_index, state_json, attempts,
                                       run_time_us, fuel, history
                                FROM {s}.task_runs
                                WHERE flow_run = $1 AND (changed, seq) > ($2, $3)
                                  AND ($4::text IS NULL OR name = $4)
                                ORDER BY changed, seq LIMIT $5",
                        ))
                        .await?,
                        &[
                            &id,
                            &after.change,
                            &after.row,
                            &task,
                            &(CHANGE_PAGE_TASKS as i64),
                        ],
                    )
                    .await?;
                tx.commit().await?;
                for r in &rows {
                    let hist: String = col(&id, r, 9)?;
                    let history = parse_history(&id, &hist)?;
                    let tid: String = col(&id, r, 2)?;
                    let state: String = col(&id, r, 5)?;
                    let map_index: Option<i32> = col(&id, r, 4)?;
                    out.tasks.push(TaskChange {
                        id: parse_id(&id, &tid)?,
                        task: col(&id, r, 3)?,
                        map_index: map_index.map(u32_of),
                        state: task_state(&id, &state, &history)?,
                        attempts: u32_of(col(&id, r, 6)?),
                        history,
                        run_time: Duration::from_micros(u64_of(col(&id, r, 7)?)),
                        fuel_consumed: u64_of(col(&id, r, 8)?),
                    });
                    (out.cursor.change, out.cursor.row) = (col(&id, r, 0)?, col(&id, r, 1)?);
                }
            }
            // Logs are only ever appended, in the order of their `seq` (written under the
            // schema's write lock): they need no snapshot.
            out.logs = log_page(
                &client,
                &sql,
                run,
                task.as_deref(),
                None,
                after.log,
                LOG_PAGE_LINES,
            )
            .await?;
            if let Some(last) = out.logs.last() {
                out.cursor.log = last.seq;
            }
            Ok(out)
        })
    }

    pub(super) fn logs_impl(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        let task = task.map(str::to_owned);
        self.read(move |client, sql| async move {
            log_page(&client, &sql, run, task.as_deref(), None, after, limit).await
        })
    }

    pub(super) fn task_run_logs_impl(
        &self,
        run: FlowRunId,
        task_run: TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.read(move |client, sql| async move {
            log_page(&client, &sql, run, None, Some(task_run), after, limit).await
        })
    }

    pub(super) fn newest_log_seq_impl(&self, run: FlowRunId) -> Result<i64, StoreError> {
        self.read(move |client, sql| async move {
            let row =
                client
                    .query_one(
                        &client
                            .prepare_cached(&sql.q(
                                "SELECT coalesce(max(seq), 0) FROM {s}.logs WHERE flow_run = $1",
                            ))
                            .await?,
                        &[&run.to_string()],
                    )
                    .await?;
            col("", &row, 0)
        })
    }

    /// Every record's message is read (the cost is its length).
    pub(super) fn log_cost_impl(&self, run: FlowRunId) -> Result<u64, StoreError> {
        self.read(move |client, sql| async move {
            let row = client
                .query_one(
                    &client
                        .prepare_cached(&sql.q(
                            "SELECT coalesce(sum(cost), 0)::int8 FROM {s}.logs WHERE flow_run = $1",
                        ))
                        .await?,
                    &[&run.to_string()],
                )
                .await?;
            Ok(u64_of(col("", &row, 0)?))
        })
    }

    pub(super) fn task_names_impl(&self, run: FlowRunId) -> Result<Vec<String>, StoreError> {
        self.read(move |client, sql| async move {
            let rows = client
                .query(
                    &client
                        .prepare_cached(&sql.q(
                            "SELECT name FROM {s}.task_runs WHERE flow_run = $1 AND parent IS NULL
                            ORDER BY task_index",
                        ))
                        .await?,
                    &[&run.to_string()],
                )
                .await?;
            rows.iter().map(|r| col("", r, 0)).collect()
        })
    }

    /// Two passes: the run's records newest first, reading only their task run and size, choose
    /// each task run's tail; then read the chosen records.
    pub(super) fn log_tails_impl(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        let limits = *limits;
        self.read(move |client, sql| async move {
            let id = run.to_string();
            let mut picker = TailPicker::new(limits);
            let sizes = client
                .query_raw(
                    &client
                        .prepare_cached(&sql.q(
                            "SELECT seq, task_run, octet_length(record)::int8 FROM {s}.logs
                            WHERE flow_run = $1 ORDER BY seq DESC",
                        ))
                        .await?,
                    [&id],
                )
                .await?;
            pin_mut!(sizes);
            while let Some(row) = sizes.next().await {
                let row = row?;
                let (seq, task_run, len): (i64, String, i64) =
                    (col(&id, &row, 0)?, col(&id, &row, 1)?, col(&id, &row, 2)?);
                picker.offer(seq, task_run, u64_of(len));
            }
            let tails: Vec<(String, Vec<i64>, u64)> = picker.tails().collect();
            let chosen: Vec<i64> = tails.iter().flat_map(|t| t.1.iter().copied()).collect();
            let rows = client
                .query(
                    &client
                        .prepare_cached(
                            &sql.q("SELECT seq, record FROM {s}.logs WHERE seq = ANY($1)"),
                        )
                        .await?,
                    &[&chosen],
                )
                .await?;
            let mut records: HashMap<i64, LogRecord> = HashMap::with_capacity(rows.len());
            for r in &rows {
                let (seq, text): (i64, String) = (col(&id, r, 0)?, col(&id, r, 1)?);
                let record = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                    run: id.clone(),
                    detail: format!("log {seq}: {e}"),
                })?;
                records.insert(seq, record);
            }
            let mut out = HashMap::with_capacity(tails.len());
            for (task_run, seqs, omitted) in tails {
                let last_seq = seqs.last().copied().unwrap_or(0);
                let records = seqs.iter().filter_map(|seq| records.remove(seq)).collect();
                let tail = LogTail {
                    records,
                    omitted,
                    last_seq,
                };
                out.insert(parse_id(&id, &task_run)?, tail);
            }
            Ok(out)
        })
    }
}

/// One page of the logs of `run` after `after`: row by row, ending at the record that reaches
/// [`LOG_PAGE_BYTES`].
async fn log_page(
    client: &impl GenericClient,
    sql: &Sql,
    run: FlowRunId,
    task: Option<&str>,
    task_run: Option<TaskRunId>,
    after: i64,
    limit: usize,
) -> Result<Vec<StoredLog>, Failure> {
    let limit = limit.clamp(1, LOG_PAGE_LINES) as i64;
    let id = run.to_string();
    let task_run = task_run.map(|t| t.to_string());
    let statement = sql.q("SELECT seq, task, map_index, record FROM {s}.logs
                           WHERE flow_run = $1 AND seq > $2 AND ($3::text IS NULL OR task = $3)
                             AND ($5::text IS NULL OR task_run = $5)
                           ORDER BY seq LIMIT $4");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&id, &after, &task, &limit, &task_run];
    let rows = client.query_raw(&statement, params).await?;
    pin_mut!(rows);
    let mut page = Vec::new();
    let mut bytes = 0u64;
    while bytes < LOG_PAGE_BYTES
        && let Some(row) = rows.next().await
    {
        let row = row?;
        let (seq, task, map_index, record): (i64, String, Option<i32>, String) = (
            col(&id, &row, 0)?,
            col(&id, &row, 1)?,
            col(&id, &row, 2)?,
            col(&id, &row, 3)?,
        );
        bytes += record.len() as u64;
        let record = serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
            run: id.clone(),
            detail: format!("log {seq}: {e}"),
        })?;
        page.push(StoredLog {
            seq,
            task,
            map_index: map_index.map(u32_of),
            record,
        });
    }
    Ok(page)
}

/// Load `run` (in the caller's snapshot).
async fn load_run(
    client: &impl GenericClient,
    sql: &Sql,
    run: FlowRunId,
) -> Result<StoredRun, Failure> {
    let id = run.to_string();
    let Some(head) = client
        .query_opt(
            &client
                .prepare_cached(&sql.q(
                    "SELECT flow, state_json, created_at, parameters, context, manifest_path,
                           manifest, cancel_requested_at, history, result, files
                    FROM {s}.flow_runs WHERE id = $1",
                ))
                .await?,
            &[&id],
        )
        .await?
    else {
        return Err(StoreError::UnknownRun(id).into());
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        run: id.clone(),
        detail,
    };
    let state: String = col(&id, &head, 1)?;
    let mut state = parse_state(&id, &state)?;
    let mut problems = Vec::new();
    let result: Option<String> = col(&id, &head, 9)?;
    if let Some(hash) = result {
        // What a code flow's body returned, carried by the run's final state.
        match get_blob(client, sql, &hash, "the flow run's result").await {
            Ok(v) => state.result = Some(v),
            Err(Failure::Store(e)) => problems.push(e),
            Err(e) => return Err(e),
        }
    }
    let parameters: String = col(&id, &head, 3)?;
    let parameters: BTreeMap<String, Value> =
        serde_json::from_str(&parameters).map_err(|e| corrupt(format!("parameters: {e}")))?;
    let context: String = col(&id, &head, 4)?;
    let context: BTreeMap<String, String> =
        serde_json::from_str(&context).map_err(|e| corrupt(format!("context: {e}")))?;

    let rows = client
        .query(
            &client
                .prepare_cached(&sql.q(
                    "SELECT t.id, t.name, t.parent, t.map_index, t.state_json, t.attempts,
                           t.run_time_us, t.fuel, t.history, t.cached_input, t.cache,
                           t.output, o.data, i.data, t.memory_peak
                    FROM {s}.task_runs t
                    LEFT JOIN {s}.blobs o ON o.hash = t.output AND t.state = ANY($2)
                    LEFT JOIN {s}.blobs i ON i.hash = t.cached_input
                    WHERE t.flow_run = $1
                    ORDER BY t.task_index, t.parent IS NOT NULL, t.map_index",
                ))
                .await?,
            &[&id, &completed_states()],
        )
        .await?;
    let mut tasks: Vec<TaskRun> = Vec::new();
    let mut parents: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let tid: String = col(&id, r, 0)?;
        let name: String = col(&id, r, 1)?;
        let parent: Option<String> = col(&id, r, 2)?;
        let map_index: Option<u32> = col::<Option<i32>>(&id, r, 3)?.map(u32_of);
        let state: String = col(&id, r, 4)?;
        let hist: String = col(&id, r, 8)?;
        let history = parse_history(&id, &hist)?;
        let state = task_state(&id, &state, &history)?;
        let what = |kind: &str| match map_index {
            Some(i) => format!("{kind} of task `{name}`[{i}]"),
            None => format!("{kind} of task `{name}`"),
        };
        let mut blob = |hash: Option<String>, data: Option<&[u8]>, kind: &str| {
            let hash = hash?;
            checked_blob(&hash, &what(kind), data)
                .map_err(|e| problems.push(e))
                .ok()
        };
        let output = match state.state_type() {
            crate::state::StateType::Completed => {
                let data: Option<Vec<u8>> = col(&id, r, 12)?;
                blob(col(&id, r, 11)?, data.as_deref(), "output")
            }
            _ => None,
        };
        let input_data: Option<Vec<u8>> = col(&id, r, 13)?;
        let cached_input = blob(col(&id, r, 9)?, input_data.as_deref(), "cached input");
        let cache: Option<String> = col(&id, r, 10)?;
        let cache = cache
            .map(|c| CacheInfo::from_stored(&c))
            .transpose()
            .map_err(|e| corrupt(format!("cache info: {e}")))?;
        let record = TaskRun {
            id: parse_id(&id, &tid)?,
            map_index,
            history,
            logs: Vec::new(),
            state,
            attempts: u32_of(col(&id, r, 5)?),
            output,
            output_released: false,
            cached_input,
            run_time: Duration::from_micros(u64_of(col(&id, r, 6)?)),
            fuel_consumed: u64_of(col(&id, r, 7)?),
            memory_peak_bytes: u64_of(col(&id, r, 14)?),
            cache,
            children: Vec::new(),
            name,
        };
        match parent {
            None => {
                parents.insert(tid, tasks.len());
                tasks.push(record);
            }
            Some(p) => match parents.get(&p) {
                Some(&i) => tasks[i].children.push(record),
                None => {
                    return Err(corrupt(format!("task run {tid} has an unknown parent {p}")).into());
                }
            },
        }
    }
    let journal = client
        .query(
            &client
                .prepare_cached(
                    &sql.q("SELECT entry FROM {s}.journal WHERE flow_run = $1 ORDER BY seq"),
                )
                .await?,
            &[&id],
        )
        .await?
        .iter()
        .map(|r| {
            let entry: String = col(&id, r, 0)?;
            serde_json::from_str(&entry)
                .map_err(|e| Failure::Store(corrupt(format!("journal: {e}"))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let history: String = col(&id, &head, 8)?;
    let mpath: Option<String> = col(&id, &head, 5)?;
    let mtext: Option<String> = col(&id, &head, 6)?;
    let cancel: Option<i64> = col(&id, &head, 7)?;
    Ok(StoredRun {
        run: FlowRun {
            id: run,
            flow: col(&id, &head, 0)?,
            state,
            history: parse_history(&id, &history)?,
            parameters,
            context,
            tasks,
            logs: Vec::new(),
            journal,
        },
        manifest: mpath.zip(mtext).map(|(p, t)| (PathBuf::from(p), t)),
        files: col(&id, &head, 10)?,
        created_at: from_micros(col(&id, &head, 2)?),
        cancel_requested_at: cancel.map(from_micros),
        problems,
    })
}

/// The state names of type Completed (whose task runs' outputs a load reads).
fn completed_states() -> Vec<&'static str> {
    StateName::ALL
        .iter()
        .filter(|n| n.state_type() == crate::state::StateType::Completed)
        .map(|n| n.as_str())
        .collect()
}

/// A read-only transaction reading one snapshot (repeatable read).
async fn snapshot(client: &mut deadpool_postgres::Object) -> Result<Transaction<'_>, Failure> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}
