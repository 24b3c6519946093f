//! The output cache in a PostgreSQL store: lookups (a miss explained against the task's newest
//! entry, as SQLite's are), preloading a task's entries streamed in chunks, listing, reading and
//! clearing entries.

use chrono::{DateTime, Utc};
use futures_util::{StreamExt, pin_mut};

use super::read::get_blob;
use super::store::{Failure, PgStore, col};
use crate::cache::CacheKey;
use crate::json::Json;
use crate::store::rows::{self, NewestEntry, from_micros, micros};
use crate::store::{CacheEntry, CacheLookup, CachedOutput, PRELOAD_CHUNK, Store, StoreError};

/// A task's valid entries, oldest first, each key once with its newest entry.
const PRELOAD_SQL: &str = "SELECT c.key, c.blob, c.created_at, c.expires_at, c.flow_run,
        c.task_run, c.validator, c.component, b.size, b.data
     FROM {s}.cache c LEFT JOIN {s}.blobs b ON b.hash = c.blob
     WHERE c.task = $1 AND c.expires_at > $2
       AND NOT EXISTS (SELECT 1 FROM {s}.cache d
                       WHERE d.key = c.key AND d.expires_at > $2 AND d.seq != c.seq
                         AND (d.created_at > c.created_at
                              OR (d.created_at = c.created_at AND d.seq > c.seq)))
     ORDER BY c.created_at, c.seq";

/// Each key's newest valid entry with its blob, numbered by the key's place (from 1); keys
/// without one are left out.
const LOOKUP_MANY_SQL: &str = "SELECT u.n, c.blob, c.created_at, c.expires_at, c.flow_run,
        c.task_run, c.task, c.validator, c.component, b.size, b.data
     FROM unnest($1::text[]) WITH ORDINALITY AS u(key, n)
     CROSS JOIN LATERAL (SELECT * FROM {s}.cache c
                         WHERE c.key = u.key AND c.expires_at > $2
                         ORDER BY c.created_at DESC, c.seq DESC LIMIT 1) c
     LEFT JOIN {s}.blobs b ON b.hash = c.blob";

/// For each (task, configuration) pair, numbered from 1: the newest entry of the task and
/// configuration (one step down its index); pairs without one are left out.
const NEWEST_OF_CONFIG_SQL: &str = "SELECT u.n, c.key, c.component, c.config, c.inputs,
        c.parameters, c.validator, c.expires_at, c.flow_run, c.grants, c.secrets
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(task, config, n)
     CROSS JOIN LATERAL (SELECT * FROM {s}.cache c WHERE c.task = u.task AND c.config = u.config
                         ORDER BY c.created_at DESC, c.seq DESC LIMIT 1) c";

/// For each task, numbered from 1: its newest entry; tasks without one are left out.
const NEWEST_OF_TASK_SQL: &str = "SELECT u.n, c.key, c.component, c.config, c.inputs,
        c.parameters, c.validator, c.expires_at, c.flow_run, c.grants, c.secrets
     FROM unnest($1::text[]) WITH ORDINALITY AS u(task, n)
     CROSS JOIN LATERAL (SELECT * FROM {s}.cache c WHERE c.task = u.task
                         ORDER BY c.created_at DESC, c.seq DESC LIMIT 1) c";

/// The newest entry of each task (of its configuration, when given: all or none are), by its
/// place (from 0).
async fn newest_of(
    client: &deadpool_postgres::Object,
    sql: &super::store::Sql,
    tasks: &[&str],
    configs: Option<&[&str]>,
) -> Result<Vec<(usize, NewestEntry)>, Failure> {
    let rows = match configs {
        Some(configs) => {
            client
                .query(
                    &client.prepare_cached(&sql.q(NEWEST_OF_CONFIG_SQL)).await?,
                    &[&tasks, &configs],
                )
                .await?
        }
        None => {
            client
                .query(
                    &client.prepare_cached(&sql.q(NEWEST_OF_TASK_SQL)).await?,
                    &[&tasks],
                )
                .await?
        }
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let n: i64 = col("", r, 0)?;
        if let Ok(slot) = usize::try_from(n - 1) {
            out.push((slot, newest(r, 1)?));
        }
    }
    Ok(out)
}

/// The entry of a row of [`NEWEST_OF_CONFIG_SQL`] or [`NEWEST_OF_TASK_SQL`], its columns from
/// `at`.
fn newest(r: &tokio_postgres::Row, at: usize) -> Result<NewestEntry, Failure> {
    Ok(NewestEntry {
        key: col("", r, at)?,
        component: col("", r, at + 1)?,
        config: col("", r, at + 2)?,
        inputs: col("", r, at + 3)?,
        parameters: col("", r, at + 4)?,
        validator: col("", r, at + 5)?,
        expires_at: col("", r, at + 6)?,
        flow_run: col("", r, at + 7)?,
        grants: col("", r, at + 8)?,
        secrets: col("", r, at + 9)?,
    })
}

