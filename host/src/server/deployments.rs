//! A tenant's deployments: flows registered with a `[schedule]` (`sluice deploy`), and their
//! slots, in `space.db` in the tenant's directory. Each tick ([`Deployments::tick`]) plans
//! every deployment with [`crate::schedule::plan`] and carries the plan out: it records slots
//! ahead (Scheduled), marks overdue ones Late, cancels those the catch-up policy skips, and
//! starts due ones through the tenant's space, where every quota holds (a slot a quota refuses
//! waits, and turns Late). A slot's run id is chosen when the slot is recorded and the run
//! store is asked before a slot starts, so a server that died between starting a run and
//! recording that it did never starts the slot twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension as _, params};

use super::problem::ApiError;
use super::sources::RunFiles;
use super::space::Space;
use super::tenants::Tenant;
use super::wire::{DeploymentRuns, DeploymentView, SlotView, StartRun};
use crate::flow::manifest::Policy;
use crate::ids::FlowRunId;
use crate::runner::{ScheduledStart, Transition};
use crate::schedule::{OpenSlot, PlanInput, Schedule, plan};
use crate::state::StateName;
use crate::store::ChangeCursor;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deployments (
    name TEXT PRIMARY KEY,
    flow TEXT NOT NULL,
    manifest_path TEXT NOT NULL,
    manifest TEXT NOT NULL,
    components TEXT NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    anchor INTEGER NOT NULL,
    planned_through INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    deployment TEXT NOT NULL,
    at INTEGER NOT NULL,
    run TEXT NOT NULL,
    state TEXT NOT NULL,
    history TEXT NOT NULL,
    message TEXT,
    PRIMARY KEY (deployment, at)
);
";

/// A slot that has not started (`Scheduled` or `Late`).
const OPEN: &str = "state IN ('Scheduled', 'Late')";
/// A slot whose run was started.
const STARTED: &str = "Started";

/// The deployments of one tenant.
#[derive(Debug)]
pub struct Deployments {
    db: Mutex<Connection>,
    /// Deployments whose next plan applies the catch-up policy: all of them when the server
    /// starts, and one that is resumed.
    catching_up: Mutex<HashSet<String>>,
    /// Why a deployment's due slot did not start at the last tick (a quota's message).
    held: Mutex<HashMap<String, String>>,
    /// Deploying, pausing, resuming and removing wait for a tick in progress, and the other way
    /// round: a tick never carries out a plan made from a deployment that changed meanwhile.
    busy: tokio::sync::Mutex<()>,
}

/// A deployment as stored.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    flow: String,
    manifest_path: String,
    manifest: String,
    /// Its components and subflows (stored in `components`).
    files: RunFiles,
    paused: bool,
    anchor: DateTime<Utc>,
    planned_through: DateTime<Utc>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or_default()
}

