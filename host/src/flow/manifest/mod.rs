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
//! worker_tags = ["gpu"]               # only workers started with --tags gpu run it
//! on_completion = ["handlers/notify.wasm"]   # also on_failure, on_retry, on_state
//! cache_for = "1h"                    # output caching ("time travel")
//! cache_validator = "all_inputs"      # duration_only (default), all_parameters, never_use,
//!                                     # { partial_inputs_only = ["x"] },
//!                                     # { partial_parameters_only = ["p"] }
//! max_retry_delay = "1h"              # the longest delay a RETRY signal may ask for (default
//!                                     # 1h; with a backoff, at most backoff.max)
//!
//! http_requests = 100                 # HTTP limits of each run (these are the defaults)
//! http_response_bytes = "64MiB"       # response body bytes, summed over the run's requests
//! http_connect_timeout = "10s"
//! http_read_timeout = "30s"           # until the response starts, and between its parts
//!
//! [tasks.load.grants]                 # what the task may reach (default: nothing); each kind
//!                                     # given replaces the flow's [grants] and may only narrow it
//! http = ["https://api.example.com", "http://127.0.0.1:*", "https://*.example.org/v1/",
//!         { url = "https://example.net", methods = ["GET"] }]
//! tcp = ["127.0.0.1:5432", "db.internal:*"]  # connections (and lookups of these names only)
//! files = [{ host = "data/in", guest = "/in", mode = "ro" }]   # preopened directories
//! env = { REGION = "eu" }             # environment variables
//! secrets = ["API_TOKEN"]             # values from the host's secret source, redacted as ***
//!
//! [schedule]                          # for `sluice deploy` (see crate::schedule); `sluice run`
//!                                     # ignores it
//! cron = "0 6 * * 1-5"                # or interval = "10m" (with anchor = 2026-01-01T00:00:00Z)
//! timezone = "Europe/Berlin"          # IANA name, default UTC (cron only)
//! parameters = { count = 5 }          # each run's parameters (over the defaults above)
//! catchup = 1                         # missed runs to start after downtime: "none", "all", N
//! late_after = "15s"                  # a run not started this long after its time is Late
//! ```
//!
//! A flow-level `[grants]` table (same keys) is what every task inherits and the most any task
//! may ask; without one a task asks for what it needs. A [`Policy`] (the operator's ceiling)
//! caps both.
//!
//! Flow keys besides those above: `cache_namespace = "etl"` (share cached outputs with the other
//! flows of that namespace; default: the flow's own name, nothing shared) and
//! `max_mapped_children = 100000` (the most mapped children of one flow run, summed over its
//! mapped tasks; default 100,000) and `max_log_bytes = "256MiB"` (the most bytes of logs one flow
//! run keeps, summed over its task runs; a size or a number of bytes; default 256 MiB).
//!
//! A flow written as code names its body instead of wiring its tasks:
//!
//! ```toml
//! name = "dynamic"
//! code = { path = "build/flow.wasm", build = "make", sources = ["flow.py"],
//!          timeout = "1h", fuel = 10000000000, memory = "64MiB" }  # the body's own budget
//! max_task_runs = 100000              # the most task runs its body may submit (default)
//!
//! [tasks.add_one]                     # a template: the body gives each task run its input
//! component = "tasks/add_one.wasm"    # (no `input`, `upstream_tasks`, `map` or
//! retries = 2                         # `reference_tasks`); everything else as above
//!
//! [subflows]                          # other flows the body may run as child flow runs
//! report = "../report/flow.toml"      # name = its manifest (relative to this one)
//! ```

mod grants;
mod raw;
mod schedule;
mod source;
mod task;
mod values;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use toml::Spanned;

pub use self::grants::Policy;
use self::grants::flow_grants;
use self::raw::RawFlow;
use self::source::{Source, Spans, locate};
use self::task::task_def;
pub use self::values::normalize;
use super::{BodyDef, DEFAULT_CONCURRENCY, FlowDef, SubflowDef, TaskDef};

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

/// Read and parse the manifest at `path`. Component paths are resolved against the manifest's
/// directory and must exist (unless a build command is declared).
pub fn load(path: &Path) -> Result<FlowDef, ManifestError> {
    parse(path, &read(path)?)
}

/// [`load`], refusing grants beyond `policy` (each at its position, naming the policy line).
pub fn load_with(path: &Path, policy: Option<&Policy>) -> Result<FlowDef, ManifestError> {
    parse_with(path, &read(path)?, policy)
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
    parse_with(file, text, None)
}

