//! The server's tenants: who may call the API. Each tenant has a name, an id (which names its
//! directory under the home) and a bearer token. Operators (`sluice operator`) have a name and
//! a token too: they sign in to the web UI and see every tenant. Tokens are random (256 bits), shown once when
//! made, and stored only as their blake3 hash, so reading `server.db` gives no token. The
//! registry is `<home>/server.db` (SQLite), or, for a server on PostgreSQL, the table
//! `sluice.tenants` of its database; `sluice tenant` edits it while the server runs, and the
//! server reads it on every request, so a removed tenant's token stops working at once.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::ids::TenantId;
use crate::store::{PgDatabase, PgRegistry, TokenKind};

/// Why the tenant registry could not do something.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// The registry could not be opened or written.
    #[error("tenant registry {}: {detail}", path.display())]
    Registry {
        /// `server.db`, or the PostgreSQL database (without its password).
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// A name that is not allowed.
    #[error(
        "tenant name `{0}` is not allowed: use 1 to 64 lowercase letters, digits, `-` and `_`, \
         starting with a letter or digit"
    )]
    BadName(String),
    /// A tenant of that name exists.
    #[error("tenant `{0}` already exists")]
    Exists(String),
    /// No tenant of that name.
    #[error("no tenant `{0}`")]
    Unknown(String),
    /// An operator name that is not allowed.
    #[error(
        "operator name `{0}` is not allowed: use 1 to 64 lowercase letters, digits, `-` and `_`, \
         starting with a letter or digit"
    )]
    BadOperatorName(String),
    /// An operator of that name exists.
    #[error("operator `{0}` already exists")]
    OperatorExists(String),
    /// No operator of that name.
    #[error("no operator `{0}`")]
    UnknownOperator(String),
    /// A grant ceiling that is not a valid policy.
    #[error("grant ceiling: {0}")]
    Ceiling(String),
}

/// One tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    /// Its id: its directory is `<home>/tenants/<id>`.
    pub id: TenantId,
    /// Its name.
    pub name: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
    /// Its share of the run slots against other busy tenants (≥ 1; default 1).
    pub weight: u32,
    /// Its quotas.
    pub quotas: Quotas,
    /// Its grant ceiling: a policy file's text (the format of `--policy`), checked besides the
    /// server's policy. `None`: the server's policy alone.
    pub grants: Option<String>,
}

/// A tenant's quotas. `None` is unlimited (the default of each). Each is named, when hit, by
/// its field name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Task runs running at once (more wait in the queue).
    pub max_running_tasks: Option<u64>,
    /// Task runs waiting in the queue: a run whose tasks would take it over is refused.
    pub max_queued_tasks: Option<u64>,
    /// Flow runs started in any 60 s: one more is refused.
    pub runs_per_minute: Option<u64>,
    /// Fuel used by task runs that ended in the last 60 s: while at it, task runs wait.
    pub fuel_per_minute: Option<u64>,
    /// The most fuel one task run may be given: a manifest giving more (or leaving fuel
    /// unlimited) is refused.
    pub max_task_fuel: Option<u64>,
    /// The most memory one task run may be given, in bytes.
    pub max_task_memory: Option<u64>,
    /// The longest deadline one task run may be given, in milliseconds.
    pub max_task_timeout_ms: Option<u64>,
    /// Bytes stored for the tenant (its components and its run store): uploads and runs are
    /// refused while it is over, and an upload that would take it over.
    pub max_stored_bytes: Option<u64>,
}

/// An operator: signs in to the web UI with its token and sees every tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// Its name.
    pub name: String,
    /// When it was added.
    pub created_at: DateTime<Utc>,
}

/// The tenant registry of a server home, or of its PostgreSQL database.
#[derive(Debug)]
pub struct Tenants {
    /// `server.db`, or the database's name: what errors name.
    path: PathBuf,
    registry: Registry,
}

