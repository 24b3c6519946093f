//! Reading recorded runs back: resolving a run id from a prefix, loading a run with its task
//! runs and histories, listing runs, reading logs, and reading blobs checked against their hash.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::super::rows::{
    TailPicker, from_micros, parse_history, parse_id, parse_state, task_state,
};
use super::SqliteStore;
use crate::cache::CacheInfo;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::runner::{FlowRun, TaskRun};
use crate::sandbox::LogRecord;
use crate::state::StateName;
use crate::store::{
    CHANGE_PAGE_TASKS, ChangeCursor, FlowChange, LOG_PAGE_BYTES, LOG_PAGE_LINES, LogTail,
    RunChanges, RunFilter, RunSummary, StoreError, StoredLog, StoredRun, TailLimits, TaskChange,
};

/// Read blob `hash`, checking it against its hash.
pub(super) fn get_blob(
    store: &SqliteStore,
    conn: &Connection,
    hash: &str,
    what: &str,
) -> Result<Json, StoreError> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM blobs WHERE hash = ?1")
        .and_then(|mut s| s.query_row([hash], |r| r.get(0)).optional())
        .map_err(store.io_err("blob read"))?;
    super::super::rows::checked_blob(hash, what, data.as_deref())
}

/// Run `read` (which scans logs) on `conn` with its memory map off: pages read through the map
/// stay resident in this process (up to the map's 256 MiB) however little of them is kept, so a
/// scan of a run's logs would cost that much memory. Read through the page cache, its pages are
/// recycled.
fn unmapped<T>(conn: &Connection, read: impl FnOnce() -> T) -> T {
    let _ = conn.pragma_update(None, "mmap_size", 0_i64);
    let result = read();
    let _ = conn.pragma_update(None, "mmap_size", super::schema::MMAP_SIZE);
    result
}

