//! `sluice deploy flow.toml` and `sluice deployments ls|pause|resume|rm|runs`: deployments run
//! on a server's schedules, so these talk to one (`--server`, `--token`).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use sluice::server::wire::{Deploy, DeploymentRuns, DeploymentView};

use crate::UsageError;
use crate::remote::Remote;

/// `sluice deploy`.
#[derive(Debug, clap::Args)]
pub(crate) struct DeployArgs {
    /// The flow manifest: it needs a `[schedule]` table.
    flow: PathBuf,
    /// The deployment's name (default: the flow's name). Deploying a name again replaces it.
    #[arg(long)]
    name: Option<String>,
    /// Build the flow's components first (as `sluice build`).
    #[arg(long)]
    build: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `sluice deployments …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum DeploymentsCommand {
    /// List deployments with their schedules and next runs.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pause a deployment: it starts nothing until resumed (its scheduled runs turn Late).
    Pause {
        /// The deployment.
        name: String,
    },
    /// Resume a deployment; runs missed meanwhile start or are skipped as its `catchup` says.
    Resume {
        /// The deployment.
        name: String,
    },
    /// Remove a deployment and its runs not started (its past runs stay).
    Rm {
        /// The deployment.
        name: String,
    },
    /// A deployment's upcoming runs and its past ones.
    Runs {
        /// The deployment.
        name: String,
        /// At most this many past runs.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn needs_server(what: &str) -> UsageError {
    UsageError(anyhow!(
        "`sluice {what}` needs a server, which runs deployments on their schedules: \
         --server URL --token TOKEN (or SLUICE_SERVER and SLUICE_TOKEN)"
    ))
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

/// `sluice deploy`.
pub(crate) async fn deploy(
    remote: Option<&Remote>,
    max_component_bytes: u64,
    args: DeployArgs,
) -> Result<ExitCode, UsageError> {
    let remote = remote.ok_or_else(|| needs_server("deploy"))?;
    let Some(flow) = remote
        .flow_request(
            &args.flow,
            max_component_bytes,
            args.build,
            Default::default(),
            Default::default(),
        )
        .await?
    else {
        return Ok(ExitCode::from(1));
    };
    let view = remote
        .deploy(&Deploy {
            name: args.name,
            flow,
        })
        .await?;
    crate::print_stdout(&if args.json {
        json(&view)
    } else {
        format!("deployed on {remote}\n{}", describe(&view))
    });
    Ok(ExitCode::SUCCESS)
}

/// `sluice deployments …`.
pub(crate) async fn deployments(
    remote: Option<&Remote>,
    cmd: DeploymentsCommand,
) -> Result<ExitCode, UsageError> {
    let remote = remote.ok_or_else(|| needs_server("deployments"))?;
    let out = match cmd {
        DeploymentsCommand::Ls { json: true } => json(&remote.deployments().await?),
        DeploymentsCommand::Ls { json: false } => {
            let all = remote.deployments().await?;
            if all.is_empty() {
                "no deployments\n".to_owned()
            } else {
                all.iter().map(describe).collect::<Vec<_>>().join("\n")
            }
        }
        DeploymentsCommand::Pause { name } => describe(&remote.set_paused(&name, true).await?),
        DeploymentsCommand::Resume { name } => describe(&remote.set_paused(&name, false).await?),
        DeploymentsCommand::Rm { name } => {
            remote.remove_deployment(&name).await?;
            format!("removed deployment {name}\n")
        }
        DeploymentsCommand::Runs {
            name,
            limit,
            json: j,
        } => {
            let runs = remote.deployment_runs(&name, limit).await?;
            if j { json(&runs) } else { render_runs(&runs) }
        }
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}

/// A deployment in a few lines.
fn describe(d: &DeploymentView) -> String {
    let mut s = format!(
        "{}  flow {}  {}{}\n  catchup {}, late after {}s\n",
        d.name,
        d.flow,
        d.schedule,
        if d.paused { "  PAUSED" } else { "" },
        d.catchup,
        d.late_after_seconds
    );
    if !d.parameters.is_empty() {
        let params = serde_json::to_string(&d.parameters).unwrap_or_default();
        let _ = writeln!(s, "  parameters {params}");
    }
    for at in &d.upcoming {
        let _ = writeln!(s, "  next {}", at.to_rfc3339());
    }
    s
}

/// `deployments runs`: a table of slots, upcoming first.
fn render_runs(r: &DeploymentRuns) -> String {
    let mut s = format!("deployment {}\n", r.deployment);
    let _ = writeln!(s, "{:<25} {:<10} {:<26} MESSAGE", "AT", "STATE", "RUN");
    for slot in r.upcoming.iter().chain(&r.past) {
        let _ = writeln!(
            s,
            "{:<25} {:<10} {:<26} {}",
            slot.at.to_rfc3339(),
            slot.state,
            slot.run.map_or_else(|| "-".to_owned(), |id| id.to_string()),
            slot.message.as_deref().unwrap_or("")
        );
    }
    if r.upcoming.is_empty() && r.past.is_empty() {
        s.push_str("(no runs yet)\n");
    }
    s
}
