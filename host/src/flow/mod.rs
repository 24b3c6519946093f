//! Flow definitions: what a flow is (tasks, their components, inputs, dependencies, triggers,
//! retries, limits, mapping, tags, hooks), built either from a TOML manifest
//! ([`manifest::parse`]) or with the Rust builder ([`FlowBuilder`]). Both produce the same
//! validated [`FlowDef`]: every referenced task exists and the graph has no cycle.

pub mod build;
pub mod manifest;
pub mod trigger;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::json::Json;

pub use self::trigger::{Trigger, TriggerDecision};
use crate::sandbox::RunBudget;

/// A task's input: a JSON value in which strings `"$params.NAME"` and `"$tasks.NAME"` stand for
/// a parameter's value and an upstream task's output (a data dependency). `"$$…"` is a literal
/// string starting with `$`.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A literal value (in canonical form).
    Literal(Json),
    /// A parameter's value.
    Param(String),
    /// An upstream task's output.
    Task(String),
    /// An object whose fields are inputs, sorted by name.
    Object(Vec<(String, Input)>),
    /// An array whose items are inputs.
    Array(Vec<Input>),
}

impl Input {
    /// Parse the reference syntax out of a JSON value. A value without references stays one
    /// literal.
    pub fn from_json(v: Value) -> Input {
        if !has_references(&v) {
            return Input::Literal(Json::from_value(&v));
        }
        match v {
            Value::String(s) => match (s.strip_prefix("$params."), s.strip_prefix("$tasks.")) {
                (Some(p), _) => Input::Param(p.to_owned()),
                (_, Some(t)) => Input::Task(t.to_owned()),
                // `$$…` escapes a literal `$…`.
                _ => Input::Literal(Json::from_value(&Value::String(s[1..].to_owned()))),
            },
            Value::Array(items) => Input::Array(items.into_iter().map(Input::from_json).collect()),
            Value::Object(map) => {
                let mut fields: Vec<(String, Input)> = map
                    .into_iter()
                    .map(|(k, v)| (k, Input::from_json(v)))
                    .collect();
                fields.sort_by(|a, b| a.0.cmp(&b.0));
                Input::Object(fields)
            }
            other => Input::Literal(Json::from_value(&other)),
        }
    }

    /// Every task this input reads, in order of appearance.
    pub fn task_refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |i| {
            if let Input::Task(t) = i {
                out.push(t.as_str());
            }
        });
        out
    }

    /// Every parameter this input reads.
    pub fn param_refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |i| {
            if let Input::Param(p) = i {
                out.push(p.as_str());
            }
        });
        out
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Input)) {
        f(self);
        match self {
            Input::Object(m) => m.iter().for_each(|(_, i)| i.visit(f)),
            Input::Array(a) => a.iter().for_each(|i| i.visit(f)),
            _ => {}
        }
    }

    /// The value, with references resolved by `param` and `task`. Upstream outputs are spliced
    /// in as the text they are, never parsed.
    pub fn resolve(
        &self,
        param: &impl Fn(&str) -> Option<Json>,
        task: &mut impl FnMut(&str) -> Option<Json>,
    ) -> Json {
        match self {
            Input::Literal(v) => v.clone(),
            Input::Param(p) => param(p).unwrap_or_else(Json::null),
            Input::Task(t) => task(t).unwrap_or_else(Json::null),
            Input::Object(m) => Json::object(
                m.iter()
                    .map(|(k, i)| (k.clone(), i.resolve(param, task)))
                    .collect::<Vec<_>>(),
            ),
            Input::Array(a) => {
                Json::array(a.iter().map(|i| i.resolve(param, task)).collect::<Vec<_>>())
            }
        }
    }
}

/// Whether `v` holds a `$params.`/`$tasks.` reference or a `$$` escape anywhere.
fn has_references(v: &Value) -> bool {
    match v {
        Value::String(s) => {
            s.starts_with("$params.") || s.starts_with("$tasks.") || s.starts_with("$$")
        }
        Value::Array(items) => items.iter().any(has_references),
        Value::Object(map) => map.values().any(has_references),
        _ => false,
    }
}

