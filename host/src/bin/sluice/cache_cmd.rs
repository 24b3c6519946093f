//! `sluice cache ls|show|clear`: the output cache ("time travel") entries in the store.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use sluice::store::{SqliteStore, Store, StoreError};

use crate::report::{truncate, when};
use crate::{UsageError, usage};

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CacheCommand {
    /// List cache entries, newest first.
    Ls {
        /// Only this task's entries.
        #[arg(long)]
        task: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one entry and its cached value.
    Show {
        /// The entry's key (or a unique prefix of it).
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove entries (every one, one task's, or only expired ones). Runs keep their results.
    Clear {
        /// Only this task's entries.
        #[arg(long)]
        task: Option<String>,
        /// Only entries that have expired.
        #[arg(long)]
        expired: bool,
    },
}

/// Open the store; `ls` and `show` also read a read-only home (as `sluice runs` does), `clear`
/// needs to write.
fn open(home: &Path, cmd: &CacheCommand) -> Result<SqliteStore, UsageError> {
    match SqliteStore::open(home) {
        Ok(s) => Ok(s),
        Err(e @ StoreError::ReadOnly { .. })
            if matches!(cmd, CacheCommand::Ls { .. } | CacheCommand::Show { .. }) =>
        {
            eprintln!("warning: {e}; showing the cache as it was left");
            SqliteStore::open_read_only(home).map_err(usage)
        }
        Err(e) => Err(usage(e)),
    }
}

pub(crate) fn cache(home: &Path, cmd: &CacheCommand) -> Result<ExitCode, UsageError> {
    let store = open(home, cmd)?;
    let now = chrono::Utc::now();
    let out = match cmd {
        CacheCommand::Ls { task, json } => {
            let entries = store.cache_entries(task.as_deref()).map_err(usage)?;
            if *json {
                let list: Vec<_> = entries
                    .iter()
                    .map(|e| {
                        let mut v = json!(e);
                        v["valid"] = json!(e.expires_at > now);
                        v
                    })
                    .collect();
                format!("{:#}\n", json!(list))
            } else {
                let mut s = format!(
                    "{:<16}  {:<20}  {:<24}  {:<19}  {:<19}  {:>9}  RUN\n",
                    "KEY", "TASK", "VALIDATOR", "CREATED", "EXPIRES", "SIZE"
                );
                for e in &entries {
                    let expires = if e.expires_at > now {
                        when(e.expires_at)
                    } else {
                        format!("expired {}", e.expires_at.format("%m-%d %H:%M"))
                    };
                    s.push_str(&format!(
                        "{:<16}  {:<20}  {:<24}  {:<19}  {:<19}  {:>9}  {}\n",
                        &e.key[..16.min(e.key.len())],
                        truncate(&e.task, 20),
                        truncate(&e.validator, 24),
                        when(e.created_at),
                        expires,
                        bytesize::ByteSize(e.size).to_string(),
                        e.flow_run
                    ));
                }
                if entries.is_empty() {
                    s.push_str("(no cache entries)\n");
                }
                s
            }
        }
        CacheCommand::Show { key, json } => {
            let (entry, value) = store.cache_entry(key).map_err(usage)?;
            if *json {
                let mut v = json!(entry);
                v["valid"] = json!(entry.expires_at > now);
                v["value"] = json!(value);
                format!("{v:#}\n")
            } else {
                format!(
                    "key        {}\ntask       {}\nvalidator  {}\ncomponent  {}\ncreated    {}\nexpires    {}{}\nproduced   flow run {} (task run {})\nblob       {} ({})\nvalue      {}\n",
                    entry.key,
                    entry.task,
                    entry.validator,
                    entry.component,
                    entry.created_at.to_rfc3339(),
                    entry.expires_at.to_rfc3339(),
                    if entry.expires_at > now {
                        ""
                    } else {
                        " (expired)"
                    },
                    entry.flow_run,
                    entry.task_run,
                    entry.blob,
                    bytesize::ByteSize(entry.size),
                    truncate(&value.to_string(), 2000)
                )
            }
        }
        CacheCommand::Clear { task, expired } => {
            let n = store
                .clear_cache(task.as_deref(), expired.then_some(now))
                .map_err(usage)?;
            format!(
                "removed {n} cache entr{}\n",
                if n == 1 { "y" } else { "ies" }
            )
        }
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}
