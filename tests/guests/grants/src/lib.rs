//! A guest that tries, on request, what grants allow or deny, and reports what happened instead
//! of failing, so a test can assert both the success and the refusal. The input is a list of
//! steps; the output is one result per step: `{"ok": …}` or `{"err": "…"}`.

use std::io::Write as _;

use serde::Deserialize;
use serde_json::{Value, json};
use sluice_guest::{Signal, export_task, info};

#[derive(Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
enum Step {
    /// Read a file as text.
    Read { path: String },
    /// Create or replace a file with `text`.
    Write { path: String, text: String },
    /// List a directory's entry names, sorted.
    List { path: String },
    /// Create a symbolic link `link` (relative to the preopened directory `dir`) pointing to
    /// `target`.
    Symlink {
        dir: String,
        target: String,
        link: String,
    },
    /// Remove a file.
    Remove { path: String },
    /// One environment variable.
    Env { name: String },
    /// Every environment variable's name.
    EnvNames,
    /// Print `text` to stdout, log it, and return it.
    Echo { text: String },
    /// Print the value of variable `name` to stdout and stderr, log it, and return it.
    Leak { name: String },
    /// Fail with a message holding the value of variable `name`.
    FailWith { name: String },
}

fn run(steps: Vec<Step>) -> Result<Vec<Value>, Signal> {
    let mut out = Vec::new();
    for step in steps {
        let r: Result<Value, String> = match step {
            Step::Read { path } => std::fs::read_to_string(&path)
                .map(Value::from)
                .map_err(|e| e.to_string()),
            Step::Write { path, text } => std::fs::write(&path, text)
                .map(|()| Value::Null)
                .map_err(|e| e.to_string()),
            Step::List { path } => std::fs::read_dir(&path)
                .and_then(|d| {
                    let mut names = d
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<Result<Vec<_>, _>>()?;
                    names.sort();
                    Ok(json!(names))
                })
                .map_err(|e| e.to_string()),
            Step::Symlink { dir, target, link } => symlink(&dir, &target, &link),
            Step::Remove { path } => std::fs::remove_file(&path)
                .map(|()| Value::Null)
                .map_err(|e| e.to_string()),
            Step::Env { name } => std::env::var(&name)
                .map(Value::from)
                .map_err(|e| e.to_string()),
            Step::EnvNames => {
                let mut names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                names.sort();
                Ok(json!(names))
            }
            Step::Echo { text } => Ok(echo(&text)),
            Step::Leak { name } => std::env::var(&name)
                .map(|v| echo(&v))
                .map_err(|e| e.to_string()),
            Step::FailWith { name } => {
                let v = std::env::var(&name).unwrap_or_default();
                return Err(Signal::Fail(format!("failing with {v}")));
            }
        };
        out.push(match r {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "err": e }),
        });
    }
    Ok(out)
}

/// `symlink_at` in the preopened directory `dir` (std has no stable symlink on WASI).
fn symlink(dir: &str, target: &str, link: &str) -> Result<Value, String> {
    let preopens = wasip2::filesystem::preopens::get_directories();
    let (d, _) = preopens
        .iter()
        .find(|(_, name)| name == dir)
        .ok_or_else(|| format!("no preopened directory {dir}"))?;
    d.symlink_at(target, link)
        .map(|()| Value::Null)
        .map_err(|e| format!("{e:?}"))
}

/// Print, log and return `text`.
fn echo(text: &str) -> Value {
    println!("stdout: {text}");
    let _ = writeln!(std::io::stderr(), "stderr: {text}");
    info!("log: {text}");
    Value::from(text)
}

export_task!(run);
