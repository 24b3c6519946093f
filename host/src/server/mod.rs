//! `sluice server`: many tenants on one host. The server owns a home directory: the tenant
//! registry (`server.db`, see [`tenants`]), the operator's grant ceiling (`policy.toml`; without
//! it nothing may be granted), the key of tenants' secrets (`server.key`, mode 0600, see
//! [`secrets`]), and one directory per tenant (`tenants/<id>/`) that is a Sluice
//! home of its own: its run store, its cache, its uploaded components. A request is served from
//! its caller's directory only, so another tenant's runs, logs, cache entries and components
//! are not hidden by a filter that could be forgotten: they are not there (404, never 403).
//!
//! The API ([`api`]) is HTTP/JSON under `/api/v1`, described by an OpenAPI document generated
//! from the handlers; the bodies are the plain types of [`wire`]. Runs execute in this process on
//! one shared sandbox: each tenant has a [`FlowRunner`] over its own store. Each tenant's
//! [`deployments`] run on their schedules from a tick every second.

mod api;
mod cpu;
pub mod deployments;
pub mod events;
pub mod fair;
mod placement;
pub use cpu::SHARED_LINGER;
mod priority;
mod problem;
pub mod secrets;
mod sources;
mod space;
pub mod tenants;
mod ui;
pub mod wire;
mod worker_api;
pub mod workers;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::clock::{ClockRef, SystemClock};
use crate::flow::manifest::{ManifestError, Policy};
use crate::ids::TenantId;
use crate::sandbox::Sandbox;
use crate::store::{PgDatabase, StoreError};
use fair::{FairQueue, Share};

pub use space::Space;
pub use tenants::{Operator, Quotas, Tenant, TenantError, Tenants};

/// Why the server could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The tenant registry failed.
    #[error(transparent)]
    Tenants(#[from] TenantError),
    /// A tenant's store failed.
    #[error("tenant `{tenant}`: {source}")]
    Store {
        /// The tenant.
        tenant: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The policy file is not valid.
    #[error("policy: {0}")]
    Policy(#[from] ManifestError),
    /// A directory or socket could not be used.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where tenants' run stores are.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Each tenant's directory holds its SQLite store (`sluice.db`): one machine.
    Sqlite,
    /// Each tenant's store is a schema of this PostgreSQL database ([`tenant_schema`]).
    Postgres(PgDatabase),
}

/// The PostgreSQL schema of tenant `id`'s store: `t_` and its id in lowercase.
pub fn tenant_schema(id: TenantId) -> String {
    format!("t_{}", id.to_string().to_ascii_lowercase())
}

/// Who holds a server's run leases on PostgreSQL, the same each time it starts over this
/// directory on this machine: `server-` and a hash of the host's name and the directory's path,
/// so a server started again gives up at once the leases its killed predecessor left.
fn lease_owner(dir: &Path) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mut h = blake3::Hasher::new();
    h.update(host.trim().as_bytes());
    h.update(b"\0");
    h.update(path.as_os_str().as_encoded_bytes());
    format!("server-{}", &h.finalize().to_hex()[..16])
}

/// A server over a home directory. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    home: PathBuf,
    sandbox: Sandbox,
    tenants: Tenants,
    policy: Policy,
    spaces: Mutex<HashMap<TenantId, Arc<Space>>>,
    queue: FairQueue,
    clock: ClockRef,
    key: secrets::ServerKey,
    backend: Backend,
    /// The workers that run task runs, when they do ([`Server::use_workers`]).
    remote: std::sync::OnceLock<Arc<workers::Remote>>,
}

impl Server {
    /// A server over `home`, running at most `slots` task runs at once on `sandbox`, from one
    /// queue shared fairly by its tenants ([`fair`]). The operator's grant ceiling is
    /// `<home>/policy.toml`; without that file nothing may be granted. Every tenant's store is
    /// opened, and runs a previous server process left executing are recorded Crashed.
    pub fn open(home: &Path, sandbox: Sandbox, slots: usize) -> Result<Server, ServerError> {
        Self::open_with_clock(home, sandbox, slots, Arc::new(SystemClock))
    }

    /// [`Server::open`] on `clock` (what runs record and deployments' schedules follow; a
    /// `SimClock` in tests).
    pub fn open_with_clock(
        home: &Path,
        sandbox: Sandbox,
        slots: usize,
        clock: ClockRef,
    ) -> Result<Server, ServerError> {
        Self::open_on(home, sandbox, slots, clock, Backend::Sqlite)
    }

