//! `sluice server` (serve the API of a home) and `sluice tenant` (edit its tenant registry).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::anyhow;
use sluice::server::{Backend, Server, Tenant, TenantError, Tenants};
use sluice::store::PgDatabase;

use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// The address to listen on (port 0: any free port; the address is printed first).
    #[arg(long, default_value = "127.0.0.1:7311")]
    listen: SocketAddr,

    /// How many task runs run at once, over all tenants (the rest wait in the fair queue);
    /// the guests of those runs share the cores by turns. Default: 64.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    task_slots: Option<u64>,

    /// Keep tenants' runs in this PostgreSQL database (`postgres://user[:password]@host[:port]/name`,
    /// or `host=… user=… dbname=…`; a password is better given in `PGPASSWORD` or `~/.pgpass`
    /// than on a command line), each tenant's store a schema of its own, instead of SQLite in
    /// each tenant's directory; the tenant registry is then the database's too (give `sluice
    /// tenant` the same `--database`). The home still holds the server key, the policy,
    /// deployments, secrets and the uploaded components.
    #[arg(
        long,
        env = "SLUICE_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,

    /// Give task runs to `sluice worker` processes (any number, on any machine, authenticated
    /// with `sluice worker-token add`) instead of running them here (code-flow bodies and
    /// handler components still run here); needs --database, and one such server per
    /// database. The fair queue then holds as many running as the workers seen lately run at
    /// once.
    #[arg(long, requires = "database")]
    workers: bool,

    /// How long a worker's claim on a task run lasts unless it extends it (workers extend every
    /// third of it, at most every second): a worker silent for this long is taken to be gone,
    /// and its task runs are recorded Crashed and retried while they have retries left, e.g.
    /// `10s`. At least 3s. Default: 30s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration, requires = "workers")]
    worker_lease: Option<std::time::Duration>,
}

/// A tenant's weight, quotas and grant ceiling. A quota given as `none` is unlimited.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct QuotaArgs {
    /// Its share of the run slots against other busy tenants (≥ 1; default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    weight: Option<u32>,
    /// Task runs running at once (more wait in the queue).
    #[arg(long, value_name = "N|none", value_parser = count)]
    max_running_tasks: Option<Limit>,
    /// Task runs waiting in the queue (a run whose tasks would go over is refused).
    #[arg(long, value_name = "N|none", value_parser = count)]
    max_queued_tasks: Option<Limit>,
    /// Flow runs started in any 60 s (one more is refused).
    #[arg(long, value_name = "N|none", value_parser = count)]
    runs_per_minute: Option<Limit>,
    /// Fuel used by task runs that ended in the last 60 s (at it, task runs wait).
    #[arg(long, value_name = "N|none", value_parser = count)]
    fuel_per_minute: Option<Limit>,
    /// The most fuel a task may be given.
    #[arg(long, value_name = "N|none", value_parser = count)]
    max_task_fuel: Option<Limit>,
    /// The most memory a task may be given, e.g. `64MiB`.
    #[arg(long, value_name = "SIZE|none", value_parser = size)]
    max_task_memory: Option<Limit>,
    /// The longest deadline a task may be given, e.g. `30s`.
    #[arg(long, value_name = "DURATION|none", value_parser = millis)]
    max_task_timeout: Option<Limit>,
    /// Bytes stored for the tenant (components and run store), e.g. `1GiB`.
    #[arg(long, value_name = "SIZE|none", value_parser = size)]
    max_stored: Option<Limit>,
    /// Its grant ceiling: a policy file (the format of `--policy`), checked besides the
    /// server's; `none` removes it.
    #[arg(long, value_name = "FILE|none")]
    grants: Option<PathBuf>,
}

/// A quota value: a number, or `none` (unlimited).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limit(Option<u64>);

fn limit(s: &str, parse: impl Fn(&str) -> Result<u64, String>) -> Result<Limit, String> {
    match s {
        "none" | "unlimited" => Ok(Limit(None)),
        s => parse(s).map(|n| Limit(Some(n))),
    }
}

fn count(s: &str) -> Result<Limit, String> {
    limit(s, |s| {
        s.parse::<u64>()
            .map_err(|e| format!("`{s}` is not a count: {e}"))
    })
}

fn size(s: &str) -> Result<Limit, String> {
    limit(s, crate::parse_size)
}

fn millis(s: &str) -> Result<Limit, String> {
    limit(s, |s| {
        humantime::parse_duration(s)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|e| format!("`{s}` is not a duration like 30s: {e}"))
    })
}

