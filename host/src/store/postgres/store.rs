//! `PgStore`: a store in a PostgreSQL schema of its own, with the same meaning as the SQLite
//! store (the store suite holds both to it). Writes go through the shared writer thread
//! ([`crate::store::writer`]): each batch one transaction of a few statements whatever its size
//! (rows as arrays, `unnest`), every write transaction of the schema serialized by an advisory
//! lock so that change numbers and log positions commit in the order they are taken (readers of
//! [`Store::changes`] never skip one). Reads take a connection of the pool each. Liveness is a
//! lease row per run that its holder renews ([`super::liveness`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Object;

use super::{PgDatabase, database_error};
use crate::cache::CacheKey;
use crate::ids::{FlowRunId, TaskRunId};
use crate::json::Json;
use crate::state::State;
use crate::store::writer::{GROUP_WINDOW, Health, Writer};
use crate::store::{
    CacheEntry, CacheLookup, CachedOutput, CancelOutcome, ChangeCursor, Flushing, LogTail,
    RunChanges, RunFilter, RunLease, RunSummary, Store, StoreError, StoredLog, StoredRun,
    TailLimits, Write,
};

/// A store in schema `schema` of a PostgreSQL database. Cheap to clone; clones share the writer
/// and the leases.
#[derive(Clone)]
pub struct PgStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) db: PgDatabase,
    /// The schema's name, as statements write it (`{s}`).
    pub(super) sql: Sql,
    /// Stopped before the database's runtime goes.
    pub(super) writer: Writer,
    /// Who holds this store's leases: host, pid and a nonce, unique to this store.
    pub(super) holder: Arc<str>,
    /// The leases taken through this store (renewed together; a run whose lease this store
    /// still has a row of is not taken again).
    pub(super) leases: super::liveness::Leases,
    /// Renews the leases.
    pub(super) renewal: Option<tokio::task::AbortHandle>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writer.stop();
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.inner.db.name())
            .field("schema", &self.inner.sql.schema)
            .finish_non_exhaustive()
    }
}

/// Statements of one schema: `{s}` in a statement's text is the schema's quoted name.
#[derive(Debug, Clone)]
pub(super) struct Sql {
    pub(super) schema: Arc<str>,
    quoted: Arc<str>,
}

impl Sql {
    pub(super) fn new(schema: &str) -> Sql {
        Sql {
            schema: schema.into(),
            quoted: format!("\"{schema}\"").into(),
        }
    }

    /// `text` with its schema.
    pub(super) fn q(&self, text: &str) -> String {
        text.replace("{s}", &self.quoted)
    }
}

/// What a query can fail with: PostgreSQL's error (named with the database when it reaches the
/// caller), or the store's own (a row that does not read back).
#[derive(Debug)]
pub(super) enum Failure {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Pg(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl Failure {
    pub(super) fn store(self, database: &str) -> StoreError {
        match self {
            Failure::Pg(e) => database_error(database, &e),
            Failure::Store(e) => e,
        }
    }
}

/// Column `i` of `row`, or a store error naming the run (never a panic on a type that does not
/// match).
pub(super) fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
    run: &str,
    row: &'a tokio_postgres::Row,
    i: usize,
) -> Result<T, Failure> {
    row.try_get(i).map_err(|e| {
        Failure::Store(StoreError::Corrupt {
            run: run.to_owned(),
            detail: format!("column {i}: {e}"),
        })
    })
}

/// The database's clock in µs, as lease times are kept (every holder reads the same clock).
pub(super) const NOW_US: &str = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";

impl PgStore {
    /// Open the store in schema `schema` of `db`, bringing it up to date (created when
    /// missing). `schema` follows [`PgDatabase::migrate_store`]'s rule.
    pub fn open(db: &PgDatabase, schema: &str) -> Result<PgStore, StoreError> {
        Self::open_as(db, schema, None)
    }

    /// [`PgStore::open`] for `owner`, a name that stays the same when its process starts again
    /// (a server's, from its home): the leases an earlier process of that owner left are given
    /// up at once, so its runs are dead (and recovered) now rather than when those leases
    /// lapse. Two processes must never run as one owner at once.
    pub fn open_as(
        db: &PgDatabase,
        schema: &str,
        owner: Option<&str>,
    ) -> Result<PgStore, StoreError> {
        db.migrate_store(schema)?;
        let sql = Sql::new(schema);
        let health = Arc::new(Health::new(None));
        let commit = super::commit::PgCommit {
            db: db.clone(),
            sql: sql.clone(),
            client: None,
        };
        let writer = Writer::start("sluice-pg-store", commit, health, GROUP_WINDOW)
            .map_err(|e| StoreError::io("starting the store's writer thread", e))?;
        let holder: Arc<str> = super::liveness::holder_name(owner).into();
        let leases = super::liveness::Leases::default();
        let renewal = super::liveness::renew_leases(db, &sql, holder.clone(), leases.clone());
        let store = PgStore {
            inner: Arc::new(Inner {
                db: db.clone(),
                sql,
                writer,
                holder,
                leases,
                renewal,
            }),
        };
        if let Some(owner) = owner {
            store.give_up_leases_of(owner)?;
        }
        Ok(store)
    }

    /// The database.
    pub fn database(&self) -> &PgDatabase {
        &self.inner.db
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.inner.sql.schema
    }

