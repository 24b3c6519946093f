// Sluice's JavaScript guest SDK: write a task as a plain function.
//
// A task module exports `run(input)`. The input arrives as the JSON value and the return value
// (anything JSON.stringify accepts; a Promise is awaited) becomes the task's output:
//
//     import { Retry, context, log } from "sluice";
//
//     export function run(x) {
//       log.info(`attempt ${context.attempt()}`);
//       if (x < 0) throw new Retry(`${x} is negative`);
//       return x;
//     }
//
// Throw (or return) a signal to set the state: Fail, Retry (optional delay in milliseconds),
// Skip, Pause, Success (a message and an optional output). Any other exception fails the run
// like a Rust panic (its message and stack go to stderr, which the run's record keeps) and stays
// retriable under the task's retry policy.
//
// Build with `guest-sdk/js/build <task.js or directory> <out.wasm>`. The contract is
// wit/task.wit (world `task`).

import * as wit from "sluice:task/context@0.1.0";
import { log as witLog } from "sluice:task/log@0.1.0";

/** Base class of every signal; `message` is recorded on the state. */
export class Signal extends Error {
  constructor(message = "") {
    super(String(message));
    this.name = new.target.name;
  }
}

/** Fail the task run (Failed), without retrying. */
export class Fail extends Signal {}

/** Skip the task run (Skipped, a successful state). */
export class Skip extends Signal {}

/** Pause the task run until it is resumed (Paused). */
export class Pause extends Signal {}

/**
 * Retry the task run (AwaitingRetry), or fail when no retries remain. `delayMs`: how long to
 * wait before the next attempt; without it the task's configured `retry_delay` applies.
 */
export class Retry extends Signal {
  constructor(message = "", { delayMs } = {}) {
    super(message);
    if (delayMs !== undefined && delayMs !== null) {
      if (!Number.isFinite(delayMs) || delayMs < 0) {
        throw new RangeError(`a retry delay must be a non-negative number of ms: ${delayMs}`);
      }
      this.delayMs = Math.round(delayMs);
    }
  }
}

/** Complete the task run with a message (Completed) and, when given, an output. */
export class Success extends Signal {
  constructor(message = "", ...output) {
    super(message);
    if (output.length > 0) this.output = output[0];
    this.hasOutput = output.length > 0;
  }
}

/** Read-only information about the current task run (Prefect's context). */
export const context = Object.freeze({
  /** The value of a context key (a string), or `fallback` (default undefined) when unset. */
  get(key, fallback = undefined) {
    const value = wit.get(String(key));
    return value === undefined || value === null ? fallback : value;
  },
  /** The id of the flow run this task run belongs to. */
  flowRunId: () => wit.flowRunId(),
  /** The id of this task run. */
  taskRunId: () => wit.taskRunId(),
  /** The name of the task. */
  taskName: () => wit.taskName(),
  /** The attempt number, starting at 1. */
  attempt: () => wit.attempt(),
  /** The index of this child run within a mapped task, or undefined. */
  mapIndex() {
    const i = wit.mapIndex();
    return i === null ? undefined : i;
  },
  /** The flow run's parameters, as an object. */
  parameters: () => JSON.parse(wit.parameters()),
});

/** Structured logging into the task run's record (console output is kept too). */
export const log = Object.freeze({
  trace: (message) => witLog("trace", String(message)),
  debug: (message) => witLog("debug", String(message)),
  info: (message) => witLog("info", String(message)),
  warn: (message) => witLog("warn", String(message)),
  error: (message) => witLog("error", String(message)),
});

/** The WIT `signal` variant for a signal. */
function toWit(signal) {
  const message = signal.message;
  if (signal instanceof Fail) return { tag: "fail", val: message };
  if (signal instanceof Skip) return { tag: "skip", val: message };
  if (signal instanceof Pause) return { tag: "pause", val: message };
  if (signal instanceof Retry) {
    const delay = signal.delayMs === undefined ? undefined : BigInt(signal.delayMs);
    return { tag: "retry", val: { message, delayMs: delay } };
  }
  if (signal instanceof Success) {
    const output = signal.hasOutput ? toJson(signal.output) : undefined;
    return { tag: "success", val: { output, message } };
  }
  throw new TypeError(`not a Sluice signal: ${signal}`);
}

function toJson(value) {
  const text = JSON.stringify(value);
  if (text === undefined) {
    throw new Fail(`the task's output is not JSON-serializable: ${typeof value}`);
  }
  return text;
}

/**
 * An exception that is not a signal fails the run like a Rust panic: the bindings read the `err`
 * payload through this getter, which rethrows the exception out of the export, so the engine
 * prints it with its stack to stderr and traps.
 */
function uncaught(e) {
  return Object.defineProperty({}, "payload", {
    enumerable: true,
    get() {
      throw e;
    },
  });
}

/** Turn a task function into the `run` export of world `task`. */
export function exportTask(task) {
  if (typeof task !== "function") {
    throw new TypeError(`the task module does not export a function \`run\`: ${typeof task}`);
  }
  return async function run(input) {
    let result;
    try {
      result = await task(JSON.parse(input));
    } catch (e) {
      if (e instanceof Signal) return { tag: "err", val: toWit(e) };
      throw uncaught(e);
    }
    if (result instanceof Signal) return { tag: "err", val: toWit(result) };
    try {
      return { tag: "ok", val: toJson(result) };
    } catch (e) {
      if (e instanceof Signal) return { tag: "err", val: toWit(e) };
      throw uncaught(e);
    }
  };
}
