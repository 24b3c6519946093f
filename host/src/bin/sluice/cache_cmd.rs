//! `sluice cache ls|show|clear`: the output cache ("time travel") entries in the store.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use sluice::server::wire::{CacheItem, CacheValue};
use sluice::store::{SqliteStore, Store, StoreError};

use crate::remote::Remote;
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
            let items: Vec<CacheItem> = entries
                .into_iter()
                .map(|entry| CacheItem {
                    valid: entry.expires_at > now,
                    entry,
                })
                .collect();
            render_ls(&items, *json)
        }
        CacheCommand::Show { key, json } => {
            let (entry, value) = store.cache_entry(key).map_err(usage)?;
            let value = serde_json::to_value(&value).unwrap_or_default();
            render_show(
                &CacheValue {
                    item: CacheItem {
                        valid: entry.expires_at > now,
                        entry,
                    },
                    value,
                },
                *json,
            )
        }
        CacheCommand::Clear { task, expired } => {
            let n = store
                .clear_cache(task.as_deref(), expired.then_some(now))
                .map_err(usage)?;
            render_clear(n as u64)
        }
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}

/// `sluice cache … --server`: the same commands on the tenant's cache there.
pub(crate) async fn remote(remote: &Remote, cmd: &CacheCommand) -> Result<ExitCode, UsageError> {
    let out = match cmd {
        CacheCommand::Ls { task, json } => {
            render_ls(&remote.cache_entries(task.as_deref()).await?, *json)
        }
        CacheCommand::Show { key, json } => render_show(&remote.cache_entry(key).await?, *json),
        CacheCommand::Clear { task, expired } => {
            render_clear(remote.clear_cache(task.as_deref(), *expired).await?)
        }
    };
    crate::print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}

/// `cache ls`: a table, or JSON (each entry with `valid`).
fn render_ls(items: &[CacheItem], json: bool) -> String {
    if json {
        return format!("{:#}\n", json!(items));
    }
    let mut s = format!(
        "{:<16}  {:<20}  {:<24}  {:<19}  {:<19}  {:>9}  RUN\n",
        "KEY", "TASK", "VALIDATOR", "CREATED", "EXPIRES", "SIZE"
    );
    for CacheItem { entry: e, valid } in items {
        let expires = if *valid {
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
    if items.is_empty() {
        s.push_str("(no cache entries)\n");
    }
    s
}

/// `cache show`: the entry and its value.
fn render_show(v: &CacheValue, json: bool) -> String {
    if json {
        return format!("{:#}\n", json!(v));
    }
    let entry = &v.item.entry;
    format!(
        "key        {}\ntask       {}\nvalidator  {}\ncomponent  {}\ncreated    {}\nexpires    {}{}\nproduced   flow run {} (task run {})\nblob       {} ({})\nvalue      {}\n",
        entry.key,
        entry.task,
        entry.validator,
        entry.component,
        entry.created_at.to_rfc3339(),
        entry.expires_at.to_rfc3339(),
        if v.item.valid { "" } else { " (expired)" },
        entry.flow_run,
        entry.task_run,
        entry.blob,
        bytesize::ByteSize(entry.size),
        truncate(&v.value.to_string(), 2000)
    )
}

fn render_clear(n: u64) -> String {
    format!(
        "removed {n} cache entr{}\n",
        if n == 1 { "y" } else { "ies" }
    )
}
