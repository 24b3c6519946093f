//! `sluice build`: build every task of a flow from its declared build command, skipping
//! up-to-date ones; `sluice run --build` does this first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sluice::flow::build::{BuildOutcome, plan};
use sluice::flow::manifest;

use crate::{UsageError, usage};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The flow manifest.
    #[arg(default_value = "flow.toml")]
    flow: PathBuf,
}

pub(crate) async fn build(args: &Args) -> Result<ExitCode, UsageError> {
    let def = manifest::load(&args.flow).map_err(usage)?;
    Ok(match build_flow(&def, &args.flow).await {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    })
}

/// Build `def` (read from `manifest`) and its subflows (each in its own directory), reporting
/// each step on stderr. False when a step failed.
pub(crate) async fn build_flow(def: &sluice::flow::FlowDef, manifest: &Path) -> bool {
    let dir = manifest
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_owned);
    let steps = plan(def);
    let mut ok = true;
    for sub in def.tasks.iter().filter_map(|t| t.subflow.as_ref()) {
        let child: std::pin::Pin<Box<dyn std::future::Future<Output = bool> + '_>> =
            Box::pin(build_flow(&sub.def, &sub.manifest));
        ok &= child.await;
    }
    if steps.is_empty() {
        eprintln!("build: no task of `{}` declares a build command", def.name);
        return ok;
    }
    for step in &steps {
        let tasks = step.tasks.join(", ");
        if !step.up_to_date() {
            eprintln!("build: {tasks}: running `{}`", step.command);
        }
        match step.run(&dir).await {
            Ok(BuildOutcome::UpToDate) => eprintln!("build: {tasks}: up to date"),
            Ok(BuildOutcome::Built(took)) => {
                eprintln!("build: {tasks}: built in {:.1} s", took.as_secs_f64());
            }
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
            }
        }
    }
    ok
}
