//! Hostile guests: each one is stopped by its budget with the right state and message, and the
//! host stays healthy (a control task completes afterwards).

use std::time::{Duration, Instant};

use serde_json::json;
use sluice::context::TaskContext;
use sluice::sandbox::{CancelToken, Ending, Limit, LimitExceeded, LogSource, RunBudget, TimeLimit};

use crate::support::{control_task_completes, guest, hostile, load, message, run_with, sandbox};

#[tokio::test]
async fn infinite_loop_times_out_by_fuel() {
    let budget = RunBudget {
        fuel: Some(50_000_000),
        ..RunBudget::default()
    };
    let out = hostile(json!({"do": "loop"}), &budget).await;
    assert_eq!(out.ending, Ending::TimedOut(TimeLimit::Fuel(50_000_000)));
    assert_eq!(out.usage.fuel_consumed, 50_000_000);
    control_task_completes().await;
}

#[tokio::test]
async fn infinite_loop_with_unlimited_fuel_times_out_by_the_deadline() {
    let timeout = Duration::from_millis(300);
    let budget = RunBudget {
        fuel: None,
        timeout,
        ..RunBudget::default()
    };
    let component = load(&guest("hostile")).await;
    let started = Instant::now();
    let out = run_with(&component, json!({"do": "loop"}), &budget).await;
    let elapsed = started.elapsed();
    assert_eq!(out.ending, Ending::TimedOut(TimeLimit::Deadline(timeout)));
    assert!(elapsed >= timeout, "stopped early: {elapsed:?}");
    // The acceptance bound of the issue: stopped within deadline + 250 ms.
    assert!(
        elapsed < timeout + Duration::from_millis(250),
        "stopped late: {elapsed:?}"
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_guest_blocked_in_the_host_still_meets_its_deadline() {
    let timeout = Duration::from_millis(200);
    let budget = RunBudget {
        timeout,
        ..RunBudget::default()
    };
    let component = load(&guest("hostile")).await;
    let started = Instant::now();
    let out = run_with(&component, json!({"do": "sleep", "ms": 60_000}), &budget).await;
    assert_eq!(out.ending, Ending::TimedOut(TimeLimit::Deadline(timeout)));
    assert!(started.elapsed() < timeout + Duration::from_millis(250));
    control_task_completes().await;
}

#[tokio::test]
async fn memory_bomb_fails_on_the_memory_limit() {
    let budget = RunBudget {
        memory_bytes: 64 << 20,
        ..RunBudget::default()
    };
    let out = hostile(json!({"do": "memory_bomb"}), &budget).await;
    match out.ending {
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::Memory,
            max,
            ..
        }) => assert_eq!(max, 64 << 20),
        other => panic!("expected the memory limit, got {other:?}"),
    }
    assert!(message(&out.ending).contains("memory limit of 67108864 bytes exceeded"));
    assert!(out.usage.memory_peak_bytes <= 64 << 20);
    control_task_completes().await;
}

#[tokio::test]
async fn unbounded_recursion_is_a_stack_overflow() {
    for behaviour in ["recurse", "recurse_shadow"] {
        let out = hostile(json!({"do": behaviour}), &RunBudget::default()).await;
        let msg = message(&out.ending);
        assert!(
            matches!(out.ending, Ending::GuestFault { .. }) && msg.starts_with("stack overflow"),
            "{behaviour}: {msg}"
        );
        assert!(msg.contains("hostile::recurse"), "{behaviour}: {msg}");
        control_task_completes().await;
    }
}

#[tokio::test]
async fn a_one_gib_output_fails_on_the_output_limit_without_being_copied() {
    let component = load(&crate::support::fixture("huge_output.wat")).await;
    let budget = RunBudget {
        memory_bytes: 2 << 30,
        ..RunBudget::default()
    };
    let out = crate::support::run_with(&component, json!(null), &budget).await;
    assert_eq!(
        out.ending,
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: budget.output_bytes,
            requested: None,
        })
    );
    // The guest really did return 1 GiB: its memory grew to hold it.
    assert!(out.usage.memory_peak_bytes > 1 << 30);
    control_task_completes().await;
}