    /// Run `work` with a connection and this schema's statements; its failure named with the
    /// database.
    pub(super) fn read<T, F>(
        &self,
        work: impl FnOnce(Object, Sql) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, Failure>> + Send + 'static,
        T: Send + 'static,
    {
        let sql = self.inner.sql.clone();
        let name = self.inner.db.name().to_owned();
        self.inner
            .db
            .call(move |client| work(client, sql))?
            .map_err(|f| f.store(&name))
    }
}

/// How long a lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

impl Store for PgStore {
    fn submit(&self, write: Write) {
        self.inner.writer.submit(write);
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.inner.writer.flush()
    }

    fn flush_async(&self) -> Flushing {
        self.inner.writer.flush_async()
    }

    fn write_error(&self) -> Option<StoreError> {
        self.inner.writer.health().error()
    }

    fn queued_write_bytes(&self) -> u64 {
        self.inner.writer.health().queued_bytes()
    }

    fn abandon(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<Option<State>, StoreError> {
        self.inner.writer.abandon(run, now)
    }

    fn lease(&self, run: FlowRunId) -> Result<Box<dyn RunLease>, StoreError> {
        self.lease_impl(run)
    }

    fn is_live(&self, run: FlowRunId) -> bool {
        self.is_live_impl(run)
    }

    fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.writer.health().watch_changes()
    }

    /// The schema's tables with their indexes and TOAST.
    fn stored_bytes(&self) -> Result<u64, StoreError> {
        let schema = self.inner.sql.schema.to_string();
        self.read(move |client, _| async move {
            let row = client
                .query_one(
                    "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relkind = 'r'",
                    &[&schema],
                )
                .await?;
            let bytes: i64 = col(&schema, &row, 0)?;
            Ok(u64::try_from(bytes).unwrap_or(0))
        })
    }

    fn cache_lookup(&self, key: &CacheKey, now: DateTime<Utc>) -> Result<CacheLookup, StoreError> {
        let mut one = self.cache_lookup_many_impl(std::slice::from_ref(key), now)?;
        one.pop()
            .ok_or_else(|| StoreError::io("cache lookup", "no answer for the key"))
    }

    fn cache_lookup_many(
        &self,
        keys: &[CacheKey],
        now: DateTime<Utc>,
    ) -> Result<Vec<CacheLookup>, StoreError> {
        self.cache_lookup_many_impl(keys, now)
    }

    fn cache_preload(
        &self,
        task: &str,
        now: DateTime<Utc>,
        max_bytes: u64,
        each: &mut dyn FnMut(Vec<CachedOutput>) -> bool,
    ) -> Result<(), StoreError> {
        self.cache_preload_impl(task, now, max_bytes, each)
    }

    fn cache_entries(&self, task: Option<&str>) -> Result<Vec<CacheEntry>, StoreError> {
        self.cache_entries_impl(task)
    }

    fn cache_entry(&self, prefix: &str) -> Result<(CacheEntry, Json), StoreError> {
        self.cache_entry_impl(prefix)
    }

    fn clear_cache(
        &self,
        task: Option<&str>,
        expired_before: Option<DateTime<Utc>>,
    ) -> Result<usize, StoreError> {
        self.clear_cache_impl(task, expired_before)
    }

    fn resolve_run(&self, id_or_prefix: &str) -> Result<FlowRunId, StoreError> {
        self.resolve_run_impl(id_or_prefix)
    }

    fn load_run(&self, run: FlowRunId) -> Result<StoredRun, StoreError> {
        self.load_run_impl(run)
    }

    fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>, StoreError> {
        self.list_runs_impl(filter)
    }

    fn child_run(&self, parent: TaskRunId) -> Result<Option<FlowRunId>, StoreError> {
        self.child_run_impl(parent)
    }

    fn logs(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.logs_impl(run, task, after, limit)
    }

    fn task_run_logs(
        &self,
        run: FlowRunId,
        task_run: TaskRunId,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredLog>, StoreError> {
        self.task_run_logs_impl(run, task_run, after, limit)
    }

    fn newest_log_seq(&self, run: FlowRunId) -> Result<i64, StoreError> {
        self.newest_log_seq_impl(run)
    }

    fn changes(
        &self,
        run: FlowRunId,
        task: Option<&str>,
        after: ChangeCursor,
    ) -> Result<RunChanges, StoreError> {
        self.changes_impl(run, task, after)
    }

    fn log_cost(&self, run: FlowRunId) -> Result<u64, StoreError> {
        self.log_cost_impl(run)
    }

    fn task_names(&self, run: FlowRunId) -> Result<Vec<String>, StoreError> {
        self.task_names_impl(run)
    }

    fn log_tails(
        &self,
        run: FlowRunId,
        limits: &TailLimits,
    ) -> Result<HashMap<TaskRunId, LogTail>, StoreError> {
        self.log_tails_impl(run, limits)
    }

    fn recover_dead(&self, now: DateTime<Utc>) -> Result<Vec<FlowRunId>, StoreError> {
        self.recover_dead_impl(now)
    }

    fn cancel(&self, run: FlowRunId, now: DateTime<Utc>) -> Result<CancelOutcome, StoreError> {
        self.cancel_impl(run, now)
    }

    fn cancel_requested(&self, run: FlowRunId) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.cancel_requested_impl(run)
    }
}
