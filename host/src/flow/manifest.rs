//! Flow manifests: TOML files that describe a flow. Parsing checks everything before anything
//! runs and reports each problem with the file, line and column: unknown keys (with a
//! did-you-mean), wrong types, missing component files, references to unknown tasks or
//! parameters, and cycles (named).
//!
//! ```toml
//! name = "example"
//! reference_tasks = ["load"]          # optional; default: the terminal tasks
//! concurrency = 8                     # optional; default 64
//!
//! [parameters]                        # name = default
//! count = 3
//!
//! [context]                           # key = "value", read by tasks
//! key = "abc"
//!
//! [tag_limits]                        # tag = how many of its runs at once
//! db = 1
//!
//! [tasks.extract]
//! component = "tasks/extract.wasm"    # or { path = "…", build = "shell command",
//!                                     #       sources = ["src/"] } (rebuilt when newer)
//! input = { n = "$params.count" }     # "$params.X", "$tasks.X" are references; "$$" escapes
//!
//! [tasks.load]
//! component = "tasks/load.wasm"
//! input = "$tasks.extract"
//! upstream_tasks = []                 # state-only dependencies
//! trigger = "all_successful"          # all_failed, any_successful, any_failed, all_finished, manual_only
//! retries = 2
//! retry_delay = "1s"
//! backoff = { factor = 2.0, max = "1m", jitter = 0.1 }
//! fuel = 1000000                      # or "unlimited"
//! timeout = "30s"
//! memory = "64MiB"
//! map = true                          # or ["field", …]
//! skip_on_upstream_skip = true
//! tags = ["db"]
//! on_completion = ["handlers/notify.wasm"]   # also on_failure, on_retry, on_state
//! cache_for = "1h"                    # output caching ("time travel")
//! cache_validator = "all_inputs"      # duration_only (default), all_parameters, never_use,
//!                                     # { partial_inputs_only = ["x"] },
//!                                     # { partial_parameters_only = ["p"] }
//! max_retry_delay = "1h"              # the longest delay a RETRY signal may ask for (default
//!                                     # 1h; with a backoff, at most backoff.max)
//! ```
//!
//! Flow keys besides those above: `cache_namespace = "etl"` (share cached outputs with the other
//! flows of that namespace; default: the flow's own name, nothing shared) and
//! `max_mapped_children = 100000` (the most mapped children of one flow run, summed over its
//! mapped tasks; default 100,000) and `max_log_bytes = "256MiB"` (the most bytes of logs one flow
//! run keeps, summed over its task runs; a size or a number of bytes; default 256 MiB).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Backoff, DEFAULT_CONCURRENCY, FlowDef, FlowError, Hint, Hooks, Input, MapOver, TaskDef, Trigger,
};
use crate::cache::{CachePolicy, CacheValidator};
use crate::sandbox::RunBudget;

/// A problem in a manifest, with its position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct ManifestError {
    /// The manifest file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    name: String,
    #[serde(default)]
    parameters: BTreeMap<String, toml::Value>,
    #[serde(default)]
    context: BTreeMap<String, String>,
    #[serde(default)]
    reference_tasks: Vec<Spanned<String>>,
    concurrency: Option<Spanned<usize>>,
    #[serde(default)]
    tag_limits: BTreeMap<String, Spanned<usize>>,
    #[serde(default)]
    tasks: indexmap::IndexMap<String, Spanned<RawTask>>,
    cache_namespace: Option<String>,
    max_mapped_children: Option<usize>,
    max_log_bytes: Option<Spanned<toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    component: Spanned<toml::Value>,
    input: Option<Spanned<toml::Value>>,
    #[serde(default)]
    upstream_tasks: Vec<Spanned<String>>,
    trigger: Option<Trigger>,
    #[serde(default)]
    retries: u32,
    retry_delay: Option<Spanned<String>>,
    backoff: Option<RawBackoff>,
    fuel: Option<Spanned<toml::Value>>,
    timeout: Option<Spanned<String>>,
    memory: Option<Spanned<toml::Value>>,
    map: Option<Spanned<toml::Value>>,
    #[serde(default = "yes")]
    skip_on_upstream_skip: bool,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    on_completion: Vec<Spanned<String>>,
    #[serde(default)]
    on_failure: Vec<Spanned<String>>,
    #[serde(default)]
    on_retry: Vec<Spanned<String>>,
    #[serde(default)]
    on_state: Vec<Spanned<String>>,
    cache_for: Option<Spanned<String>>,
    cache_validator: Option<Spanned<toml::Value>>,
    max_retry_delay: Option<Spanned<String>>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    #[serde(default = "two")]
    factor: f64,
    max: Option<Spanned<String>>,
    #[serde(default)]
    jitter: f64,
}

