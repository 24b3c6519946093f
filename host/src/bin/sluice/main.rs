//! The `sluice` command line.
//!
//! Exit codes, for every command that runs something:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the run ended in a Completed-type state (Completed, Cached, Skipped, Mapped) |
//! | 1 | the run ended Failed, Crashed or Cancelled (any of their types: TimedOut, TriggerFailed, …) |
//! | 1 | also: a server's quota refused the command (`--server`) |
//! | 2 | usage or input error: bad flags, input that is not JSON, a file that is not a task |
//! | 3 | the run is waiting: Paused, or AwaitingRetry (another Scheduled-type state) |

mod alloc;
mod build;
mod cache_cmd;
mod control;
mod deploy_cmd;
mod history;
mod remote;
mod report;
mod run;
mod secret_cmd;
mod server_cmd;
mod task_run;
mod worker_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::state::StateType;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "A sandboxed workflow engine: every task is a WebAssembly component"
)]
struct Cli {
    /// Where Sluice keeps its state: the run store (`sluice.db`) and run leases.
    #[arg(long, global = true, env = "SLUICE_HOME", default_value = ".sluice")]
    home: PathBuf,

    /// Run and inspect flows on this `sluice server` instead of in this process (`run`,
    /// `runs`, `show`, `logs`, `cancel`), e.g. `http://127.0.0.1:7311`.
    #[arg(long, global = true, env = "SLUICE_SERVER", value_name = "URL")]
    server: Option<String>,

    /// The tenant token for `--server` (printed by `sluice tenant add`).
    #[arg(
        long,
        global = true,
        env = "SLUICE_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,

    #[command(flatten)]
    sandbox: SandboxArgs,

    #[command(subcommand)]
    command: Command,
}

/// Where precompiled components are kept, how large a component file may be, and the memory
/// ceiling.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SandboxArgs {
    /// Where precompiled components are kept: a directory of this user's that nobody else can
    /// write (loading one runs its code; each is authenticated with the per-user key in
    /// `<cache dir>/sluice/artifact.key`). Default: `$XDG_CACHE_HOME/sluice/artifacts`, else
    /// `~/.cache/sluice/artifacts`; never inside `--home`.
    #[arg(long, global = true, env = "SLUICE_ARTIFACTS", value_name = "DIR")]
    artifacts: Option<PathBuf>,

    /// The largest component file read, e.g. `512MiB`. Default: 256MiB.
    #[arg(
        long,
        global = true,
        env = "SLUICE_MAX_COMPONENT_SIZE",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    max_component_size: Option<u64>,

    /// The host's memory ceiling: the memory budgets of the task runs in progress never add up
    /// to more (further runs wait), and a task whose budget alone exceeds it fails, e.g. `8GiB`.
    /// Default: three quarters of the machine's memory.
    #[arg(
        long,
        global = true,
        env = "SLUICE_MEMORY_CEILING",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    memory_ceiling: Option<u64>,
}

impl SandboxArgs {
    /// A sandbox builder with these settings.
    pub(crate) fn builder(&self) -> sluice::sandbox::SandboxBuilder {
        let mut b = sluice::sandbox::Sandbox::builder();
        match self
            .artifacts
            .clone()
            .or_else(sluice::sandbox::default_artifact_dir)
        {
            Some(dir) => b = b.artifact_dir(dir),
            None => eprintln!(
                "warning: no per-user cache directory (set XDG_CACHE_HOME or HOME, or pass \
                 --artifacts): components are compiled in memory, every run"
            ),
        }
        if let Some(max) = self.max_component_size {
            b = b.max_component_bytes(max);
        }
        if let Some(ceiling) = self.memory_ceiling {
            b = b.memory_ceiling(ceiling);
        }
        b
    }
}

/// The operator's ceiling on grants and where secret values come from (`run`, `resume`).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct GrantArgs {
    /// The policy file: the most any flow may be granted; a manifest asking for more is refused
    /// before anything runs. Default: `<home>/policy.toml` when it exists, else none (manifests
    /// get what they ask).
    #[arg(long, env = "SLUICE_POLICY", value_name = "FILE")]
    policy: Option<PathBuf>,

    /// A file of secret values in dotenv form (`NAME=value` lines) that only its owner may read
    /// (mode 600). Secrets not in it are read from `SLUICE_SECRET_<NAME>` variables.
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
}