impl SqliteStore {
    pub(super) fn resolve_run_impl(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        let prefix = id_or_prefix.trim().to_ascii_uppercase();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(StoreError::UnknownRun(id_or_prefix.to_owned()));
        }
        let conn = self.read();
        let mut s = conn
            .prepare_cached("SELECT id FROM flow_runs WHERE id >= ?1 AND id < ?1 || 'ZZZZZZZZZZZZZZZZZZZZZZZZZZ' LIMIT 2")
            .map_err(self.io_err("run lookup"))?;
        let ids: Vec<String> = s
            .query_map([&prefix], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.io_err("run lookup"))?;
        let ids: Vec<&String> = ids.iter().filter(|i| i.starts_with(&prefix)).collect();
        match ids.as_slice() {
            [] => Err(StoreError::UnknownRun(id_or_prefix.to_owned())),
            [one] => parse_id(one, one),
            _ => {
                let count: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM flow_runs WHERE substr(id, 1, length(?1)) = ?1",
                        [&prefix],
                        |r| r.get(0),
                    )
                    .map_err(self.io_err("run lookup"))?;
                Err(StoreError::AmbiguousRun {
                    prefix: id_or_prefix.to_owned(),
                    count: count as usize,
                })
            }
        }
    }

    pub(super) fn child_run_impl(
        &self,
        parent: TaskRunId,
    ) -> Result<Option<FlowRunId>, StoreError> {
        let conn = self.read();
        let id: Option<String> = conn
            .prepare_cached(
                "SELECT id FROM flow_runs WHERE parent_task_run = ?1 ORDER BY id DESC LIMIT 1",
            )
            .and_then(|mut s| s.query_row([parent.to_string()], |r| r.get(0)).optional())
            .map_err(self.io_err("child run lookup"))?;
        id.map(|id| parse_id(&id, &id)).transpose()
    }

    pub(super) fn load_run_impl(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        let conn = self.read();
        let id = run.to_string();
        let io = self.io_err("run load");
        type Head = (
            String,
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<i64>,
            String,
            Option<String>,
            Option<String>,
        );
        let head: Option<Head> = conn
            .query_row(
                "SELECT flow, state_json, created_at, parameters, context, manifest_path, manifest, cancel_requested_at, history, result, files FROM flow_runs WHERE id = ?1",
                [&id],
                |r| TryFrom::try_from(r),
            )
            .optional()
            .map_err(&io)?;
        let Some((
            flow,
            state,
            created,
            parameters,
            context,
            mpath,
            mtext,
            cancel,
            history,
            result,
            files,
        )) = head
        else {
            return Err(StoreError::UnknownRun(id));
        };
        let corrupt = |detail: String| StoreError::Corrupt {
            run: id.clone(),
            detail,
        };
        let mut state = parse_state(&id, &state)?;
        let mut problems = Vec::new();
        if let Some(hash) = result {
            // What a code flow's body returned, carried by the run's final state.
            match get_blob(self, &conn, &hash, "the flow run's result") {
                Ok(v) => state.result = Some(v),
                Err(e) => problems.push(e),
            }
        }
        let parameters: BTreeMap<String, Value> =
            serde_json::from_str(&parameters).map_err(|e| corrupt(format!("parameters: {e}")))?;
        let context: BTreeMap<String, String> =
            serde_json::from_str(&context).map_err(|e| corrupt(format!("context: {e}")))?;

        type Row = (
            String,
            u32,
            String,
            Option<String>,
            Option<u32>,
            String,
            u32,
            i64,
            i64,
            Option<String>,
            Option<String>,
            Option<String>,
            String,
            i64,
        );
        let rows: Vec<Row> = {
            let mut s = conn
                .prepare_cached(
                    "SELECT id, task_index, name, parent, map_index, state_json, attempts, run_time_us, fuel, output, cached_input, cache, history, memory_peak
                     FROM task_runs WHERE flow_run = ?1 ORDER BY task_index, parent IS NOT NULL, map_index",
                )
                .map_err(&io)?;
            s.query_map([&id], |r| TryFrom::try_from(r))
                .and_then(|rows| rows.collect())
                .map_err(&io)?
        };
        let mut tasks: Vec<TaskRun> = Vec::new();
        let mut parents: HashMap<String, usize> = HashMap::new();
        for (
            tid,
            _index,
            name,
            parent,
            map_index,
            state,
            attempts,
            rt,
            fuel,
            out,
            input,
            cache,
            hist,
            memory_peak,
        ) in rows
        {
            let history = parse_history(&id, &hist)?;
            let state = task_state(&id, &state, &history)?;
            let what = |kind: &str| match map_index {
                Some(i) => format!("{kind} of task `{name}`[{i}]"),
                None => format!("{kind} of task `{name}`"),
            };
            let mut blob = |hash: &Option<String>, kind: &str| {
                let hash = hash.as_deref()?;
                get_blob(self, &conn, hash, &what(kind))
                    .map_err(|e| problems.push(e))
                    .ok()
            };
            let output = match state.state_type() {
                crate::state::StateType::Completed => blob(&out, "output"),
                _ => None,
            };
            let cached_input = blob(&input, "cached input");
            let cache = cache
                .map(|c| CacheInfo::from_stored(&c))
                .transpose()
                .map_err(|e| corrupt(format!("cache info: {e}")))?;
            let record = TaskRun {
                name,
                id: parse_id(&id, &tid)?,
                map_index,
                history,
                logs: Vec::new(),
                state,
                attempts,
                output,
                output_released: false,
                cached_input,
                run_time: Duration::from_micros(u64::try_from(rt).unwrap_or(0)),
                fuel_consumed: u64::try_from(fuel).unwrap_or(0),
                memory_peak_bytes: u64::try_from(memory_peak).unwrap_or(0),
                cache,
                children: Vec::new(),
            };
            match parent {
                None => {
                    parents.insert(tid, tasks.len());
                    tasks.push(record);
                }
                Some(p) => match parents.get(&p) {
                    Some(&i) => tasks[i].children.push(record),
                    None => {
                        return Err(corrupt(format!("task run {tid} has an unknown parent {p}")));
                    }
                },
            }
        }
        let journal = {
            let mut s = conn
                .prepare_cached("SELECT entry FROM journal WHERE flow_run = ?1 ORDER BY seq")
                .map_err(&io)?;
            let rows: Vec<String> = s
                .query_map([&id], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(&io)?;
            rows.iter()
                .map(|e| serde_json::from_str(e).map_err(|e| corrupt(format!("journal: {e}"))))
                .collect::<Result<Vec<_>, _>>()?
        };
        let run_record = FlowRun {
            id: run,
            flow,
            state,
            history: parse_history(&id, &history)?,
            parameters,
            context,
            tasks,
            logs: Vec::new(),
            journal,
        };
        Ok(StoredRun {
            run: run_record,
            manifest: mpath.zip(mtext).map(|(p, t)| (PathBuf::from(p), t)),
            files,
            created_at: from_micros(created),
            cancel_requested_at: cancel.map(from_micros),
            problems,
        })
    }

    pub(super) fn list_runs_impl(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        let conn = self.read();
        let io = self.io_err("run list");
        let limit = if filter.limit == 0 {
            i64::MAX
        } else {
            filter.limit as i64
        };
        let rows: Vec<(String, String, String, i64, i64)> = {
            // The bounds on creation (a cursor, a time window) as a range of the
            // (created_at, id) index, however deep the page: written into the statement only
            // when given (an unused parameter is bound to a test of its absence).
            let upper = filter.upper();
            let since = filter.since.map(|t| t.timestamp_micros());
            // A deployment's runs: through the index on the context's `deployment` (the
            // expression as the index has it).
            let sql = format!(
                "SELECT id, flow, state_json, created_at, updated_at FROM flow_runs
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR flow = ?2) AND {} AND {}
                   AND {}
                 ORDER BY created_at DESC, id DESC LIMIT ?3",
                match upper {
                    Some(_) => "(created_at, id) < (?4, ?5)",
                    None => "?4 IS NULL AND ?5 IS NULL",
                },
                match since {
                    Some(_) => "created_at >= ?6",
                    None => "?6 IS NULL",
                },
                match filter.deployment {
                    Some(_) => "json_extract(context, '$.deployment') = ?7",
                    None => "?7 IS NULL",
                },
            );
            let mut s = conn.prepare_cached(&sql).map_err(&io)?;
            let (before, before_id) = upper.unzip();
            s.query_map(
                params![
                    filter.state.map(StateName::as_str),
                    filter.flow,
                    limit,
                    before,
                    before_id,
                    since,
                    filter.deployment
                ],
                |r| TryFrom::try_from(r),
            )
            .and_then(|rows| rows.collect())
            .map_err(&io)?
        };
        let mut out = Vec::with_capacity(rows.len());
        let mut counts = conn
            .prepare_cached(
                "SELECT state, count(*) FROM task_runs WHERE flow_run = ?1 AND parent IS NULL GROUP BY state",
            )
            .map_err(&io)?;
        for (id, flow, state, created, updated) in rows {
            let tasks: BTreeMap<String, u64> = counts
                .query_map([&id], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))
                .and_then(|rows| rows.collect())
                .map_err(&io)?;
            out.push(RunSummary {
                id: parse_id(&id, &id)?,
                flow,
                state: parse_state(&id, &state)?,
                created_at: from_micros(created),
                updated_at: from_micros(updated),
                tasks,
            });
        }
        Ok(out)
    }

    pub(super) fn changes_impl(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<RunChanges, StoreError> {
        let conn = self.read();
        let id = run.to_string();
        let io = self.io_err("change read");
        // One snapshot for the rows: a change committed while this reads is wholly in this
        // answer or wholly in a later one.
        conn.execute_batch("BEGIN").map_err(&io)?;
        let read = || -> Result<RunChanges, StoreError> {
            let mut out = RunChanges {
                cursor: after,
                ..RunChanges::default()
            };
            let flow: Option<(String, String, i64)> = conn
                .prepare_cached("SELECT state_json, history, changed FROM flow_runs WHERE id = ?1")
                .and_then(|mut s| s.query_row([&id], |r| TryFrom::try_from(r)).optional())
                .map_err(&io)?;
            let Some((state, history, changed)) = flow else {
                return Err(StoreError::UnknownRun(id.clone()));
            };
            if changed > after.flow {
                out.flow = Some(FlowChange {
                    state: parse_state(&id, &state)?,
                    history: parse_history(&id, &history)?,
                });
                out.cursor.flow = changed;
            }
            type Row = (
                i64,
                i64,
                String,
                String,
                Option<u32>,
                String,
                u32,
                i64,
                i64,
                String,
            );
            let mut s = conn
                .prepare_cached(
                    "SELECT changed, rowid, id, name, map_index, state_json, attempts, run_time_us, fuel, history
                     FROM task_runs WHERE flow_run = ?1 AND (changed, rowid) > (?2, ?3)
                       AND (?4 IS NULL OR name = ?4)
                     ORDER BY changed, rowid LIMIT ?5",
                )
                .map_err(&io)?;
            let rows: Vec<Row> = s
                .query_map(
                    params![id, after.change, after.row, task, CHANGE_PAGE_TASKS as i64],
                    |r| TryFrom::try_from(r),
                )
                .and_then(|rows| rows.collect())
                .map_err(&io)?;
            for (changed, row, tid, name, map_index, state, attempts, rt, fuel, hist) in rows {
                let history = parse_history(&id, &hist)?;
                out.tasks.push(TaskChange {
                    id: parse_id(&id, &tid)?,
                    task: name,
                    map_index,
                    state: task_state(&id, &state, &history)?,
                    attempts,
                    history,
                    run_time: Duration::from_micros(u64::try_from(rt).unwrap_or(0)),
                    fuel_consumed: u64::try_from(fuel).unwrap_or(0),
                });
                (out.cursor.change, out.cursor.row) = (changed, row);
            }
            Ok(out)
        };
        let result = read();
        let _ = conn.execute_batch("COMMIT");
        let mut out = result?;
        // Logs are only ever appended, each with the next `seq`: they need no snapshot.
        out.logs = unmapped(&conn, || {
            self.log_page(&conn, run, task, None, after.log, LOG_PAGE_LINES)
        })?;
        if let Some(last) = out.logs.last() {
            out.cursor.log = last.seq;
        }
        Ok(out)
    }

    pub(super) fn logs_impl(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        let conn = self.read();
        unmapped(&conn, || {
            self.log_page(&conn, run, task, None, after, limit)
        })
    }

    pub(super) fn task_run_logs_impl(
        &self,
        run: FlowRunId,
        task_run: TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        let conn = self.read();
        unmapped(&conn, || {
            self.log_page(&conn, run, None, Some(task_run), after, limit)
        })
    }

    pub(super) fn newest_log_seq_impl(&self, run: FlowRunId) -> Result<i64, StoreError> {
        let conn = self.read();
        conn.prepare_cached("SELECT coalesce(max(seq), 0) FROM logs WHERE flow_run = ?1")
            .and_then(|mut s| s.query_row([run.to_string()], |r| r.get(0)))
            .map_err(self.io_err("log read"))
    }

    /// A page of `run`'s lines after `after`: of one task (`task`), of one task run
    /// (`task_run`), or all.
    fn log_page(
        &self,
        conn: &Connection,
        run: FlowRunId,
        task: Option<&str>,
        task_run: Option<TaskRunId>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        let io = self.io_err("log read");
        let limit = limit.clamp(1, LOG_PAGE_LINES);
        let mut s = conn
            .prepare_cached(
                "SELECT seq, task, map_index, record FROM logs WHERE flow_run = ?1 AND seq > ?2 AND (?3 IS NULL OR task = ?3) AND (?5 IS NULL OR task_run = ?5) ORDER BY seq LIMIT ?4",
            )
            .map_err(&io)?;
        let mut rows = s
            .query(params![
                run.to_string(),
                after,
                task,
                limit as i64,
                task_run.map(|t| t.to_string())
            ])
            .map_err(&io)?;
        let mut page = Vec::new();
        let mut bytes = 0u64;
        // Row by row: the page ends at the record that reaches its size, and only one record
        // beyond what the page keeps is ever read.
        while bytes < LOG_PAGE_BYTES
            && let Some(row) = rows.next().map_err(&io)?
        {
            let (seq, task, map_index, record): (i64, String, Option<u32>, String) =
                TryFrom::try_from(row).map_err(&io)?;
            bytes += record.len() as u64;
            let record = serde_json::from_str(&record).map_err(|e| StoreError::Corrupt {
                run: run.to_string(),
                detail: format!("log {seq}: {e}"),
            })?;
            page.push(StoredLog {
                seq,
                task,
                map_index,
                record,
            });
        }
        Ok(page)
    }

    /// Every record's message is read (the cost is its length), with the memory map off.
    pub(super) fn log_cost_impl(&self, run: FlowRunId) -> Result<u64, StoreError> {
        let conn = self.read();
        let cost: i64 = unmapped(&conn, || {
            conn.query_row(
                "SELECT coalesce(sum(octet_length(json_extract(record, '$.message')) + ?2), 0) FROM logs WHERE flow_run = ?1",
                params![run.to_string(), LogRecord::OVERHEAD as i64],
                |r| r.get(0),
            )
        })
        .map_err(self.io_err("log read"))?;
        Ok(u64::try_from(cost).unwrap_or(0))
    }

    pub(super) fn task_names_impl(&self, run: FlowRunId) -> Result<Vec<String>, StoreError> {
        let conn = self.read();
        let mut s = conn
            .prepare_cached(
                "SELECT name FROM task_runs WHERE flow_run = ?1 AND parent IS NULL ORDER BY task_index",
            )
            .map_err(self.io_err("run load"))?;
        s.query_map([run.to_string()], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(self.io_err("run load"))
    }

    /// Two passes: the run's records newest first, reading only their task run and size (SQLite
    /// reads a value's length without its content), choose each task run's tail; then read the
    /// chosen records by position.
    pub(super) fn log_tails_impl(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        let conn = self.read();
        unmapped(&conn, || self.tails(&conn, run, limits))
    }

    fn tails(
        &self,
        conn: &Connection,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        let io = self.io_err("log read");
        let id = run.to_string();
        let mut picker = TailPicker::new(*limits);
        {
            let mut s = conn
                .prepare_cached(
                    "SELECT seq, task_run, octet_length(record) FROM logs WHERE flow_run = ?1 ORDER BY seq DESC",
                )
                .map_err(&io)?;
            let mut rows = s.query([&id]).map_err(&io)?;
            while let Some(row) = rows.next().map_err(&io)? {
                let (seq, task_run, len): (i64, String, i64) =
                    TryFrom::try_from(row).map_err(&io)?;
                picker.offer(seq, task_run, u64::try_from(len).unwrap_or(0));
            }
        }
        let mut read = conn
            .prepare_cached("SELECT record FROM logs WHERE seq = ?1")
            .map_err(&io)?;
        let mut out = HashMap::new();
        for (task_run, seqs, omitted) in picker.tails() {
            let last_seq = seqs.last().copied().unwrap_or(0);
            let mut records = Vec::with_capacity(seqs.len());
            for seq in seqs {
                let text: String = read.query_row([seq], |r| r.get(0)).map_err(&io)?;
                records.push(
                    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
                        run: id.clone(),
                        detail: format!("log {seq}: {e}"),
                    })?,
                );
            }
            let tail = LogTail {
                records,
                omitted,
                last_seq,
            };
            out.insert(parse_id(&id, &task_run)?, tail);
        }
        Ok(out)
    }
}