impl QuotaArgs {
    /// Apply the given settings to `tenant`.
    fn apply(&self, tenant: &mut Tenant) -> Result<(), TenantError> {
        if let Some(w) = self.weight {
            tenant.weight = w;
        }
        let q = &mut tenant.quotas;
        for (given, field) in [
            (self.max_running_tasks, &mut q.max_running_tasks),
            (self.max_queued_tasks, &mut q.max_queued_tasks),
            (self.runs_per_minute, &mut q.runs_per_minute),
            (self.fuel_per_minute, &mut q.fuel_per_minute),
            (self.max_task_fuel, &mut q.max_task_fuel),
            (self.max_task_memory, &mut q.max_task_memory),
            (self.max_task_timeout, &mut q.max_task_timeout_ms),
            (self.max_stored, &mut q.max_stored_bytes),
        ] {
            if let Some(Limit(v)) = given {
                *field = v;
            }
        }
        match &self.grants {
            None => {}
            Some(p) if p.as_os_str() == "none" => tenant.grants = None,
            Some(p) => {
                // Checked now, so a bad ceiling is never stored.
                let ceiling =
                    |e: sluice::flow::manifest::ManifestError| TenantError::Ceiling(e.to_string());
                let text = sluice::flow::manifest::read(p).map_err(ceiling)?;
                sluice::flow::manifest::Policy::parse(p, &text).map_err(ceiling)?;
                tenant.grants = Some(text);
            }
        }
        Ok(())
    }
}

/// The `--database` of the admin commands.
#[derive(Debug, clap::Args)]
pub(crate) struct DatabaseArg {
    /// The server's PostgreSQL database, as `sluice server --database` takes it (for `tenant`:
    /// its registry instead of the home's).
    #[arg(
        long,
        global = true,
        env = "SLUICE_DATABASE",
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
}

/// `sluice tenant`: the registry of the home's server, or of a PostgreSQL database.
#[derive(Debug, clap::Args)]
pub(crate) struct TenantArgs {
    #[command(flatten)]
    database: DatabaseArg,
    #[command(subcommand)]
    command: TenantCommand,
}