/// How a mapped task splits its input into child runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MapOver {
    /// Not mapped.
    #[default]
    No,
    /// The input is a list; each element is one child's input.
    Input,
    /// The input is an object; these fields are lists of equal length, zipped: child `i` gets the
    /// object with each field replaced by its `i`th element.
    Fields(Vec<String>),
}

/// Retry backoff: delay `n` (from 1) is `retry_delay × factor^(n-1)`, at most `max`, plus up to
/// `jitter` × the delay at random.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Growth factor per retry (≥ 1).
    pub factor: f64,
    /// The largest delay.
    pub max: Duration,
    /// Random extra, as a fraction of the delay (0 to 1).
    pub jitter: f64,
}

/// State-change hooks of a task in a manifest: handler components run on transitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Run when the task enters a Completed-type state.
    pub on_completion: Vec<PathBuf>,
    /// Run when the task enters a Failed-type or Crashed state.
    pub on_failure: Vec<PathBuf>,
    /// Run when the task enters Retrying.
    pub on_retry: Vec<PathBuf>,
    /// Run on every transition.
    pub on_state: Vec<PathBuf>,
}

impl Hooks {
    /// Every handler component named.
    pub fn all(&self) -> impl Iterator<Item = &PathBuf> {
        self.on_completion
            .iter()
            .chain(&self.on_failure)
            .chain(&self.on_retry)
            .chain(&self.on_state)
    }
}

/// One task of a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDef {
    /// Unique within the flow.
    pub name: String,
    /// The component file.
    pub component: PathBuf,
    /// A shell command that produces `component` (run in the manifest's directory when the file
    /// is missing).
    pub build: Option<String>,
    /// Files and directories the component is built from: `sluice build` skips the build while
    /// the component is newer than all of them. Without sources the command always runs (and
    /// may skip work itself).
    pub sources: Vec<PathBuf>,
    /// The input.
    pub input: Input,
    /// State-only dependencies, besides the data dependencies in `input`.
    pub upstream_tasks: Vec<String>,
    /// When the task runs.
    pub trigger: Trigger,
    /// How many times a failed run is retried.
    pub retries: u32,
    /// Delay before a retry.
    pub retry_delay: Duration,
    /// Optional exponential backoff of the delay.
    pub backoff: Option<Backoff>,
    /// The longest retry delay a RETRY signal may ask for (default
    /// [`DEFAULT_MAX_RETRY_DELAY`], 1 hour); with a `backoff`, its `max` caps it too. A longer
    /// request is cut to this.
    pub max_retry_delay: Duration,
    /// Fuel, deadline, memory and the other limits of each run.
    pub budget: RunBudget,
    /// Mapping.
    pub map: MapOver,
    /// Skip this task when an upstream task was skipped (default true, as Prefect 1).
    pub skip_on_upstream_skip: bool,
    /// Tags, for per-tag concurrency limits.
    pub tags: Vec<String>,
    /// Only workers carrying every one of these run it (`sluice worker --tags`), on a server
    /// that gives task runs to workers; elsewhere they are ignored. Not part of the cache key:
    /// where a task runs does not change its output.
    pub worker_tags: Vec<String>,
    /// Handler components.
    pub hooks: Hooks,
    /// Output caching (`cache_for` and `cache_validator`); `None` caches nothing.
    pub cache: Option<crate::cache::CachePolicy>,
    /// What the task may reach besides its input (default: nothing).
    pub grants: crate::grants::Grants,
    /// A code flow's subflow (a manifest's `[subflows]`): this template's task runs are child
    /// flow runs of that flow, its parameters their input, its result their output (and
    /// `component` is its manifest). `None`: a task.
    pub subflow: Option<std::sync::Arc<SubflowDef>>,
}

/// Another flow a code flow's body runs as a child flow run (a manifest's `[subflows]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SubflowDef {
    /// Its definition.
    pub def: FlowDef,
    /// Its manifest file.
    pub manifest: PathBuf,
    /// The manifest's text (recorded with each child flow run, for `sluice resume`).
    pub text: String,
}

