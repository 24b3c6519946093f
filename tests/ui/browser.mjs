// The web UI in a real browser (Debian's chromium, driven by playwright-core), as a tenant uses
// it: sign in, the runs list, a failed run's graph, the failed task's log line and error,
// cancelling a running run, another tenant's run unreachable by URL; axe-core checks each page
// (no serious or critical violation). Started by tests/all/ui.rs with the server and runs it
// made; writes a screenshot of each page to $SHOTS. Exits non-zero on the first failure.
import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import { createRequire } from "node:module";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("SLUICE_URL");
const token = env("TOKEN");
const failed = env("FAILED_RUN");
const running = env("RUNNING_RUN");
const other = env("OTHER_RUN");
const shots = env("SHOTS");
mkdirSync(shots, { recursive: true });
const axe = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

function check(ok, what) {
  if (!ok) throw new Error(what);
  console.log(`ok: ${what}`);
}

async function accessible(page, name) {
  await page.addScriptTag({ content: axe });
  const result = await page.evaluate(() => window.axe.run(document));
  const bad = result.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of bad) console.error(`${name}: ${v.id} (${v.impact}): ${v.help}: ${v.nodes.map((n) => n.target).join(" ")}`);
  check(bad.length === 0, `${name}: no serious accessibility violation (${result.violations.length} minor)`);
}

async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });

  // Not signed in: the sign-in page, usable with the keyboard alone.
  await page.goto(`${url}/ui/runs`);
  check(page.url().endsWith("/ui/login"), "an unsigned visitor is sent to the sign-in page");
  await accessible(page, "sign-in");
  await shot(page, "sign-in");
  await page.getByLabel("Tenant token").fill("sluice_not-a-token");
  await page.keyboard.press("Enter");
  check((await page.getByRole("alert").textContent()).includes("not valid"), "a wrong token is refused");
  await page.getByLabel("Tenant token").fill(token);
  await page.keyboard.press("Enter");
  await page.waitForURL("**/ui/runs");
  const cookies = await page.context().cookies();
  const cookie = cookies.find((c) => c.name === "sluice_token");
  check(cookie && cookie.httpOnly && cookie.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");

  // The runs list shows the failed run; open it.
  const link = page.locator(`a[href="/ui/runs/${failed}"]`);
  check((await link.count()) === 1, "the runs list shows the failed run");
  await accessible(page, "runs");
  await shot(page, "runs");
  await link.click();
  await page.waitForURL(`**/ui/runs/${failed}`);

  // Its graph: each task a node with its state.
  const boom = page.locator('a.node[data-task="boom"]');
  const after = page.locator('a.node[data-task="after"]');
  await boom.waitFor();
  check((await boom.getAttribute("class")).includes("st-failed"), "the failed task's node is Failed");
  check((await boom.textContent()).startsWith("boomFailed"), "the node shows its task and state");
  check((await after.getAttribute("class")).includes("st-triggerfailed"), "its downstream node is TriggerFailed");
  check((await page.locator(".run-state .badge").textContent()) === "Failed", "the run is Failed");
  await accessible(page, "run");
  await shot(page, "run");

  // The failed task: its log line and its error.
  await boom.click();
  await page.waitForURL("**/tasks/boom");
  check((await page.locator("pre.logs").textContent()).includes("about to fail: the disk is full"), "the task's log line is shown");
  check((await page.locator("pre.message").textContent()).includes("no space left"), "the task's error is shown");
  await accessible(page, "task");
  await shot(page, "task");

  // A running run: cancel it, and watch it turn Cancelled (the page follows the live run).
  await page.goto(`${url}/ui/runs/${running}`);
  check((await page.locator(".run-state .badge").textContent()) === "Running", "the other run is Running");
  await page.getByRole("button", { name: "Cancel run" }).click();
  await page.locator(".run-state .badge", { hasText: "Cancelled" }).waitFor({ timeout: 30000 });
  check(true, "the cancelled run turns Cancelled");
  await shot(page, "cancelled");

  // Another tenant's run is not reachable by URL.
  const resp = await page.goto(`${url}/ui/runs/${other}`);
  check(resp.status() === 404, `another tenant's run answers 404 (got ${resp.status()})`);
  await shot(page, "other-tenant");
} finally {
  await browser.close();
}