impl GrantArgs {
    /// The policy in force, if any.
    pub(crate) fn policy(
        &self,
        home: &std::path::Path,
    ) -> Result<Option<sluice::flow::manifest::Policy>, UsageError> {
        let path = match &self.policy {
            Some(p) => p.clone(),
            None => {
                let p = home.join("policy.toml");
                if !p.exists() {
                    return Ok(None);
                }
                p
            }
        };
        sluice::flow::manifest::Policy::load(&path)
            .map(Some)
            .map_err(|e| UsageError(anyhow::anyhow!("policy: {e}")))
    }

    /// Where secrets come from: the `--secrets` file, then the environment.
    pub(crate) fn secrets(&self) -> Result<sluice::grants::SecretSource, UsageError> {
        let source = sluice::grants::SecretSource::none().with_env();
        match &self.secrets {
            Some(path) => source.with_file(path).map_err(usage),
            None => Ok(source),
        }
    }
}

/// Errors that reach a guest (a failed stream read, say) carry the host's backtrace when
/// backtraces are captured (`RUST_BACKTRACE=1` in the environment): host paths and symbols a
/// guest has no business seeing, and symbolizing them loads the binary's debug information
/// (some 150 MB). Library backtraces are turned off unless `RUST_LIB_BACKTRACE` asks for them;
/// panics keep theirs (`RUST_BACKTRACE`).
#[allow(unsafe_code)]
fn no_error_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists, so nothing
        // reads the environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

/// Parse a size like `64MiB` or `1GiB`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("`{s}` is not a size like 64MiB or 1GiB: {e}"))
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a flow manifest (recorded in the store).
    Run(run::Args),
    /// Build a flow's components from their declared build commands.
    Build(build::Args),
    /// Continue a Paused, Failed, Cancelled or Crashed flow run in this process.
    Resume(control::ResumeArgs),
    /// Cancel a flow run: a live one from another terminal, or one nobody runs.
    Cancel(control::CancelArgs),
    /// List flow runs, newest first.
    Runs(history::RunsArgs),
    /// Show a flow run: tasks, states, attempts, durations, cache status, full history.
    Show(history::ShowArgs),
    /// Print a flow run's logs.
    Logs(history::LogsArgs),
    /// Inspect or clear the output cache.
    #[command(subcommand)]
    Cache(cache_cmd::CacheCommand),
    /// Work with single tasks.
    #[command(subcommand)]
    Task(TaskCommand),
    /// What this tenant uses on the server (`--server`), against its quotas.
    Usage {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register a flow with a `[schedule]` on the server (`--server`): it runs on that schedule.
    Deploy(deploy_cmd::DeployArgs),
    /// List, pause, resume or remove the server's deployments, or show their runs.
    #[command(subcommand)]
    Deployments(deploy_cmd::DeploymentsCommand),
    /// Set, list or remove this tenant's secrets on the server (`--server`).
    #[command(subcommand)]
    Secret(secret_cmd::SecretCommand),
    /// Serve the HTTP API of this home to its tenants.
    Server(server_cmd::ServerArgs),
    /// Add, list or remove the tenants of this home's server (or of its `--database`).
    Tenant(server_cmd::TenantArgs),
    /// Add, list or remove the tokens `sluice worker` processes authenticate with, in the
    /// server's `--database`.
    WorkerToken(server_cmd::WorkerTokenArgs),
    /// Add, list or remove the operators of this home's server (or of its `--database`): they
    /// sign in to the web UI with their token and see every tenant.
    Operator(server_cmd::OperatorArgs),
    /// Run task runs for a server that gives them to workers (`sluice server --database URL
    /// --workers`), authenticated with a worker token: `sluice worker --server URL --token T`.
    Worker(worker_cmd::WorkerArgs),
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Run one task component once, in its sandbox, and report its state.
    Run(task_run::Args),
}

/// Exit code for a final state type.
fn exit_code(ty: StateType) -> ExitCode {
    match ty {
        StateType::Completed => ExitCode::SUCCESS,
        StateType::Scheduled | StateType::Paused | StateType::Pending => ExitCode::from(3),
        StateType::Running
        | StateType::Cancelling
        | StateType::Cancelled
        | StateType::Failed
        | StateType::Crashed => ExitCode::from(1),
    }
}