impl TaskDef {
    /// A task named `name` running `component`, with every default: input `null`, trigger
    /// `all_successful`, no retries, the default budget, not mapped, skipping on upstream skip.
    pub fn new(name: impl Into<String>, component: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            component: component.into(),
            build: None,
            sources: Vec::new(),
            input: Input::Literal(Json::null()),
            upstream_tasks: Vec::new(),
            trigger: Trigger::default(),
            retries: 0,
            retry_delay: Duration::ZERO,
            backoff: None,
            max_retry_delay: DEFAULT_MAX_RETRY_DELAY,
            budget: RunBudget::default(),
            map: MapOver::No,
            skip_on_upstream_skip: true,
            tags: Vec::new(),
            worker_tags: Vec::new(),
            hooks: Hooks::default(),
            cache: None,
            grants: crate::grants::Grants::default(),
            subflow: None,
        }
    }

    /// The delay before retry number `n` (from 1).
    pub fn retry_delay_for(&self, n: u32) -> Duration {
        let Some(b) = self.backoff else {
            return self.retry_delay;
        };
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = self.retry_delay.as_secs_f64() * b.factor.max(1.0).powi(exp);
        let base = base.min(b.max.as_secs_f64());
        let jitter = base * b.jitter.clamp(0.0, 1.0) * fastrand::f64();
        Duration::try_from_secs_f64(base + jitter).unwrap_or(b.max)
    }

    /// The longest delay a RETRY signal of this task may ask for: `max_retry_delay`, and at
    /// most `backoff.max` when the task has a backoff.
    pub fn retry_delay_cap(&self) -> Duration {
        match self.backoff {
            Some(b) => self.max_retry_delay.min(b.max),
            None => self.max_retry_delay,
        }
    }

    /// Every upstream task: data dependencies first, then state-only ones, without repeats.
    pub fn upstream(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in self
            .input
            .task_refs()
            .into_iter()
            .chain(self.upstream_tasks.iter().map(String::as_str))
        {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
    }
}

/// A validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowDef {
    /// The flow's name.
    pub name: String,
    /// Parameters and their defaults.
    pub parameters: BTreeMap<String, Value>,
    /// Context values every task sees.
    pub context: BTreeMap<String, String>,
    /// The tasks, in definition order.
    pub tasks: Vec<TaskDef>,
    /// The tasks whose states decide the flow's state; empty means the terminal tasks.
    pub reference_tasks: Vec<String>,
    /// How many task runs may execute at once.
    pub concurrency: usize,
    /// Per-tag limits on task runs executing at once.
    pub tag_limits: BTreeMap<String, usize>,
    /// The output cache's namespace: cached outputs are shared only between flows of the same
    /// namespace. `None` (the default) is the flow's own name, so two flows never share entries
    /// unless both name the same `cache_namespace`.
    pub cache_namespace: Option<String>,
    /// The most mapped children one flow run may create, summed over its mapped tasks (default
    /// [`DEFAULT_MAX_MAPPED_CHILDREN`]). A mapped task whose input would go past it fails,
    /// naming the limit, before any child is created.
    pub max_mapped_children: usize,
    /// The most bytes of logs one flow run keeps, summed over its task runs and state handlers
    /// (default [`DEFAULT_MAX_LOG_BYTES`]; each record costs its message's length plus 64, as
    /// in a task run's own log budget). Past it, records are dropped and counted, and one record
    /// says so at the end of the run; no task run fails because of it. A resumed run counts
    /// what it logged before.
    pub max_log_bytes: u64,
    /// When a deployment of the flow runs (a manifest's `[schedule]`); `sluice run` ignores it.
    pub schedule: Option<crate::schedule::Schedule>,
    /// A flow written as code: its body (a component of world `flow`) submits task runs of
    /// the declared tasks, which are then templates (no inputs, edges or maps of their own).
    /// `None`: the declared tasks are the flow's DAG.
    pub body: Option<BodyDef>,
    /// The most task runs the body of a code flow may submit in one flow run (each mapped
    /// element counts; default [`DEFAULT_MAX_TASK_RUNS`]). A submission past it is refused,
    /// naming the limit: the body sees the refusal, nothing is created.
    pub max_task_runs: usize,
}