    /// [`Server::open_with_clock`], tenants' run stores on `backend`.
    pub fn open_on(
        home: &Path,
        sandbox: Sandbox,
        slots: usize,
        clock: ClockRef,
        backend: Backend,
    ) -> Result<Server, ServerError> {
        let tenants = match &backend {
            Backend::Sqlite => Tenants::open(home)?,
            Backend::Postgres(db) => Tenants::open_database(db)?,
        };
        let key = secrets::ServerKey::load_or_create(home)?;
        let policy_file = home.join("policy.toml");
        let policy = match policy_file.exists() {
            true => Policy::load(&policy_file)?,
            false => Policy::deny_all(&policy_file),
        };
        let server = Server {
            inner: Arc::new(Inner {
                home: home.to_owned(),
                tenants,
                policy,
                spaces: Mutex::default(),
                queue: FairQueue::new(
                    sandbox.clone(),
                    slots,
                    std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
                )
                .map_err(|source| ServerError::Io {
                    what: "starting the guests' runtime".into(),
                    source,
                })?,
                sandbox,
                clock,
                key,
                backend,
                remote: std::sync::OnceLock::new(),
            }),
        };
        for tenant in server.inner.tenants.list()? {
            server.space(&tenant)?;
        }
        Ok(server)
    }

    /// From now on, task runs are run by `sluice worker` processes, each claim of theirs leased
    /// for `lease` (at least [`workers::MIN_LEASE`]; see [`workers`]); only on PostgreSQL, and
    /// one server per database. Call it before
    /// [`Server::resume_crashed`], from within the server's runtime: the attempts a previous
    /// server left in the database's queue are taken back first.
    pub fn use_workers(&self, lease: std::time::Duration) -> Result<(), ServerError> {
        let Backend::Postgres(db) = &self.inner.backend else {
            return Err(ServerError::Io {
                what: "giving task runs to workers".into(),
                source: std::io::Error::other(
                    "workers need the server's runs in PostgreSQL: give --database URL",
                ),
            });
        };
        let store = |source| ServerError::Store {
            tenant: "(the worker queue)".into(),
            source,
        };
        let queue = db.queue().map_err(store)?;
        let registry = db.registry().map_err(store)?;
        let remote = workers::Remote::start(
            queue,
            registry,
            lease.max(workers::MIN_LEASE),
            self.inner.queue.slot_setter(),
            tokio::runtime::Handle::current(),
        )
        .map_err(store)?;
        self.inner.queue.use_workers(remote.clone());
        let _ = self.inner.remote.set(remote);
        Ok(())
    }

    /// The tenant registry.
    pub fn tenants(&self) -> &Tenants {
        &self.inner.tenants
    }

    /// The directory of tenant `id`.
    pub fn tenant_dir(home: &Path, id: TenantId) -> PathBuf {
        home.join("tenants").join(id.to_string())
    }

    /// The space of `tenant`, opened on first use; the queue takes its current weight and
    /// quotas.
    pub fn space(&self, tenant: &Tenant) -> Result<Arc<Space>, ServerError> {
        self.inner.queue.configure(
            tenant.id,
            Share {
                weight: tenant.weight,
                max_running: tenant.quotas.max_running_tasks,
                fuel_per_minute: tenant.quotas.fuel_per_minute,
            },
        );
        let mut spaces = self.inner.spaces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(space) = spaces.get(&tenant.id) {
            return Ok(space.clone());
        }
        let dir = Self::tenant_dir(&self.inner.home, tenant.id);
        let space = Arc::new(Space::open(
            tenant,
            &dir,
            &self.inner.sandbox,
            &self.inner.queue,
            &self.inner.clock,
            &self.inner.key,
            &self.inner.backend,
        )?);
        spaces.insert(tenant.id, space.clone());
        Ok(space)
    }

    /// The HTTP API, under `/api/v1`.
    pub fn router(&self) -> axum::Router {
        api::router(self.clone())
    }

    /// Plan every tenant's deployments now and carry the plans out: record slots ahead, mark
    /// Late, start due runs ([`deployments`]). [`Server::serve`] does it every second.
    pub async fn tick(&self) {
        let tenants = match self.inner.tenants.list() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("deployments: reading the tenants: {e}");
                return;
            }
        };
        for tenant in tenants {
            match self.space(&tenant) {
                Ok(space) => {
                    space
                        .deployments()
                        .tick(&space, &tenant, &self.inner.policy)
                        .await;
                }
                Err(e) => tracing::warn!("deployments of tenant `{}`: {e}", tenant.name),
            }
        }
    }

    /// Resume, in every tenant's space, the runs found Crashed when it opened whose crashed task
    /// runs have retries left ([`crate::runner::resumable`]); the others stay Crashed. `sluice
    /// server` does it before it listens.
    pub async fn resume_crashed(&self) {
        let Ok(tenants) = self.inner.tenants.list() else {
            return;
        };
        for tenant in tenants {
            if let Ok(space) = self.space(&tenant) {
                space.resume_crashed(&tenant, &self.inner.policy).await;
            }
        }
    }

    /// Serve the API on `listener`, and run the deployments' schedules, until `shutdown`
    /// completes.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let ticker = self.clone();
        let scheduler = tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                every.tick().await;
                ticker.tick().await;
            }
        });
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServerError::Io {
                what: "serving the API".into(),
                source,
            });
        scheduler.abort();
        served
    }
}
