//! Tenants' secrets: set through the API (`sluice secret set NAME --server …`), kept in the
//! tenant's `space.db` encrypted with ChaCha20-Poly1305 (ring) under the server's key file,
//! `<home>/server.key` (32 random bytes, created on first start with mode 0600; refused when
//! others may read it). Each value is sealed with a fresh random nonce and bound to its tenant
//! and name (the associated data), so a row copied to another tenant or name does not open.
//! Values are never returned by the API; runs see a secret only through their grants (a
//! manifest's `secrets = […]`, under the operator's policy and the tenant's ceiling), redacted
//! as everywhere.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rusqlite::{Connection, params};

use super::ServerError;
use super::problem::ApiError;
use super::wire::SecretInfo;
use crate::grants::{MIN_SECRET_BYTES, SecretStore, is_variable_name};
use crate::ids::TenantId;

/// The longest secret value: 64 KiB.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// The server's key for tenants' secrets. Cheap to clone.
#[derive(Clone)]
pub struct ServerKey(Arc<LessSafeKey>);

impl std::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKey(…)")
    }
}

impl ServerKey {
    /// The key in `<home>/server.key`, created (mode 0600) when missing.
    pub fn load_or_create(home: &Path) -> Result<ServerKey, ServerError> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        let path = home.join("server.key");
        let err = |what: &str, source: std::io::Error| ServerError::Io {
            what: format!("{what} the server key {}", path.display()),
            source,
        };
        let mut bytes = [0u8; 32];
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(mut file) => {
                getrandom::fill(&mut bytes)
                    .map_err(|e| err("making", std::io::Error::other(e.to_string())))?;
                file.write_all(&bytes)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| err("writing", e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let mut file = std::fs::File::open(&path).map_err(|e| err("opening", e))?;
                let mode = file
                    .metadata()
                    .map_err(|e| err("reading", e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(err(
                        "using",
                        std::io::Error::other(format!(
                            "its mode {:o} lets others read it; make it private with `chmod 600 {}`",
                            mode & 0o777,
                            path.display()
                        )),
                    ));
                }
                let mut extra = Vec::new();
                file.read_exact(&mut bytes)
                    .and_then(|()| file.read_to_end(&mut extra))
                    .map_err(|e| err("reading", e))?;
                if !extra.is_empty() {
                    return Err(err(
                        "reading",
                        std::io::Error::other("it is not 32 bytes long"),
                    ));
                }
            }
            Err(e) => return Err(err("creating", e)),
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| err("using", std::io::Error::other("not a ChaCha20 key")))?;
        Ok(ServerKey(Arc::new(LessSafeKey::new(key))))
    }
}

/// One tenant's secrets: the sealed rows, and their values opened in memory.
pub struct TenantSecrets {
    db: Mutex<Connection>,
    key: ServerKey,
    tenant: TenantId,
    values: RwLock<BTreeMap<String, Arc<str>>>,
    /// Rows that did not open (the key file was replaced): such a secret counts as missing.
    sealed: RwLock<Vec<String>>,
}

impl std::fmt::Debug for TenantSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSecrets")
            .field("tenant", &self.tenant)
            .field("count", &self.read().len())
            .finish_non_exhaustive()
    }
}

fn aad(tenant: TenantId, name: &str) -> Vec<u8> {
    format!("sluice-secret-v1\0{tenant}\0{name}").into_bytes()
}

fn db_error(e: &rusqlite::Error) -> ApiError {
    ApiError::internal("reading or writing secrets", e)
}