/// The body of a flow written as code (a manifest's `code`).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyDef {
    /// The component file (world `flow`).
    pub component: PathBuf,
    /// A shell command that builds it (run in the manifest's directory).
    pub build: Option<String>,
    /// What it is built from (see [`TaskDef::sources`]).
    pub sources: Vec<PathBuf>,
    /// The body's own budget: fuel for its own code, and a deadline for the whole body,
    /// waiting included (default [`BodyDef::DEFAULT_TIMEOUT`]; a body that never returns ends
    /// TimedOut, and with it the flow run).
    pub budget: RunBudget,
}

impl BodyDef {
    /// A body's default deadline: 1 hour (it waits for its task runs).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3600);

    /// The body at `component`, with the default budget.
    pub fn new(component: impl Into<PathBuf>) -> Self {
        Self {
            component: component.into(),
            build: None,
            sources: Vec::new(),
            budget: RunBudget {
                timeout: Self::DEFAULT_TIMEOUT,
                ..RunBudget::default()
            },
        }
    }
}

/// Why a flow definition is invalid (the builder's errors; the manifest parser adds positions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// Two tasks share a name.
    #[error("task `{0}` is defined twice")]
    DuplicateTask(String),
    /// A flow's or task's name holds a control character (NUL, a line break, …): names are
    /// printed, and stored as text.
    #[error("{what} name {name:?} holds a control character; names are printed and stored as text")]
    BadName {
        /// `flow` or `task`.
        what: &'static str,
        /// The name.
        name: String,
    },
    /// A reference to a task that does not exist.
    #[error("task `{task}` refers to unknown task `{unknown}`{hint}")]
    UnknownTask {
        /// The referring task (or `reference_tasks`).
        task: String,
        /// The missing name.
        unknown: String,
        /// A did-you-mean.
        hint: Hint,
    },
    /// A reference to a parameter that does not exist.
    #[error("task `{task}` refers to unknown parameter `{unknown}`{hint}")]
    UnknownParameter {
        /// The referring task.
        task: String,
        /// The missing name.
        unknown: String,
        /// A did-you-mean.
        hint: Hint,
    },
    /// The dependencies form a cycle.
    #[error("the tasks form a cycle: {}", .0.join(" → "))]
    Cycle(Vec<String>),
    /// A task of a flow written as code declares what only its body decides.
    #[error(
        "task `{task}` has `{key}`, but in a flow written as code the body gives each task run \
         its input and what it waits for, maps by itself, and waits for its task runs (none may \
         pause): remove `{key}`"
    )]
    NotATemplate {
        /// The task.
        task: String,
        /// The key: `input`, `upstream_tasks`, `map` or `trigger = "manual_only"` (nobody
        /// could resume it: the body waits for its task runs).
        key: &'static str,
    },
    /// A flow written as code names reference tasks.
    #[error(
        "`reference_tasks` cannot be used with `code`: a flow written as code ends as its body \
         does (its return value, or what its task runs did when it returns nothing)"
    )]
    CodeReferenceTasks,
    /// A mapped field that the input does not have.
    #[error("task `{task}` maps over `{field}`, which its input does not set")]
    UnknownMapField {
        /// The task.
        task: String,
        /// The field.
        field: String,
    },
}

/// A " (did you mean `x`?)" suffix, or nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hint(pub Option<String>);

impl Hint {
    /// The closest of `candidates` to `name`, if it is close enough to be a likely typo.
    pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Hint {
        Hint(
            candidates
                .into_iter()
                .map(|c| (strsim::jaro_winkler(name, c), c))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, c)| c.to_owned()),
        )
    }
}

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(s) => write!(f, " (did you mean `{s}`?)"),
            None => Ok(()),
        }
    }
}