/// [`parse`], refusing grants beyond `policy`.
pub fn parse_with(
    file: &Path,
    text: &str,
    policy: Option<&Policy>,
) -> Result<FlowDef, ManifestError> {
    parse_with_files(file, text, policy, &LocalFiles)
}

/// Where a manifest's component files are.
pub trait ComponentFiles {
    /// The file of the component the manifest names `written` (lexically normalized: relative
    /// to the manifest's directory unless absolute); `local` is that path beside the manifest,
    /// and `build` whether the manifest declares a build command for it (handler components
    /// have none). An error says why it cannot be used (`does not exist (looked at …)`); it is
    /// reported at the value's position, after the task and the path.
    fn file(&self, written: &Path, local: &Path, build: bool) -> Result<PathBuf, String>;

    /// The text of the manifest a `[subflows]` entry names (`local`: its path beside the
    /// manifest), or why it cannot be read (reported at the entry, after the subflow's name).
    fn subflow(&self, local: &Path) -> Result<String, String>;
}

/// Component files beside the manifest: `local`, which must be a file unless it is built.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalFiles;

impl ComponentFiles for LocalFiles {
    fn subflow(&self, local: &Path) -> Result<String, String> {
        read(local).map_err(|e| format!("`{}`: {}", local.display(), e.message))
    }

    fn file(&self, _written: &Path, local: &Path, build: bool) -> Result<PathBuf, String> {
        if build || local.is_file() {
            return Ok(local.to_owned());
        }
        Err(format!(
            "{} (looked at {})",
            if local.exists() {
                "is not a file"
            } else {
                "does not exist"
            },
            local.display()
        ))
    }
}

/// [`parse_with`], with component files found by `files` instead of beside the manifest (a
/// server's uploaded components).
pub fn parse_with_files(
    file: &Path,
    text: &str,
    policy: Option<&Policy>,
    files: &dyn ComponentFiles,
) -> Result<FlowDef, ManifestError> {
    parse_nested(file, text, policy, files, &mut Nesting::default())
}

/// How deep subflows may nest: a flow's subflow is at depth 1, its subflow's at 2.
pub const MAX_SUBFLOW_DEPTH: usize = 8;

/// How many subflows a flow and its subflows may name in all (each naming counts, so a
/// manifest named twice counts twice).
pub const MAX_SUBFLOWS: usize = 256;

/// Where a parse is among subflows.
#[derive(Debug, Default)]
struct Nesting {
    /// The manifests reaching the one parsed as subflows, each the parent of the next.
    ancestors: Vec<PathBuf>,
    /// Subflows parsed so far, in the whole tree.
    parsed: usize,
}

/// [`parse_with_files`] of a manifest that `nest.ancestors` reach as a subflow (each of them
/// the parent of the next).
fn parse_nested(
    file: &Path,
    text: &str,
    policy: Option<&Policy>,
    files: &dyn ComponentFiles,
    nest: &mut Nesting,
) -> Result<FlowDef, ManifestError> {
    let src = Source { file, text };
    let dir = file.parent().unwrap_or(Path::new("."));
    let mut raw: RawFlow = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
    let mut spans = Spans::default();
    let flow_grants = flow_grants(&src, dir, raw.grants.take())?;

    let parameters = raw
        .parameters
        .into_iter()
        .map(|(k, v)| (k, to_json(v)))
        .collect();
    let schedule = match raw.schedule.take() {
        Some(s) => Some(schedule::schedule(&src, s, &parameters)?),
        None => None,
    };
    let body = match raw.code.take() {
        Some(code) => Some(body_def(&src, dir, &code, files)?),
        None => None,
    };
    let mut tasks = Vec::new();
    for (name, raw_task) in raw.tasks {
        let table_span = raw_task.span();
        let (task, task_spans) = task_def(
            &src,
            dir,
            name.clone(),
            raw_task.into_inner(),
            table_span,
            &flow_grants,
            (policy, files),
        )?;
        spans.tasks.insert(name, task_spans);
        tasks.push(task);
    }
    let subflows = std::mem::take(&mut raw.subflows);
    for (name, path) in subflows {
        let sub = subflow_def(
            &src,
            dir,
            (&name, &path),
            body.is_some(),
            (policy, files),
            nest,
        )?;
        if tasks.iter().any(|t| t.name == name) {
            return Err(src.error(
                path.span(),
                format!("subflow `{name}`: a task has that name; the body names each by it"),
            ));
        }
        let mut template = TaskDef::new(name, sub.manifest.clone());
        template.subflow = Some(std::sync::Arc::new(sub));
        tasks.push(template);
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
            Some(v) => values::size(&src, "`max_log_bytes`", v, "256MiB")?,
        },
        schedule,
        body,
        max_task_runs: match raw.max_task_runs {
            None => super::DEFAULT_MAX_TASK_RUNS,
            Some(n) if *n.get_ref() == 0 => {
                return Err(src.error(
                    n.span(),
                    "`max_task_runs` = 0 would refuse every task run: it is how many task runs \
                     the flow's body may submit in one flow run, at least 1",
                ));
            }
            Some(n) => n.into_inner(),
        },
    };
    def.validate().map_err(|e| locate(&src, &spans, e))?;
    Ok(def)
}

