//! The task cache in the database: lookups (with the reason for a miss), preloading a task's
//! entries, listing, reading and clearing entries.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};

use super::super::rows::{self, NewestEntry, from_micros, micros};
use super::SqliteStore;
use super::runs::get_blob;
use crate::cache::CacheKey;
use crate::json::Json;
use crate::store::{CacheEntry, CacheLookup, CachedOutput, PRELOAD_CHUNK, Store, StoreError};

/// A row of [`newest_entry_sql`].
fn newest(r: &rusqlite::Row<'_>) -> rusqlite::Result<NewestEntry> {
    Ok(NewestEntry {
        key: r.get(0)?,
        component: r.get(1)?,
        config: r.get(2)?,
        inputs: r.get(3)?,
        parameters: r.get(4)?,
        validator: r.get(5)?,
        expires_at: r.get(6)?,
        flow_run: r.get(7)?,
        grants: r.get(8)?,
        secrets: r.get(9)?,
    })
}

/// The newest cache entry matching `filter` (one of [`SAME_CONFIG`], [`SAME_TASK`]), for
/// explaining a miss.
fn newest_entry_sql(filter: &str) -> String {
    format!(
        "SELECT key, component, config, inputs, parameters, validator, expires_at, flow_run, grants, secrets
         FROM cache WHERE {filter} ORDER BY created_at DESC, seq DESC LIMIT 1"
    )
}

/// The newest valid entry of a key, with its blob.
const LOOKUP_SQL: &str = "SELECT c.blob, c.created_at, c.expires_at, c.flow_run, c.task_run, c.task, c.validator, c.component, b.size, b.data
     FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
     WHERE c.key = ?1 AND c.expires_at > ?2 ORDER BY c.created_at DESC, c.seq DESC LIMIT 1";

/// A task's valid entries, oldest first, each key once: an entry with a newer valid one of its
/// key is left out. The newer one is looked for in the key's index, where an entry's own row is
/// told apart by its `seq` alone, so a key cached once costs no second read of a row.
const PRELOAD_SQL: &str = "SELECT c.key, c.blob, c.created_at, c.expires_at, c.flow_run, c.task_run, c.validator, c.component, b.size, b.data
     FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
     WHERE c.task = ?1 AND c.expires_at > ?2
       AND NOT EXISTS (SELECT 1 FROM cache d WHERE d.key = c.key AND d.expires_at > ?2 AND d.seq != c.seq
                       AND (d.created_at > c.created_at OR (d.created_at = c.created_at AND d.seq > c.seq)))
     ORDER BY c.created_at, c.seq";

const SAME_CONFIG: &str = "task = ?1 AND config = ?2";
const SAME_TASK: &str = "task = ?1";

impl SqliteStore {
    pub(super) fn cache_lookup_impl(
        &self,
        key: &CacheKey,
        now: DateTime<Utc>,
    ) -> Result<CacheLookup, StoreError> {
        let conn = self.read();
        let io = self.io_err("cache lookup");
        let found = conn
            .prepare_cached(LOOKUP_SQL)
            .and_then(|mut s| {
                s.query_row(params![key.key, micros(now)], |r| {
                    Ok((
                        CacheEntry {
                            key: key.key.clone(),
                            blob: r.get(0)?,
                            created_at: from_micros(r.get(1)?),
                            expires_at: from_micros(r.get(2)?),
                            flow_run: r.get(3)?,
                            task_run: r.get(4)?,
                            task: r.get(5)?,
                            validator: r.get(6)?,
                            component: r.get(7)?,
                            size: r.get::<_, Option<i64>>(8)?.unwrap_or(0) as u64,
                        },
                        r.get::<_, Option<Vec<u8>>>(9)?,
                    ))
                })
                .optional()
            })
            .map_err(io)?;
        if let Some((entry, data)) = found {
            return Ok(rows::cached(entry, data.as_deref()));
        }
        // Explain the miss against the newest entry of the task.
        // The newest entry of the same configuration (the same child of a mapped task), else the
        // newest of the task: two index lookups (migration 4), so explaining every miss of a
        // first run of a large mapped task stays linear in its children.
        let same_config: Option<NewestEntry> = conn
            .prepare_cached(&newest_entry_sql(SAME_CONFIG))
            .and_then(|mut s| {
                s.query_row(params![key.task, key.config], newest)
                    .optional()
            })
            .map_err(self.io_err("cache lookup"))?;
        let newest_entry = match same_config {
            Some(n) => Some(n),
            None => conn
                .prepare_cached(&newest_entry_sql(SAME_TASK))
                .and_then(|mut s| s.query_row(params![key.task], newest).optional())
                .map_err(self.io_err("cache lookup"))?,
        };
        Ok(CacheLookup::Miss(rows::explain_miss(
            key,
            newest_entry.as_ref(),
        )))
    }

