//! The files each run of a tenant was started with besides its manifest (the paths it names →
//! uploaded components' digests, and its subflows' manifests): with the manifest text the run
//! store keeps, they rebuild the run's flow to resume it. Recorded in the run's own first write
//! (`RunOptions::files`, schema 11), so no run exists without them; a run recorded before that
//! has them in `space.db` in the tenant's directory, read here.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension as _};
use serde::{Deserialize, Serialize};

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

/// What a run request brings besides its manifest (see [`super::wire::StartRun`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RunFiles {
    /// Component paths → digests.
    pub(super) components: BTreeMap<String, String>,
    /// Subflow manifest paths → texts.
    #[serde(default)]
    pub(super) subflows: BTreeMap<String, String>,
}

impl RunFiles {
    /// As stored (JSON): this, or the components alone (as recorded before subflows).
    pub(super) fn from_stored(text: &str) -> Option<RunFiles> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Files(RunFiles),
            Components(BTreeMap<String, String>),
        }
        Some(match serde_json::from_str(text).ok()? {
            Stored::Files(files) => files,
            Stored::Components(components) => RunFiles {
                components,
                subflows: BTreeMap::new(),
            },
        })
    }

    /// As stored.
    pub(super) fn to_stored(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The files of a tenant's runs recorded before runs kept them themselves.
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

    /// The files of `run`, when it was started here.
    pub(super) fn get(&self, run: FlowRunId) -> Result<Option<RunFiles>, ApiError> {
        let text: Option<String> = self
            .db()
            .query_row(
                "SELECT components FROM run_sources WHERE run = ?1",
                [run.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| ApiError::internal("reading the run's components", &e))?;
        Ok(text.and_then(|t| RunFiles::from_stored(&t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_recorded_before_subflows_still_read() {
        let old = r#"{"a.wasm":"00ff"}"#;
        let files = RunFiles::from_stored(old).expect("the old form");
        assert_eq!(files.components["a.wasm"], "00ff");
        assert!(files.subflows.is_empty());
        let new = RunFiles {
            components: BTreeMap::from([("components".into(), "00ff".into())]),
            subflows: BTreeMap::from([("child.toml".into(), "name = \"c\"".into())]),
        };
        assert_eq!(RunFiles::from_stored(&new.to_stored()), Some(new));
        // A component file named `components` in the old form is still a component.
        let odd = r#"{"components":"00ff"}"#;
        assert_eq!(
            RunFiles::from_stored(odd).expect("read").components["components"],
            "00ff"
        );
    }
}
