//! `sluice run`: run a flow manifest, with a live view on a terminal, then a summary table (or
//! the flow run record as JSON).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use std::sync::Arc;

use anyhow::anyhow;
use serde_json::Value;
use sluice::flow::manifest;
use sluice::grants::SecretSource;
use sluice::runner::{FlowEvent, FlowRun, FlowRunner, PrepareError, RunOptions};
use sluice::sandbox::{CancelToken, LoadEvent};
use sluice::state::StateName;
use sluice::store::Store;
use tokio::sync::mpsc;

use crate::report::{log_tails, summary, write_run_json};
use crate::{UsageError, exit_code};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The flow manifest (TOML).
    flow: PathBuf,

    /// Set a parameter (repeatable): `--param name=value`. The value is JSON when it parses as
    /// JSON, else a string; JSON nested deeper than 127 levels is refused.
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = crate::parse_key_value)]
    params: Vec<(String, String)>,

    /// Set a context value (repeatable): `--context key=value`.
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = crate::parse_key_value)]
    context: Vec<(String, String)>,

    /// Print the flow run record as JSON instead of a table.
    #[arg(long)]
    json: bool,

    /// Build the flow's components first (as `sluice build`).
    #[arg(long)]
    build: bool,

    #[command(flatten)]
    grants: crate::GrantArgs,
}

pub(crate) async fn run(
    home: &Path,
    sandbox: &crate::SandboxArgs,
    remote: Option<&crate::remote::Remote>,
    args: Args,
) -> Result<ExitCode, UsageError> {
    let usage = |e: anyhow::Error| UsageError(e);
    if let Some(remote) = remote {
        let parameters = parameters(args.params)?;
        let max = sandbox
            .max_component_size
            .unwrap_or(sluice::sandbox::DEFAULT_MAX_COMPONENT_BYTES);
        let context = args.context.into_iter().collect();
        return remote
            .run(&args.flow, max, args.build, parameters, context, args.json)
            .await;
    }
    let text = manifest::read(&args.flow).map_err(|e| usage(e.into()))?;
    // Recorded with the run, so `sluice resume` works from any directory.
    let path = std::path::absolute(&args.flow).unwrap_or_else(|_| args.flow.clone());
    let policy = args.grants.policy(home)?;
    let def = manifest::parse_with(&path, &text, policy.as_ref()).map_err(|e| usage(e.into()))?;
    let secrets = args.grants.secrets()?;
    if args.build && !crate::build::build_flow(&def, &path).await {
        return Ok(ExitCode::from(1));
    }
    let parameters = parameters(args.params)?;
    let session = Session::open(home, sandbox, secrets)?;
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let flow = session
        .runner
        .prepare(def, &dir)
        .await
        .map_err(|e| usage(e.into()))?;
    let context = args.context.into_iter().collect();
    session
        .drive(
            flow.def().tasks.len(),
            args.json,
            move |runner, cancel| async move {
                let options = RunOptions {
                    parameters,
                    context,
                    cancel,
                    manifest: Some((path, text)),
                    files: None,
                    id: None,
                    scheduled: None,
                    parent: None,
                };
                runner.run(&flow, options).await
            },
        )
        .await
}

/// The `--param` values.
fn parameters(params: Vec<(String, String)>) -> Result<BTreeMap<String, Value>, UsageError> {
    params
        .into_iter()
        .map(|(k, v)| Ok((param_value(&k, &v)?, k)))
        .map(|r: Result<_, UsageError>| r.map(|(v, k)| (k, v)))
        .collect()
}

/// How deep `--param` JSON may nest: serde_json's recursion limit (it refuses a 128th level).
pub(crate) const MAX_PARAM_DEPTH: usize = 127;

/// The value of `--param name=text`: JSON when `text` parses as JSON, else the string `text`.
/// JSON nested deeper than serde_json's limit is refused rather than quietly taken as a string.
fn param_value(name: &str, text: &str) -> Result<Value, UsageError> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(_) if json_depth(text) > MAX_PARAM_DEPTH => Err(UsageError(anyhow!(
            "--param {name}: the JSON value nests {} levels deep; at most {MAX_PARAM_DEPTH} are \
             supported",
            json_depth(text)
        ))),
        Err(_) => Ok(Value::String(text.to_owned())),
    }
}

