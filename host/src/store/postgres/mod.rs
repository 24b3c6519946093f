//! Sluice's PostgreSQL database (`sluice server --database postgres://…`): connecting (the
//! address named in every error, never its password), each store's schema brought up to date
//! ([`schema`]: a store is a PostgreSQL schema of its own), and the runtime of the database's
//! own that drives its connections, so callers without one (the CLI, a blocking thread of the
//! server) wait on its answers as on SQLite's.

mod queue;
mod schema;

pub use queue::{Claimed, Lapsed, Lease, NewAttempt, PgQueue, Wakeups};

use std::sync::Arc;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use super::StoreError;
use schema::Migrated;

/// How long connecting waits for the server when the address does not say
/// (`connect_timeout`).
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection to a PostgreSQL database holding Sluice's stores. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PgDatabase {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Drives the connections; its own, so no caller needs a runtime (or blocks one).
    runtime: Option<tokio::runtime::Runtime>,
    /// The shared client; replaced by a new connection when found closed (the server
    /// restarted, the link broke).
    client: Arc<std::sync::Mutex<Arc<Client>>>,
    /// The database as errors name it: `postgres://user@host:port/name`, no password.
    name: String,
    /// Where it is, for connections of their own (migrations).
    config: Config,
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("starting the PostgreSQL client's runtime", e))?;
        // Spawned, not `block_on`: the caller may be in an async context of its own.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (for_connect, for_name) = (config.clone(), name.clone());
        runtime.spawn(async move {
            let _ = tx.send(connect(&for_connect, &for_name).await);
        });
        let connected = rx.recv().unwrap_or_else(|_| {
            Err(StoreError::io(
                "connecting to PostgreSQL",
                "the client's runtime stopped",
            ))
        });
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                // Not dropped in place: the caller may be async, where that panics.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        Ok(PgDatabase {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                client: Arc::new(std::sync::Mutex::new(Arc::new(client))),
                name,
                config,
            }),
        })
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

    /// Run `work` with the shared client on the database's runtime and wait for its answer:
    /// from any thread but the runtime's own (an async caller does so from a blocking thread,
    /// as with any store read). A client found closed is replaced by a new connection first: a
    /// call that failed because the server went away (retriable) is followed by one that
    /// reconnects.
    fn call<T, F>(
        &self,
        work: impl FnOnce(Arc<Client>) -> F + Send + 'static,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let Some(rt) = &self.inner.runtime else {
            return Err(StoreError::io("a PostgreSQL query", "the store is closing"));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let shared = self.inner.client.clone();
        let (config, name) = (self.inner.config.clone(), self.inner.name.clone());
        rt.spawn(async move {
            let current = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let client = if current.is_closed() {
                match connect(&config, &name).await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *shared.lock().unwrap_or_else(|p| p.into_inner()) = c.clone();
                        c
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            } else {
                current
            };
            let _ = tx.send(Ok(work(client).await));
        });
        rx.recv()
            .map_err(|_| StoreError::io("a PostgreSQL query", "the store's runtime stopped"))?
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
/// back (the connection failed or was closed), not when it answered with an error.
fn database_error(name: &str, e: &tokio_postgres::Error) -> StoreError {
    let (detail, retriable) = match e.as_db_error() {
        Some(db) => (
            format!("{} ({}: {})", db.message(), db.severity(), db.code().code()),
            false,
        ),
        None => {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                detail = format!("{detail}: {s}");
                source = s.source();
            }
            (detail, true)
        }
    };
    StoreError::Database {
        database: name.to_owned(),
        detail,
        retriable,
    }
}