fn two() -> f64 {
    2.0
}

/// Positions of the parts of a manifest that later checks point at.
#[derive(Debug, Default)]
struct Spans {
    tasks: BTreeMap<String, TaskSpans>,
    reference_tasks: Vec<(String, Range<usize>)>,
}

#[derive(Debug, Default)]
struct TaskSpans {
    table: Range<usize>,
    input: Option<Range<usize>>,
    upstream: Vec<(String, Range<usize>)>,
}

struct Source<'a> {
    file: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl fmt::Display) -> ManifestError {
        let at = span.start.min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(at, |nl| at - nl - 1)
            .saturating_add(1);
        ManifestError {
            file: self.file.to_owned(),
            line,
            column,
            message: message.to_string(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ManifestError {
        self.error(e.span().unwrap_or(0..0), with_did_you_mean(e.message()))
    }
}

/// Add a did-you-mean to serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn with_did_you_mean(message: &str) -> String {
    let message = message.trim_end().to_owned();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message;
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let hint = Hint::closest(field, candidates);
    format!("{message}{hint}")
}

/// Read and parse the manifest at `path`. Component paths are resolved against the manifest's
/// directory and must exist (unless a build command is declared).
pub fn load(path: &Path) -> Result<FlowDef, ManifestError> {
    parse(path, &read(path)?)
}

/// The largest manifest read: 16 MiB (manifests are a few kilobytes; this only stops a path
/// like `/dev/zero` from filling memory).
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// Read the manifest at `path`: a regular file of at most [`MAX_MANIFEST_BYTES`], in UTF-8.
pub fn read(path: &Path) -> Result<String, ManifestError> {
    use std::io::Read as _;
    let err = |message: String| ManifestError {
        file: path.to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot read the manifest: {message}"),
    };
    // Looked at before opening: opening a named pipe would wait for a writer.
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err(if meta.is_dir() {
            "it is a directory".into()
        } else {
            "it is not a regular file".into()
        }));
    }
    let too_large = || {
        err(format!(
            "it is larger than the manifest size limit of {MAX_MANIFEST_BYTES} bytes (16 MiB)"
        ))
    };
    if meta.len() > MAX_MANIFEST_BYTES {
        return Err(too_large());
    }
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(too_large());
    }
    String::from_utf8(bytes).map_err(|e| err(format!("it is not UTF-8: {e}")))
}

