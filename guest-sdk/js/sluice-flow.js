// Flows written as code, for JavaScript flow bodies: `import { submit, call, map } from
// "sluice/flow"`. One construct per row of Prefect 2's types of submission:
//
//     import { call, map, submit } from "sluice/flow";
//
//     export function run(parameters) {
//       const r1 = call("t1", 1);                     // r1 = t1()
//       const f1 = submit("t1", 2);                   // f1 = t1.submit()
//       const s1 = f1.wait();                         // Completed/Failed
//       const s2 = submit("t2", 3).getState();        // Pending/Running, without waiting
//       const r2 = f1.result();                       // throws TaskRunFailed on failure
//       const s3 = f1.result({ raiseOnFailure: false }); // the output, or the failed State
//       const futures = map("add_one", [1, 2, 3]);
//       const states = map("add_one", [1, 2, 3], { returnState: true });
//       return r1;
//     }
//
// A flow body is the module `flow.js` (or a directory with flow.js) exporting
// `run(parameters)`; guest-sdk/js/build builds it against world `flow-js` of wit/guests.wit. It
// must be deterministic: it is replayed from the start when its run is resumed. Its clocks and
// random numbers are the run's, and `now()` is the time as the run recorded it. Nothing is
// granted to it.
import * as o from "sluice:task/orchestrate@0.1.0";

/** A task run's state: `name` (`Completed`, `Failed`, `TimedOut`, …), `type` (`COMPLETED`,
 * `FAILED`, …), `message`, and `result()`. */
export class State {
  #result;
  constructor(w) {
    this.name = w.name;
    this.type = String(w.type).toUpperCase();
    this.message = w.message ?? null;
    this.#result = w.result == null ? null : JSON.parse(w.result);
  }
  /** The output of a successful state (Prefect's `State.result()`); for another state, throw
   * TaskRunFailed (`{ raiseOnFailure: false }`: return the state). */
  result({ raiseOnFailure = true } = {}) {
    if (this.isCompleted()) return this.#result;
    if (raiseOnFailure) throw new TaskRunFailed(this);
    return this;
  }
  /** A successful final state (Completed, Cached, Skipped, …). */
  isCompleted() {
    return this.type === "COMPLETED";
  }
  /** A Failed-type state (Failed, TimedOut, TriggerFailed, …). */
  isFailed() {
    return this.type === "FAILED";
  }
  /** Nothing more happens to the task run. */
  isFinal() {
    return ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"].includes(this.type);
  }
}

/** The host refused a submission (an undeclared task, the run's task limit, …). */
export class SubmissionRefused extends Error {}

/** A task run ended in a state that is not successful; `state` is that state. */
export class TaskRunFailed extends Error {
  constructor(state) {
    super(`the task run ended ${state.name}${state.message ? `: ${state.message}` : ""}`);
    this.state = state;
  }
}

const payload = (e) => (e && typeof e === "object" && "payload" in e ? e.payload : e);

/** A future used after `dispose()`: its task run's state and result can no longer be read. */
export class FutureReleased extends Error {}

/** A submitted task run (Prefect's `PrefectFuture`). `dispose()` (or `using`) tells the host the
 * body will not read its result again; using it afterwards throws FutureReleased. */
export class Future {
  #handle;
  #releasedId = null;
  constructor(handle) {
    this.#handle = handle;
  }
  /** The host's handle; throws FutureReleased once disposed. */
  live() {
    if (this.#handle === null) {
      throw new FutureReleased(
        `the future of task run ${this.#releasedId} was released (disposed): its state and result can no longer be read`,
      );
    }
    return this.#handle;
  }
  /** The task run's id. */
  get id() {
    return this.#handle === null ? this.#releasedId : this.#handle.id();
  }
  /** Block until the task run is final; its State. */
  wait() {
    return new State(this.live().wait());
  }
  /** Its State now, without waiting (Pending, Running or final). */
  getState() {
    return new State(this.live().getState());
  }
  /** Block until final: its output; on a state that is not successful, throw TaskRunFailed
   * (`{ raiseOnFailure: false }`: return that State). */
  result({ raiseOnFailure = true } = {}) {
    const handle = this.live();
    let text;
    try {
      text = handle.result();
    } catch (e) {
      const state = new State(payload(e));
      if (raiseOnFailure) throw new TaskRunFailed(state);
      return state;
    }
    return JSON.parse(text);
  }
  dispose() {
    if (this.#handle === null) return;
    const handle = this.#handle;
    this.#releasedId = handle.id();
    this.#handle = null;
    handle[Symbol.dispose]?.();
  }
  [Symbol.dispose]() {
    this.dispose();
  }
}

const json = (v) => JSON.stringify(v === undefined ? null : v);
const handles = (fs) => fs.map((f) => f.live());

/** Submit one task run of the declared task `task` (Prefect's `t.submit(x)`): its Future;
 * `{ returnState: true }`: wait and return its final State. It starts once
 * every future in `waitFor` is final, their states feeding its trigger (`trigger`, e.g.
 * `"all_finished"`, or the task's own). */
export function submit(task, input = null, { waitFor = [], trigger = undefined, returnState = false } = {}) {
  let f;
  try {
    f = new Future(o.submit(task, json(input), handles(waitFor), trigger));
  } catch (e) {
    throw new SubmissionRefused(String(payload(e)));
  }
  return returnState ? f.wait() : f;
}

/** Submit one task run of `task` per input, as one mapped task run (Prefect's `t.map(inputs)`):
 * the futures; `{ returnState: true }`: wait and return their States. */
export function map(task, inputs, { waitFor = [], returnState = false } = {}) {
  let all;
  try {
    all = o.submitMap(task, inputs.map(json), handles(waitFor));
  } catch (e) {
    throw new SubmissionRefused(String(payload(e)));
  }
  const futures = all.map((h) => new Future(h));
  return returnState ? futures.map((f) => f.wait()) : futures;
}

/** Submit `task` and return its output (Prefect's `r = t(x)`); throws TaskRunFailed on failure. */
export function call(task, input = null) {
  return submit(task, input).result();
}

/** Run the subflow `flow` (a manifest's `[subflows]`) as a child flow run with `parameters` (an
 * object, over the subflow's defaults): the Future of the task run standing for it, final when
 * the child is, the child's result its output (Prefect's calling a flow from a flow). */
export function subflow(flow, parameters = {}) {
  try {
    return new Future(o.subflow(flow, json(parameters)));
  } catch (e) {
    throw new SubmissionRefused(String(payload(e)));
  }
}

/** Block until every one of `futures` is final. */
export function waitAll(futures) {
  o.waitAll(handles(futures));
}

/** Block until one of `futures` is final; its index (the lowest of those final). */
export function waitAny(futures) {
  if (futures.length === 0) throw new RangeError("waitAny of no futures would wait for ever");
  return o.waitAny(handles(futures));
}

/** The time as the run recorded it (RFC 3339; the same when the body is replayed). */
export function now() {
  return o.now();
}