fn size(n: Option<i64>) -> u64 {
    n.map_or(0, |n| u64::try_from(n).unwrap_or(0))
}

impl PgStore {
    /// Three round trips whatever the number of keys: each key's newest valid entry with its
    /// blob; for the misses, the newest entry of the same configuration; for those still
    /// without one, the newest of the task.
    pub(super) fn cache_lookup_many_impl(
        &self,
        keys: &[CacheKey],
        now: DateTime<Utc>,
    ) -> Result<Vec<CacheLookup>, StoreError> {
        let keys = keys.to_vec();
        self.read(move |client, sql| async move {
            let texts: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
            let rows = client
                .query(
                    &client.prepare_cached(&sql.q(LOOKUP_MANY_SQL)).await?,
                    &[&texts, &micros(now)],
                )
                .await?;
            let mut found: Vec<Option<CacheLookup>> = (0..keys.len()).map(|_| None).collect();
            for r in &rows {
                let n: i64 = col("", r, 0)?;
                let Some(key) = usize::try_from(n - 1).ok().and_then(|i| keys.get(i)) else {
                    continue;
                };
                let entry = CacheEntry {
                    key: key.key.clone(),
                    blob: col("", r, 1)?,
                    created_at: from_micros(col("", r, 2)?),
                    expires_at: from_micros(col("", r, 3)?),
                    flow_run: col("", r, 4)?,
                    task_run: col("", r, 5)?,
                    task: col("", r, 6)?,
                    validator: col("", r, 7)?,
                    component: col("", r, 8)?,
                    size: size(col("", r, 9)?),
                };
                let data: Option<Vec<u8>> = col("", r, 10)?;
                found[(n - 1) as usize] = Some(rows::cached(entry, data.as_deref()));
            }
            // Explain each miss against the newest entry of the same configuration (the same
            // child of a mapped task), else the newest of the task.
            let missed: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
            let mut newest: Vec<Option<NewestEntry>> = (0..keys.len()).map(|_| None).collect();
            if !missed.is_empty() {
                let tasks: Vec<&str> = missed.iter().map(|&i| keys[i].task.as_str()).collect();
                let configs: Vec<&str> = missed.iter().map(|&i| keys[i].config.as_str()).collect();
                for (slot, entry) in newest_of(&client, &sql, &tasks, Some(&configs)).await? {
                    newest[missed[slot]] = Some(entry);
                }
                let bare: Vec<usize> = missed
                    .iter()
                    .copied()
                    .filter(|&i| newest[i].is_none())
                    .collect();
                if !bare.is_empty() {
                    // Each task once (a mapped task's children share theirs).
                    let mut tasks: Vec<&str> =
                        bare.iter().map(|&i| keys[i].task.as_str()).collect();
                    tasks.sort_unstable();
                    tasks.dedup();
                    let of_task: std::collections::HashMap<&str, NewestEntry> =
                        newest_of(&client, &sql, &tasks, None)
                            .await?
                            .into_iter()
                            .map(|(slot, entry)| (tasks[slot], entry))
                            .collect();
                    for i in bare {
                        newest[i] = of_task.get(keys[i].task.as_str()).cloned();
                    }
                }
            }
            Ok(found
                .into_iter()
                .zip(newest)
                .zip(&keys)
                .map(|((hit, newest), key)| {
                    hit.unwrap_or_else(|| {
                        CacheLookup::Miss(rows::explain_miss(key, newest.as_ref()))
                    })
                })
                .collect())
        })
    }

