// Sluice's JavaScript guest SDK: write a task as a plain function, and reach what the task is
// granted. This module owns the `run` export (input, output, signals), the run's context and log,
// and small helpers over the WASI interfaces that StarlingMonkey gives no JavaScript API for
// (environment, secrets, files), plus JSON conveniences over `fetch`.
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
// Grants. Nothing outside the task is reachable unless the flow's manifest grants it
// (`[tasks.NAME.grants]`); without a grant each helper below fails or finds nothing:
//
//   - `env(name, fallback)` / `secret(name, fallback)`: a variable of `env = { NAME = "..." }`
//     or a secret of `secrets = ["NAME"]`, else `fallback` (default undefined). Sluice replaces
//     a secret's value with `***` wherever it shows up in the run's logs, output or messages.
//     (There is no `process.env`.)
//   - `readText(path)`, `readBytes(path)` (a Uint8Array), `writeText(path, text)`,
//     `writeBytes(path, bytes)` (create or truncate), `listDir(path)` (sorted names): files in
//     the directories of `files = [{ host = "data/in", guest = "/in", mode = "ro" }, ...]`, by
//     absolute guest path (`/in/orders.csv`). A path outside every granted directory, or with a
//     `..` component, throws an Error saying so; the host refuses escapes (symbolic links
//     included) and writes under a read-only grant. File errors carry the WASI error code as
//     `code` (`no-entry`, `not-permitted`, ...). (There is no `fs`.)
//   - HTTP is the standard `fetch` (over wasi:http), for the URLs of `http = ["https://host/*"]`.
//     A refused request rejects like a network failure (`TypeError: NetworkError ...`: no
//     reason reaches the task; the run's log records `HTTP request denied: ...`).
//     `getJson(url, init)` and `postJson(url, value, init)` parse a JSON answer and throw an
//     HttpError on a status other than 2xx (`status`, `url`) or on a failed or refused request
//     (`status` null, the fetch error as `cause`).
//   - There is no TCP API (`tcp` grants serve the other languages).
//
// Call these while the task runs, not at module top level: the top level runs when the component
// is built (pre-initialized with Wizer), where calling them fails the build ("You cannot call
// arbitrary imported functions during Wizer initialization").
//
// Build with `guest-sdk/js/build <task.js or directory> <out.wasm>`. The contract is world
// `task-js` of wit/guests.wit (world `task` of wit/task.wit plus WASI environment, preopens and
// TCP socket creation).

import * as wit from "sluice:task/context@0.1.0";
import { log as witLog } from "sluice:task/log@0.1.0";
import { getEnvironment } from "wasi:cli/environment@0.2.12";
import { getDirectories } from "wasi:filesystem/preopens@0.2.12";

/** Base class of every signal; `message` is recorded on the state. */
export class Signal extends Error {
  constructor(message = "") {
    super(String(message));
    this.name = new.target.name;
  }
}

/** Fail the task run (Failed; like any failure it is retried while the task has retries left). */
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

/** The environment variable `name` when the task is granted it, else `fallback`. */
export function env(name, fallback = undefined) {
  const key = String(name);
  const found = getEnvironment().find(([k]) => k === key);
  return found === undefined ? fallback : found[1];
}

/**
 * The secret `name` when the task is granted it, else `fallback`. The host replaces its value
 * with `***` wherever it shows up in the run's logs, output or messages.
 */
export function secret(name, fallback = undefined) {
  return env(name, fallback);
}

/** The granted directories, `[descriptor, guest path components]`, read once per run. */
let preopens;
function granted() {
  preopens ??= getDirectories().map(([dir, guest]) => [dir, components(guest)]);
  return preopens;
}

function components(path) {
  return path.split("/").filter((c) => c !== "" && c !== ".");
}

/** `path` as [the granted directory's descriptor, the path relative to it]; throws outside. */
function locate(path) {
  path = String(path);
  if (!path.startsWith("/")) throw new Error(`${path} is not an absolute path`);
  const parts = components(path);
  if (parts.includes("..")) throw new Error(`${path}: ".." is not allowed in a path`);
  let best;
  for (const [dir, root] of granted()) {
    const inside = root.length <= parts.length && root.every((c, i) => c === parts[i]);
    if (inside && (best === undefined || root.length > best[1].length)) best = [dir, root];
  }
  if (best === undefined) {
    const dirs = granted().map(([, root]) => `/${root.join("/")}`);
    const note = dirs.length === 0 ? "no directories are granted" : `granted: ${dirs.join(", ")}`;
    throw new Error(`${path} is not in a granted directory (${note})`);
  }
  return [best[0], parts.slice(best[1].length).join("/") || "."];
}

const dispose = Symbol.dispose ?? Symbol.for("dispose");