impl FlowDef {
    /// Check references and acyclicity.
    pub fn validate(&self) -> Result<(), FlowError> {
        let bad = |name: &str| name.chars().any(char::is_control);
        if bad(&self.name) {
            return Err(FlowError::BadName {
                what: "flow",
                name: self.name.clone(),
            });
        }
        if let Some(t) = self.tasks.iter().find(|t| bad(&t.name)) {
            return Err(FlowError::BadName {
                what: "task",
                name: t.name.clone(),
            });
        }
        if self.body.is_some() {
            if !self.reference_tasks.is_empty() {
                return Err(FlowError::CodeReferenceTasks);
            }
            for t in &self.tasks {
                let no_input = matches!(&t.input, Input::Literal(j) if *j == Json::null());
                let key = if !no_input {
                    Some("input")
                } else if !t.upstream_tasks.is_empty() {
                    Some("upstream_tasks")
                } else if t.map != MapOver::No {
                    Some("map")
                } else if t.trigger == Trigger::ManualOnly {
                    Some("trigger = \"manual_only\"")
                } else {
                    None
                };
                if let Some(key) = key {
                    return Err(FlowError::NotATemplate {
                        task: t.name.clone(),
                        key,
                    });
                }
            }
        }
        let mut index = HashMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if index.insert(t.name.as_str(), i).is_some() {
                return Err(FlowError::DuplicateTask(t.name.clone()));
            }
        }
        let names = || self.tasks.iter().map(|t| t.name.as_str());
        for t in &self.tasks {
            for u in t.upstream() {
                if !index.contains_key(u) {
                    return Err(FlowError::UnknownTask {
                        task: t.name.clone(),
                        unknown: u.to_owned(),
                        hint: Hint::closest(u, names()),
                    });
                }
            }
            for p in t.input.param_refs() {
                if !self.parameters.contains_key(p) {
                    return Err(FlowError::UnknownParameter {
                        task: t.name.clone(),
                        unknown: p.to_owned(),
                        hint: Hint::closest(p, self.parameters.keys().map(String::as_str)),
                    });
                }
            }
            if let Some(crate::cache::CachePolicy {
                validator: crate::cache::CacheValidator::PartialParametersOnly(names),
                ..
            }) = &t.cache
            {
                for p in names {
                    if !self.parameters.contains_key(p) {
                        return Err(FlowError::UnknownParameter {
                            task: t.name.clone(),
                            unknown: p.clone(),
                            hint: Hint::closest(p, self.parameters.keys().map(String::as_str)),
                        });
                    }
                }
            }
            if let MapOver::Fields(fields) = &t.map {
                for f in fields {
                    let present = match &t.input {
                        Input::Object(m) => m.iter().any(|(k, _)| k == f),
                        Input::Literal(v) => v.field(f).is_some(),
                        _ => false,
                    };
                    if !present {
                        return Err(FlowError::UnknownMapField {
                            task: t.name.clone(),
                            field: f.clone(),
                        });
                    }
                }
            }
        }
        for r in &self.reference_tasks {
            if !index.contains_key(r.as_str()) {
                return Err(FlowError::UnknownTask {
                    task: "reference_tasks".into(),
                    unknown: r.clone(),
                    hint: Hint::closest(r, names()),
                });
            }
        }
        if let Some(cycle) = self.find_cycle(&index) {
            return Err(FlowError::Cycle(cycle));
        }
        Ok(())
    }

    fn find_cycle(&self, index: &HashMap<&str, usize>) -> Option<Vec<String>> {
        use petgraph::graph::DiGraph;
        let mut g = DiGraph::<usize, ()>::new();
        let nodes: Vec<_> = (0..self.tasks.len()).map(|i| g.add_node(i)).collect();
        for (i, t) in self.tasks.iter().enumerate() {
            for u in t.upstream() {
                if let Some(&j) = index.get(u) {
                    g.add_edge(nodes[j], nodes[i], ());
                }
            }
        }
        for scc in petgraph::algo::tarjan_scc(&g) {
            let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
            if scc.len() > 1 || self_loop {
                // The shortest cycle through the first-defined member, found by breadth-first
                // search inside the component, in dependency order.
                let members: Vec<usize> = scc.iter().map(|n| g[*n]).collect();
                let start = *members.iter().min()?;
                let mut parent: HashMap<usize, usize> = HashMap::new();
                let mut queue = std::collections::VecDeque::from([start]);
                'search: while let Some(cur) = queue.pop_front() {
                    let mut next: Vec<usize> = g.neighbors(nodes[cur]).map(|n| g[n]).collect();
                    next.sort_unstable();
                    for n in next {
                        if !members.contains(&n) || parent.contains_key(&n) {
                            continue;
                        }
                        parent.insert(n, cur);
                        if n == start {
                            break 'search;
                        }
                        queue.push_back(n);
                    }
                }
                let mut path = vec![start];
                let mut cur = *parent.get(&start)?;
                while cur != start {
                    path.push(cur);
                    cur = *parent.get(&cur)?;
                }
                path.push(start);
                path.reverse();
                return Some(path.iter().map(|&i| self.tasks[i].name.clone()).collect());
            }
        }
        None
    }
}