/// Parse manifest `text`, read from `file` (used for positions and to resolve relative paths).
pub fn parse(file: &Path, text: &str) -> Result<FlowDef, ManifestError> {
    let src = Source { file, text };
    let dir = file.parent().unwrap_or(Path::new("."));
    let raw: RawFlow = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    let mut spans = Spans::default();

    let parameters = raw
        .parameters
        .into_iter()
        .map(|(k, v)| (k, to_json(v)))
        .collect();
    let mut tasks = Vec::new();
    for (name, raw_task) in raw.tasks {
        let table_span = raw_task.span();
        let (task, task_spans) =
            task_def(&src, dir, name.clone(), raw_task.into_inner(), table_span)?;
        spans.tasks.insert(name, task_spans);
        tasks.push(task);
    }
    spans.reference_tasks = raw
        .reference_tasks
        .iter()
        .map(|s| (s.get_ref().clone(), s.span()))
        .collect();

    // A limit of 0 would block its tasks forever.
    let concurrency = match raw.concurrency {
        None => DEFAULT_CONCURRENCY,
        Some(n) if *n.get_ref() == 0 => {
            return Err(src.error(
                n.span(),
                "`concurrency` = 0 would run nothing: it is how many task runs may run at once, \
                 at least 1",
            ));
        }
        Some(n) => n.into_inner(),
    };
    let mut tag_limits = BTreeMap::new();
    for (tag, n) in raw.tag_limits {
        if *n.get_ref() == 0 {
            return Err(src.error(
                n.span(),
                format!(
                    "`tag_limits.{tag}` = 0 would block every task tagged `{tag}`: it is how many \
                     of them may run at once, at least 1"
                ),
            ));
        }
        tag_limits.insert(tag, n.into_inner());
    }
    let def = FlowDef {
        name: raw.name,
        parameters,
        context: raw.context,
        tasks,
        reference_tasks: raw
            .reference_tasks
            .into_iter()
            .map(Spanned::into_inner)
            .collect(),
        concurrency,
        tag_limits,
        cache_namespace: raw.cache_namespace,
        max_mapped_children: raw
            .max_mapped_children
            .unwrap_or(super::DEFAULT_MAX_MAPPED_CHILDREN),
        max_log_bytes: match &raw.max_log_bytes {
            None => super::DEFAULT_MAX_LOG_BYTES,
            Some(v) => size(&src, "`max_log_bytes`", v, "256MiB")?,
        },
    };
    def.validate().map_err(|e| locate(&src, &spans, e))?;
    Ok(def)
}

/// A size: a string like `example` (`64MiB`) or a number of bytes; `what` names the key.
fn size(
    src: &Source<'_>,
    what: &str,
    v: &Spanned<toml::Value>,
    example: &str,
) -> Result<u64, ManifestError> {
    let bad = |detail: String| {
        src.error(
            v.span(),
            format!(
                "{what} = {} must be a size like \"{example}\" or a number of bytes{detail}",
                v.get_ref()
            ),
        )
    };
    match v.get_ref() {
        toml::Value::Integer(n) if *n >= 0 => Ok(n.unsigned_abs()),
        toml::Value::String(t) => t
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| bad(format!(": {e}"))),
        _ => Err(bad(String::new())),
    }
}

fn task_def(
    src: &Source<'_>,
    dir: &Path,
    name: String,
    raw: RawTask,
    table: Range<usize>,
) -> Result<(TaskDef, TaskSpans), ManifestError> {
    let component_span = raw.component.span();
    let (path, build, sources) = component(src, &name, &raw.component)?;
    let component = normalize(&dir.join(&path));
    if build.is_none() && !component.is_file() {
        return Err(src.error(
            component_span,
            format!(
                "task `{name}`: component file `{path}` {} (looked at {})",
                if component.exists() {
                    "is not a file"
                } else {
                    "does not exist"
                },
                component.display()
            ),
        ));
    }
    let mut task = TaskDef::new(name.clone(), component);
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
    task.budget = budget;
    task.map = match &raw.map {
        None => MapOver::No,
        Some(m) => map_over(src, &name, m)?,
    };
    task.skip_on_upstream_skip = raw.skip_on_upstream_skip;
    task.tags = raw.tags;
    let hooks = |list: Vec<Spanned<String>>| -> Result<Vec<PathBuf>, ManifestError> {
        list.into_iter()
            .map(|h| {
                let path = normalize(&dir.join(h.get_ref()));
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(src.error(
                        h.span(),
                        format!(
                            "task `{name}`: handler component `{}` does not exist (looked at {})",
                            h.get_ref(),
                            path.display()
                        ),
                    ))
                }
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

/// `component`: a path, or `{ path, build, sources }` (no other keys).
fn component(
    src: &Source<'_>,
    task: &str,
    v: &Spanned<toml::Value>,
) -> Result<(String, Option<String>, Vec<String>), ManifestError> {
    const KEYS: [&str; 3] = ["path", "build", "sources"];
    let err = |message: String| src.error(v.span(), format!("task `{task}`: {message}"));
    let table = match v.get_ref() {
        toml::Value::String(path) => return Ok((path.clone(), None, Vec::new())),
        toml::Value::Table(t) => t,
        other => {
            return Err(err(format!(
                "`component` = {other} must be a path like \"tasks/a.wasm\" or a table like \
                 {{ path = \"tasks/a.wasm\", build = \"make\", sources = [\"src/\"] }}"
            )));
        }
    };
    if let Some(unknown) = table.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(err(format!(
            "unknown key `{unknown}` in `component`{}; expected one of `path`, `build`, `sources`",
            Hint::closest(unknown, KEYS)
        )));
    }
    let string = |key: &str| -> Result<Option<String>, ManifestError> {
        match table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(format!("`component.{key}` = {other} must be a string"))),
        }
    };
    let path = string("path")?.ok_or_else(|| {
        err("`component` needs `path` (the component file, built by `build` if given)".into())
    })?;
    let build = string("build")?;
    let sources = match table.get("sources") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_owned).ok_or_else(|| {
                    err(format!(
                        "`component.sources` takes a list of paths (strings), not {i}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(format!(
                "`component.sources` = {other} must be a list of paths, like [\"src/\"]"
            )));
        }
    };
    Ok((path, build, sources))
}