fn db_error(e: &rusqlite::Error) -> ApiError {
    ApiError::internal("reading or writing deployments", e)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Deployments {
    /// Open (or create) the deployments of the tenant at `path`.
    pub(super) fn open(path: &Path) -> Result<Deployments, rusqlite::Error> {
        let db = super::sources::open_db(path)?;
        db.execute_batch(SCHEMA)?;
        let names = {
            let mut s = db.prepare("SELECT name FROM deployments")?;
            s.query_map([], |r| r.get::<_, String>(0))?
                .collect::<Result<HashSet<_>, _>>()?
        };
        Ok(Deployments {
            db: Mutex::new(db),
            catching_up: Mutex::new(names),
            held: Mutex::default(),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    fn rows(&self, name: Option<&str>) -> Result<Vec<Row>, ApiError> {
        let db = lock(&self.db);
        let mut s = db
            .prepare_cached(
                "SELECT name, flow, manifest_path, manifest, components, paused, anchor,
                        planned_through, created_at, updated_at
                 FROM deployments WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
            )
            .map_err(|e| db_error(&e))?;
        s.query_map(params![name], |r| {
            Ok(Row {
                name: r.get(0)?,
                flow: r.get(1)?,
                manifest_path: r.get(2)?,
                manifest: r.get(3)?,
                files: RunFiles::from_stored(&r.get::<_, String>(4)?).unwrap_or_default(),
                paused: r.get(5)?,
                anchor: time(r.get(6)?),
                planned_through: time(r.get(7)?),
                created_at: time(r.get(8)?),
                updated_at: time(r.get(9)?),
            })
        })
        .and_then(Iterator::collect)
        .map_err(|e| db_error(&e))
    }

    fn row(&self, name: &str) -> Result<Row, ApiError> {
        self.rows(Some(name))?
            .pop()
            .ok_or_else(|| ApiError::not_found(format!("no deployment named `{name}`")))
    }

    fn open_slots(
        &self,
        name: &str,
    ) -> Result<Vec<(OpenSlot, FlowRunId, Vec<Transition>)>, ApiError> {
        let db = lock(&self.db);
        let mut s = db
            .prepare_cached(&format!(
                "SELECT at, state, run, history FROM slots WHERE deployment = ?1 AND {OPEN} ORDER BY at"
            ))
            .map_err(|e| db_error(&e))?;
        s.query_map(params![name], |r| {
            let late = r.get::<_, String>(1)? == "Late";
            let run: String = r.get(2)?;
            let history: String = r.get(3)?;
            Ok((
                OpenSlot {
                    at: time(r.get(0)?),
                    late,
                },
                run.parse().unwrap_or_default(),
                serde_json::from_str(&history).unwrap_or_default(),
            ))
        })
        .and_then(Iterator::collect)
        .map_err(|e| db_error(&e))
    }

    /// Register deployment `name` of the flow in `req` (checked by the caller, with its
    /// schedule): a new one, or a new version of one (its slots not started yet are dropped and
    /// its slots planned again from `now`).
    pub async fn deploy(
        &self,
        name: &str,
        req: &StartRun,
        flow: &str,
        schedule: &Schedule,
        now: DateTime<Utc>,
    ) -> Result<DeploymentView, ApiError> {
        let _busy = self.busy.lock().await;
        {
            let mut db = lock(&self.db);
            let tx = db.transaction().map_err(|e| db_error(&e))?;
            tx.execute(
                &format!("DELETE FROM slots WHERE deployment = ?1 AND {OPEN}"),
                params![name],
            )
            .map_err(|e| db_error(&e))?;
            tx.execute(
                "INSERT INTO deployments (name, flow, manifest_path, manifest, components, paused,
                                          anchor, planned_through, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?6, ?6, ?6)
                 ON CONFLICT (name) DO UPDATE SET flow = ?2, manifest_path = ?3, manifest = ?4,
                     components = ?5, anchor = ?6, planned_through = ?6, updated_at = ?6",
                params![
                    name,
                    flow,
                    req.manifest_path,
                    req.manifest,
                    RunFiles {
                        components: req.components.clone(),
                        subflows: req.subflows.clone(),
                    }
                    .to_stored(),
                    micros(now)
                ],
            )
            .map_err(|e| db_error(&e))?;
            tx.commit().map_err(|e| db_error(&e))?;
        }
        lock(&self.catching_up).remove(name);
        lock(&self.held).remove(name);
        let row = self.row(name)?;
        Ok(self.view(&row, Some(schedule), now))
    }

    fn view(&self, row: &Row, schedule: Option<&Schedule>, now: DateTime<Utc>) -> DeploymentView {
        // The next slots: as the schedule has them (those recorded are the same times).
        let mut upcoming = Vec::new();
        if let Some(s) = schedule
            && !row.paused
        {
            let mut at = now;
            while upcoming.len() < 3 {
                match s.every.next_after(at, row.anchor) {
                    Some(next) => {
                        upcoming.push(next);
                        at = next;
                    }
                    None => break,
                }
            }
        }
        DeploymentView {
            name: row.name.clone(),
            flow: row.flow.clone(),
            schedule: schedule.map_or_else(|| "(unreadable)".into(), |s| s.every.to_string()),
            catchup: schedule.map_or_else(String::new, |s| s.catchup.to_string()),
            late_after_seconds: schedule.map_or(0, |s| s.late_after.num_seconds()),
            parameters: schedule.map(|s| s.parameters.clone()).unwrap_or_default(),
            paused: row.paused,
            created_at: row.created_at,
            updated_at: row.updated_at,
            upcoming,
        }
    }

    /// The schedule of a stored deployment (its manifest parsed again: it was checked when it
    /// was deployed).
    fn schedule(space: &Space, row: &Row) -> Result<Schedule, ApiError> {
        let req = request(row, BTreeMap::new());
        let def = space.parse(&req).map_err(|e| {
            ApiError::internal(&format!("reading deployment `{}`", row.name), &e.detail)
        })?;
        def.schedule.ok_or_else(|| {
            ApiError::internal(
                &format!("reading deployment `{}`", row.name),
                &"its manifest has no [schedule]",
            )
        })
    }

    /// Every deployment.
    pub fn list(&self, space: &Space) -> Result<Vec<DeploymentView>, ApiError> {
        let now = space.now();
        Ok(self
            .rows(None)?
            .iter()
            .map(|row| self.view(row, Self::schedule(space, row).ok().as_ref(), now))
            .collect())
    }

    /// Deployment `name`.
    pub fn get(&self, space: &Space, name: &str) -> Result<DeploymentView, ApiError> {
        let row = self.row(name)?;
        Ok(self.view(&row, Self::schedule(space, &row).ok().as_ref(), space.now()))
    }

    /// Pause or resume deployment `name`. Paused, it records no new slots and starts none (those
    /// recorded turn Late); resumed, its next plan applies the catch-up policy.
    pub async fn set_paused(
        &self,
        space: &Space,
        name: &str,
        paused: bool,
    ) -> Result<DeploymentView, ApiError> {
        let _busy = self.busy.lock().await;
        let row = self.row(name)?;
        if row.paused != paused {
            lock(&self.db)
                .execute(
                    "UPDATE deployments SET paused = ?2, updated_at = ?3 WHERE name = ?1",
                    params![name, paused, micros(space.now())],
                )
                .map_err(|e| db_error(&e))?;
            if !paused {
                lock(&self.catching_up).insert(name.to_owned());
            }
        }
        self.get(space, name)
    }

    /// Remove deployment `name` and its slots not started; its runs stay in the run store.
    pub async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let _busy = self.busy.lock().await;
        self.row(name)?;
        let mut db = lock(&self.db);
        let tx = db.transaction().map_err(|e| db_error(&e))?;
        for sql in [
            "DELETE FROM slots WHERE deployment = ?1",
            "DELETE FROM deployments WHERE name = ?1",
        ] {
            tx.execute(sql, params![name]).map_err(|e| db_error(&e))?;
        }
        tx.commit().map_err(|e| db_error(&e))?;
        lock(&self.catching_up).remove(name);
        Ok(())
    }

    /// The slots of deployment `name`: those not started (oldest first) and the last `limit`
    /// that ended (newest first), each started one with its run's state.
    pub fn runs(
        &self,
        space: &Space,
        name: &str,
        limit: usize,
    ) -> Result<DeploymentRuns, ApiError> {
        self.row(name)?;
        let slots: Vec<(i64, String, String, Option<String>)> = {
            let db = lock(&self.db);
            let mut s = db
                .prepare_cached(&format!(
                    "SELECT at, run, state, message FROM slots WHERE deployment = ?1 AND {OPEN}
                     ORDER BY at"
                ))
                .map_err(|e| db_error(&e))?;
            let mut rows: Vec<_> = s
                .query_map(params![name], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .and_then(Iterator::collect)
                .map_err(|e| db_error(&e))?;
            let mut s = db
                .prepare_cached(&format!(
                    "SELECT at, run, state, message FROM slots WHERE deployment = ?1 AND NOT {OPEN}
                     ORDER BY at DESC LIMIT ?2"
                ))
                .map_err(|e| db_error(&e))?;
            rows.extend(
                s.query_map(params![name, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| db_error(&e))?,
            );
            rows
        };
        // Each started slot's run, read by its id (its flow run's row alone).
        let mut states: HashMap<FlowRunId, StateName> = HashMap::new();
        for (_, run, state, _) in &slots {
            if let (STARTED, Ok(id)) = (state.as_str(), run.parse::<FlowRunId>())
                && let Ok(c) = space.store().changes(id, None, ChangeCursor::FLOW_ONLY)
                && let Some(flow) = c.flow
            {
                states.insert(id, flow.state.name);
            }
        }
        let mut out = DeploymentRuns {
            deployment: name.to_owned(),
            upcoming: Vec::new(),
            past: Vec::new(),
        };
        for (at, run, state, message) in slots {
            let run: FlowRunId = run.parse().unwrap_or_default();
            let open = state == "Scheduled" || state == "Late";
            let (state, run) = match state.as_str() {
                "Scheduled" | "Late" | "Cancelled" | "Failed" => (state, None),
                _ => (
                    states
                        .get(&run)
                        .map_or_else(|| STARTED.to_owned(), |s| s.as_str().to_owned()),
                    Some(run),
                ),
            };
            let slot = SlotView {
                at: time(at),
                run,
                state,
                message,
            };
            if open {
                out.upcoming.push(slot);
            } else {
                out.past.push(slot);
            }
        }
        Ok(out)
    }

    /// Plan every deployment at the space's `now` and carry the plans out.
    pub async fn tick(&self, space: &Arc<Space>, tenant: &Tenant, policy: &Policy) {
        let _busy = self.busy.lock().await;
        let rows = match self.rows(None) {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!("tenant `{}`: deployments: {}", tenant.name, e.detail);
                return;
            }
        };
        for row in rows {
            if let Err(e) = self.tick_one(space, tenant, policy, &row).await {
                tracing::warn!(
                    "tenant `{}`: deployment `{}`: {}",
                    tenant.name,
                    row.name,
                    e.detail
                );
            }
        }
    }

    async fn tick_one(
        &self,
        space: &Arc<Space>,
        tenant: &Tenant,
        policy: &Policy,
        row: &Row,
    ) -> Result<(), ApiError> {
        let schedule = Self::schedule(space, row)?;
        let now = space.now();
        let open = self.open_slots(&row.name)?;
        let catching_up = lock(&self.catching_up).contains(&row.name);
        let slots: Vec<OpenSlot> = open.iter().map(|(s, _, _)| *s).collect();
        let plan = plan(
            &schedule,
            &PlanInput {
                anchor: row.anchor,
                planned_through: row.planned_through,
                paused: row.paused,
                catching_up,
                open: &slots,
            },
            now,
        );
        let late_reason = if row.paused {
            "the deployment is paused".to_owned()
        } else if catching_up {
            "its time passed while the server was not running or the deployment was paused"
                .to_owned()
        } else {
            lock(&self.held)
                .get(&row.name)
                .cloned()
                .unwrap_or_else(|| "it has not started".into())
        };
        {
            let mut db = lock(&self.db);
            let tx = db.transaction().map_err(|e| db_error(&e))?;
            for at in &plan.record {
                let history = [Transition {
                    from: None,
                    to: StateName::Scheduled,
                    time: now,
                    message: Some(format!(
                        "deployment `{}`: scheduled for {}",
                        row.name,
                        at.to_rfc3339()
                    )),
                }];
                tx.execute(
                    "INSERT OR IGNORE INTO slots (deployment, at, run, state, history)
                     VALUES (?1, ?2, ?3, 'Scheduled', ?4)",
                    params![
                        row.name,
                        micros(*at),
                        FlowRunId::new().to_string(),
                        serde_json::to_string(&history).unwrap_or_default()
                    ],
                )
                .map_err(|e| db_error(&e))?;
            }
            for at in &plan.skip {
                tx.execute(
                    "UPDATE slots SET state = 'Cancelled', message = ?3 WHERE deployment = ?1 AND at = ?2",
                    params![
                        row.name,
                        micros(*at),
                        format!(
                            "skipped: missed while the server was not running or the deployment \
                             was paused (catchup = {})",
                            schedule.catchup
                        )
                    ],
                )
                .map_err(|e| db_error(&e))?;
            }
            for at in &plan.late {
                let mut history = tx
                    .query_row(
                        "SELECT history FROM slots WHERE deployment = ?1 AND at = ?2",
                        params![row.name, micros(*at)],
                        |r| r.get::<_, String>(0),
                    )
                    .optional()
                    .map_err(|e| db_error(&e))?
                    .and_then(|h| serde_json::from_str::<Vec<Transition>>(&h).ok())
                    .unwrap_or_default();
                let message = format!(
                    "not started {} after its time: {late_reason}",
                    humantime::format_duration(schedule.late_after.to_std().unwrap_or_default())
                );
                history.push(Transition {
                    from: history.last().map(|t| t.to),
                    to: StateName::Late,
                    time: now,
                    message: Some(message.clone()),
                });
                tx.execute(
                    "UPDATE slots SET state = 'Late', history = ?3, message = ?4
                     WHERE deployment = ?1 AND at = ?2",
                    params![
                        row.name,
                        micros(*at),
                        serde_json::to_string(&history).unwrap_or_default(),
                        message
                    ],
                )
                .map_err(|e| db_error(&e))?;
            }
            tx.execute(
                "UPDATE deployments SET planned_through = ?2 WHERE name = ?1",
                params![row.name, micros(plan.planned_through)],
            )
            .map_err(|e| db_error(&e))?;
            tx.commit().map_err(|e| db_error(&e))?;
        }
        if !row.paused {
            lock(&self.catching_up).remove(&row.name);
        }
        if plan.start.is_empty() {
            return Ok(());
        }
        let open: HashMap<DateTime<Utc>, (FlowRunId, Vec<Transition>)> = self
            .open_slots(&row.name)?
            .into_iter()
            .map(|(s, id, h)| (s.at, (id, h)))
            .collect();
        for at in plan.start {
            let Some((id, history)) = open.get(&at).cloned() else {
                continue;
            };
            // Started before the server died, and not marked so: it is not started again.
            let started_before = space.store().resolve_run(&id.to_string()).is_ok();
            let outcome = match started_before {
                true => Ok(()),
                false => space
                    .start_run(
                        tenant,
                        request(row, schedule.parameters.clone()),
                        policy,
                        Some((
                            id,
                            ScheduledStart {
                                at,
                                history,
                                deployment: Some(row.name.clone()),
                            },
                        )),
                    )
                    .await
                    .map(drop),
            };
            let (state, message) = match outcome {
                Ok(()) => (STARTED, None),
                Err(e) if e.code == "quota-exceeded" => {
                    // It waits for the quota (and turns Late); later slots wait behind it.
                    lock(&self.held).insert(row.name.clone(), e.detail);
                    break;
                }
                Err(e) => ("Failed", Some(format!("could not start: {}", e.detail))),
            };
            lock(&self.held).remove(&row.name);
            lock(&self.db)
                .execute(
                    "UPDATE slots SET state = ?3, message = ?4 WHERE deployment = ?1 AND at = ?2",
                    params![row.name, micros(at), state, message],
                )
                .map_err(|e| db_error(&e))?;
        }
        Ok(())
    }
}

/// The run request of a deployment's run.
fn request(row: &Row, parameters: BTreeMap<String, serde_json::Value>) -> StartRun {
    StartRun {
        manifest: row.manifest.clone(),
        manifest_path: row.manifest_path.clone(),
        components: row.files.components.clone(),
        subflows: row.files.subflows.clone(),
        parameters,
        context: BTreeMap::new(),
    }
}

/// Check a deployment name: 1 to 64 letters, digits, `-`, `_` or `.`.
pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    match ok {
        true => Ok(()),
        false => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad-request",
            format!("deployment name `{name}` must be 1 to 64 letters, digits, `-`, `_` or `.`"),
        )),
    }
}
