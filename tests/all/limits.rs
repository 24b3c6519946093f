//! Every limit of a run budget, as an exact pair: at the limit the run passes, one unit below it
//! fails, naming the limit and its value.

use serde_json::json;
use sluice::sandbox::{Ending, Limit, LimitExceeded, RunBudget, TimeLimit};

use crate::support::{control_task_completes, fixture, hostile, load, run_with};

fn limit_of(ending: &Ending) -> Option<(Limit, u64)> {
    match ending {
        Ending::LimitExceeded(LimitExceeded { limit, max, .. }) => Some((*limit, *max)),
        _ => None,
    }
}

#[tokio::test]
async fn fuel_exactly_enough_passes_one_less_times_out() {
    // Fuel is deterministic, but wasmtime checks it at function entries and loop back-edges, so
    // the smallest budget that passes can be below what a run reports consuming. Find it by
    // bisection; then it passes and one unit less fails.
    let component = load(&crate::support::guest("add_one")).await;
    let with = |fuel| RunBudget {
        fuel: Some(fuel),
        ..RunBudget::default()
    };
    let passes = |fuel| {
        let component = component.clone();
        async move {
            run_with(&component, json!(1), &with(fuel)).await.ending
                == Ending::Output(json!(2).into())
        }
    };
    let (mut lo, mut hi) = (
        0,
        run_with(&component, json!(1), &RunBudget::default())
            .await
            .usage
            .fuel_consumed,
    );
    assert!(passes(hi).await);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if passes(mid).await {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let out = run_with(&component, json!(1), &with(hi)).await;
    assert_eq!(out.ending, Ending::Output(json!(2).into()));
    let out = run_with(&component, json!(1), &with(hi - 1)).await;
    assert_eq!(out.ending, Ending::TimedOut(TimeLimit::Fuel(hi - 1)));
    assert_eq!(out.usage.fuel_consumed, hi - 1);
    control_task_completes().await;
}

#[tokio::test]
async fn memory_exactly_enough_passes_one_byte_less_fails() {
    let input = json!({"do": "allocate", "mib": 8});
    let peak = hostile(input.clone(), &RunBudget::default())
        .await
        .usage
        .memory_peak_bytes;
    let with = |memory_bytes| RunBudget {
        memory_bytes,
        ..RunBudget::default()
    };
    let out = hostile(input.clone(), &with(peak)).await;
    assert_eq!(out.ending, Ending::Output(json!(8).into()));
    let out = hostile(input, &with(peak - 1)).await;
    assert_eq!(limit_of(&out.ending), Some((Limit::Memory, peak - 1)));
    control_task_completes().await;
}

#[tokio::test]
async fn output_at_the_limit_passes_one_byte_over_fails() {
    // The output is a JSON string of `bytes` bytes, quotes included.
    let input = json!({"do": "output", "bytes": 1000});
    let with = |output_bytes| RunBudget {
        output_bytes,
        ..RunBudget::default()
    };
    let out = hostile(input.clone(), &with(1000)).await;
    assert!(matches!(out.ending, Ending::Output(_)), "{:?}", out.ending);
    let out = hostile(input, &with(999)).await;
    assert_eq!(
        out.ending,
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: 999,
            requested: Some(1000),
        })
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_host_call_at_the_limit_passes_one_byte_over_fails() {
    let input = json!({"do": "log_bytes", "bytes": 4096});
    let with = |host_call_bytes| RunBudget {
        host_call_bytes,
        ..RunBudget::default()
    };
    let out = hostile(input.clone(), &with(4096)).await;
    assert_eq!(out.ending, Ending::Output(json!(4096).into()));
    let out = hostile(input, &with(4095)).await;
    assert_eq!(
        out.ending,
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::HostCallBytes,
            max: 4095,
            requested: Some(4096),
        })
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_host_call_larger_than_any_transfer_is_refused_before_it_is_copied() {
    // 8 MiB in one log call, with both transfer limits far below: wasmtime refuses to lift it.
    let budget = RunBudget {
        host_call_bytes: 1 << 20,
        output_bytes: 1 << 20,
        ..RunBudget::default()
    };
    let out = hostile(json!({"do": "log_bytes", "bytes": 8 << 20}), &budget).await;
    // `requested: None` is the early path: wasmtime's hostcall fuel stopped the copy, so the host
    // never learned (or allocated) the size. The later per-kind check would say `Some(8 MiB)`.
    assert_eq!(
        out.ending,
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::HostCallBytes,
            max: 1 << 20,
            requested: None,
        })
    );
    control_task_completes().await;
}

