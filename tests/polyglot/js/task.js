// The JavaScript test guest: the input's "do" picks a behaviour (see ../README.md).
import { getEnvironment } from "wasi:cli/environment@0.2.12";
import { createTcpSocket } from "wasi:sockets/tcp-create-socket@0.2.12";
import {
  Fail,
  Pause,
  Retry,
  Skip,
  Success,
  context,
  env,
  getJson,
  log,
  readText,
  secret,
  writeText,
} from "sluice";
import { countWords } from "./lib/words.js";

// Asynchronous: the SDK awaits the promise `run` returns.
export async function run(input) {
  switch (input.do) {
    case "fail":
      throw new Fail("failing on purpose");
    case "retry":
      throw new Retry("try again");
    case "retry_after":
      throw new Retry("later", { delayMs: input.ms });
    case "skip":
      throw new Skip("nothing to do");
    case "pause":
      return new Pause("waiting for approval");
    case "success":
      throw new Success("done early", { answer: 42 });
    case "context":
      return {
        flow_run_id: context.flowRunId(),
        task_run_id: context.taskRunId(),
        task_name: context.taskName(),
        attempt: context.attempt(),
        map_index: context.mapIndex() ?? null,
        parameters: context.parameters(),
        get: Object.fromEntries(input.keys.map((k) => [k, context.get(k) ?? null])),
      };
    case "log":
      log.trace("trace line");
      log.debug("debug line");
      log.info("info line");
      log.warn("warn line");
      log.error("error line");
      console.log("to stdout");
      console.error("to stderr");
      return "logged";
    case "loop": {
      let i = 0;
      for (;;) i++;
    }
    case "memory_bomb": {
      const blocks = [];
      for (;;) {
        const block = new Uint8Array(1 << 20);
        block[4096] = 1;
        blocks.push(block);
      }
    }
    case "crash":
      throw new TypeError("boom");
    case "echo":
      return input.value;
    case "words":
      return { words: await countWords(input.text) };
    case "probe": {
      const results = [];
      for (const step of input.steps) results.push(await attempt(step));
      return results;
    }
    default:
      throw new Fail(`unknown mode ${JSON.stringify(input.do)}`);
  }
}

/** One probe step's result: `{"ok": value}` or `{"err": "text"}`; never throws. */
async function attempt(step) {
  try {
    return { ok: (await probe(step)) ?? null };
  } catch (e) {
    return { err: String(e?.message ?? e) };
  }
}

async function probe(step) {
  switch (step.do) {
    case "read":
      return readText(step.path);
    case "write":
      writeText(step.path, step.text);
      return null;
    case "env":
      return env(step.name);
    case "secret":
      return secret(step.name);
    case "env_names":
      return getEnvironment()
        .map(([name]) => name)
        .sort();
    case "http": {
      const response = await fetch(step.url, {
        method: step.method ?? "GET",
        headers: step.headers ?? [],
        body: step.body,
      });
      return { status: response.status, body: await response.text() };
    }
    case "get_json":
      return getJson(step.url);
    case "connect": {
      // The SDK has no TCP: only see whether the grants let the task create a socket.
      let socket;
      try {
        socket = createTcpSocket("ipv4");
      } catch (e) {
        throw new Error(String(e?.payload ?? e?.message ?? e));
      }
      socket[Symbol.dispose ?? Symbol.for("dispose")]();
      throw new Error(`created a socket, but the JavaScript SDK has no TCP connect (${step.addr})`);
    }
    default:
      throw new Error(`unknown step ${JSON.stringify(step.do)}`);
  }
}
