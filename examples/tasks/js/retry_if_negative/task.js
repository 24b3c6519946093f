// retry_if_negative: raises RETRY while its input is negative, else returns it.
import { Retry } from "sluice";

export function run(x) {
  if (x < 0) throw new Retry(`${x} is negative`);
  return x;
}