/// Builds a [`FlowDef`] in Rust; the result is validated exactly like a manifest.
#[derive(Debug, Clone)]
pub struct FlowBuilder {
    def: FlowDef,
}

impl FlowBuilder {
    /// A flow named `name` with no tasks, no parameters, and a concurrency of 64.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            def: FlowDef {
                name: name.into(),
                parameters: BTreeMap::new(),
                context: BTreeMap::new(),
                tasks: Vec::new(),
                reference_tasks: Vec::new(),
                concurrency: DEFAULT_CONCURRENCY,
                tag_limits: BTreeMap::new(),
                cache_namespace: None,
                max_mapped_children: DEFAULT_MAX_MAPPED_CHILDREN,
                max_log_bytes: DEFAULT_MAX_LOG_BYTES,
                schedule: None,
                body: None,
                max_task_runs: DEFAULT_MAX_TASK_RUNS,
            },
        }
    }

    /// Declare a parameter with its default.
    pub fn parameter(mut self, name: impl Into<String>, default: Value) -> Self {
        self.def.parameters.insert(name.into(), default);
        self
    }

    /// Set a context value.
    pub fn context(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.def.context.insert(key.into(), value.into());
        self
    }

    /// Add a task.
    pub fn task(mut self, task: TaskDef) -> Self {
        self.def.tasks.push(task);
        self
    }

    /// Set the reference tasks.
    pub fn reference_tasks<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.def.reference_tasks = names.into_iter().map(Into::into).collect();
        self
    }

    /// Limit how many task runs execute at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.def.concurrency = n.max(1);
        self
    }

    /// Limit how many runs of tasks tagged `tag` execute at once.
    pub fn tag_limit(mut self, tag: impl Into<String>, n: usize) -> Self {
        self.def.tag_limits.insert(tag.into(), n.max(1));
        self
    }

    /// Share cached outputs with every flow of namespace `namespace` (instead of only with
    /// runs of this flow).
    pub fn cache_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.def.cache_namespace = Some(namespace.into());
        self
    }

    /// Limit how many mapped children one run of the flow may create, summed over its mapped
    /// tasks.
    pub fn max_mapped_children(mut self, n: usize) -> Self {
        self.def.max_mapped_children = n;
        self
    }

    /// Limit the bytes of logs one run of the flow keeps, summed over its task runs.
    pub fn max_log_bytes(mut self, bytes: u64) -> Self {
        self.def.max_log_bytes = bytes;
        self
    }

    /// Make it a flow written as code: `body` submits task runs of the declared tasks.
    pub fn body(mut self, body: BodyDef) -> Self {
        self.def.body = Some(body);
        self
    }

    /// Limit how many task runs the body of a code flow may submit in one flow run.
    pub fn max_task_runs(mut self, n: usize) -> Self {
        self.def.max_task_runs = n;
        self
    }

    /// Validate and return the flow.
    pub fn build(self) -> Result<FlowDef, FlowError> {
        self.def.validate()?;
        Ok(self.def)
    }
}