/// `map`: `true`, `false`, or a list of field names.
fn map_over(
    src: &Source<'_>,
    task: &str,
    v: &Spanned<toml::Value>,
) -> Result<MapOver, ManifestError> {
    let err = || {
        src.error(
            v.span(),
            format!(
                "task `{task}`: `map` = {} must be true (one run per element of the input \
                 list), false, or a list of field names like [\"x\"]",
                v.get_ref()
            ),
        )
    };
    match v.get_ref() {
        toml::Value::Boolean(false) => Ok(MapOver::No),
        toml::Value::Boolean(true) => Ok(MapOver::Input),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(err))
            .collect::<Result<_, _>>()
            .map(MapOver::Fields),
        _ => Err(err()),
    }
}

/// `path` with `.` and `..` components resolved lexically (without looking at the file system,
/// so the file need not exist yet): `flows/x/../build/a.wasm` is `flows/build/a.wasm`. A `..`
/// that would climb above the start of a relative path is kept.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // The parent of the root is the root.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// `cache_validator`: a name, or `{ partial_inputs_only = [...] }` /
/// `{ partial_parameters_only = [...] }`.
fn cache_validator(
    src: &Source<'_>,
    task: &str,
    v: &Spanned<toml::Value>,
) -> Result<CacheValidator, ManifestError> {
    const NAMES: [&str; 6] = [
        "duration_only",
        "all_inputs",
        "all_parameters",
        "never_use",
        "partial_inputs_only",
        "partial_parameters_only",
    ];
    let err = |message: String| src.error(v.span(), format!("task `{task}`: {message}"));
    let names = |list: &toml::Value, key: &str| -> Result<Vec<String>, ManifestError> {
        let items = list.as_array().ok_or_else(|| {
            err(format!(
                "`{key}` takes a list of names, like {key} = [\"x\"]"
            ))
        })?;
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(format!("`{key}` takes a list of names (strings)")))
            })
            .collect()
    };
    match v.get_ref() {
        toml::Value::String(s) => match s.as_str() {
            "duration_only" => Ok(CacheValidator::DurationOnly),
            "all_inputs" => Ok(CacheValidator::AllInputs),
            "all_parameters" => Ok(CacheValidator::AllParameters),
            "never_use" => Ok(CacheValidator::NeverUse),
            "partial_inputs_only" | "partial_parameters_only" => Err(err(format!(
                "`{s}` needs the names to validate: cache_validator = {{ {s} = [\"x\"] }}"
            ))),
            other => Err(err(format!(
                "unknown cache_validator `{other}`{}; expected one of {}",
                Hint::closest(other, NAMES),
                NAMES.join(", ")
            ))),
        },
        toml::Value::Table(t) if t.len() == 1 => {
            let (k, list) = t.iter().next().ok_or_else(|| err("empty table".into()))?;
            match k.as_str() {
                "partial_inputs_only" => Ok(CacheValidator::PartialInputsOnly(names(list, k)?)),
                "partial_parameters_only" => {
                    Ok(CacheValidator::PartialParametersOnly(names(list, k)?))
                }
                other => Err(err(format!(
                    "unknown cache_validator `{other}`{}; the table form is {{ partial_inputs_only = [...] }} or {{ partial_parameters_only = [...] }}",
                    Hint::closest(other, NAMES)
                ))),
            }
        }
        _ => Err(err(
            "`cache_validator` is a name like \"all_inputs\" or a table like { partial_inputs_only = [\"x\"] }".into(),
        )),
    }
}

