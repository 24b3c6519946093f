// transform: normalizes extracted order records, sorted by id:
// {"id", "customer" (capitalized), "cents" (the amount as integer cents, no floating point)}.
import { Fail, log } from "sluice";

function cents(amount, id) {
  const m = /^\s*(\d+)(?:\.(\d{1,2}))?\s*$/.exec(String(amount));
  if (!m) throw new Fail(`order ${id}: the amount ${JSON.stringify(amount)} is not a price`);
  return Number(m[1]) * 100 + Number((m[2] ?? "0").padEnd(2, "0"));
}

function capitalize(name) {
  return name.charAt(0).toUpperCase() + name.slice(1).toLowerCase();
}

export function run(records) {
  if (!Array.isArray(records)) throw new Fail("expected a list of records");
  const out = records
    .map((r) => ({ id: r.id, customer: capitalize(r.customer), cents: cents(r.amount, r.id) }))
    .sort((a, b) => a.id - b.id);
  log.info(`transformed ${out.length} records`);
  return out;
}
