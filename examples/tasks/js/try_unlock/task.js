// try_unlock: true when the context key `key` is "abc", else FAIL.
import { Fail, context } from "sluice";

export function run() {
  if (context.get("key") === "abc") return true;
  throw new Fail("the context key `key` does not unlock this task");
}