impl TenantSecrets {
    /// Open the secrets of `tenant` in `space.db` at `path`.
    pub(super) fn open(
        path: &Path,
        key: ServerKey,
        tenant: TenantId,
    ) -> Result<TenantSecrets, rusqlite::Error> {
        let db = super::sources::open_db(path)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS secrets (
                name TEXT PRIMARY KEY,
                nonce BLOB NOT NULL,
                sealed BLOB NOT NULL,
                updated_at INTEGER NOT NULL
            )",
        )?;
        let rows: Vec<(String, Vec<u8>, Vec<u8>)> = {
            let mut s = db.prepare("SELECT name, nonce, sealed FROM secrets")?;
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        let (mut values, mut sealed) = (BTreeMap::new(), Vec::new());
        for (name, nonce, mut data) in rows {
            let opened = <[u8; NONCE_LEN]>::try_from(nonce.as_slice())
                .ok()
                .and_then(|n| {
                    key.0
                        .open_in_place(
                            Nonce::assume_unique_for_key(n),
                            Aad::from(aad(tenant, &name)),
                            &mut data,
                        )
                        .ok()
                        .and_then(|plain| std::str::from_utf8(plain).ok().map(Arc::<str>::from))
                });
            match opened {
                Some(v) => {
                    values.insert(name, v);
                }
                None => {
                    tracing::warn!(
                        "tenant {tenant}: secret `{name}` does not open with the server key \
                         (was server.key replaced?); it counts as missing until set again"
                    );
                    sealed.push(name);
                }
            }
        }
        Ok(TenantSecrets {
            db: Mutex::new(db),
            key,
            tenant,
            values: RwLock::new(values),
            sealed: RwLock::new(sealed),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<str>>> {
        self.values.read().unwrap_or_else(|p| p.into_inner())
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set secret `name` to `value`.
    pub fn set(&self, name: &str, value: &str, now: DateTime<Utc>) -> Result<(), ApiError> {
        let bad = |detail: String| ApiError::new(StatusCode::BAD_REQUEST, "bad-request", detail);
        if !is_variable_name(name) {
            return Err(bad(format!(
                "`{name}` is not a secret name (letters, digits and `_`, not starting with a digit)"
            )));
        }
        if value.len() < MIN_SECRET_BYTES {
            return Err(bad(format!(
                "secret `{name}`: {} bytes is shorter than {MIN_SECRET_BYTES} bytes, too short \
                 to be redacted reliably",
                value.len()
            )));
        }
        if value.len() > MAX_SECRET_BYTES {
            return Err(bad(format!(
                "secret `{name}`: {} bytes is over the limit of {MAX_SECRET_BYTES} bytes",
                value.len()
            )));
        }
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| ApiError::internal("making a nonce", &e))?;
        let mut data = value.as_bytes().to_vec();
        self.key
            .0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(self.tenant, name)),
                &mut data,
            )
            .map_err(|_| ApiError::internal("sealing a secret", &"the cipher refused"))?;
        self.db()
            .execute(
                "INSERT OR REPLACE INTO secrets (name, nonce, sealed, updated_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, nonce.as_slice(), data, now.timestamp_micros()],
            )
            .map_err(|e| db_error(&e))?;
        self.values
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::from(value));
        self.sealed
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != name);
        Ok(())
    }

    /// The names of the secrets set, with when (never their values).
    pub fn list(&self) -> Result<Vec<SecretInfo>, ApiError> {
        let db = self.db();
        let mut s = db
            .prepare_cached("SELECT name, updated_at FROM secrets ORDER BY name")
            .map_err(|e| db_error(&e))?;
        s.query_map([], |r| {
            Ok(SecretInfo {
                name: r.get(0)?,
                updated_at: DateTime::from_timestamp_micros(r.get(1)?).unwrap_or_default(),
            })
        })
        .and_then(Iterator::collect)
        .map_err(|e| db_error(&e))
    }

    /// Remove secret `name`.
    pub fn remove(&self, name: &str) -> Result<(), ApiError> {
        let n = self
            .db()
            .execute("DELETE FROM secrets WHERE name = ?1", [name])
            .map_err(|e| db_error(&e))?;
        if n == 0 {
            return Err(ApiError::not_found(format!("no secret named `{name}`")));
        }
        self.values
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }
}

impl SecretStore for TenantSecrets {
    fn get(&self, name: &str) -> Option<Arc<str>> {
        self.read().get(name).cloned()
    }

    fn where_to_set(&self, name: &str) -> String {
        let sealed = self
            .sealed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|n| n == name);
        if sealed {
            format!(
                "its stored value does not open with the server's key; set it again with \
                 `sluice secret set {name} --server …`"
            )
        } else {
            format!("set it with `sluice secret set {name} --server …`")
        }
    }
}
