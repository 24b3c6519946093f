// The JavaScript test guest: the input's "do" picks a behaviour (see ../README.md).
import { Fail, Pause, Retry, Skip, Success, context, log } from "sluice";
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
    default:
      throw new Fail(`unknown mode ${JSON.stringify(input.do)}`);
  }
}
