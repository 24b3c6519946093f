//! The sandbox under hostile neighbours: one run never makes another fail through the shared
//! pooling allocator. Components with many core instances and memories next to ordinary tasks,
//! multi-memory modules, tables up to the budget, components too large for the pool refused at
//! load (compiled once), traps during instantiation, the host's memory ceiling, huge host
//! requests, and the fuel a stopped run reports.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;
use sluice::context::TaskContext;
use sluice::flow::{FlowBuilder, Input, MapOver, TaskDef};
use sluice::runner::{FlowRunner, RunOptions};
use sluice::sandbox::{Ending, Limit, LoadError, LoadEvent, RunBudget, Sandbox};
use sluice::state::{StateName, StateType};

use crate::support::{control_task_completes, guest, message, run_with, sandbox};

/// The types and the lifted `run` every fixture shares: `run` is core function `run` of core
/// instance `$i0`, with its memory and `realloc`.
const TASK_EXPORTS: &str = r#"
  (type $retry' (record (field "message" string) (field "delay-ms" (option u64))))
  (export $retry "retry-request" (type $retry'))
  (type $success' (record (field "output" (option string)) (field "message" string)))
  (export $success "success-report" (type $success'))
  (type $signal' (variant
    (case "fail" string)
    (case "retry" $retry)
    (case "skip" string)
    (case "pause" string)
    (case "success" $success)))
  (export $signal "signal" (type $signal'))
  (func (export "run") (param "input" string) (result (result string (error $signal)))
    (canon lift (core func $i0 "run") (memory (core memory $i0 "memory")) (realloc (core func $i0 "realloc"))))
"#;

/// A core module whose `run` returns `null` after `body` (WebAssembly text, which may use the
/// local `$n`), with `extra` declarations.
fn returning_null(extra: &str, body: &str) -> String {
    format!(
        r#"(core module $m
    (memory (export "memory") 1)
    {extra}
    (data (i32.const 64) "null")
    (func (export "realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024)
    (func (export "run") (param i32 i32) (result i32) (local $n i32)
      {body}
      (i32.store8 (i32.const 16) (i32.const 0))
      (i32.store (i32.const 24) (i32.const 64))
      (i32.store (i32.const 28) (i32.const 4))
      i32.const 16))"#
    )
}

/// A task component of `instances` core instances of one module, each with its own memory;
/// `run` spins for `spins` loop iterations, so runs overlap, then returns `null`.
fn many_memories(instances: u32, spins: u32) -> String {
    let body = format!(
        "(local.set $n (i32.const {spins}))
         (block $done (loop $spin
           (br_if $done (i32.eqz (local.get $n)))
           (local.set $n (i32.sub (local.get $n) (i32.const 1)))
           (br $spin)))"
    );
    let module = returning_null("", &body);
    let mut wat = format!("(component\n{module}\n");
    for i in 0..instances {
        let _ = writeln!(wat, "  (core instance $i{i} (instantiate $m))");
    }
    wat.push_str(TASK_EXPORTS);
    wat.push(')');
    wat
}

/// A task component of one core module: `extra` declarations, `body` before returning `null`.
fn one_module(extra: &str, body: &str) -> String {
    format!(
        "(component\n{}\n  (core instance $i0 (instantiate $m))\n{TASK_EXPORTS})",
        returning_null(extra, body)
    )
}

fn write(dir: &Path, name: &str, wat: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, wat).expect("write a fixture");
    path
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir")
}

/// The acceptance's neighbour test: 300 ordinary tasks beside 300 runs of a component with 17
/// core instances, each with a memory, in one flow. Every run reserves its memories before it
/// starts, so none of them, and none of the ordinary tasks, is starved of pool slots: every
/// ordinary task completes on its first attempt, and so does every big run.
#[tokio::test(flavor = "multi_thread")]
async fn ordinary_tasks_complete_first_time_beside_runs_that_fill_the_pool() {
    let dir = tmp();
    let big = write(dir.path(), "seventeen.wat", &many_memories(17, 20_000_000));
    let inputs: Vec<i64> = (0..300).collect();
    let mut ordinary = TaskDef::new("ordinary", guest("add_one"));
    ordinary.input = Input::from_json(json!(inputs));
    ordinary.map = MapOver::Input;
    let mut heavy = TaskDef::new("heavy", big);
    heavy.input = Input::from_json(json!(inputs));
    heavy.map = MapOver::Input;
    let def = FlowBuilder::new("neighbours")
        .concurrency(1024)
        .task(heavy)
        .task(ordinary)
        .build()
        .expect("flow");
    let runner = FlowRunner::new(sandbox().clone());
    let flow = runner.prepare(def, dir.path()).await.expect("prepare");
    let run = runner.run(&flow, RunOptions::default()).await.expect("run");
    for name in ["ordinary", "heavy"] {
        let t = run.task(name).expect("task");
        assert_eq!(t.state.name, StateName::Mapped, "{name}: {:?}", t.state);
        assert_eq!(t.children.len(), 300);
        for c in &t.children {
            assert_eq!(
                (c.state.state_type(), c.attempts),
                (StateType::Completed, 1),
                "{name}[{:?}] did not complete first time: {:?}",
                c.map_index,
                c.state
            );
        }
    }
    let outputs = run.task("ordinary").and_then(|t| t.output.clone());
    assert_eq!(outputs, Some(json!((1..=300).collect::<Vec<i64>>()).into()));
}

#[tokio::test]
async fn a_module_with_two_memories_runs() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "two.wat",
        &one_module(
            "(memory $second 2)",
            "(i32.store $second (i32.const 70000) (i32.const 7))",
        ),
    );
    let c = sandbox()
        .load_file(&path)
        .await
        .expect("multi-memory loads");
    let out = run_with(&c, json!(null), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(json!(null).into()),
        "{}",
        message(&out.ending)
    );
    assert_eq!(
        out.usage.memory_peak_bytes,
        3 * 65536,
        "both memories count"
    );
}

/// One component may define at most 32 memories (the sandbox's default): 32 loads and runs, 33
/// is refused at load naming the limit, and, with an artifact directory, is compiled once
/// however often it is loaded.
#[tokio::test]
async fn memories_per_component_at_the_limit_load_one_over_is_refused_and_compiled_once() {
    let dir = tmp();
    let at = write(dir.path(), "at.wat", &many_memories(32, 0));
    let c = sandbox().load_file(&at).await.expect("32 memories load");
    let out = run_with(&c, json!(null), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(json!(null).into()),
        "{}",
        message(&out.ending)
    );

    let over = write(dir.path(), "over.wat", &many_memories(33, 0));
    let artifacts = dir.path().join("artifacts");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sb = Sandbox::builder()
        .artifact_dir(&artifacts)
        .load_events(tx)
        .build()
        .expect("sandbox");
    for _ in 0..3 {
        let err = sb.load_file(&over).await.expect_err("33 memories");
        assert!(matches!(err, LoadError::ExceedsSandbox { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("33 Wasm linear memories") && text.contains("maximum of 32"),
            "{text}"
        );
    }
    // A new sandbox on the same artifacts does not compile it either.
    let again = Sandbox::builder()
        .artifact_dir(&artifacts)
        .build()
        .expect("sandbox");
    assert!(matches!(
        again.load_file(&over).await,
        Err(LoadError::ExceedsSandbox { .. })
    ));
    drop(sb);
    let mut compiles = 0;
    while let Ok(e) = rx.try_recv() {
        compiles += usize::from(matches!(e, LoadEvent::Compiling { .. }));
    }
    assert_eq!(
        compiles, 1,
        "compiled once, refused from the artifact after"
    );
    control_task_completes().await;
}

/// Tables are limited by the run's budget (summed, default 100 000), and the pool holds a table
/// of that size: a 25 000-element table loads and grows, growth past the budget names it.
#[tokio::test]
async fn tables_up_to_the_budget_load_and_grow_past_it_names_the_limit() {
    let dir = tmp();
    let big = write(
        dir.path(),
        "big.wat",
        &one_module("(table 25000 funcref)", ""),
    );
    let c = sandbox().load_file(&big).await.expect("a 25k table loads");
    let out = run_with(&c, json!(null), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(json!(null).into()),
        "{}",
        message(&out.ending)
    );

    let grow = |to: u32| {
        one_module(
            "(table $t 10 funcref)",
            &format!(
                "(if (i32.eq (table.grow $t (ref.null func) (i32.const {})) (i32.const -1))
                   (then unreachable))",
                to - 10
            ),
        )
    };
    let at = write(dir.path(), "grow_at.wat", &grow(100_000));
    let c = sandbox().load_file(&at).await.expect("loads");
    let out = run_with(&c, json!(null), &RunBudget::default()).await;
    assert_eq!(
        out.ending,
        Ending::Output(json!(null).into()),
        "{}",
        message(&out.ending)
    );
    let over = write(dir.path(), "grow_over.wat", &grow(100_001));
    let c = sandbox().load_file(&over).await.expect("loads");
    let out = run_with(&c, json!(null), &RunBudget::default()).await;
    match &out.ending {
        Ending::LimitExceeded(l) => {
            assert_eq!((l.limit, l.max), (Limit::TableElements, 100_000));
        }
        other => panic!("expected the table limit, got {other:?}"),
    }
    control_task_completes().await;
}

#[tokio::test]
async fn a_table_larger_than_the_pool_allows_is_refused_at_load() {
    let dir = tmp();
    let path = write(
        dir.path(),
        "huge.wat",
        &one_module("(table 100001 funcref)", ""),
    );
    let err = sandbox().load_file(&path).await.expect_err("too large");
    assert!(matches!(err, LoadError::ExceedsSandbox { .. }), "{err}");
    assert!(err.to_string().contains("100001"), "{err}");
}

/// A trap in a start function or an out-of-bounds data segment is the guest's fault: the run
/// fails (retriable), it does not crash.
#[tokio::test]
async fn traps_while_instantiating_are_guest_faults() {
    let dir = tmp();
    let start = write(
        dir.path(),
        "start.wat",
        &one_module("(func $boom unreachable) (start $boom)", ""),
    );
    let segment = write(
        dir.path(),
        "segment.wat",
        &one_module("(data (i32.const 65535) \"xy\")", ""),
    );
    for path in [start, segment] {
        let c = sandbox().load_file(&path).await.expect("loads");
        let out = run_with(&c, json!(null), &RunBudget::default()).await;
        match &out.ending {
            Ending::GuestFault { message } => {
                assert!(message.contains("instantiated"), "{message}");
            }
            other => panic!("{}: expected a guest fault, got {other:?}", path.display()),
        }
    }
    control_task_completes().await;
}

/// The host's memory ceiling: a run whose budget is at the ceiling runs, one byte over is
/// refused naming the ceiling.
#[tokio::test]
async fn a_budget_at_the_memory_ceiling_runs_one_byte_over_is_refused() {
    let ceiling = 64 << 20;
    let sb = Sandbox::builder()
        .memory_ceiling(ceiling)
        .build()
        .expect("sandbox");
    let c = sb.load_file(&guest("add_one")).await.expect("loads");
    let with = |memory_bytes| RunBudget {
        memory_bytes,
        ..RunBudget::default()
    };
    let ctx = TaskContext::new("ceiling");
    let out = sb
        .run(&c, &json!(1).into(), &ctx, &with(ceiling), None)
        .await;
    assert_eq!(out.ending, Ending::Output(json!(2).into()));
    let out = sb
        .run(&c, &json!(1).into(), &ctx, &with(ceiling + 1), None)
        .await;
    match &out.ending {
        Ending::LimitExceeded(l) => {
            assert_eq!(
                (l.limit, l.max, l.requested),
                (Limit::HostMemory, ceiling, Some(ceiling + 1))
            );
            assert!(l.to_string().contains("host memory"), "{l}");
        }
        other => panic!("expected the host memory ceiling, got {other:?}"),
    }
}

/// A guest asking the host for more random bytes than one host call may carry is refused
/// before the host makes them, naming the host-call limit; the message starts with the reason.
#[tokio::test]
async fn a_huge_random_request_names_the_host_call_limit() {
    let budget = RunBudget::default();
    let out = crate::support::hostile(json!({"do": "random", "bytes": 1u64 << 40}), &budget).await;
    match &out.ending {
        Ending::LimitExceeded(l) => assert_eq!(
            (l.limit, l.max, l.requested),
            (Limit::HostCallBytes, budget.host_call_bytes, Some(1 << 40))
        ),
        other => panic!("expected the host-call limit, got {other:?}"),
    }
    let out = crate::support::hostile(json!({"do": "random", "bytes": 1 << 20}), &budget).await;
    assert_eq!(out.ending, Ending::Output(json!(1 << 20).into()));
}

/// A loop stopped by its deadline reports the fuel it really used (it used to report only what
/// was spent before the loop, about 2,000 units).
#[tokio::test]
async fn a_run_stopped_by_its_deadline_reports_the_fuel_it_used() {
    let budget = RunBudget {
        timeout: std::time::Duration::from_millis(300),
        fuel: None,
        ..RunBudget::default()
    };
    let out = crate::support::hostile(json!({"do": "loop"}), &budget).await;
    assert!(
        matches!(out.ending, Ending::TimedOut(_)),
        "{:?}",
        out.ending
    );
    assert!(
        out.usage.fuel_consumed >= 1_000_000,
        "300 ms of a loop used only {} fuel",
        out.usage.fuel_consumed
    );
}

/// The ceiling through the CLI (`--memory-ceiling`): a task whose memory budget is at the
/// ceiling completes, one whose budget is over it fails naming the host memory limit.
#[test]
fn the_cli_memory_ceiling_admits_a_budget_at_it_and_fails_one_over() {
    let dir = tmp();
    let run = |ceiling: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["task", "run"])
            .arg(guest("add_one"))
            .args([
                "--input",
                "41",
                "--memory",
                "64MiB",
                "--json",
                "--memory-ceiling",
                ceiling,
            ])
            .env("SLUICE_HOME", dir.path().join("home"))
            .env("SLUICE_ARTIFACTS", dir.path().join("artifacts"))
            .output()
            .expect("run sluice")
    };
    let out = run("64MiB");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "Completed", "{v}");
    let out = run("63MiB");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["state"], "Failed", "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(msg.contains("host memory limit of 66060288 bytes"), "{msg}");
}