/// Point a validation error at the part of the manifest it is about.
fn locate(src: &Source<'_>, spans: &Spans, e: FlowError) -> ManifestError {
    let task_span = |t: &str| spans.tasks.get(t).map(|s| s.table.clone()).unwrap_or(0..0);
    let span = match &e {
        FlowError::UnknownTask { task, unknown, .. } if task == "reference_tasks" => spans
            .reference_tasks
            .iter()
            .find(|(n, _)| n == unknown)
            .map_or(0..0, |(_, s)| s.clone()),
        FlowError::UnknownTask { task, unknown, .. } => {
            let t = spans.tasks.get(task.as_str());
            t.and_then(|t| t.upstream.iter().find(|(n, _)| n == unknown))
                .map(|(_, s)| s.clone())
                .or_else(|| t.and_then(|t| t.input.clone()))
                .unwrap_or_else(|| task_span(task))
        }
        FlowError::UnknownParameter { task, .. } => spans
            .tasks
            .get(task.as_str())
            .and_then(|t| t.input.clone())
            .unwrap_or_else(|| task_span(task)),
        FlowError::UnknownMapField { task, .. } => task_span(task),
        FlowError::DuplicateTask(task) => task_span(task),
        FlowError::Cycle(path) => path.first().map_or(0..0, |t| task_span(t)),
    };
    src.error(span, e)
}

