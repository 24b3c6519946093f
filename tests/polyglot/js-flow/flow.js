// A flow body that uses every type of submission of seed 004 and returns what it observed (as
// tests/guests/flow_body does in Rust, with the same keys). Parameter `scenario`: `types`, or
// `released`: a future waited on after `dispose()` (the error it throws), or `subflow`: the Rust
// guest's (subflows `child` and `dag`, and the refusals).
import { call, FutureReleased, map, now, submit, subflow, SubmissionRefused, TaskRunFailed, waitAll, waitAny } from "sluice/flow";

export function run(parameters) {
  if (parameters.scenario === "released") {
    const f = submit("double", 1);
    const first = f.result();
    f.dispose();
    try {
      f.wait();
      return "unexpected: no exception";
    } catch (e) {
      return e instanceof FutureReleased ? { first, error: e.message, id: f.id } : `unexpected: ${e}`;
    }
  }
  if (parameters.scenario === "subflow") {
    const child = subflow("child", { n: parameters.n });
    const state = child.wait();
    const result = child.result();
    let failed;
    try {
      subflow("dag").result();
      failed = "unexpected: no exception";
    } catch (e) {
      failed = e instanceof TaskRunFailed ? { name: e.state.name, message: e.state.message } : `unexpected: ${e}`;
    }
    const refused = [["nope", {}], ["child", 5], ["double", {}]].map(([name, p]) => {
      try {
        subflow(name, p);
        return "unexpected: accepted";
      } catch (e) {
        return e instanceof SubmissionRefused ? e.message : `unexpected: ${e}`;
      }
    });
    let asTask;
    try {
      submit("child", 1);
      asTask = "unexpected: accepted";
    } catch (e) {
      asTask = e instanceof SubmissionRefused ? e.message : `unexpected: ${e}`;
    }
    return { state: state.name, result, failed, refused, as_task: asTask };
  }
  if (parameters.scenario !== "types") throw new Error(`unknown scenario ${parameters.scenario}`);
  // r1 = t1(): call and get the result.
  const called = call("double", 2);
  // f1 = t1.submit(); its state without waiting, then waited for, then its result.
  const f = submit("double", 5);
  const before = f.getState();
  const waited = f.wait();
  const result = f.result();
  // A failing task: result() throws, unless asked not to.
  const failing = submit("fail", 1);
  let raised;
  try {
    failing.result();
    raised = "unexpected: no exception";
  } catch (e) {
    raised = e instanceof TaskRunFailed ? { name: e.state.name, message: e.state.message } : `unexpected: ${e}`;
  }
  const failedState = failing.result({ raiseOnFailure: false });
  // waitFor with the default trigger (all_successful) and with all_finished.
  const afterDefault = submit("double", 8, { waitFor: [failing], returnState: true });
  const afterFinished = submit("double", 7, { waitFor: [failing], trigger: "all_finished" }).result();
  // map: futures, and states.
  const mapped = map("double", [1, 2, 3]).map((m) => m.result());
  const mappedStates = map("fail", [1, 2], { returnState: true }).map((s) => s.name);
  const any = waitAny([failing, f]);
  waitAll([f, failing]);
  let refused;
  try {
    submit("nope", 1);
    refused = "unexpected: accepted";
  } catch (e) {
    refused = e instanceof SubmissionRefused ? e.message : `unexpected: ${e}`;
  }
  return {
    call: called,
    get_state_before_wait: before.name,
    wait: { name: waited.name, result: String(waited.result()) },
    result,
    raised,
    failed_state: failedState.name,
    failed_is_failed: failedState.isFailed(),
    after_default: afterDefault.name,
    after_finished: afterFinished,
    map: mapped,
    map_states: mappedStates,
    wait_any: any,
    refused,
    id: f.id,
    now: now(),
    clock: Math.floor(Date.now() / 1000),
    hashed: String(Math.random()),
    map_len: 4,
  };
}