/// The deepest nesting of `[` and `{` in `text`, outside JSON strings.
fn json_depth(text: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in text.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A runner recording into the store of `home`, with a live view of its events.
pub(crate) struct Session {
    pub(crate) runner: FlowRunner,
    events: mpsc::UnboundedReceiver<FlowEvent>,
    /// The runner's store: the JSON record's logs are read back from it.
    store: Arc<dyn Store>,
}

impl Session {
    pub(crate) fn open(
        home: &Path,
        sandbox: &crate::SandboxArgs,
        secrets: SecretSource,
    ) -> Result<Session, UsageError> {
        let store: Arc<dyn Store> = Arc::new(crate::open_store(home)?);
        let (loads, load_events) = mpsc::unbounded_channel();
        tokio::spawn(compile_progress(load_events));
        let sandbox = sandbox
            .builder()
            .load_events(loads)
            .build()
            .map_err(|e| UsageError(anyhow!("cannot start the sandbox: {e}")))?;
        let (tx, events) = mpsc::unbounded_channel();
        let runner = FlowRunner::new(sandbox)
            .events(tx)
            .store(store.clone())
            .secrets(secrets);
        Ok(Session {
            runner,
            events,
            store,
        })
    }

    /// Run `go` with Ctrl-C and SIGTERM wired to cancellation (the run goes Cancelling →
    /// Cancelled and is recorded so) and a live view on a terminal, then print the run (a
    /// table, or JSON) and return its exit code.
    pub(crate) async fn drive<F, Fut>(
        self,
        tasks: usize,
        json: bool,
        go: F,
    ) -> Result<ExitCode, UsageError>
    where
        F: FnOnce(FlowRunner, CancelToken) -> Fut,
        Fut: Future<Output = Result<FlowRun, PrepareError>>,
    {
        let cancel = CancelToken::new();
        let on_signal = cancel.clone();
        // Installed before the run starts, so a signal at any point from here is a cancel.
        let signals = interrupt_signals();
        tokio::spawn(async move {
            let name = signals.await;
            eprintln!("\ncancelling ({name}): interrupting running tasks…");
            on_signal.cancel();
        });
        let live = (!json && std::io::stderr().is_terminal())
            .then(|| tokio::spawn(live_view(self.events, tasks)));
        let result = go(self.runner, cancel).await;
        if let Some(view) = live {
            let _ = view.await;
        }
        let (run, not_recorded) = match result {
            Ok(run) => (run, None),
            Err(PrepareError::NotRecorded { run, source }) => (*run, Some(source)),
            Err(e) => return Err(UsageError(e.into())),
        };
        if json {
            // Written as it is made: the record of a large run is never all in memory at once.
            let tails = log_tails(&*self.store, &run);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let _ = write_run_json(&mut out, &run, &tails);
        } else {
            crate::print_stdout(&summary(&run, false));
        }
        if let Some(e) = not_recorded {
            let id = run.id;
            let marked = run.state.name == StateName::Crashed
                && run
                    .state
                    .message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("not fully recorded"));
            if marked {
                // The reason is in the state (above, and in the record): not repeated here.
                eprintln!(
                    "error: flow run {id} is recorded Crashed, not fully recorded (its state says why); `sluice resume {id}` continues it once the store can be written"
                );
            } else {
                eprintln!("error: flow run {id} was not fully recorded: {e}");
            }
            return Ok(ExitCode::from(1));
        }
        Ok(exit_code(run.state.state_type()))
    }
}

/// Wait for the first of SIGINT (Ctrl-C) and SIGTERM (what `kill`, service managers and
/// container runtimes send); return its name. The handlers are installed when this is called,
/// not when it is first polled. A signal whose handler cannot be installed is never waited for.
pub(crate) fn interrupt_signals() -> impl Future<Output = &'static str> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        let ctrl_c = async {
            if ctrl_c.await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async {
            match term.as_mut() {
                Some(t) => {
                    t.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => "SIGINT",
            () = term => "SIGTERM",
        }
    }
}

/// Show compiles as they happen: a component compiled for the first time (1 s per MB with
/// Cranelift) would otherwise look like a hang. Later runs load the precompiled artifact.
async fn compile_progress(mut rx: mpsc::UnboundedReceiver<LoadEvent>) {
    let terminal = std::io::stderr().is_terminal();
    let mut bars: HashMap<String, indicatif::ProgressBar> = HashMap::new();
    while let Some(event) = rx.recv().await {
        match event {
            LoadEvent::Compiling { name, bytes } => {
                let what = format!(
                    "compiling {name} ({}), once: later runs load it precompiled",
                    bytesize::ByteSize(bytes)
                );
                if terminal {
                    let bar = indicatif::ProgressBar::new_spinner();
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar.set_message(what);
                    bars.insert(name, bar);
                } else {
                    eprintln!("{what}");
                }
            }
            LoadEvent::Compiled { name, elapsed, .. } => {
                let done = format!("compiled {name} in {:.1} s", elapsed.as_secs_f64());
                match bars.remove(&name) {
                    Some(bar) => bar.finish_with_message(done),
                    None => eprintln!("{done}"),
                }
            }
            LoadEvent::CompileFailed { name, .. } => {
                if let Some(bar) = bars.remove(&name) {
                    bar.finish_and_clear();
                }
            }
            _ => {}
        }
    }
}

/// Counts of task runs by state and the tasks running now, redrawn as events arrive.
pub(crate) async fn live_view(mut rx: mpsc::UnboundedReceiver<FlowEvent>, tasks: usize) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut states: HashMap<(String, Option<u32>), StateName> = HashMap::new();
    while let Some(event) = rx.recv().await {
        let FlowEvent::Task {
            name,
            map_index,
            state,
        } = event
        else {
            continue;
        };
        states.insert((name, map_index), state);
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut running: Vec<String> = Vec::new();
        for ((name, idx), s) in &states {
            *counts.entry(s.as_str()).or_default() += 1;
            if matches!(s, StateName::Running | StateName::Retrying) {
                running.push(match idx {
                    Some(i) => format!("{name}[{i}]"),
                    None => name.clone(),
                });
            }
        }
        running.sort();
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let mut line = format!("{tasks} tasks │ {}", counts.join("  "));
        if !running.is_empty() {
            let shown: Vec<&str> = running.iter().take(6).map(String::as_str).collect();
            line.push_str(&format!(" │ running: {}", shown.join(", ")));
            if running.len() > 6 {
                line.push_str(&format!(" +{}", running.len() - 6));
            }
        }
        bar.set_message(line);
    }
    bar.finish_and_clear();
}