/// Parse `KEY=VALUE`.
fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

/// Print to stdout; a closed pipe (`sluice … | head`) is not an error worth a panic.
fn print_stdout(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// An error in what the user gave us (exit code 2), as opposed to a run that failed.
#[derive(Debug)]
struct UsageError(anyhow::Error);

fn usage(e: impl Into<anyhow::Error>) -> UsageError {
    UsageError(e.into())
}

/// An error and its causes, each cause only when the message does not already include it
/// (our errors name their cause in their own message).
fn chain(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Open the run store in `home`.
fn open_store(home: &std::path::Path) -> Result<sluice::store::SqliteStore, UsageError> {
    sluice::store::SqliteStore::open(home).map_err(usage)
}

fn main() -> ExitCode {
    no_error_backtraces();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        if let Command::Worker(args) = &cli.command {
            return worker_cmd::work(
                cli.server.as_deref(),
                cli.token.as_deref(),
                &cli.sandbox,
                args,
            )
            .await;
        }
        let remote = match &cli.server {
            Some(url) => match remote::Remote::new(url, cli.token.as_deref()) {
                Ok(r) => Some(r),
                Err(e) => return Err(e),
            },
            None => None,
        };
        let remote = remote.as_ref();
        let local_only = |what: &str| {
            UsageError(anyhow::anyhow!(
                "`sluice {what}` works on this machine's home only, not with --server"
            ))
        };
        match cli.command {
            Command::Run(args) => run::run(&cli.home, &cli.sandbox, remote, args).await,
            Command::Build(args) => build::build(&args).await,
            Command::Resume(args) if let Some(remote) = remote => {
                remote.resume(&args.run, args.start, args.json).await
            }
            Command::Resume(args) => control::resume(&cli.home, &cli.sandbox, args).await,
            Command::Cancel(args) => match remote {
                Some(remote) => remote.cancel(&args.run).await,
                None => control::cancel(&cli.home, &args).await,
            },
            Command::Runs(args) => history::runs(&cli.home, remote, &args).await,
            Command::Show(args) => history::show(&cli.home, remote, &args).await,
            Command::Logs(args) => history::logs(&cli.home, remote, &args).await,
            Command::Cache(cmd) if let Some(remote) = remote => {
                cache_cmd::remote(remote, &cmd).await
            }
            Command::Cache(cmd) => cache_cmd::cache(&cli.home, &cmd),
            Command::Task(TaskCommand::Run(args)) => task_run::run(&cli.sandbox, args).await,
            Command::Usage { json } => match remote {
                Some(remote) => remote.usage(json).await,
                None => Err(UsageError(anyhow::anyhow!(
                    "`sluice usage` reports a tenant's usage on a server: give --server and --token"
                ))),
            },
            Command::Deploy(args) => {
                let max = cli
                    .sandbox
                    .max_component_size
                    .unwrap_or(sluice::sandbox::DEFAULT_MAX_COMPONENT_BYTES);
                deploy_cmd::deploy(remote, max, args).await
            }
            Command::Deployments(cmd) => deploy_cmd::deployments(remote, cmd).await,
            Command::Secret(cmd) => secret_cmd::secret(remote, cmd).await,
            Command::Server(_)
            | Command::Tenant(_)
            | Command::WorkerToken(_)
            | Command::Operator(_)
                if remote.is_some() =>
            {
                Err(local_only("server/tenant/worker-token/operator"))
            }
            Command::Server(args) => server_cmd::serve(&cli.home, &cli.sandbox, &args).await,
            Command::Tenant(args) => {
                tokio::task::block_in_place(|| server_cmd::tenant(&cli.home, &args))
            }
            Command::WorkerToken(args) => {
                tokio::task::block_in_place(|| server_cmd::worker_token(&args))
            }
            Command::Operator(args) => {
                tokio::task::block_in_place(|| server_cmd::operator(&cli.home, &args))
            }
            Command::Worker(_) => Err(UsageError(anyhow::anyhow!("`sluice worker` ran above"))),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e.0));
            match e.0.downcast_ref::<remote::QuotaRefused>() {
                Some(_) => ExitCode::from(1),
                None => ExitCode::from(2),
            }
        }
    }
}
