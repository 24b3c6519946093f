//! `sluice server` (serve the API of a home) and `sluice tenant` (edit its tenant registry).

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::anyhow;
use sluice::server::{Server, Tenants};

use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// The address to listen on (port 0: any free port; the address is printed first).
    #[arg(long, default_value = "127.0.0.1:7311")]
    listen: SocketAddr,
}

#[derive(Debug, clap::Subcommand)]
pub(crate) enum TenantCommand {
    /// Add a tenant; its token is printed once, on the last line of stdout.
    Add {
        /// The tenant's name: lowercase letters, digits, `-` and `_`.
        name: String,
    },
    /// List tenants.
    Ls,
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
    let sandbox = sandbox
        .builder()
        .build()
        .map_err(|e| UsageError(anyhow!("cannot start the sandbox: {e}")))?;
    let server = Server::open(home, sandbox).map_err(usage)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| UsageError(anyhow!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| UsageError(anyhow!("cannot listen on {}: {e}", args.listen)))?;
    crate::print_stdout(&format!("sluice server listening on http://{addr}\n"));
    eprintln!(
        "serving {} ({} tenants); stop with Ctrl-C",
        home.display(),
        server.tenants().list().map_err(usage)?.len()
    );
    let shutdown = async {
        let name = crate::run::interrupt_signals().await;
        eprintln!("\nstopping ({name})");
    };
    server.serve(listener, shutdown).await.map_err(usage)?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn tenant(home: &Path, cmd: &TenantCommand) -> Result<ExitCode, UsageError> {
    let tenants = Tenants::open(home).map_err(usage)?;
    match cmd {
        TenantCommand::Add { name } => {
            let (tenant, token) = tenants.add(name, chrono::Utc::now()).map_err(usage)?;
            crate::print_stdout(&format!(
                "added tenant {} ({}); its token, shown only now:\n{token}\n",
                tenant.name, tenant.id
            ));
        }
        TenantCommand::Ls => {
            let list = tenants.list().map_err(usage)?;
            let width = crate::report::column_width(list.iter().map(|t| t.name.as_str()));
            let mut out = format!("{:<width$}  {:<26}  CREATED\n", "NAME", "ID");
            for t in &list {
                out.push_str(&format!(
                    "{:<width$}  {:<26}  {}\n",
                    t.name,
                    t.id.to_string(),
                    crate::report::when(t.created_at)
                ));
            }
            if list.is_empty() {
                out.push_str(&format!("(no tenants in {})\n", home.display()));
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
