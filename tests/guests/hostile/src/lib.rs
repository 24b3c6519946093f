//! A guest that misbehaves on request, for the sandbox's tests. The input names the behaviour.

use std::hint::black_box;

use serde::Deserialize;
use sluice_guest::{Signal, context, export_task, info};

#[derive(Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
enum Behaviour {
    /// Spin forever.
    Loop,
    /// Compute for `iterations` steps, then return how many were made (CPU-bound, bounded).
    Spin { iterations: u64 },
    /// Allocate and touch `mib` MiB, then return how many were allocated.
    Allocate { mib: usize },
    /// Allocate 1 MiB blocks until allocation fails.
    MemoryBomb,
    /// Recurse without bound on WebAssembly's own call stack.
    Recurse,
    /// Recurse without bound with large frames, overflowing the shadow stack in linear memory.
    RecurseShadow,
    /// Sleep (blocked in the host, not executing WebAssembly).
    Sleep { ms: u64 },
    /// Write lines to stdout forever.
    StdoutFlood,
    /// Write `lines` numbered lines to stdout and stderr.
    Print { lines: usize },
    /// Record `lines` log lines of `bytes` bytes each through the log import.
    Log { lines: usize, bytes: usize },
    /// Log `log`, then fail with `message`.
    LogThenFail { log: String, message: String },
    /// Call `log` once with a message of `bytes` bytes.
    LogBytes { bytes: usize },
    /// Return a string of `bytes` bytes.
    Output { bytes: usize },
    /// What `Output` does in the guest (the same string, serialized as the SDK serializes an
    /// output), returning only its length: the guest's memory of `Output` without the output.
    OutputLen { bytes: usize },
    /// Return every environment variable and argument the guest can see.
    Env,
    /// Try to read a file and list a directory; return what happened.
    ReadFile { path: String },
    /// Try to open a TCP connection; return what happened.
    Connect { addr: String },
    /// Read stdin; return what was read.
    Stdin,
    /// Panic with `message`.
    Panic { message: String },
    /// Raise RETRY asking for a delay of `ms` milliseconds.
    RetryAfter { ms: u64 },
    /// Ask the host for `bytes` random bytes at once (`wasi:random`); return how many came.
    Random { bytes: u64 },
    /// Return the length of `of` as JSON text.
    Len { of: serde_json::Value },
    /// Return everything the context interface answers.
    Context { keys: Vec<String> },
    /// Raise the signal `kind` (fail, retry, skip, pause, success) with a message of `bytes`
    /// bytes; a SUCCESS carries `output`.
    Signal {
        kind: String,
        bytes: usize,
        #[serde(default)]
        output: serde_json::Value,
    },
    /// Return the list 0, 1, …, n − 1.
    List { n: u64 },
    /// Raise PAUSE on the first attempt; return `value` on later ones.
    PauseOnFirstAttempt { value: serde_json::Value },
    /// Raise RETRY with a delay of `ms` milliseconds on the first attempt; return the attempt
    /// number on later ones.
    RetryOnFirstAttempt { ms: u64 },
    /// Raise RETRY on every attempt before `attempt` (the first with a delay of `first_ms`
    /// milliseconds, the others without one); return the attempt number from then on.
    RetryBefore { attempt: u32, first_ms: u64 },
    /// Write `lines` rounds of a log-import line, a stdout line and a stderr line.
    Chatter { lines: usize },
    /// Log `{log} {attempt}`; on the first attempt, then raise RETRY with a delay of `ms`
    /// milliseconds; return the attempt number on later ones.
    LogEachAttempt { log: String, ms: u64 },
}

#[allow(unconditional_recursion)] // recursing without bound is the point
fn recurse(n: u64) -> u64 {
    black_box(recurse(black_box(n + 1))) ^ n
}

#[allow(unconditional_recursion)] // recursing without bound is the point
fn recurse_shadow(n: u64) -> u64 {
    let buf = black_box([n; 64]);
    recurse_shadow(buf[0] + 1) + buf[63]
}

