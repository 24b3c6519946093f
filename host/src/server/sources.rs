//! The components each run of a tenant was started with (the manifest's paths → uploaded
//! digests), in `space.db` in the tenant's directory: with the manifest text the run store keeps,
//! they rebuild the run's flow to resume it. Recorded before the run itself, so no run exists
//! without them.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension as _, params};

use super::problem::ApiError;
use crate::ids::FlowRunId;

/// Open `space.db` at `path` (WAL, durable commits, waiting up to 10 s for its other
/// connection).
pub(super) fn open_db(path: &Path) -> Result<Connection, rusqlite::Error> {
    let db = Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(db)
}

/// The components of a tenant's runs.
#[derive(Debug)]
pub(super) struct RunSources {
    db: Mutex<Connection>,
}

impl RunSources {
    /// Open (or create) them in the database at `path`.
    pub(super) fn open(path: &Path) -> Result<RunSources, rusqlite::Error> {
        let db = open_db(path)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS run_sources (run TEXT PRIMARY KEY, components TEXT NOT NULL)",
        )?;
        Ok(RunSources { db: Mutex::new(db) })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the components of `run`.
    pub(super) fn record(
        &self,
        run: FlowRunId,
        components: &BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        self.db()
            .execute(
                "INSERT OR REPLACE INTO run_sources (run, components) VALUES (?1, ?2)",
                params![
                    run.to_string(),
                    serde_json::to_string(components).unwrap_or_default()
                ],
            )
            .map(drop)
            .map_err(|e| ApiError::internal("recording the run's components", &e))
    }

    /// The components of `run`, when it was started here.
    pub(super) fn get(&self, run: FlowRunId) -> Result<Option<BTreeMap<String, String>>, ApiError> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT components FROM run_sources WHERE run = ?1",
                [run.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| ApiError::internal("reading the run's components", &e))?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }
}
