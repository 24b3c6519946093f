//! Sluice's PostgreSQL database (`sluice server --database postgres://…`): connecting (the
//! address named in every error, never its password), its pool of connections (a closed one
//! replaced on the next call: a restarted PostgreSQL is connected to again), each store's schema
//! brought up to date ([`schema`]: a store is a PostgreSQL schema of its own), and the runtime of
//! the database's own that drives its connections, so callers without one (the CLI, a blocking
//! thread of the server, a store's writer thread) wait on its answers as on SQLite's.

mod cache;
mod commit;
mod liveness;
mod queue;
mod read;
mod registry;
mod schema;
mod store;

pub use liveness::RENEW_EVERY;
pub use queue::{Claimed, Lapsed, Lease, NewAttempt, PgQueue, Wakeups};
pub use registry::{PgRegistry, TenantRow, TokenKind, WorkerRow};
pub use store::{LEASE_TTL, PgStore};

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use super::StoreError;
use schema::Migrated;

/// How long connecting waits for the server when the address does not say
/// (`connect_timeout`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections one [`PgDatabase`] opens (its store's writer, readers, the queue).
pub const POOL_SIZE: usize = 16;

/// Most statements a connection keeps prepared (`prepare_cached`: each parsed once, and
/// planned once it has run a few times); past this its cache is emptied. Statements name their
/// store's schema, so a server of many tenants prepares many.
const MAX_PREPARED: usize = 512;

/// How long a call waits for a free connection of the pool before it fails (retriable).
const POOL_WAIT: Duration = Duration::from_secs(30);