/// `[subflows] name = "path"`: another manifest, read and parsed (its own errors name its own
/// file), run by the body as a child flow run. Only a code flow has subflows; a manifest that
/// reaches itself through subflows is refused, naming the cycle.
fn subflow_def(
    src: &Source<'_>,
    dir: &Path,
    (name, path): (&str, &Spanned<String>),
    code: bool,
    (policy, files): (Option<&Policy>, &dyn ComponentFiles),
    nest: &mut Nesting,
) -> Result<SubflowDef, ManifestError> {
    let err = |message: String| src.error(path.span(), format!("subflow `{name}`: {message}"));
    if !code {
        return Err(err(
            "only a flow written as code (`code = …`) has subflows: its body runs them".into(),
        ));
    }
    let manifest = normalize(&dir.join(path.get_ref()));
    let me = normalize(src.file);
    let chain = |nest: &Nesting| {
        let chain: Vec<String> = nest
            .ancestors
            .iter()
            .chain([&me, &manifest])
            .map(|p| format!("`{}`", p.display()))
            .collect();
        chain.join(" → ")
    };
    if nest.ancestors.contains(&manifest) || manifest == me {
        return Err(err(format!(
            "a flow cannot run itself: {} is a cycle",
            chain(nest)
        )));
    }
    if nest.ancestors.len() + 1 > MAX_SUBFLOW_DEPTH {
        return Err(err(format!(
            "subflows nest at most {MAX_SUBFLOW_DEPTH} deep: {} is deeper",
            chain(nest)
        )));
    }
    nest.parsed += 1;
    if nest.parsed > MAX_SUBFLOWS {
        return Err(err(format!(
            "a flow and its subflows name at most {MAX_SUBFLOWS} subflows in all"
        )));
    }
    let text = files.subflow(&manifest).map_err(err)?;
    nest.ancestors.push(me);
    let def = parse_nested(&manifest, &text, policy, files, nest);
    nest.ancestors.pop();
    Ok(SubflowDef {
        def: def?,
        manifest,
        text,
    })
}

/// `code`: the body of a flow written as code, a component like a task's (`path`, `build`,
/// `sources`) plus its own budget (`timeout`, `fuel`, `memory`), each error at `code`.
fn body_def(
    src: &Source<'_>,
    dir: &Path,
    code: &Spanned<toml::Value>,
    files: &dyn ComponentFiles,
) -> Result<BodyDef, ManifestError> {
    const BUDGET: [&str; 3] = ["timeout", "fuel", "memory"];
    let (path, build, sources) = values::component(src, ("flow", "code"), code, &BUDGET)?;
    let err = |message: String| src.error(code.span(), format!("flow: {message}"));
    let component = files
        .file(
            &normalize(Path::new(&path)),
            &normalize(&dir.join(&path)),
            build.is_some(),
        )
        .map_err(|why| err(format!("`code` file `{path}` {why}")))?;
    let mut body = BodyDef::new(component);
    body.build = build;
    body.sources = sources.iter().map(|s| normalize(&dir.join(s))).collect();
    let Some(table) = code.get_ref().as_table() else {
        return Ok(body);
    };
    if let Some(t) = table.get("timeout") {
        let text = t.as_str().unwrap_or_default();
        body.budget.timeout = humantime::parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                err(format!(
                    "`code.timeout` = {t} must be a duration longer than zero, like \"10m\""
                ))
            })?;
    }
    if let Some(f) = table.get("fuel") {
        body.budget.fuel = match f {
            toml::Value::Integer(n) if *n >= 0 => Some(n.unsigned_abs()),
            toml::Value::String(w) if w == "unlimited" => None,
            other => {
                return Err(err(format!(
                    "`code.fuel` = {other} must be a number of fuel units (0 or more) or \
                     \"unlimited\""
                )));
            }
        };
    }
    if let Some(m) = table.get("memory") {
        let m = Spanned::new(code.span(), m.clone());
        body.budget.memory_bytes = values::size(src, "flow: `code.memory`", &m, "64MiB")?;
    }
    Ok(body)
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
mod tests;