#[tokio::test]
async fn a_64_mib_output_under_default_limits_is_refused_before_it_is_copied() {
    // 64 MiB: over the default output limit (16 MiB) but under wasmtime's own default hostcall
    // fuel (128 MiB), so only Sluice's hostcall fuel refuses it before the host copies it (the
    // later check would report `requested: Some(64 MiB)`).
    let component = load(&fixture("output_64_mib.wat")).await;
    let budget = RunBudget::default();
    let out = run_with(&component, json!(null), &budget).await;
    assert_eq!(
        out.ending,
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: 16 << 20,
            requested: None,
        })
    );
    // The guest really did return 64 MiB: its memory grew to hold it.
    assert!(out.usage.memory_peak_bytes > 64 << 20);
    control_task_completes().await;
}

#[tokio::test]
async fn logs_at_the_budget_are_kept_one_byte_over_are_dropped_and_marked() {
    // 10 lines of 100 bytes through the log import; each line also costs 64 bytes.
    let input = json!({"do": "log", "lines": 10, "bytes": 100});
    let with = |log_bytes| RunBudget {
        log_bytes,
        ..RunBudget::default()
    };
    let out = hostile(input.clone(), &with(1640)).await;
    assert_eq!(out.ending, Ending::Output(json!(10).into()));
    assert_eq!(out.logs.len(), 10);
    assert_eq!(out.logs_dropped_bytes, 0);
    let out = hostile(input, &with(1639)).await;
    assert_eq!(out.ending, Ending::Output(json!(10).into()));
    assert_eq!(out.logs_dropped_bytes, 100);
    assert_eq!(out.logs.len(), 10, "9 lines and the truncation marker");
    assert!(out.logs[9].message.contains("logs truncated"));
}

#[tokio::test]
async fn table_elements_at_the_limit_pass_one_less_fails() {
    let component = load(&fixture("table_of_ten.wat")).await;
    let with = |table_elements| RunBudget {
        table_elements,
        ..RunBudget::default()
    };
    let out = run_with(&component, json!(null), &with(10)).await;
    assert_eq!(out.ending, Ending::Output(json!(null).into()));
    let out = run_with(&component, json!(null), &with(9)).await;
    assert_eq!(limit_of(&out.ending), Some((Limit::TableElements, 9)));
    control_task_completes().await;
}

#[tokio::test]
async fn instances_at_the_limit_pass_one_less_fails() {
    let component = load(&fixture("table_of_ten.wat")).await;
    let with = |instances| RunBudget {
        instances,
        ..RunBudget::default()
    };
    let out = run_with(&component, json!(null), &with(1)).await;
    assert_eq!(out.ending, Ending::Output(json!(null).into()));
    let out = run_with(&component, json!(null), &with(0)).await;
    assert_eq!(limit_of(&out.ending), Some((Limit::Instances, 0)));
    control_task_completes().await;
}

#[tokio::test]
async fn a_run_within_its_deadline_completes() {
    let budget = RunBudget {
        timeout: std::time::Duration::from_millis(300),
        ..RunBudget::default()
    };
    let out = hostile(json!({"do": "sleep", "ms": 10}), &budget).await;
    assert_eq!(out.ending, Ending::Output(json!(10).into()));
}

#[tokio::test]
async fn a_signal_message_at_the_output_limit_passes_one_byte_over_fails() {
    use sluice::sandbox::Signal;
    // The host-call limit is above the output limit, so only the output check can refuse it.
    let budget = RunBudget {
        output_bytes: 1000,
        host_call_bytes: 4096,
        ..RunBudget::default()
    };
    let over = |requested| {
        Ending::LimitExceeded(LimitExceeded {
            limit: Limit::OutputBytes,
            max: 1000,
            requested: Some(requested),
        })
    };
    let out = hostile(
        json!({"do": "signal", "kind": "fail", "bytes": 1000}),
        &budget,
    )
    .await;
    assert_eq!(
        out.ending,
        Ending::Signal(Signal::Fail {
            message: "m".repeat(1000)
        })
    );
    for kind in ["fail", "retry", "skip", "pause"] {
        let out = hostile(
            json!({"do": "signal", "kind": kind, "bytes": 1001}),
            &budget,
        )
        .await;
        assert_eq!(out.ending, over(1001), "{kind}");
    }
    // SUCCESS counts its output (JSON text) and its message together: 4 + 996 bytes pass.
    let success =
        |bytes| json!({"do": "signal", "kind": "success", "bytes": bytes, "output": "zz"});
    let out = hostile(success(996), &budget).await;
    assert_eq!(
        out.ending,
        Ending::Signal(Signal::Success {
            output: json!("zz").into(),
            message: "m".repeat(996)
        })
    );
    let out = hostile(success(997), &budget).await;
    assert_eq!(out.ending, over(1001));
    control_task_completes().await;
}