fn to_json(v: toml::Value) -> serde_json::Value {
    match v {
        toml::Value::String(s) => serde_json::Value::String(s),
        toml::Value::Integer(i) => i.into(),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        toml::Value::Boolean(b) => b.into(),
        toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
        toml::Value::Array(a) => a.into_iter().map(to_json).collect(),
        toml::Value::Table(t) => t.into_iter().map(|(k, v)| (k, to_json(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(dir: &Path, text: &str) -> Result<FlowDef, ManifestError> {
        std::fs::write(dir.join("t.wasm"), b"").expect("write");
        parse(&dir.join("flow.toml"), text)
    }

    fn err(text: &str) -> String {
        let dir = tempfile::tempdir().expect("temp dir");
        let e = parse_in(dir.path(), text).expect_err("invalid");
        e.to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    }

    #[test]
    fn a_full_manifest_parses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let def = parse_in(
            dir.path(),
            r#"
name = "f"
reference_tasks = ["b"]
concurrency = 4
[parameters]
n = 3
[context]
key = "abc"
[tag_limits]
db = 1
[tasks.a]
component = "t.wasm"
input = { n = "$params.n" }
retries = 2
retry_delay = "1s"
backoff = { factor = 3.0, max = "10s" }
fuel = "unlimited"
timeout = "2s"
memory = "64MiB"
map = ["n"]
tags = ["db"]
[tasks.b]
component = { path = "missing.wasm", build = "true" }
input = "$tasks.a"
trigger = "all_failed"
skip_on_upstream_skip = false
"#,
        )
        .expect("valid");
        assert_eq!(def.tasks.len(), 2);
        let a = &def.tasks[0];
        assert_eq!(a.retries, 2);
        assert_eq!(a.budget.fuel, None);
        assert_eq!(a.budget.memory_bytes, 64 << 20);
        assert_eq!(a.map, MapOver::Fields(vec!["n".into()]));
        let b = &def.tasks[1];
        assert_eq!(b.trigger, Trigger::AllFailed);
        assert_eq!(b.upstream(), ["a"]);
        assert_eq!(b.build.as_deref(), Some("true"));
        assert!(!b.skip_on_upstream_skip);
        assert_eq!(def.concurrency, 4);
    }

    #[test]
    fn cache_settings_parse_and_bad_ones_are_located() {
        let dir = tempfile::tempdir().expect("tempdir");
        let def = parse_in(
            dir.path(),
            r#"name = "f"
[parameters]
p = 1
[tasks.a]
component = "t.wasm"
cache_for = "1h"
[tasks.b]
component = "t.wasm"
cache_for = "10m"
cache_validator = { partial_parameters_only = ["p"] }
[tasks.c]
component = "t.wasm"
cache_for = "1s"
cache_validator = "all_inputs"
"#,
        )
        .expect("valid");
        let policy = |i: usize| def.tasks[i].cache.clone().expect("cached");
        assert_eq!(policy(0).validator, CacheValidator::DurationOnly);
        assert_eq!(policy(0).cache_for, Duration::from_secs(3600));
        assert_eq!(
            policy(1).validator,
            CacheValidator::PartialParametersOnly(vec!["p".into()])
        );
        assert_eq!(policy(2).validator, CacheValidator::AllInputs);

        let e = |text: &str| {
            parse_in(dir.path(), text)
                .expect_err("invalid")
                .to_string()
                .replace(&dir.path().display().to_string(), "DIR")
        };
        let head = "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\n";
        assert_eq!(
            e(&format!(
                "{head}cache_for = \"1h\"\ncache_validator = \"all_input\"\n"
            )),
            "DIR/flow.toml:5:19: task `a`: unknown cache_validator `all_input` (did you mean \
             `all_inputs`?); expected one of duration_only, all_inputs, all_parameters, \
             never_use, partial_inputs_only, partial_parameters_only"
        );
        assert_eq!(
            e(&format!("{head}cache_validator = \"all_inputs\"\n")),
            "DIR/flow.toml:4:19: task `a`: `cache_validator` needs `cache_for` (how long \
             outputs stay cached)"
        );
        assert_eq!(
            e(&format!("{head}cache_for = \"soon\"\n")),
            "DIR/flow.toml:4:13: task `a`: `cache_for` = \"soon\" is not a duration like \
             \"30s\" or \"500ms\": expected number at 0"
        );
        assert_eq!(
            e(&format!(
                "{head}cache_for = \"1h\"\ncache_validator = {{ partial_parameters_only = [\"q\"] }}\n"
            )),
            "DIR/flow.toml:2:1: task `a` refers to unknown parameter `q`"
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nretires = 2\n"),
            "DIR/flow.toml:4:1: unknown field `retires`, expected one of `component`, \
             `input`, `upstream_tasks`, `trigger`, `retries`, `retry_delay`, `backoff`, `fuel`, \
             `timeout`, `memory`, `map`, `skip_on_upstream_skip`, `tags`, `on_completion`, \
             `on_failure`, `on_retry`, `on_state`, `cache_for`, `cache_validator`, \
             `max_retry_delay` (did you mean `retries`?)"
        );
        assert_eq!(
            err("name = \"f\"\nconcurency = 3\n"),
            "DIR/flow.toml:2:1: unknown field `concurency`, expected one of `name`, `parameters`, \
             `context`, `reference_tasks`, `concurrency`, `tag_limits`, `tasks`, \
             `cache_namespace`, `max_mapped_children`, `max_log_bytes` (did you mean \
             `concurrency`?)"
        );
        let e = err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nretries = \"two\"\n");
        assert_eq!(
            e,
            "DIR/flow.toml:4:11: invalid type: string \"two\", expected u32"
        );
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"nope.wasm\"\n"),
            "DIR/flow.toml:3:13: task `a`: component file `nope.wasm` does not exist (looked at \
             DIR/nope.wasm)"
        );
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nupstream_tasks = [\"b\"]\n"),
            "DIR/flow.toml:4:19: task `a` refers to unknown task `b`"
        );
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ntimeout = \"soon\"\n"),
            "DIR/flow.toml:4:11: task `a`: `timeout` = \"soon\" is not a duration like \"30s\" or \
             \"500ms\": unknown time unit \"soon\", supported units: ns, us/µs, ms, sec, min, \
             hours, days, weeks, months, years (and few variations)"
                .replace("unknown time unit \"soon\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)", &humantime::parse_duration("soon").expect_err("bad").to_string())
        );
        assert_eq!(
            err(
                "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ninput = \"$tasks.b\"\n\
                 [tasks.b]\ncomponent = \"t.wasm\"\ninput = \"$tasks.a\"\n"
            ),
            "DIR/flow.toml:2:1: the tasks form a cycle: a → b → a"
        );
        assert_eq!(
            err("name = \"f\"\nreference_tasks = [\"x\"]\n"),
            "DIR/flow.toml:2:20: task `reference_tasks` refers to unknown task `x`"
        );
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ntrigger = \"sometimes\"\n"),
            "DIR/flow.toml:4:11: unknown variant `sometimes`, expected one of \
             `all_successful`, `all_failed`, `any_successful`, `any_failed`, `all_finished`, \
             `manual_only`"
        );
    }

    #[test]
    fn max_log_bytes_is_a_size_or_a_number_of_bytes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let def = parse_in(dir.path(), "name = \"f\"\nmax_log_bytes = \"2MiB\"\n").expect("valid");
        assert_eq!(def.max_log_bytes, 2 << 20);
        let def = parse_in(dir.path(), "name = \"f\"\nmax_log_bytes = 1000\n").expect("valid");
        assert_eq!(def.max_log_bytes, 1000);
        let def = parse_in(dir.path(), "name = \"f\"\n").expect("valid");
        assert_eq!(def.max_log_bytes, super::super::DEFAULT_MAX_LOG_BYTES);
        assert_eq!(
            err("name = \"f\"\nmax_log_bytes = -1\n"),
            "DIR/flow.toml:2:17: `max_log_bytes` = -1 must be a size like \"256MiB\" or a number \
             of bytes"
        );
    }

    #[test]
    fn cache_namespace_mapped_children_and_retry_delay_caps_parse() {
        let dir = tempfile::tempdir().expect("temp dir");
        let def = parse_in(
            dir.path(),
            "name = \"f\"\ncache_namespace = \"etl\"\nmax_mapped_children = 7\n[tasks.a]\n\
             component = \"t.wasm\"\nmax_retry_delay = \"10m\"\n[tasks.b]\n\
             component = \"t.wasm\"\n",
        )
        .expect("valid");
        assert_eq!(def.cache_namespace.as_deref(), Some("etl"));
        assert_eq!(def.max_mapped_children, 7);
        assert_eq!(def.tasks[0].max_retry_delay, Duration::from_secs(600));
        assert_eq!(
            def.tasks[1].max_retry_delay,
            super::super::DEFAULT_MAX_RETRY_DELAY
        );
        let def = parse_in(dir.path(), "name = \"f\"\n").expect("valid");
        assert_eq!(def.cache_namespace, None);
        assert_eq!(
            def.max_mapped_children,
            super::super::DEFAULT_MAX_MAPPED_CHILDREN
        );
        assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nmax_retry_delay = \"later\"\n"),
            format!(
                "DIR/flow.toml:4:19: task `a`: `max_retry_delay` = \"later\" is not a duration \
                 like \"30s\" or \"500ms\": {}",
                humantime::parse_duration("later").expect_err("bad")
            )
        );
    }

    /// Every key of a full manifest reaches the `FlowDef`, each with a value other than its
    /// default, so ignoring any one of them fails here.
    #[test]
    fn every_manifest_key_reaches_the_flow_definition() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("h.wasm"), b"").expect("write");
        let def = parse_in(
            dir.path(),
            r#"
name = "f"
reference_tasks = ["a"]
concurrency = 4
[parameters]
n = 3
[context]
key = "abc"
other = "x y"
[tag_limits]
db = 2
[tasks.a]
component = "t.wasm"
input = { n = "$params.n" }
upstream_tasks = ["b"]
trigger = "any_failed"
retries = 2
retry_delay = "1s"
backoff = { factor = 3.0, max = "10s", jitter = 0.25 }
fuel = 1234
timeout = "2s"
memory = "64MiB"
map = ["n"]
skip_on_upstream_skip = false
tags = ["db", "slow"]
on_completion = ["h.wasm"]
on_failure = ["h.wasm", "h.wasm"]
on_retry = ["h.wasm"]
on_state = ["h.wasm"]
cache_for = "5m"
cache_validator = "all_parameters"
[tasks.b]
component = { path = "t.wasm", build = "make t.wasm", sources = ["src"] }
"#,
        )
        .expect("valid");
        assert_eq!(def.name, "f");
        assert_eq!(def.reference_tasks, ["a"]);
        assert_eq!(def.concurrency, 4);
        assert_eq!(def.parameters.get("n"), Some(&serde_json::json!(3)));
        assert_eq!(
            def.context,
            BTreeMap::from([
                ("key".to_owned(), "abc".to_owned()),
                ("other".to_owned(), "x y".to_owned())
            ])
        );
        assert_eq!(def.tag_limits.get("db"), Some(&2));
        let a = &def.tasks[0];
        assert_eq!(a.name, "a");
        assert_eq!(a.component, dir.path().join("t.wasm"));
        assert_eq!(
            a.input,
            Input::from_json(serde_json::json!({"n": "$params.n"}))
        );
        assert_eq!(a.upstream_tasks, ["b"]);
        assert_eq!(a.trigger, Trigger::AnyFailed);
        assert_eq!(a.retries, 2);
        assert_eq!(a.retry_delay, Duration::from_secs(1));
        assert_eq!(
            a.backoff,
            Some(Backoff {
                factor: 3.0,
                max: Duration::from_secs(10),
                jitter: 0.25,
            })
        );
        assert_eq!(
            a.budget,
            RunBudget {
                fuel: Some(1234),
                timeout: Duration::from_secs(2),
                memory_bytes: 64 << 20,
                ..RunBudget::default()
            }
        );
        assert_eq!(a.map, MapOver::Fields(vec!["n".into()]));
        assert!(!a.skip_on_upstream_skip);
        assert_eq!(a.tags, ["db", "slow"]);
        let h = dir.path().join("h.wasm");
        assert_eq!(
            a.hooks,
            Hooks {
                on_completion: vec![h.clone()],
                on_failure: vec![h.clone(), h.clone()],
                on_retry: vec![h.clone()],
                on_state: vec![h],
            }
        );
        assert_eq!(
            a.cache,
            Some(CachePolicy {
                cache_for: Duration::from_secs(300),
                validator: CacheValidator::AllParameters,
            })
        );
        let b = &def.tasks[1];
        assert_eq!(b.build.as_deref(), Some("make t.wasm"));
        assert_eq!(b.sources, [dir.path().join("src")]);
        // The defaults of a task that sets nothing.
        assert_eq!(b.trigger, Trigger::AllSuccessful);
        assert_eq!(
            (b.retries, b.retry_delay, b.backoff),
            (0, Duration::ZERO, None)
        );
        assert_eq!(b.budget, RunBudget::default());
        assert!(b.skip_on_upstream_skip && b.tags.is_empty() && b.cache.is_none());
        // A backoff that names only some of its keys gets the documented defaults for the others.
        let def = parse_in(
            dir.path(),
            "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nbackoff = { jitter = 0.5 }\n",
        )
        .expect("valid");
        assert_eq!(
            def.tasks[0].backoff,
            Some(Backoff {
                factor: 2.0,
                max: Duration::from_secs(3600),
                jitter: 0.5,
            })
        );
    }
}
