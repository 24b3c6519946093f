//! One `[tasks.X]` table converted into a [`TaskDef`]: its component, input, dependencies,
//! retries and backoff, budget (fuel, timeout, memory), mapping, hooks, cache policy and
//! grants, every bad value reported at its position.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::grants::{Placed, Policy, task_grants};
use super::raw::RawTask;
use super::source::{Source, TaskSpans};
use super::values::{cache_validator, component, map_over, normalize, size};
use super::{ComponentFiles, ManifestError, to_json};
use crate::cache::{CachePolicy, CacheValidator};
use crate::flow::{Backoff, Hooks, Input, MapOver, TaskDef};
use crate::sandbox::RunBudget;

pub(super) fn task_def(
    src: &Source<'_>,
    dir: &Path,
    name: String,
    mut raw: RawTask,
    table: Range<usize>,
    flow_grants: &Placed,
    (policy, files): (Option<&Policy>, &dyn ComponentFiles),
) -> Result<(TaskDef, TaskSpans), ManifestError> {
    let component_span = raw.component.span();
    let (path, build, sources) = component(
        src,
        (&format!("task `{name}`"), "component"),
        &raw.component,
        &[],
    )?;
    let component = files
        .file(
            &normalize(Path::new(&path)),
            &normalize(&dir.join(&path)),
            build.is_some(),
        )
        .map_err(|why| {
            src.error(
                component_span,
                format!("task `{name}`: component file `{path}` {why}"),
            )
        })?;
    let mut task = TaskDef::new(name.clone(), component);
    let grants = task_grants(src, dir, &name, raw.grants.take(), flow_grants)?;
    if let Some(policy) = policy {
        policy.check(src, &name, &grants)?;
    }
    task.grants = grants.grants;
    task.build = build;
    task.sources = sources.iter().map(|s| normalize(&dir.join(s))).collect();
    let mut spans = TaskSpans {
        table,
        ..TaskSpans::default()
    };
    if let Some(input) = raw.input {
        spans.input = Some(input.span());
        task.input = Input::from_json(to_json(input.into_inner()));
    }
    spans.upstream = raw
        .upstream_tasks
        .iter()
        .map(|s| (s.get_ref().clone(), s.span()))
        .collect();
    task.upstream_tasks = raw
        .upstream_tasks
        .into_iter()
        .map(Spanned::into_inner)
        .collect();
    task.trigger = raw.trigger.unwrap_or_default();
    task.retries = raw.retries;
    let duration = |s: &Spanned<String>, what: &str| {
        humantime::parse_duration(s.get_ref()).map_err(|e| {
            src.error(
                s.span(),
                format!(
                    "task `{name}`: `{what}` = \"{}\" is not a duration like \"30s\" or \"500ms\": {e}",
                    s.get_ref()
                ),
            )
        })
    };
    if let Some(d) = &raw.retry_delay {
        task.retry_delay = duration(d, "retry_delay")?;
    }
    if let Some(b) = &raw.backoff {
        let max = match &b.max {
            Some(m) => duration(m, "backoff.max")?,
            None => Duration::from_secs(3600),
        };
        task.backoff = Some(Backoff {
            factor: b.factor,
            max,
            jitter: b.jitter,
        });
    }
    if let Some(d) = &raw.max_retry_delay {
        task.max_retry_delay = duration(d, "max_retry_delay")?;
    }
    let mut budget = RunBudget::default();
    if let Some(f) = &raw.fuel {
        budget.fuel = match f.get_ref() {
            toml::Value::Integer(n) if *n >= 0 => Some(n.unsigned_abs()),
            toml::Value::String(w) if w == "unlimited" => None,
            other => {
                return Err(src.error(
                    f.span(),
                    format!(
                        "task `{name}`: `fuel` = {other} must be a number of fuel units (0 or \
                         more) or \"unlimited\""
                    ),
                ));
            }
        };
    }
    if let Some(t) = &raw.timeout {
        budget.timeout = duration(t, "timeout")?;
        if budget.timeout.is_zero() {
            return Err(src.error(
                t.span(),
                format!(
                    "task `{name}`: `timeout` = \"{}\" would stop every run before it starts: \
                     give a duration longer than zero, like \"30s\"",
                    t.get_ref()
                ),
            ));
        }
    }
    if let Some(m) = &raw.memory {
        budget.memory_bytes = size(src, &format!("task `{name}`: `memory`"), m, "64MiB")?;
    }
    if let Some(n) = raw.http_requests {
        budget.http_requests = n;
    }
    if let Some(b) = &raw.http_response_bytes {
        let what = format!("task `{name}`: `http_response_bytes`");
        budget.http_response_bytes = size(src, &what, b, "8MiB")?;
    }
    for (raw, field, key) in [
        (
            &raw.http_connect_timeout,
            &mut budget.http_connect_timeout,
            "http_connect_timeout",
        ),
        (
            &raw.http_read_timeout,
            &mut budget.http_read_timeout,
            "http_read_timeout",
        ),
    ] {
        if let Some(t) = raw {
            *field = duration(t, key)?;
            if field.is_zero() {
                return Err(src.error(
                    t.span(),
                    format!("task `{name}`: `{key}` must be longer than zero, like \"10s\""),
                ));
            }
        }
    }
    task.budget = budget;
    spans.map = raw.map.as_ref().map(Spanned::span);
    task.map = match &raw.map {
        None => MapOver::No,
        Some(m) => map_over(src, &name, m)?,
    };
    task.skip_on_upstream_skip = raw.skip_on_upstream_skip;
    task.tags = raw.tags;
    if let Some(bad) = raw.worker_tags.iter().find(|t| {
        let t = t.get_ref();
        t.is_empty() || t.chars().any(char::is_control) || t.contains(',')
    }) {
        return Err(src.error(
            bad.span(),
            format!(
                "task `{name}`: `worker_tags` entry {:?} is not a tag: tags are not empty and \
                 hold no comma or control character",
                bad.get_ref()
            ),
        ));
    }
    task.worker_tags = raw
        .worker_tags
        .into_iter()
        .map(Spanned::into_inner)
        .collect();
    let hooks = |list: Vec<Spanned<String>>| -> Result<Vec<PathBuf>, ManifestError> {
        list.into_iter()
            .map(|h| {
                let written = Path::new(h.get_ref());
                files
                    .file(&normalize(written), &normalize(&dir.join(written)), false)
                    .map_err(|why| {
                        src.error(
                            h.span(),
                            format!("task `{name}`: handler component `{}` {why}", h.get_ref()),
                        )
                    })
            })
            .collect()
    };
    task.hooks = Hooks {
        on_completion: hooks(raw.on_completion)?,
        on_failure: hooks(raw.on_failure)?,
        on_retry: hooks(raw.on_retry)?,
        on_state: hooks(raw.on_state)?,
    };
    let validator = raw
        .cache_validator
        .as_ref()
        .map(|v| cache_validator(src, &name, v))
        .transpose()?;
    task.cache = match (&raw.cache_for, validator) {
        (Some(d), validator) => Some(CachePolicy {
            cache_for: duration(d, "cache_for")?,
            validator: validator.unwrap_or(CacheValidator::DurationOnly),
        }),
        (None, Some(_)) => {
            let span = raw.cache_validator.as_ref().map_or(0..0, Spanned::span);
            return Err(src.error(
                span,
                format!("task `{name}`: `cache_validator` needs `cache_for` (how long outputs stay cached)"),
            ));
        }
        (None, None) => None,
    };
    Ok((task, spans))
}
