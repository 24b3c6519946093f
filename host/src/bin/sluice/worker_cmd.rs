//! `sluice worker --server URL --token T`: run task runs for a server that gives them to
//! workers (`sluice server --database URL --workers`). See [`sluice::worker`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;

use crate::UsageError;

#[derive(Debug, clap::Args)]
pub(crate) struct WorkerArgs {
    /// How many task runs this worker runs at once. Default: twice the machine's cores.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: Option<u32>,

    /// Tags this worker carries, comma-separated: it also claims task runs whose task asks for
    /// them (`worker_tags` in the manifest; it must carry every one); untagged task runs go to
    /// any worker.
    #[arg(long, value_delimiter = ',', value_name = "TAGS")]
    tags: Vec<String>,

    /// Where fetched components are kept. Default: `worker` beside the artifact cache
    /// (`~/.cache/sluice/worker`).
    #[arg(long, env = "SLUICE_WORKER_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Run the worker until interrupted (SIGINT, SIGTERM): then it finishes and reports what it
/// holds.
pub(crate) async fn work(
    server: Option<&str>,
    token: Option<&str>,
    sandbox: &crate::SandboxArgs,
    args: &WorkerArgs,
) -> Result<ExitCode, UsageError> {
    let server = server.ok_or_else(|| {
        UsageError(anyhow!(
            "`sluice worker` needs the server: give --server URL (or SLUICE_SERVER)"
        ))
    })?;
    let token = token
        .map(str::to_owned)
        .or_else(|| std::env::var("SLUICE_WORKER_TOKEN").ok())
        .ok_or_else(|| {
            UsageError(anyhow!(
                "`sluice worker` needs a worker token (from `sluice worker-token add NAME`): \
                 give --token TOKEN (or SLUICE_WORKER_TOKEN)"
            ))
        })?;
    if let Some(tag) = args
        .tags
        .iter()
        .find(|t| t.is_empty() || t.chars().any(char::is_control))
    {
        return Err(UsageError(anyhow!(
            "--tags: {tag:?} is not a tag (tags are not empty and have no control characters)"
        )));
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => sluice::sandbox::default_artifact_dir()
            .and_then(|a| a.parent().map(|p| p.join("worker")))
            .ok_or_else(|| {
                UsageError(anyhow!(
                    "no per-user cache directory (set XDG_CACHE_HOME or HOME): give --dir"
                ))
            })?,
    };
    let sandbox = sandbox
        .builder()
        .build()
        .map_err(|e| UsageError(anyhow!("cannot start the sandbox: {e}")))?;
    let concurrency = args.concurrency.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(2, |n| {
            u32::try_from(n.get()).unwrap_or(u32::MAX).saturating_mul(2)
        })
    });
    let config = sluice::worker::WorkerConfig {
        server: server.to_owned(),
        token,
        concurrency,
        tags: args.tags.clone(),
        dir,
    };
    eprintln!(
        "sluice worker serving {server} ({concurrency} at once{}); stop with Ctrl-C",
        match args.tags.is_empty() {
            true => String::new(),
            false => format!(", tags {}", args.tags.join(",")),
        }
    );
    let shutdown = async {
        let name = crate::run::interrupt_signals().await;
        eprintln!("\nstopping ({name}): finishing the task runs held");
    };
    sluice::worker::run(config, sandbox, shutdown)
        .await
        .map_err(|e| UsageError(anyhow!("{e}")))?;
    Ok(ExitCode::SUCCESS)
}
