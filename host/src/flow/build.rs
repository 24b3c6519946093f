//! Building a flow's components from the build commands its manifest declares (`sluice build`,
//! `sluice run --build`, like `spin build`). Tasks that share a command (and directory) build
//! once. A task whose component is newer than every one of its declared `sources` is up to date
//! and skipped; without `sources` the command always runs and decides itself (cargo, the guest
//! SDK build scripts and make all skip unchanged work).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::FlowDef;

/// One build command and the tasks it builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildStep {
    /// The shell command.
    pub command: String,
    /// The tasks whose component it builds (`(flow body)` for a code flow's body).
    pub tasks: Vec<String>,
    /// Their component files.
    pub outputs: Vec<PathBuf>,
    /// Each task's declared sources (same order as `outputs`).
    pub sources: Vec<Vec<PathBuf>>,
}

/// What happened to a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildOutcome {
    /// Every output exists and is newer than every source.
    UpToDate,
    /// The command ran and succeeded.
    Built(Duration),
}

/// A build command that failed: which tasks, which command, and its output.
#[derive(Debug, Clone, thiserror::Error)]
#[error("building {}: `{command}` {status}{}", tasks.iter().map(|t| format!("`{t}`")).collect::<Vec<_>>().join(", "), if output.is_empty() { String::new() } else { format!(":\n{output}") })]
pub struct BuildError {
    /// The tasks.
    pub tasks: Vec<String>,
    /// The command.
    pub command: String,
    /// How it ended (`failed with exit status 1`, `could not start: …`).
    pub status: String,
    /// The end of its stderr (and stdout), trimmed.
    pub output: String,
}

/// The build steps of `def`, in task order, one per distinct command.
pub fn plan(def: &FlowDef) -> Vec<BuildStep> {
    let mut steps: Vec<BuildStep> = Vec::new();
    let body = def
        .body
        .iter()
        .map(|b| ("(flow body)", &b.build, &b.component, &b.sources));
    let tasks = def
        .tasks
        .iter()
        .map(|t| (t.name.as_str(), &t.build, &t.component, &t.sources));
    for (name, build, component, sources) in body.chain(tasks) {
        let Some(cmd) = build else { continue };
        let step = match steps.iter_mut().find(|s| &s.command == cmd) {
            Some(s) => s,
            None => {
                steps.push(BuildStep {
                    command: cmd.clone(),
                    tasks: Vec::new(),
                    outputs: Vec::new(),
                    sources: Vec::new(),
                });
                let last = steps.len() - 1;
                &mut steps[last]
            }
        };
        step.tasks.push(name.to_owned());
        step.outputs.push(component.clone());
        step.sources.push(sources.clone());
    }
    steps
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Directories that hold tools or caches, not sources.
const NOT_SOURCES: [&str; 3] = ["node_modules", "__pycache__", "target"];

/// The newest modification time under `path` (a file, or a directory walked recursively, without
/// hidden entries and tool or cache directories).
fn newest(path: &Path) -> Option<SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    let mut best = meta.modified().ok();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).ok()?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || NOT_SOURCES.contains(&name.as_ref()) {
                continue;
            }
            if let Some(t) = newest(&entry.path()) {
                best = Some(best.map_or(t, |b| b.max(t)));
            }
        }
    }
    best
}

impl BuildStep {
    /// Whether the step can be skipped: every task declares sources, and every task's component
    /// exists and is newer than every one of its sources.
    pub fn up_to_date(&self) -> bool {
        self.outputs
            .iter()
            .zip(&self.sources)
            .all(|(output, sources)| {
                let Some(built) = modified(output) else {
                    return false;
                };
                !sources.is_empty()
                    && sources
                        .iter()
                        .all(|s| newest(s).is_some_and(|t| t <= built))
            })
    }

    /// Run the step in `dir` (the manifest's directory) unless it is up to date.
    pub async fn run(&self, dir: &Path) -> Result<BuildOutcome, BuildError> {
        if self.up_to_date() {
            return Ok(BuildOutcome::UpToDate);
        }
        let began = Instant::now();
        let fail = |status: String, output: String| BuildError {
            tasks: self.tasks.clone(),
            command: self.command.clone(),
            status,
            output,
        };
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .current_dir(dir)
            .output()
            .await
            .map_err(|e| fail(format!("could not start: {e}"), String::new()))?;
        if !out.status.success() {
            let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
            if text.trim().is_empty() {
                text = String::from_utf8_lossy(&out.stdout).into_owned();
            }
            return Err(fail(format!("failed with {}", out.status), tail(&text, 40)));
        }
        if let Some(missing) = self.outputs.iter().find(|o| !o.is_file()) {
            return Err(fail(
                format!("succeeded but did not produce {}", missing.display()),
                String::new(),
            ));
        }
        Ok(BuildOutcome::Built(began.elapsed()))
    }
}

/// The last `lines` lines of `text`, trimmed.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