#[tokio::test]
async fn stdout_flood_is_truncated_and_the_run_ends_by_its_budget() {
    let budget = RunBudget {
        fuel: Some(200_000_000),
        log_bytes: 64 << 10,
        ..RunBudget::default()
    };
    let out = hostile(json!({"do": "stdout_flood"}), &budget).await;
    assert_eq!(out.ending, Ending::TimedOut(TimeLimit::Fuel(200_000_000)));
    let kept: usize = out
        .logs
        .iter()
        .filter(|r| r.source == LogSource::Stdout)
        .map(|r| r.message.len())
        .sum();
    assert!(kept > 0 && kept <= 64 << 10, "kept {kept} bytes");
    assert!(out.logs_dropped_bytes > 0);
    let marker = out.logs.last().expect("a truncation marker");
    assert!(
        marker.message.contains("logs truncated"),
        "{}",
        marker.message
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_guest_sees_no_environment_arguments_files_network_or_stdin() {
    // The test process has plenty of environment (PATH, CARGO_*); none of it may leak.
    assert!(std::env::var_os("PATH").is_some());
    let out = hostile(json!({"do": "env"}), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(json!({"env": [], "args": []}).into())
    );

    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    for path in ["/etc/passwd", "/", ".", manifest] {
        let out = hostile(
            json!({"do": "read_file", "path": path}),
            &RunBudget::default(),
        )
        .await;
        let Ending::Output(v) = &out.ending else {
            panic!("{path}: {:?}", out.ending)
        };
        let v = &v.to_value().expect("JSON");
        assert!(v["read"].get("Err").is_some(), "{path} was readable: {v}");
        assert!(v["list"].get("Err").is_some(), "{path} was listable: {v}");
    }

    // A listener that would accept the connection if the guest had any network.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    listener.set_nonblocking(true).expect("non-blocking");
    let addr = listener.local_addr().expect("address").to_string();
    let out = hostile(
        json!({"do": "connect", "addr": addr}),
        &RunBudget::default(),
    )
    .await;
    let Ending::Output(v) = &out.ending else {
        panic!("{:?}", out.ending)
    };
    let v = &v.to_value().expect("JSON");
    let err = v["connect"]["Err"].as_str().unwrap_or_default();
    assert!(
        err.to_lowercase().contains("permission denied"),
        "connecting to {addr} was not refused for lack of permission: {v}"
    );
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the listener saw a connection from the guest: {other:?}"),
    }

    let out = hostile(json!({"do": "stdin"}), &RunBudget::default()).await;
    let Ending::Output(v) = &out.ending else {
        panic!("{:?}", out.ending)
    };
    let v = &v.to_value().expect("JSON");
    assert_eq!(v["text"], "", "stdin gave data: {v}");
    control_task_completes().await;
}

/// Stdin of `sluice task run` is the user's terminal or pipe: the guest must not read it.
#[test]
fn a_guest_reads_nothing_of_the_stdin_piped_to_sluice() {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let home = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-home");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["task", "run"])
        .arg(guest("hostile"))
        .args(["--input", r#"{"do":"stdin"}"#, "--json"])
        .env("SLUICE_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let mut stdin = child.stdin.take().expect("stdin");
    // Written before the guest runs (a pipe holds 64 KiB), then closed so a read would end.
    stdin
        .write_all(b"secret bytes on sluice's stdin\n")
        .expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["output"]["read"], json!({"Ok": 0}), "{v}");
    assert_eq!(
        v["output"]["text"], "",
        "the guest read sluice's stdin: {v}"
    );
}

#[tokio::test]
async fn a_panic_fails_with_the_panic_message() {
    let out = hostile(
        json!({"do": "panic", "message": "the flux capacitor broke"}),
        &RunBudget::default(),
    )
    .await;
    let msg = message(&out.ending);
    assert!(matches!(out.ending, Ending::GuestFault { .. }), "{msg}");
    assert!(
        msg.starts_with("the task panicked at tests/guests/hostile/src/lib.rs:"),
        "{msg}"
    );
    assert!(msg.contains("the flux capacitor broke"), "{msg}");
    assert!(msg.contains("guest backtrace:"), "{msg}");
    control_task_completes().await;
}

#[tokio::test]
async fn cancelling_interrupts_a_running_guest() {
    let component = load(&guest("hostile")).await;
    let cancel = CancelToken::new();
    let budget = RunBudget {
        fuel: None,
        ..RunBudget::default()
    };
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        canceller.cancel();
    });
    let started = Instant::now();
    let out = sandbox()
        .run(
            &component,
            &json!({"do": "loop"}).into(),
            &TaskContext::new("cancel-me"),
            &budget,
            Some(&cancel),
        )
        .await;
    assert_eq!(out.ending, Ending::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(1));
    // Also when the guest is blocked in the host rather than executing.
    let cancel = CancelToken::new();
    cancel.cancel();
    let out = sandbox()
        .run(
            &component,
            &json!({"do": "sleep", "ms": 60_000}).into(),
            &TaskContext::new("cancel-me"),
            &budget,
            Some(&cancel),
        )
        .await;
    assert_eq!(out.ending, Ending::Cancelled);
    control_task_completes().await;
}

#[tokio::test]
async fn many_hostile_runs_at_once_leave_the_host_healthy() {
    let budget = RunBudget {
        fuel: Some(20_000_000),
        memory_bytes: 32 << 20,
        ..RunBudget::default()
    };
    let behaviours = [
        "loop",
        "memory_bomb",
        "recurse",
        "stdout_flood",
        "recurse_shadow",
    ];
    let runs = (0..20).map(|i| {
        let behaviour = behaviours[i % behaviours.len()];
        async move { hostile(json!({"do": behaviour}), &budget).await }
    });
    for out in futures_join_all(runs).await {
        assert!(
            !matches!(out.ending, Ending::Output(_) | Ending::HostFault { .. }),
            "{:?}",
            out.ending
        );
    }
    control_task_completes().await;
}

async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut outs = Vec::new();
    for h in handles {
        outs.push(h.await.expect("run task"));
    }
    outs
}