    pub(super) fn cache_preload_impl(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError> {
        let conn = self.read();
        let io = self.io_err("cache preload");
        // Oldest first, the order a mapped task's children were cached in and ask in; each key
        // with the entry a lookup finds.
        let mut s = conn.prepare_cached(PRELOAD_SQL).map_err(&io)?;
        let mut rows = s.query(params![task, micros(now)]).map_err(&io)?;
        let mut out = Vec::with_capacity(PRELOAD_CHUNK);
        let mut loaded = 0u64;
        while let Some(r) = rows.next().map_err(&io)? {
            let size = r.get::<_, Option<i64>>(8).map_err(&io)?;
            let entry = CacheEntry {
                key: r.get(0).map_err(&io)?,
                blob: r.get(1).map_err(&io)?,
                created_at: from_micros(r.get(2).map_err(&io)?),
                expires_at: from_micros(r.get(3).map_err(&io)?),
                flow_run: r.get(4).map_err(&io)?,
                task_run: r.get(5).map_err(&io)?,
                task: task.to_owned(),
                validator: r.get(6).map_err(&io)?,
                component: r.get(7).map_err(&io)?,
                size: size.map_or(0, |n| u64::try_from(n).unwrap_or(0)),
            };
            let size = size.and_then(|n| u64::try_from(n).ok());
            let value = match size {
                Some(n) if loaded.saturating_add(n) <= max_bytes => {
                    let data = r.get_ref(9).map_err(&io)?;
                    let bytes = data.as_blob().unwrap_or_default();
                    loaded += n;
                    // A corrupt blob is not preloaded; a hit on it goes to `cache_lookup`, which
                    // reports it as a miss.
                    (blake3::hash(bytes).to_hex().as_str() == entry.blob)
                        .then(|| std::str::from_utf8(bytes).ok().map(Json::from_canonical))
                        .flatten()
                }
                _ => None,
            };
            out.push(CachedOutput { entry, value });
            if out.len() == PRELOAD_CHUNK {
                let chunk = std::mem::replace(&mut out, Vec::with_capacity(PRELOAD_CHUNK));
                if !each(chunk) {
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            each(out);
        }
        Ok(())
    }

    pub(super) fn cache_entries_impl(
        &self,
        task: Option<&str>,
    ) -> Result<Vec<CacheEntry>, StoreError> {
        let conn = self.read();
        let mut s = conn
            .prepare(
                "SELECT c.key, c.task, c.validator, c.component, c.blob, coalesce(b.size, 0), c.created_at, c.expires_at, c.flow_run, c.task_run
                 FROM cache c LEFT JOIN blobs b ON b.hash = c.blob
                 WHERE ?1 IS NULL OR c.task = ?1 ORDER BY c.created_at DESC, c.seq DESC",
            )
            .map_err(self.io_err("cache list"))?;
        let rows = s
            .query_map([task], |r| {
                Ok(CacheEntry {
                    key: r.get(0)?,
                    task: r.get(1)?,
                    validator: r.get(2)?,
                    component: r.get(3)?,
                    blob: r.get(4)?,
                    size: r.get::<_, i64>(5)? as u64,
                    created_at: from_micros(r.get(6)?),
                    expires_at: from_micros(r.get(7)?),
                    flow_run: r.get(8)?,
                    task_run: r.get(9)?,
                })
            })
            .map_err(self.io_err("cache list"))?;
        rows.collect::<Result<_, _>>()
            .map_err(self.io_err("cache list"))
    }

    pub(super) fn cache_entry_impl(&self, prefix: &str) -> Result<(CacheEntry, Json), StoreError> {
        let entry = rows::entry_by_prefix(self.cache_entries(None)?, &prefix.to_ascii_lowercase())?;
        let value = get_blob(
            self,
            &self.read(),
            &entry.blob,
            &format!("cached output of task `{}`", entry.task),
        )?;
        Ok((entry, value))
    }

    pub(super) fn clear_cache_impl(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        self.writable()?;
        let conn = self.read();
        conn.execute(
            "DELETE FROM cache WHERE (?1 IS NULL OR task = ?1) AND (?2 IS NULL OR expires_at <= ?2)",
            params![task, expired_before.map(micros)],
        )
        .map_err(self.io_err("cache clear"))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Explaining a miss reads one row through an index, never the task's other entries: the
    /// first run of a cached mapped task explains each of its N misses in O(log N), not O(N).
    /// The preload reads a task's entries in order through an index too (no sort before the
    /// first row), each key's newer entries looked for through the key's index.
    #[test]
    fn explaining_a_miss_and_the_preload_read_through_indexes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        let conn = store.read();
        let both: &[&dyn rusqlite::ToSql] = &[&"t", &"c"];
        let preload: &[&dyn rusqlite::ToSql] = &[&"t", &0_i64];
        for (sql, args) in [
            (newest_entry_sql(SAME_CONFIG), both),
            (newest_entry_sql(SAME_TASK), &both[..1]),
            (PRELOAD_SQL.to_owned(), preload),
        ] {
            let filter = &sql;
            let sql = format!("EXPLAIN QUERY PLAN {sql}");
            let mut stmt = conn.prepare(&sql).expect("plan");
            let plan: Vec<String> = stmt
                .query_map(args, |r| r.get::<_, String>(3))
                .expect("query")
                .collect::<Result<_, _>>()
                .expect("rows");
            assert!(
                plan.iter().all(|d| {
                    (d.contains("USING INDEX") || d.contains("SUBQUERY"))
                        && !d.contains("TEMP B-TREE")
                }),
                "{filter}: {plan:?}"
            );
        }
    }

    pub(in crate::store::sqlite) fn key_of(key: &str) -> CacheKey {
        CacheKey {
            key: key.to_owned(),
            task: "t".to_owned(),
            component: "c".to_owned(),
            config: "config".to_owned(),
            grants: String::new(),
            secrets: String::new(),
            inputs: None,
            parameters: None,
            validator: "duration_only".to_owned(),
        }
    }

    /// A cache entry of task `t` under `key`, with output `output`, made at `at`, valid for
    /// an hour.
    pub(in crate::store::sqlite) fn entry(
        key: &str,
        output: impl serde::Serialize,
        at: DateTime<Utc>,
    ) -> crate::store::Write {
        crate::store::Write::Cache(Box::new(crate::store::CacheWrite {
            key: key_of(key),
            output: Json::from_value(&serde_json::json!(output)),
            created_at: at,
            expires_at: at + chrono::TimeDelta::hours(1),
            flow_run: crate::ids::FlowRunId::new(),
            task_run: crate::ids::TaskRunId::new(),
        }))
    }

    /// The preload sends the task's valid keys oldest first in chunks, each key once with the
    /// entry a lookup finds: a key cached again comes at the end with its newest entry.
    #[test]
    fn preload_streams_each_valid_key_once_with_the_entry_a_lookup_finds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        let t0: DateTime<Utc> = "2030-01-01T00:00:00Z".parse().expect("time");
        let ms = chrono::TimeDelta::milliseconds;
        let n = PRELOAD_CHUNK * 2 + 10;
        // Expired by `now` below: never sent.
        store.submit(entry("gone", -1, t0 - chrono::TimeDelta::hours(2)));
        // Valid, and a newer entry of its key expired: this one is the key's.
        store.submit(entry("kept", 7, t0 - ms(2)));
        let mut newer = entry("kept", 8, t0 - ms(1));
        if let crate::store::Write::Cache(c) = &mut newer {
            c.expires_at = t0;
        }
        store.submit(newer);
        for i in 0..n {
            store.submit(entry(&format!("k{i}"), i as i64, t0 + ms(i as i64)));
        }
        store.submit(entry("k1", 1000, t0 + ms(n as i64)));
        store.flush().expect("flush");
        let now = t0 + ms(n as i64 + 1);
        let mut chunks = Vec::new();
        store
            .cache_preload("t", now, u64::MAX, &mut |c| {
                chunks.push(c);
                true
            })
            .expect("preload");
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            [PRELOAD_CHUNK, PRELOAD_CHUNK, n + 1 - 2 * PRELOAD_CHUNK]
        );
        let keys: Vec<&str> = chunks
            .iter()
            .flatten()
            .map(|c| c.entry.key.as_str())
            .collect();
        let mut expected = vec!["kept".to_owned()];
        expected.extend((0..n).filter(|&i| i != 1).map(|i| format!("k{i}")));
        expected.push("k1".to_owned());
        assert_eq!(keys, expected);
        for key in ["kept", "k1"] {
            let sent = chunks.iter().flatten().find(|c| c.entry.key == key);
            let found = store.cache_lookup(&key_of(key), now).expect("lookup");
            assert!(
                matches!((&found, sent), (CacheLookup::Hit { entry, output, .. }, Some(c))
                    if entry.task_run == c.entry.task_run && c.value.as_ref() == Some(output)),
                "{key}: sent {sent:?}, found {found:?}"
            );
        }
        // `each` stops it.
        let mut calls = 0;
        store
            .cache_preload("t", now, u64::MAX, &mut |_| {
                calls += 1;
                false
            })
            .expect("preload");
        assert_eq!(calls, 1);
        // Values within the byte budget only, the oldest first.
        let mut sent = Vec::new();
        store
            .cache_preload("t", now, 3, &mut |c| {
                sent.extend(c);
                true
            })
            .expect("preload");
        let valued: Vec<&str> = sent
            .iter()
            .filter(|c| c.value.is_some())
            .map(|c| c.entry.key.as_str())
            .collect();
        assert_eq!(valued, ["kept", "k0", "k2"]);
    }

    /// A cached lookup statement is planned once: used again with other values, it is not
    /// prepared again (without the planner stability guarantee, every use re-prepared it,
    /// and a first run of a 10,000-child cached map spent 2.7 s instead of 0.75 s).
    #[test]
    fn cached_lookup_statements_are_not_prepared_again_for_new_values() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).expect("store");
        let conn = store.read();
        let statements = [
            (LOOKUP_SQL.to_owned(), 2),
            (newest_entry_sql(SAME_CONFIG), 2),
            (newest_entry_sql(SAME_TASK), 1),
            (PRELOAD_SQL.to_owned(), 2),
        ];
        for (sql, params) in &statements {
            for i in 0..5_i64 {
                let mut stmt = conn.prepare_cached(sql).expect("prepare");
                let values: [&dyn rusqlite::ToSql; 2] = [&format!("k{i}"), &i];
                let mut rows = stmt.query(&values[..*params]).expect("query");
                while rows.next().expect("row").is_some() {}
                drop(rows);
                assert_eq!(
                    stmt.get_status(rusqlite::StatementStatus::RePrepare),
                    0,
                    "use {i} of {sql}"
                );
            }
        }
    }
}