fn run(behaviour: Behaviour) -> Result<serde_json::Value, Signal> {
    use serde_json::json;
    Ok(match behaviour {
        Behaviour::Loop => {
            let mut i: u64 = 0;
            loop {
                i = black_box(i.wrapping_add(1));
            }
        }
        Behaviour::Spin { iterations } => {
            let mut i: u64 = 0;
            while black_box(i) < iterations {
                i = black_box(i.wrapping_add(1));
            }
            json!(i)
        }
        Behaviour::Allocate { mib } => {
            let mut v = vec![0u8; mib << 20];
            for b in v.iter_mut().step_by(4096) {
                *b = 1;
            }
            json!(black_box(v).len() >> 20)
        }
        Behaviour::MemoryBomb => {
            let mut blocks = Vec::new();
            loop {
                let mut b = vec![0u8; 1 << 20];
                b[4096] = 1;
                blocks.push(black_box(b));
            }
        }
        Behaviour::Recurse => json!(recurse(0)),
        Behaviour::RecurseShadow => json!(recurse_shadow(0)),
        Behaviour::Sleep { ms } => {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            json!(ms)
        }
        Behaviour::StdoutFlood => loop {
            println!("flooding stdout with a line that is long enough to fill the buffer quickly");
        },
        Behaviour::Print { lines } => {
            for i in 0..lines {
                println!("out {i}");
                eprintln!("err {i}");
            }
            json!(lines)
        }
        Behaviour::Log { lines, bytes } => {
            for i in 0..lines {
                info!("{i}:{}", "x".repeat(bytes.saturating_sub(2)));
            }
            json!(lines)
        }
        Behaviour::LogThenFail { log, message } => {
            info!("{log}");
            return Err(Signal::fail(message));
        }
        Behaviour::LogBytes { bytes } => {
            sluice_guest::log::log(sluice_guest::log::Level::Info, &"y".repeat(bytes));
            json!(bytes)
        }
        Behaviour::Output { bytes } => json!("z".repeat(bytes.saturating_sub(2))),
        Behaviour::OutputLen { bytes } => {
            let value = json!("z".repeat(bytes.saturating_sub(2)));
            json!(serde_json::to_string(&value).map_or(0, |s| s.len()))
        }
        Behaviour::Env => json!({
            "env": std::env::vars().collect::<Vec<_>>(),
            "args": std::env::args().collect::<Vec<_>>(),
        }),
        Behaviour::ReadFile { path } => json!({
            "read": std::fs::read_to_string(&path).map_err(|e| e.to_string()),
            "list": std::fs::read_dir(&path).map(|d| d.count()).map_err(|e| e.to_string()),
            "cwd": std::env::current_dir().map(|p| p.display().to_string()).map_err(|e| e.to_string()),
        }),
        Behaviour::Connect { addr } => json!({
            "connect": std::net::TcpStream::connect(addr.as_str()).map(|_| ()).map_err(|e| e.to_string()),
        }),
        Behaviour::Stdin => {
            let mut s = String::new();
            let r = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s);
            json!({ "read": r.map_err(|e| e.to_string()), "text": s })
        }
        Behaviour::Panic { message } => panic!("{message}"),
        Behaviour::Len { of } => json!(of.to_string().len()),
        Behaviour::Random { bytes } => json!(wasip2::random::random::get_random_bytes(bytes).len()),
        Behaviour::RetryAfter { ms } => {
            return Err(Signal::retry_after(
                "later",
                std::time::Duration::from_millis(ms),
            ));
        }
        Behaviour::Signal {
            kind,
            bytes,
            output,
        } => {
            let message = "m".repeat(bytes);
            return Err(match kind.as_str() {
                "fail" => Signal::fail(message),
                "retry" => Signal::retry(message),
                "skip" => Signal::skip(message),
                "pause" => Signal::pause(message),
                "success" => Signal::success(output, message),
                other => panic!("no signal `{other}`"),
            });
        }
        Behaviour::List { n } => json!((0..n).collect::<Vec<_>>()),
        Behaviour::PauseOnFirstAttempt { value } => {
            if context::attempt() == 1 {
                return Err(Signal::pause("paused by the task"));
            }
            value
        }
        Behaviour::LogEachAttempt { log, ms } => {
            info!("{log} {}", context::attempt());
            if context::attempt() == 1 {
                return Err(Signal::retry_after(
                    "first attempt",
                    std::time::Duration::from_millis(ms),
                ));
            }
            json!(context::attempt())
        }
        Behaviour::RetryOnFirstAttempt { ms } => {
            if context::attempt() == 1 {
                return Err(Signal::retry_after(
                    "first attempt",
                    std::time::Duration::from_millis(ms),
                ));
            }
            json!(context::attempt())
        }
        Behaviour::RetryBefore { attempt, first_ms } => {
            let now = context::attempt();
            if now < attempt {
                let ms = if now == 1 { first_ms } else { 0 };
                return Err(Signal::retry_after(
                    format!("attempt {now}"),
                    std::time::Duration::from_millis(ms),
                ));
            }
            json!(now)
        }
        Behaviour::Chatter { lines } => {
            for i in 0..lines {
                info!("log {i}");
                println!("out {i}");
                eprintln!("err {i}");
            }
            json!(lines)
        }
        Behaviour::Context { keys } => json!({
            "flow_run_id": context::flow_run_id(),
            "task_run_id": context::task_run_id(),
            "task_name": context::task_name(),
            "attempt": context::attempt(),
            "map_index": context::map_index(),
            "parameters": context::parameters::<serde_json::Value>().map_err(|e| e.to_string()),
            "get": keys.iter().map(|k| (k.clone(), json!(context::get(k)))).collect::<serde_json::Map<_, _>>(),
        }),
    })
}

export_task!(run);