/** What the common WASI filesystem error codes mean here. */
const fsErrors = {
  access: "access denied",
  exist: "it exists already",
  "is-directory": "it is a directory",
  loop: "too many symbolic links",
  "no-entry": "no such file or directory",
  "not-directory": "not a directory",
  "not-permitted": "a read-only grant, or a link leading outside the granted directory",
  "read-only": "a read-only file system",
};

/** Run `use(descriptor)` on `path` opened with the flags, then close it; errors name the path. */
function withFile(path, verb, openFlags, flags, use) {
  const [dir, rel] = locate(path);
  let file;
  try {
    file = dir.openAt({ symlinkFollow: true }, rel, openFlags, flags);
    // Reading a directory would fail with `bad-descriptor`; say what is wrong instead.
    if (!openFlags.directory && file.getType() === "directory") throw { payload: "is-directory" };
    return use(file);
  } catch (e) {
    const code = e?.payload;
    if (typeof code !== "string") throw e;
    const why = fsErrors[code] ? `${code} (${fsErrors[code]})` : code;
    const cause = e instanceof Error ? { cause: e } : {};
    throw Object.assign(new Error(`cannot ${verb} ${path}: ${why}`, cause), { code });
  } finally {
    file?.[dispose]();
  }
}

/** The contents of the file at `path` (an absolute guest path), as a Uint8Array. */
export function readBytes(path) {
  return withFile(path, "read", {}, { read: true }, (file) => {
    const chunks = [];
    let size = 0;
    for (;;) {
      const [chunk, eof] = file.read(65536n, BigInt(size));
      chunks.push(chunk);
      size += chunk.length;
      if (eof || chunk.length === 0) break;
    }
    const bytes = new Uint8Array(size);
    let at = 0;
    for (const chunk of chunks) {
      bytes.set(chunk, at);
      at += chunk.length;
    }
    return bytes;
  });
}

/** The contents of the file at `path`, decoded as UTF-8. */
export function readText(path) {
  return new TextDecoder().decode(readBytes(path));
}

/** Write `bytes` (a Uint8Array or ArrayBuffer) to the file at `path`, created or truncated. */
export function writeBytes(path, bytes) {
  if (typeof bytes === "string") throw new TypeError("writeBytes takes bytes; use writeText");
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  withFile(path, "write", { create: true, truncate: true }, { write: true }, (file) => {
    let at = 0;
    while (at < data.length) {
      at += Number(file.write(data.subarray(at, at + (1 << 20)), BigInt(at)));
    }
  });
}

/** Write `text` as UTF-8 to the file at `path`, created or truncated. */
export function writeText(path, text) {
  writeBytes(path, new TextEncoder().encode(String(text)));
}

/** The names in the directory at `path`, sorted. */
export function listDir(path) {
  return withFile(path, "list", { directory: true }, { read: true }, (dir) => {
    const names = [];
    const entries = dir.readDirectory();
    try {
      for (let e = entries.readDirectoryEntry(); e; e = entries.readDirectoryEntry()) {
        names.push(e.name);
      }
    } finally {
      entries[dispose]();
    }
    return names.sort();
  });
}

/** A failed `getJson`/`postJson`: a status other than 2xx, or (`status` null) no answer. */
export class HttpError extends Error {
  constructor(message, { status = null, url, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "HttpError";
    this.status = status;
    this.url = url;
  }
}

/** `fetch`, with a status other than 2xx or a failed request thrown as an HttpError. */
async function fetchOk(url, init) {
  const what = `${(init.method ?? "GET").toUpperCase()} ${url}`;
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    throw new HttpError(
      `${what} failed or was refused (${e?.message ?? e}); see the run's log, which records ` +
        "requests the task's grants refuse",
      { url: String(url), cause: e },
    );
  }
  if (!response.ok) {
    const status = `${response.status} ${response.statusText}`.trim();
    throw new HttpError(`${what} answered ${status}`, {
      status: response.status,
      url: String(url),
    });
  }
  return response;
}

/** GET `url` (`init` as for `fetch`) and parse the JSON answer; HttpError unless 2xx. */
export async function getJson(url, init = {}) {
  const headers = new Headers(init.headers);
  if (!headers.has("accept")) headers.set("accept", "application/json");
  return (await fetchOk(url, { ...init, headers })).json();
}

/**
 * POST `value` as JSON to `url` (`init` as for `fetch`) and parse the JSON answer (null when the
 * answer is empty); HttpError unless 2xx.
 */
export async function postJson(url, value, init = {}) {
  const headers = new Headers(init.headers);
  if (!headers.has("accept")) headers.set("accept", "application/json");
  headers.set("content-type", "application/json");
  const body = JSON.stringify(value);
  const text = await (await fetchOk(url, { method: "POST", ...init, headers, body })).text();
  return text === "" ? null : JSON.parse(text);
}

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