/// How long a store's writer retries a commit while the database is unreachable, by default:
/// a restart of PostgreSQL (seconds) passes unnoticed by runs; a longer outage stops them, their
/// writes held until a flush commits them.
pub const OUTAGE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// A connection to a PostgreSQL database holding Sluice's stores. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Drives the connections; its own, so no caller needs a runtime (or blocks one).
    runtime: Option<tokio::runtime::Runtime>,
    /// The connections; one found closed (the server restarted, the link broke) is replaced
    /// by a new one when next taken.
    pool: Pool,
    /// The database as errors name it: `postgres://user@host:port/name`, no password.
    name: String,
    /// Where it is, for connections of their own (migrations).
    config: Config,
    /// How long a store's writer retries a commit while the database is unreachable, in ms
    /// ([`PgDatabase::set_outage_patience`]).
    patience_ms: std::sync::atomic::AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // May be dropped from async code: the connection's task is abandoned, not awaited.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl PgDatabase {
    /// Connect to the database at `url` (`postgres://user[:password]@host[:port]/name`, or the
    /// `key=value` form; a `host` that is a directory is a Unix socket's).
    pub fn connect(url: &str) -> Result<PgDatabase, StoreError> {
        let mut config: Config = url.parse().map_err(|e| StoreError::Database {
            database: "the --database address".into(),
            detail: format!("it is not a PostgreSQL address: {e}"),
            retriable: false,
        })?;
        let name = display_name(&config);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A peer gone without closing (a half-open TCP connection) is found within about 30 s
        // rather than never: the call on it fails (retriable) and the pool replaces it.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(15))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(30));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("starting the PostgreSQL client's runtime", e))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = {
            // Building the pool takes the runtime its timeouts run on.
            let _entered = runtime.enter();
            Pool::builder(manager)
                .max_size(POOL_SIZE)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .wait_timeout(Some(POOL_WAIT))
                .create_timeout(config.get_connect_timeout().copied())
                .recycle_timeout(Some(CONNECT_TIMEOUT))
                .build()
                .map_err(|e| StoreError::io("making the PostgreSQL connection pool", e))?
        };
        let db = PgDatabase {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                pool,
                name,
                config,
                patience_ms: std::sync::atomic::AtomicU64::new(
                    u64::try_from(OUTAGE_PATIENCE.as_millis()).unwrap_or(u64::MAX),
                ),
            }),
        };
        // Connect once now: a wrong address or a server that is down is reported here.
        db.call(|_| async {})?;
        Ok(db)
    }

    /// Bring store schema `schema` up to date (created when missing); its version (how many
    /// migrations are applied). Refused, untouched, when a newer Sluice migrated it. `schema`
    /// is 1 to 63 lowercase letters, digits and `_`, starting with a letter, and the store's alone
    /// (not `sluice`, the control schema, nor `public`, `information_schema` or `pg_…`).
    pub fn migrate_store(&self, schema: &str) -> Result<i64, StoreError> {
        if !schema::valid_schema_name(schema) {
            return Err(StoreError::Database {
                database: self.inner.name.clone(),
                detail: format!(
                    "`{schema}` cannot name a store's schema (1 to 63 lowercase letters, digits and `_`, starting with a letter, not `sluice`, `public`, `information_schema` or `pg_…`)"
                ),
                retriable: false,
            });
        }
        self.migrate(schema, schema::STORE_MIGRATIONS)
    }

    /// Bring `schema` up to date with `migrations`; its version.
    fn migrate(
        &self,
        schema: &str,
        migrations: &'static [&'static str],
    ) -> Result<i64, StoreError> {
        let (config, name, schema) = (
            self.inner.config.clone(),
            self.inner.name.clone(),
            schema.to_owned(),
        );
        // A connection of its own: a transaction on the shared client would take in other
        // callers' statements.
        self.call(move |_| async move {
            let mut client = connect(&config, &name).await?;
            match schema::migrate(&mut client, &schema, migrations).await {
                Ok(Migrated::Current(v)) => Ok(i64::from(v)),
                Ok(Migrated::TooNew { found, known }) => Err(StoreError::TooNew {
                    path: format!("{name} (schema {schema})").into(),
                    found: found.into(),
                    supported: known.into(),
                }),
                Err(e) => Err(database_error(&name, &e)),
            }
        })?
    }

    /// How long the writers of this database's stores retry a commit while it is unreachable
    /// (restarting, the link broken) before they hold their writes and the runs stop. Default:
    /// [`OUTAGE_PATIENCE`]; zero holds them at the first failure.
    pub fn set_outage_patience(&self, patience: std::time::Duration) {
        self.inner.patience_ms.store(
            u64::try_from(patience.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// [`PgDatabase::set_outage_patience`].
    pub fn outage_patience(&self) -> std::time::Duration {
        std::time::Duration::from_millis(
            self.inner
                .patience_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// The database as errors name it (`postgres://user@host:port/name`, without a password).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The tables of store schema `schema`, by name.
    pub fn tables(&self, schema: &str) -> Result<Vec<String>, StoreError> {
        let schema = schema.to_owned();
        let rows = self.call(|client| async move {
            client
                .query(
                    "SELECT tablename::text FROM pg_tables WHERE schemaname = $1 ORDER BY 1",
                    &[&schema],
                )
                .await
        })?;
        let rows = rows.map_err(|e| database_error(&self.inner.name, &e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Run `work` with a connection of the pool on the database's runtime and wait for its
    /// answer: from any thread but the runtime's own (an async caller does so from a blocking
    /// thread, as with any store read). A connection found closed is replaced by a new one
    /// first: a call that failed because the server went away (retriable) is followed by one
    /// that reconnects.
    fn call<T, F>(&self, work: impl FnOnce(Object) -> F + Send + 'static) -> Result<T, StoreError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(rt) = &self.inner.runtime else {
            return Err(StoreError::io("a PostgreSQL query", "the store is closing"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (pool, name) = (self.inner.pool.clone(), self.inner.name.clone());
        rt.spawn(async move {
            let _ = tx.send(match pool.get().await {
                Ok(client) => Ok(work(bounded(client)).await),
                Err(e) => Err(pool_error(&name, e)),
            });
        });
        rx.recv()
            .map_err(|_| StoreError::io("a PostgreSQL query", "the store's runtime stopped"))?
    }

    /// [`PgDatabase::call`] of `work`, whose PostgreSQL error names the database.
    fn run<T, F>(&self, work: impl FnOnce(Object) -> F + Send + 'static) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, tokio_postgres::Error>> + Send + 'static,
        T: Send + 'static,
    {
        let name = self.inner.name.clone();
        self.call(work)?.map_err(|e| database_error(&name, &e))
    }

    /// Run `work` on the database's runtime without waiting for it (a lease given back as it is
    /// dropped, perhaps in async code).
    fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.inner.runtime {
            rt.spawn(work);
        }
    }

    /// Wait for `work`, which may borrow the caller's data, on this thread, its I/O driven by
    /// the database's runtime. Only from a thread of its own outside any runtime (a store's
    /// writer thread): anywhere else, [`PgDatabase::call`].
    fn block_on<T>(&self, work: impl Future<Output = T>) -> Result<T, StoreError> {
        match &self.inner.runtime {
            Some(rt) => Ok(rt.block_on(work)),
            None => Err(StoreError::io("a PostgreSQL query", "the store is closing")),
        }
    }

    /// A connection of the pool, for [`PgDatabase::block_on`].
    async fn client(&self) -> Result<Object, StoreError> {
        self.inner
            .pool
            .get()
            .await
            .map(bounded)
            .map_err(|e| pool_error(&self.inner.name, e))
    }
}

/// `client`, its prepared statements at most [`MAX_PREPARED`].
fn bounded(client: Object) -> Object {
    if client.statement_cache.size() > MAX_PREPARED {
        client.statement_cache.clear();
    }
    client
}

/// The pool's error as a store error naming the database: retriable unless PostgreSQL answered
/// with an error.
fn pool_error(name: &str, e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => database_error(name, &e),
        other => StoreError::Database {
            database: name.to_owned(),
            detail: match other {
                PoolError::Timeout(_) => format!(
                    "no connection within {}s ({other}): the database is unreachable or all {POOL_SIZE} connections are busy",
                    POOL_WAIT.as_secs()
                ),
                _ => other.to_string(),
            },
            retriable: true,
        },
    }
}

/// Connect, and start the connection's task.
async fn connect(config: &Config, name: &str) -> Result<Client, StoreError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| database_error(name, &e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!("PostgreSQL connection ended: {e}");
        }
    });
    Ok(client)
}

/// `postgres://user@host:port/name` (Unix sockets: their directory as the host); never the
/// password.
fn display_name(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    let at = if user.is_empty() { "" } else { "@" };
    format!("postgres://{user}{at}{host}:{port}/{db}")
}

/// A PostgreSQL error as a store error naming the database: retriable when the server may come
/// back or the statement may succeed next time (the connection failed, was closed or timed out;
/// PostgreSQL shutting down or starting, out of connections or resources, a serialization
/// failure or a deadlock), not when it refused the statement itself.
fn database_error(name: &str, e: &tokio_postgres::Error) -> StoreError {
    let (detail, retriable) = match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let retriable = code.starts_with("08")
                || code.starts_with("53")
                || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
            (
                format!("{} ({}: {code})", db.message(), db.severity()),
                retriable,
            )
        }
        None => {
            let mut detail = e.to_string();
            // The client's own kinds: only a connection's troubles pass.
            let retriable = e.is_closed()
                || ["error communicating", "error connecting", "timeout waiting"]
                    .iter()
                    .any(|k| detail.starts_with(k));
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                detail = format!("{detail}: {s}");
                source = s.source();
            }
            (detail, retriable)
        }
    };
    StoreError::Database {
        database: name.to_owned(),
        detail,
        retriable,
    }
}