#[derive(Debug)]
enum Registry {
    Sqlite(Mutex<Connection>),
    Postgres(PgRegistry),
}

/// The schema of `server.db`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    weight INTEGER NOT NULL DEFAULT 1,
    quotas TEXT NOT NULL DEFAULT '{}',
    grants TEXT
);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
";

/// The columns every query reads, in [`Tenants::tenant`]'s order.
const COLUMNS: &str = "id, name, created_at, weight, quotas, grants";

type Row = (String, String, String, u32, String, Option<String>);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

impl Tenants {
    /// Open (creating) the registry of `home`.
    pub fn open(home: &Path) -> Result<Tenants, TenantError> {
        let path = home.join("server.db");
        let err = |e: &dyn std::fmt::Display| TenantError::Registry {
            path: path.clone(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(home).map_err(|e| err(&e))?;
        let conn = Connection::open(&path).map_err(|e| err(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| err(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| err(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| err(&e))?;
        // A registry from before quotas: add their columns.
        let has_weight: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('tenants') WHERE name = 'weight'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| err(&e))?
            > 0;
        if !has_weight {
            conn.execute_batch(
                "ALTER TABLE tenants ADD COLUMN weight INTEGER NOT NULL DEFAULT 1;
                 ALTER TABLE tenants ADD COLUMN quotas TEXT NOT NULL DEFAULT '{}';
                 ALTER TABLE tenants ADD COLUMN grants TEXT;",
            )
            .map_err(|e| err(&e))?;
        }
        Ok(Tenants {
            path,
            registry: Registry::Sqlite(Mutex::new(conn)),
        })
    }

    /// The registry of the PostgreSQL database `db` (`sluice.tenants`).
    pub fn open_database(db: &PgDatabase) -> Result<Tenants, TenantError> {
        let path = PathBuf::from(db.name());
        let registry = db.registry().map_err(|e| TenantError::Registry {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        Ok(Tenants {
            path,
            registry: Registry::Postgres(registry),
        })
    }

    /// A row of the PostgreSQL registry as the SQLite registry reads it.
    fn pg_row((id, name, created, weight, quotas, grants): crate::store::TenantRow) -> Row {
        let weight = u32::try_from(weight).unwrap_or(1);
        (id, name, created, weight, quotas, grants)
    }

    fn err(&self, e: &dyn std::fmt::Display) -> TenantError {
        TenantError::Registry {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// The SQLite registry's connection, or the PostgreSQL registry.
    fn sqlite(&self) -> Result<std::sync::MutexGuard<'_, Connection>, &PgRegistry> {
        match &self.registry {
            // A panic while holding it cannot leave the connection half-changed: every
            // statement is its own transaction.
            Registry::Sqlite(conn) => Ok(conn.lock().unwrap_or_else(|p| p.into_inner())),
            Registry::Postgres(pg) => Err(pg),
        }
    }

    /// Add a tenant named `name`; returns it and its token (shown only now).
    pub fn add(&self, name: &str, now: DateTime<Utc>) -> Result<(Tenant, String), TenantError> {
        check_name(name)?;
        let tenant = Tenant {
            id: TenantId::new(),
            name: name.to_owned(),
            created_at: now,
            weight: 1,
            quotas: Quotas::default(),
            grants: None,
        };
        let token = new_token().map_err(|e| self.err(&e))?;
        let (id, hash, created) = (tenant.id.to_string(), token_hash(&token), now.to_rfc3339());
        let inserted = match self.sqlite() {
            Ok(conn) => conn
                .execute(
                    "INSERT INTO tenants (id, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (name) DO NOTHING",
                    params![id, name, hash, created],
                )
                .map(|n| n == 1)
                .map_err(|e| self.err(&e)),
            Err(pg) => pg
                .add_tenant(&id, name, &hash, &created)
                .map_err(|e| self.err(&e)),
        };
        match inserted? {
            false => Err(TenantError::Exists(name.to_owned())),
            true => Ok((tenant, token)),
        }
    }

    /// Every tenant, by name.
    pub fn list(&self) -> Result<Vec<Tenant>, TenantError> {
        let rows: Vec<Row> = match self.sqlite() {
            Ok(conn) => conn
                .prepare(&format!("SELECT {COLUMNS} FROM tenants ORDER BY name"))
                .and_then(|mut stmt| stmt.query_map([], row)?.collect())
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg
                .tenants()
                .map_err(|e| self.err(&e))?
                .into_iter()
                .map(Self::pg_row)
                .collect(),
        };
        rows.into_iter().map(|r| self.tenant(r)).collect()
    }

    fn tenant(
        &self,
        (id, name, created, weight, quotas, grants): Row,
    ) -> Result<Tenant, TenantError> {
        Ok(Tenant {
            weight: weight.max(1),
            quotas: serde_json::from_str(&quotas)
                .map_err(|e| self.err(&format!("tenant `{name}` has bad quotas: {e}")))?,
            grants,
            id: id
                .parse()
                .map_err(|e| self.err(&format!("tenant `{name}` has a bad id `{id}`: {e}")))?,
            created_at: DateTime::parse_from_rfc3339(&created)
                .map_err(|e| self.err(&format!("tenant `{name}` has a bad time: {e}")))?
                .with_timezone(&Utc),
            name,
        })
    }

    /// The tenant named `name`.
    pub fn get(&self, name: &str) -> Result<Tenant, TenantError> {
        let row = match self.sqlite() {
            Ok(conn) => conn
                .query_row(
                    &format!("SELECT {COLUMNS} FROM tenants WHERE name = ?1"),
                    [name],
                    row,
                )
                .optional()
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg.tenant(name).map_err(|e| self.err(&e))?.map(Self::pg_row),
        };
        match row {
            Some(row) => self.tenant(row),
            None => Err(TenantError::Unknown(name.to_owned())),
        }
    }

    /// Change the tenant named `name`: its weight, quotas and grant ceiling become those of
    /// `change(current)`. A running server applies them from the tenant's next request.
    pub fn update(
        &self,
        name: &str,
        change: impl FnOnce(&mut Tenant) -> Result<(), TenantError>,
    ) -> Result<Tenant, TenantError> {
        let mut tenant = self.get(name)?;
        change(&mut tenant)?;
        let quotas = serde_json::to_string(&tenant.quotas).map_err(|e| self.err(&e))?;
        let weight = tenant.weight.max(1);
        let updated = match self.sqlite() {
            Ok(conn) => conn
                .execute(
                    "UPDATE tenants SET weight = ?2, quotas = ?3, grants = ?4 WHERE name = ?1",
                    params![name, weight, quotas, tenant.grants],
                )
                .map(|n| n == 1)
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg
                .update_tenant(
                    name,
                    i32::try_from(weight).unwrap_or(i32::MAX),
                    &quotas,
                    tenant.grants.as_deref(),
                )
                .map_err(|e| self.err(&e))?,
        };
        match updated {
            true => Ok(tenant),
            // Removed meanwhile.
            false => Err(TenantError::Unknown(name.to_owned())),
        }
    }

    /// Remove the tenant named `name`: its token stops working. Its data is left in its
    /// directory.
    pub fn remove(&self, name: &str) -> Result<Tenant, TenantError> {
        let tenant = self.get(name)?;
        match self.sqlite() {
            Ok(conn) => conn
                .execute("DELETE FROM tenants WHERE name = ?1", [name])
                .map(drop)
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg.remove_tenant(name).map(drop).map_err(|e| self.err(&e))?,
        }
        Ok(tenant)
    }

    /// The tenant whose token is `token`, if any.
    pub fn authenticate(&self, token: &str) -> Result<Option<Tenant>, TenantError> {
        let row = match self.sqlite() {
            Ok(conn) => conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM tenants WHERE token_hash = ?1"
                ))
                .and_then(|mut s| s.query_row([token_hash(token)], row).optional())
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg
                .tenant_by_token(&token_hash(token))
                .map_err(|e| self.err(&e))?
                .map(Self::pg_row),
        };
        row.map(|row| self.tenant(row)).transpose()
    }
}

impl Tenants {
    /// Add an operator named `name`; returns it and its token (shown only now).
    pub fn add_operator(
        &self,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<(Operator, String), TenantError> {
        if !valid_name(name) {
            return Err(TenantError::BadOperatorName(name.to_owned()));
        }
        let token = new_token().map_err(|e| self.err(&e))?;
        let (hash, created) = (token_hash(&token), now.to_rfc3339());
        let inserted = match self.sqlite() {
            Ok(conn) => conn
                .execute(
                    "INSERT INTO operators (name, token_hash, created_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (name) DO NOTHING",
                    params![name, hash, created],
                )
                .map(|n| n == 1)
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg
                .add_token(TokenKind::Operator, name, &hash, &created)
                .map_err(|e| self.err(&e))?,
        };
        match inserted {
            false => Err(TenantError::OperatorExists(name.to_owned())),
            true => Ok((
                Operator {
                    name: name.to_owned(),
                    created_at: now,
                },
                token,
            )),
        }
    }

    /// Every operator, by name.
    pub fn operators(&self) -> Result<Vec<Operator>, TenantError> {
        let rows: Vec<(String, String)> = match self.sqlite() {
            Ok(conn) => conn
                .prepare("SELECT name, created_at FROM operators ORDER BY name")
                .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg.tokens(TokenKind::Operator).map_err(|e| self.err(&e))?,
        };
        rows.into_iter()
            .map(|(name, created)| {
                let created_at = DateTime::parse_from_rfc3339(&created)
                    .map_err(|e| self.err(&format!("operator `{name}` has a bad time: {e}")))?
                    .with_timezone(&Utc);
                Ok(Operator { name, created_at })
            })
            .collect()
    }

    /// Remove the operator named `name`: its token stops working at once.
    pub fn remove_operator(&self, name: &str) -> Result<(), TenantError> {
        let removed = match self.sqlite() {
            Ok(conn) => conn
                .execute("DELETE FROM operators WHERE name = ?1", [name])
                .map(|n| n == 1)
                .map_err(|e| self.err(&e))?,
            Err(pg) => pg
                .remove_token(TokenKind::Operator, name)
                .map_err(|e| self.err(&e))?,
        };
        match removed {
            true => Ok(()),
            false => Err(TenantError::UnknownOperator(name.to_owned())),
        }
    }

    /// The name of the operator whose token is `token`, if any.
    pub fn authenticate_operator(&self, token: &str) -> Result<Option<String>, TenantError> {
        match self.sqlite() {
            Ok(conn) => conn
                .prepare_cached("SELECT name FROM operators WHERE token_hash = ?1")
                .and_then(|mut s| s.query_row([token_hash(token)], |r| r.get(0)).optional())
                .map_err(|e| self.err(&e)),
            Err(pg) => pg
                .token_name(TokenKind::Operator, &token_hash(token))
                .map_err(|e| self.err(&e)),
        }
    }
}

fn check_name(name: &str) -> Result<(), TenantError> {
    match valid_name(name) {
        true => Ok(()),
        false => Err(TenantError::BadName(name.to_owned())),
    }
}

/// Whether `name` may name a tenant (or a worker token): 1 to 64 lowercase letters, digits,
/// `-` and `_`, starting with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A new token: `sluice_` and 256 random bits in hex.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    let mut token = String::from("sluice_");
    for b in bytes {
        token.push_str(&format!("{b:02x}"));
    }
    Ok(token)
}

/// What the registry keeps of a token. Tokens are 256 random bits, so a fast hash is enough:
/// nothing can be guessed from it.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}
