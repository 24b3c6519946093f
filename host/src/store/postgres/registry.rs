//! The registries a server and its admin commands share in the control schema: tenants (as a
//! server home's `server.db` holds them, so `sluice tenant --database` on any machine edits
//! what the server reads on every request), worker tokens and operator tokens. Rows only: what
//! they mean (names allowed, tokens made and hashed) is the server's.

use super::{PgDatabase, schema};
use crate::store::StoreError;

/// A tenant's row: id, name, creation time (RFC 3339), weight, quotas (JSON), grant ceiling.
pub type TenantRow = (String, String, String, i32, String, Option<String>);

/// A worker or operator token's row: name and creation time (RFC 3339).
pub type WorkerRow = (String, String);

/// Which named tokens: the table holding them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// `sluice worker` processes' (`sluice.worker_tokens`).
    Worker,
    /// The web UI's operators' (`sluice.operator_tokens`).
    Operator,
}

impl TokenKind {
    fn table(self) -> &'static str {
        match self {
            TokenKind::Worker => "sluice.worker_tokens",
            TokenKind::Operator => "sluice.operator_tokens",
        }
    }
}

/// The control schema's registries of one database.
#[derive(Debug, Clone)]
pub struct PgRegistry {
    db: PgDatabase,
}

const TENANT_COLUMNS: &str = "id, name, created_at, weight, quotas, grants";

fn tenant(r: &tokio_postgres::Row) -> Result<TenantRow, tokio_postgres::Error> {
    Ok((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        r.try_get(5)?,
    ))
}

impl PgDatabase {
    /// The registries, the control schema brought up to date first.
    pub fn registry(&self) -> Result<PgRegistry, StoreError> {
        self.migrate(schema::CONTROL, schema::CONTROL_MIGRATIONS)?;
        Ok(PgRegistry { db: self.clone() })
    }
}

impl PgRegistry {
    /// The database, as errors name it.
    pub fn name(&self) -> &str {
        self.db.name()
    }

    /// Add a tenant; false when one of that name exists.
    pub fn add_tenant(
        &self,
        id: &str,
        name: &str,
        token_hash: &str,
        created_at: &str,
    ) -> Result<bool, StoreError> {
        let row = [id, name, token_hash, created_at].map(str::to_owned);
        self.db.run(move |c| async move {
            let n = c
                .execute(
                    "INSERT INTO sluice.tenants (id, name, token_hash, created_at)
                     VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING",
                    &[&row[0], &row[1], &row[2], &row[3]],
                )
                .await?;
            Ok(n == 1)
        })
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<TenantRow>, StoreError> {
        self.db.run(|c| async move {
            c.query(
                &format!("SELECT {TENANT_COLUMNS} FROM sluice.tenants ORDER BY name"),
                &[],
            )
            .await?
            .iter()
            .map(tenant)
            .collect()
        })
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Result<Option<TenantRow>, StoreError> {
        let name = name.to_owned();
        self.db.run(move |c| async move {
            c.query_opt(
                &format!("SELECT {TENANT_COLUMNS} FROM sluice.tenants WHERE name = $1"),
                &[&name],
            )
            .await?
            .as_ref()
            .map(tenant)
            .transpose()
        })
    }

    /// The tenant whose token hashes to `token_hash`.
    pub fn tenant_by_token(&self, token_hash: &str) -> Result<Option<TenantRow>, StoreError> {
        let hash = token_hash.to_owned();
        self.db.run(move |c| async move {
            let statement = c
                .prepare_cached(&format!(
                    "SELECT {TENANT_COLUMNS} FROM sluice.tenants WHERE token_hash = $1"
                ))
                .await?;
            c.query_opt(&statement, &[&hash])
                .await?
                .as_ref()
                .map(tenant)
                .transpose()
        })
    }

    /// Set a tenant's weight, quotas (JSON) and grant ceiling; false when there is none.
    pub fn update_tenant(
        &self,
        name: &str,
        weight: i32,
        quotas: &str,
        grants: Option<&str>,
    ) -> Result<bool, StoreError> {
        let (name, quotas, grants) = (
            name.to_owned(),
            quotas.to_owned(),
            grants.map(str::to_owned),
        );
        self.db.run(move |c| async move {
            let n = c
                .execute(
                    "UPDATE sluice.tenants SET weight = $2, quotas = $3, grants = $4
                     WHERE name = $1",
                    &[&name, &weight, &quotas, &grants],
                )
                .await?;
            Ok(n == 1)
        })
    }

    /// Remove the tenant named `name`; false when there is none.
    pub fn remove_tenant(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.db.run(move |c| async move {
            let n = c
                .execute("DELETE FROM sluice.tenants WHERE name = $1", &[&name])
                .await?;
            Ok(n == 1)
        })
    }

    /// Add a worker token; false when one of that name exists.
    pub fn add_worker(
        &self,
        name: &str,
        token_hash: &str,
        created_at: &str,
    ) -> Result<bool, StoreError> {
        self.add_token(TokenKind::Worker, name, token_hash, created_at)
    }

    /// Every worker token's name and creation time, by name.
    pub fn workers(&self) -> Result<Vec<WorkerRow>, StoreError> {
        self.tokens(TokenKind::Worker)
    }

    /// The name of the worker whose token hashes to `token_hash`.
    pub fn worker_by_token(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        self.token_name(TokenKind::Worker, token_hash)
    }

    /// Remove the worker token `name`; false when there is none.
    pub fn remove_worker(&self, name: &str) -> Result<bool, StoreError> {
        self.remove_token(TokenKind::Worker, name)
    }

    /// Add a named token of `kind`; false when one of that name exists.
    pub fn add_token(
        &self,
        kind: TokenKind,
        name: &str,
        token_hash: &str,
        created_at: &str,
    ) -> Result<bool, StoreError> {
        let row = [name, token_hash, created_at].map(str::to_owned);
        self.db.run(move |c| async move {
            let n = c
                .execute(
                    &format!(
                        "INSERT INTO {} (name, token_hash, created_at)
                         VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                        kind.table()
                    ),
                    &[&row[0], &row[1], &row[2]],
                )
                .await?;
            Ok(n == 1)
        })
    }

    /// Every token of `kind`: name and creation time, by name.
    pub fn tokens(&self, kind: TokenKind) -> Result<Vec<WorkerRow>, StoreError> {
        self.db.run(move |c| async move {
            c.query(
                &format!(
                    "SELECT name, created_at FROM {} ORDER BY name",
                    kind.table()
                ),
                &[],
            )
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }

    /// The name of the token of `kind` that hashes to `token_hash`.
    pub fn token_name(
        &self,
        kind: TokenKind,
        token_hash: &str,
    ) -> Result<Option<String>, StoreError> {
        let hash = token_hash.to_owned();
        self.db.run(move |c| async move {
            let statement = c
                .prepare_cached(&format!(
                    "SELECT name FROM {} WHERE token_hash = $1",
                    kind.table()
                ))
                .await?;
            c.query_opt(&statement, &[&hash])
                .await?
                .map(|r| r.try_get(0))
                .transpose()
        })
    }

    /// Remove the token of `kind` named `name`; false when there is none.
    pub fn remove_token(&self, kind: TokenKind, name: &str) -> Result<bool, StoreError> {
        let name = name.to_owned();
        self.db.run(move |c| async move {
            let n = c
                .execute(
                    &format!("DELETE FROM {} WHERE name = $1", kind.table()),
                    &[&name],
                )
                .await?;
            Ok(n == 1)
        })
    }
}