/// The default global concurrency of a flow.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// The default longest retry delay a RETRY signal may ask for: 1 hour.
pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);

/// The default most mapped children of one flow run (summed over its mapped tasks): 100,000.
/// Each child costs its record (about 1 KiB with its history) and its input and output, so this
/// bounds a run's memory whatever list a guest returns.
pub const DEFAULT_MAX_MAPPED_CHILDREN: usize = 100_000;

/// The default most task runs the body of a code flow submits in one flow run: 100,000 (each
/// costs its record, about 1 KiB, while the run lasts).
pub const DEFAULT_MAX_TASK_RUNS: usize = 100_000;

/// The default most bytes of logs one flow run keeps (summed over its task runs): 256 MiB, a
/// quarter of what 1,000 task runs could log at their own default budget of 1 MiB each.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 256 << 20;

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn task(name: &str, input: Value) -> TaskDef {
        let mut t = TaskDef::new(name, "x.wasm");
        t.input = Input::from_json(input);
        t
    }

    #[test]
    fn inputs_parse_references_and_escapes() {
        let i =
            Input::from_json(json!({"a": "$tasks.up", "b": ["$params.n", 1], "c": "$$5", "d": 2}));
        assert_eq!(i.task_refs(), ["up"]);
        assert_eq!(i.param_refs(), ["n"]);
        let v = i.resolve(&|p| (p == "n").then(|| json!(7).into()), &mut |t| {
            (t == "up").then(|| json!("out").into())
        });
        assert_eq!(v, json!({"a": "out", "b": [7, 1], "c": "$5", "d": 2}));
        assert_eq!(
            Input::from_json(json!([1, 2])),
            Input::Literal(json!([1, 2]).into())
        );
    }

    #[test]
    fn unknown_references_get_a_did_you_mean() {
        let err = FlowBuilder::new("f")
            .task(task("extract", json!(null)))
            .task(task("load", json!("$tasks.extrct")))
            .build()
            .expect_err("unknown task");
        assert_eq!(
            err.to_string(),
            "task `load` refers to unknown task `extrct` (did you mean `extract`?)"
        );
        let err = FlowBuilder::new("f")
            .parameter("count", json!(1))
            .task(task("a", json!("$params.cuont")))
            .build()
            .expect_err("unknown parameter");
        assert_eq!(
            err.to_string(),
            "task `a` refers to unknown parameter `cuont` (did you mean `count`?)"
        );
    }

    #[test]
    fn cycles_are_named() {
        let c = task("c", json!("$tasks.b"));
        let err = FlowBuilder::new("f")
            .task(task("a", json!("$tasks.c")))
            .task(task("b", json!("$tasks.a")))
            .task(c)
            .task(task("d", json!("$tasks.c")))
            .build()
            .expect_err("cycle");
        assert_eq!(
            err,
            FlowError::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        let err = FlowBuilder::new("f")
            .task(task("self", json!("$tasks.self")))
            .build()
            .expect_err("self cycle");
        assert_eq!(err.to_string(), "the tasks form a cycle: self → self");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut t = TaskDef::new("t", "x.wasm");
        t.retry_delay = Duration::from_secs(1);
        assert_eq!(t.retry_delay_for(3), Duration::from_secs(1));
        t.backoff = Some(Backoff {
            factor: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.0,
        });
        let delays: Vec<u64> = (1..=6).map(|n| t.retry_delay_for(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10]);
        t.backoff = Some(Backoff {
            factor: 2.0,
            max: Duration::from_secs(10),
            jitter: 0.5,
        });
        for _ in 0..100 {
            let d = t.retry_delay_for(3);
            assert!(
                d >= Duration::from_secs(4) && d <= Duration::from_secs(6),
                "{d:?}"
            );
        }
    }
}