/// `sluice operator`: who signs in to the web UI to see every tenant.
#[derive(Debug, clap::Args)]
pub(crate) struct OperatorArgs {
    #[command(flatten)]
    database: DatabaseArg,
    #[command(subcommand)]
    command: OperatorCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum OperatorCommand {
    /// Add an operator; its token is printed once, on the last line of stdout.
    Add {
        /// Its name: lowercase letters, digits, `-` and `_`.
        name: String,
    },
    /// List operators (names and when they were added; never the tokens).
    Ls,
    /// Remove an operator: its token stops working at once.
    Rm {
        /// Its name.
        name: String,
    },
}

/// The registry of this home's server, or of its `--database`, and where it is (for messages).
fn registry(home: &Path, arg: &DatabaseArg) -> Result<(Tenants, String), UsageError> {
    Ok(match &arg.database {
        None => (
            Tenants::open(home).map_err(usage)?,
            home.display().to_string(),
        ),
        Some(url) => {
            let db = database(url)?;
            let place = db.name().to_owned();
            (Tenants::open_database(&db).map_err(usage)?, place)
        }
    })
}

pub(crate) fn operator(home: &Path, args: &OperatorArgs) -> Result<ExitCode, UsageError> {
    let (registry, place) = registry(home, &args.database)?;
    match &args.command {
        OperatorCommand::Add { name } => {
            let (_, token) = registry
                .add_operator(name, chrono::Utc::now())
                .map_err(usage)?;
            crate::print_stdout(&format!(
                "added operator `{name}` in {place}\nits token, shown only now:\n{token}\n"
            ));
        }
        OperatorCommand::Ls => {
            let list = registry.operators().map_err(usage)?;
            let width = crate::report::column_width(list.iter().map(|o| o.name.as_str()));
            let mut out = format!("{:<width$}  CREATED\n", "NAME");
            for o in &list {
                out.push_str(&format!(
                    "{:<width$}  {}\n",
                    o.name,
                    crate::report::when(o.created_at)
                ));
            }
            if list.is_empty() {
                out.push_str(&format!("(no operators in {place})\n"));
            }
            crate::print_stdout(&out);
        }
        OperatorCommand::Rm { name } => {
            registry.remove_operator(name).map_err(usage)?;
            crate::print_stdout(&format!("removed operator `{name}`\n"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `sluice worker-token`: the tokens of `sluice worker` processes, in a server's PostgreSQL
/// database.
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerTokenArgs {
    #[command(flatten)]
    database: DatabaseArg,
    #[command(subcommand)]
    command: WorkerTokenCommand,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum WorkerTokenCommand {
    /// Add a worker token; it is printed once, on the last line of stdout.
    Add {
        /// A name for the workers that will use it: lowercase letters, digits, `-` and `_`.
        name: String,
    },
    /// List worker tokens (names and when they were made; never the tokens).
    Ls,
    /// Remove a worker token: workers using it are refused from their next call.
    Rm {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantCommand {
    /// Add a tenant; its token is printed once, on the last line of stdout.
    Add {
        /// The tenant's name: lowercase letters, digits, `-` and `_`.
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Change a tenant's weight, quotas or grant ceiling (a running server applies them from
    /// the tenant's next request).
    Set {
        /// The tenant's name.
        name: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// List tenants with their weights and quotas.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a tenant: its token stops working at once; its data stays in its directory.
    Rm {
        /// The tenant's name.
        name: String,
    },
}

pub(crate) async fn serve(
    home: &Path,
    sandbox: &crate::SandboxArgs,
    args: &ServerArgs,
) -> Result<ExitCode, UsageError> {
    // A 1 ms tick: guests reach a yield point every millisecond, where the server gives the
    // cores to the least-served tenant (and deadlines are kept to the millisecond).
    let sandbox = sandbox
        .builder()
        .epoch_tick(std::time::Duration::from_millis(1))
        .build()
        .map_err(|e| UsageError(anyhow!("cannot start the sandbox: {e}")))?;
    let slots = args
        .task_slots
        .map_or(sluice::server::fair::DEFAULT_TASK_SLOTS, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        });
    let backend = match &args.database {
        None => Backend::Sqlite,
        Some(url) => Backend::Postgres(
            tokio::task::spawn_blocking({
                let url = url.clone();
                move || PgDatabase::connect(&url)
            })
            .await
            .map_err(|e| UsageError(anyhow!("connecting to PostgreSQL: {e}")))?
            .map_err(usage)?,
        ),
    };
    let database = match &backend {
        Backend::Sqlite => "SQLite in each tenant's directory".to_owned(),
        Backend::Postgres(db) => db.name().to_owned(),
    };
    let server = tokio::task::block_in_place(|| {
        Server::open_on(
            home,
            sandbox,
            slots,
            std::sync::Arc::new(sluice::clock::SystemClock),
            backend,
        )
    })
    .map_err(usage)?;
    if args.workers {
        let lease = args
            .worker_lease
            .unwrap_or(sluice::server::workers::DEFAULT_LEASE);
        if lease < sluice::server::workers::MIN_LEASE {
            return Err(UsageError(anyhow!(
                "--worker-lease {}: at least {} (a worker's first extension of a claim may come \
                 a second after it)",
                humantime::format_duration(lease),
                humantime::format_duration(sluice::server::workers::MIN_LEASE)
            )));
        }
        tokio::task::block_in_place(|| server.use_workers(lease)).map_err(usage)?;
    }
    // Before it listens: the runs the previous process died executing resume (those with
    // retries left) or stay Crashed.
    server.resume_crashed().await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| UsageError(anyhow!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| UsageError(anyhow!("cannot listen on {}: {e}", args.listen)))?;
    crate::print_stdout(&format!("sluice server listening on http://{addr}\n"));
    eprintln!(
        "serving {} ({} tenants; runs in {database}{}); stop with Ctrl-C",
        home.display(),
        server.tenants().list().map_err(usage)?.len(),
        match args.workers {
            true => "; task runs given to `sluice worker` processes",
            false => "",
        }
    );
    let shutdown = async {
        let name = crate::run::interrupt_signals().await;
        eprintln!("\nstopping ({name})");
    };
    server.serve(listener, shutdown).await.map_err(usage)?;
    Ok(ExitCode::SUCCESS)
}

/// Connect to the database at `url`.
fn database(url: &str) -> Result<PgDatabase, UsageError> {
    PgDatabase::connect(url).map_err(usage)
}

pub(crate) fn tenant(home: &Path, args: &TenantArgs) -> Result<ExitCode, UsageError> {
    let (tenants, place) = registry(home, &args.database)?;
    match &args.command {
        TenantCommand::Add { name, quotas } => {
            // The settings are checked before the tenant exists.
            let mut probe = Tenant {
                id: sluice::ids::TenantId::new(),
                name: name.clone(),
                created_at: chrono::Utc::now(),
                weight: 1,
                quotas: Default::default(),
                grants: None,
            };
            quotas.apply(&mut probe).map_err(usage)?;
            let (tenant, token) = tenants.add(name, chrono::Utc::now()).map_err(usage)?;
            // The settings checked above, not read and checked again.
            let tenant = tenants
                .update(&tenant.name, |t| {
                    t.weight = probe.weight;
                    t.quotas = probe.quotas;
                    t.grants = probe.grants;
                    Ok(())
                })
                .map_err(usage)?;
            crate::print_stdout(&format!(
                "added {}\nits token, shown only now:\n{token}\n",
                describe(&tenant)
            ));
        }
        TenantCommand::Set { name, quotas } => {
            let tenant = tenants.update(name, |t| quotas.apply(t)).map_err(usage)?;
            crate::print_stdout(&format!("{}\n", describe(&tenant)));
        }
        TenantCommand::Ls { json } => {
            let list = tenants.list().map_err(usage)?;
            if *json {
                crate::print_stdout(&format!("{:#}\n", serde_json::json!(list)));
                return Ok(ExitCode::SUCCESS);
            }
            let width = crate::report::column_width(list.iter().map(|t| t.name.as_str()));
            let mut out = format!(
                "{:<width$}  {:<26}  {:<19}  SETTINGS\n",
                "NAME", "ID", "CREATED"
            );
            for t in &list {
                out.push_str(&format!(
                    "{:<width$}  {:<26}  {:<19}  {}\n",
                    t.name,
                    t.id.to_string(),
                    crate::report::when(t.created_at),
                    settings(t)
                ));
            }
            if list.is_empty() {
                out.push_str(&format!("(no tenants in {place})\n"));
            }
            crate::print_stdout(&out);
        }
        TenantCommand::Rm { name } => {
            let tenant = tenants.remove(name).map_err(usage)?;
            crate::print_stdout(&format!(
                "removed tenant {name}; its runs and components stay in {}\n",
                Server::tenant_dir(home, tenant.id).display()
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tenant NAME (ID): weight …, quotas …`.
fn describe(t: &Tenant) -> String {
    format!("tenant {} ({}): {}", t.name, t.id, settings(t))
}

/// A tenant's weight, the quotas it has, and whether it has a grant ceiling.
fn settings(t: &Tenant) -> String {
    let q = &t.quotas;
    let mut parts = vec![format!("weight {}", t.weight)];
    for (name, v) in [
        ("max_running_tasks", q.max_running_tasks),
        ("max_queued_tasks", q.max_queued_tasks),
        ("runs_per_minute", q.runs_per_minute),
        ("fuel_per_minute", q.fuel_per_minute),
        ("max_task_fuel", q.max_task_fuel),
        ("max_task_memory", q.max_task_memory),
        ("max_task_timeout_ms", q.max_task_timeout_ms),
        ("max_stored_bytes", q.max_stored_bytes),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {v}"));
        }
    }
    if t.grants.is_some() {
        parts.push("grant ceiling".into());
    }
    if parts.len() == 1 {
        parts.push("no quotas".into());
    }
    parts.join(", ")
}

pub(crate) fn worker_token(args: &WorkerTokenArgs) -> Result<ExitCode, UsageError> {
    let Some(url) = &args.database.database else {
        return Err(UsageError(anyhow!(
            "worker tokens live in the server's PostgreSQL database: give --database URL (or SLUICE_DATABASE)"
        )));
    };
    let db = database(url)?;
    let registry = db.registry().map_err(usage)?;
    match &args.command {
        WorkerTokenCommand::Add { name } => {
            if !sluice::server::tenants::valid_name(name) {
                return Err(UsageError(anyhow!(
                    "worker name `{name}` is not allowed: use 1 to 64 lowercase letters, digits, `-` and `_`, starting with a letter or digit"
                )));
            }
            let token = sluice::server::tenants::new_token()
                .map_err(|e| UsageError(anyhow!("cannot make a token: {e}")))?;
            let added = registry
                .add_worker(
                    name,
                    &sluice::server::tenants::token_hash(&token),
                    &chrono::Utc::now().to_rfc3339(),
                )
                .map_err(usage)?;
            if !added {
                return Err(UsageError(anyhow!(
                    "worker token `{name}` already exists in {}",
                    db.name()
                )));
            }
            crate::print_stdout(&format!(
                "added worker token `{name}` in {}\nthe token, shown only now:\n{token}\n",
                db.name()
            ));
        }
        WorkerTokenCommand::Ls => {
            let rows = registry.workers().map_err(usage)?;
            let width = crate::report::column_width(rows.iter().map(|(n, _)| n.as_str()));
            let mut out = format!("{:<width$}  CREATED\n", "NAME");
            for (name, created) in &rows {
                out.push_str(&format!("{name:<width$}  {created}\n"));
            }
            if rows.is_empty() {
                out.push_str(&format!("(no worker tokens in {})\n", db.name()));
            }
            crate::print_stdout(&out);
        }
        WorkerTokenCommand::Rm { name } => {
            if !registry.remove_worker(name).map_err(usage)? {
                return Err(UsageError(anyhow!(
                    "no worker token `{name}` in {}",
                    db.name()
                )));
            }
            crate::print_stdout(&format!("removed worker token `{name}`\n"));
        }
    }
    Ok(ExitCode::SUCCESS)
}
