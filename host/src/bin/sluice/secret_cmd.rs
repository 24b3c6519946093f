//! `sluice secret set|ls|rm --server …`: the tenant's secrets on a server, stored there
//! encrypted; runs read them only where their manifests grant them.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::anyhow;
use reqwest::Method;
use sluice::server::wire::{SecretInfo, SetSecret};

use crate::UsageError;
use crate::remote::Remote;

/// `sluice secret …`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum SecretCommand {
    /// Set a secret to the value read from stdin (one trailing newline is dropped), e.g.
    /// `printf %s "$TOKEN" | sluice secret set API_TOKEN`: the value never appears in a command
    /// line.
    Set {
        /// The secret's name (letters, digits and `_`).
        name: String,
    },
    /// List the secrets' names and when they were set (never their values).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
}

pub(crate) async fn secret(
    remote: Option<&Remote>,
    cmd: SecretCommand,
) -> Result<ExitCode, UsageError> {
    let remote = remote.ok_or_else(|| {
        UsageError(anyhow!(
            "`sluice secret` sets a tenant's secrets on a server: --server URL --token TOKEN \
             (or SLUICE_SERVER and SLUICE_TOKEN); locally, use --secrets FILE or \
             SLUICE_SECRET_<NAME>"
        ))
    })?;
    let out = match cmd {
        SecretCommand::Set { name } => {
            let mut value = String::new();
            std::io::stdin()
                .take(sluice::server::secrets::MAX_SECRET_BYTES as u64 + 2)
                .read_to_string(&mut value)
                .map_err(|e| UsageError(anyhow!("reading the value from stdin: {e}")))?;
            if value.ends_with('\n') {
                value.pop();
                if value.ends_with('\r') {
                    value.pop();
                }
            }
            remote
                .no_content(
                    Method::PUT,
                    &format!("/secrets/{}", crate::remote::encode(&name)),
                    Some(&SetSecret { value }),
                )
                .await?;
            format!("secret {name} set\n")
        }
        SecretCommand::Ls { json } => {
            let list: Vec<SecretInfo> = remote.get("/secrets").await?;
            if json {
                serde_json::to_string_pretty(&list).unwrap_or_default() + "\n"
            } else if list.is_empty() {
                "no secrets\n".to_owned()
            } else {
                list.iter()
                    .map(|s| format!("{:<32}  set {}\n", s.name, s.updated_at.to_rfc3339()))
                    .collect()
            }
        }
        SecretCommand::Rm { name } => {
            remote
                .no_content(
                    Method::DELETE,
                    &format!("/secrets/{}", crate::remote::encode(&name)),
                    None::<&()>,
                )
                .await?;
            format!("secret {name} removed\n")
        }
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}