    /// Read on the database's runtime, the chunks handed over a channel to `each` on the
    /// caller's thread as they come (a chunk ahead at most); the caller's thread waits as for
    /// any other read (from a blocking thread, as the runner calls it).
    pub(super) fn cache_preload_impl(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<CachedOutput>>(1);
        let task = task.to_owned();
        let name = self.inner.db.name().to_owned();
        let sql = self.inner.sql.clone();
        let pool = self.inner.db.inner.pool.clone();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        self.inner.db.spawn(async move {
            let read = async {
                let client = pool
                    .get()
                    .await
                    .map_err(|e| Failure::Store(super::pool_error(&name, e)))?;
                let rows = client
                    .query_raw(
                        &client.prepare_cached(&sql.q(PRELOAD_SQL)).await?,
                        [
                            &task as &(dyn tokio_postgres::types::ToSql + Sync),
                            &micros(now),
                        ],
                    )
                    .await?;
                pin_mut!(rows);
                let mut out = Vec::with_capacity(PRELOAD_CHUNK);
                let mut loaded = 0u64;
                while let Some(r) = rows.next().await {
                    let r = r?;
                    let stored_size: Option<i64> = col("", &r, 8)?;
                    let entry = CacheEntry {
                        key: col("", &r, 0)?,
                        blob: col("", &r, 1)?,
                        created_at: from_micros(col("", &r, 2)?),
                        expires_at: from_micros(col("", &r, 3)?),
                        flow_run: col("", &r, 4)?,
                        task_run: col("", &r, 5)?,
                        task: task.clone(),
                        validator: col("", &r, 6)?,
                        component: col("", &r, 7)?,
                        size: size(stored_size),
                    };
                    let value = match stored_size.and_then(|n| u64::try_from(n).ok()) {
                        Some(n) if loaded.saturating_add(n) <= max_bytes => {
                            loaded += n;
                            let data: Option<&[u8]> = col("", &r, 9)?;
                            // A corrupt blob is not preloaded; a hit on it goes to
                            // `cache_lookup`, which reports it as a miss.
                            data.filter(|d| blake3::hash(d).to_hex().as_str() == entry.blob)
                                .and_then(|d| std::str::from_utf8(d).ok())
                                .map(Json::from_canonical)
                        }
                        _ => None,
                    };
                    out.push(CachedOutput { entry, value });
                    if out.len() == PRELOAD_CHUNK {
                        let chunk = std::mem::replace(&mut out, Vec::with_capacity(PRELOAD_CHUNK));
                        if tx.send(chunk).await.is_err() {
                            // The caller stopped early.
                            return Ok(());
                        }
                    }
                }
                if !out.is_empty() {
                    let _ = tx.send(out).await;
                }
                Ok::<(), Failure>(())
            };
            let result = read.await.map_err(|f| f.store(&name));
            drop(tx);
            let _ = done_tx.send(result);
        });
        while let Some(chunk) = wait(rx.recv()) {
            if !each(chunk) {
                // Dropping the receiver stops the read.
                drop(rx);
                return Ok(());
            }
        }
        done_rx
            .recv()
            .map_err(|_| StoreError::io("cache preload", "the store's runtime stopped"))?
    }

    pub(super) fn cache_entries_impl(
        &self,
        task: Option<&str>,
    ) -> Result<Vec<CacheEntry>, StoreError> {
        let task = task.map(str::to_owned);
        self.read(move |client, sql| async move {
            let rows = client
                .query(
                    &client
                        .prepare_cached(&sql.q(
                            "SELECT c.key, c.task, c.validator, c.component, c.blob,
                                   coalesce(b.size, 0), c.created_at, c.expires_at, c.flow_run,
                                   c.task_run
                            FROM {s}.cache c LEFT JOIN {s}.blobs b ON b.hash = c.blob
                            WHERE $1::text IS NULL OR c.task = $1
                            ORDER BY c.created_at DESC, c.seq DESC",
                        ))
                        .await?,
                    &[&task],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(CacheEntry {
                        key: col("", r, 0)?,
                        task: col("", r, 1)?,
                        validator: col("", r, 2)?,
                        component: col("", r, 3)?,
                        blob: col("", r, 4)?,
                        size: size(col("", r, 5)?),
                        created_at: from_micros(col("", r, 6)?),
                        expires_at: from_micros(col("", r, 7)?),
                        flow_run: col("", r, 8)?,
                        task_run: col("", r, 9)?,
                    })
                })
                .collect()
        })
    }

    pub(super) fn cache_entry_impl(&self, prefix: &str) -> Result<(CacheEntry, Json), StoreError> {
        let entry = rows::entry_by_prefix(self.cache_entries(None)?, &prefix.to_ascii_lowercase())?;
        let (hash, what) = (
            entry.blob.clone(),
            format!("cached output of task `{}`", entry.task),
        );
        let value = self
            .read(move |client, sql| async move { get_blob(&client, &sql, &hash, &what).await })?;
        Ok((entry, value))
    }

    pub(super) fn clear_cache_impl(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        let task = task.map(str::to_owned);
        let before = expired_before.map(micros);
        self.read(move |client, sql| async move {
            let n = client
                .execute(
                    &client
                        .prepare_cached(
                            &sql.q("DELETE FROM {s}.cache WHERE ($1::text IS NULL OR task = $1)
                            AND ($2::int8 IS NULL OR expires_at <= $2)"),
                        )
                        .await?,
                    &[&task, &before],
                )
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }
}

/// Wait for `work` on this thread, parking it until woken (as a read's answer is waited for on a
/// channel): unlike a runtime's `block_on`, never a panic in an async context.
fn wait<T>(work: impl Future<Output = T>) -> T {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut work = std::pin::pin!(work);
    loop {
        if let std::task::Poll::Ready(v) = work.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
