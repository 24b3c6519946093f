// The web UI in a real browser (Debian's chromium, driven by playwright-core), as a tenant uses
// it: sign in, a live task's new log line appended as it comes, the runs list, a failed run's
// graph and timeline, the failed task's log line and error, a task's output downloaded,
// resuming the failed run from a chosen task, cancelling a running run, pausing and resuming a
// deployment, usage against quotas, another tenant's run unreachable by URL; axe-core checks
// each page (no serious or critical violation). Started by tests/all/ui.rs with the server and
// runs it made; writes a screenshot of each page to $SHOTS. Exits non-zero on the first failure.
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
const drip = env("DRIP_RUN");
const operatorToken = env("OPERATOR_TOKEN");
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
  await page.getByLabel("Tenant or operator token").fill("sluice_not-a-token");
  await page.keyboard.press("Enter");
  check((await page.getByRole("alert").textContent()).includes("not valid"), "a wrong token is refused");
  await page.getByLabel("Tenant or operator token").fill(token);
  await page.keyboard.press("Enter");
  await page.waitForURL("**/ui/runs");
  const cookies = await page.context().cookies();
  const cookie = cookies.find((c) => c.name === "sluice_token");
  check(cookie && cookie.httpOnly && cookie.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");

  // A live task (waiting 20 s for its retry): its page shows its first attempt's line and
  // appends the second's when that attempt ends, before the page reloads itself at the run's
  // end (an observer on the first page records the line arriving there).
  await page.goto(`${url}/ui/runs/${drip}/tasks/drip`);
  const tail = page.locator("#logs");
  check((await tail.getAttribute("data-tail")) !== null, "the live task's page follows its log (the run was still live)");
  check((await tail.textContent()).includes("drip attempt 1"), "the live task's first line is shown");
  check(!(await tail.textContent()).includes("drip attempt 2"), "the second attempt has not run yet");
  await page.evaluate(() => {
    const pre = document.getElementById("logs");
    new MutationObserver(() => {
      if (pre.textContent.includes("drip attempt 2")) sessionStorage.setItem("appended", "yes");
    }).observe(pre, { childList: true, subtree: true, characterData: true });
  });
  await page.waitForFunction(() => sessionStorage.getItem("appended") === "yes", null, { timeout: 60000 });
  check(true, "the live task's next line is appended as it comes, without a reload");
  // Then the run ends and the page shows it as it ended: no longer following.
  await page.locator("#logs:not([data-tail])").waitFor({ timeout: 30000 });
  check((await page.locator(".task-state .badge").textContent()) === "Completed", "after its end, the page shows the task Completed");
  await accessible(page, "task-live");
  await shot(page, "task-live");

  // The runs list shows the failed run; open it.
  await page.goto(`${url}/ui/runs`);
  const link = page.locator(`a[href="/ui/runs/${failed}"]`);
  check((await link.count()) === 1, "the runs list shows the failed run");
  await accessible(page, "runs");
  await shot(page, "runs");
  // Filtered by creation time (UTC): none before 2000; the failed run within the last hour.
  await page.getByLabel("to (UTC)").fill("2000-01-01T00:00:00");
  await page.getByRole("button", { name: "Filter" }).click();
  await page.waitForURL("**/ui/runs?**");
  check((await page.locator(`a[href="/ui/runs/${failed}"]`).count()) === 0, "no run was created before 2000");
  const hourAgo = new Date(Date.now() - 3600e3).toISOString().slice(0, 19);
  await page.goto(`${url}/ui/runs?since=${hourAgo}`);
  check((await link.count()) === 1, "the failed run was created within the last hour");
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
  // Its timeline: a bar per attempt, coloured by how it ended.
  const bar = page.locator("svg.timeline rect.bar.st-failed title", { hasText: "boom, attempt 1" });
  check((await bar.count()) === 1, "the timeline has the failed task's attempt, ended Failed");
  check((await page.locator("svg.timeline rect.bar.st-completed title", { hasText: "ok, attempt 1" }).count()) === 1,
    "the timeline has the completed task's attempt");
  await accessible(page, "run");
  await shot(page, "run");

  // The failed task: its log line and its error.
  await boom.click();
  await page.waitForURL("**/tasks/boom");
  check((await page.locator("pre.logs").textContent()).includes("about to fail: the disk is full"), "the task's log line is shown");
  check((await page.locator("pre.message").textContent()).includes("no space left"), "the task's error is shown");
  check((await page.locator("dl.usage").textContent()).includes("Peak memory"), "the task's peak memory is shown");
  await accessible(page, "task");
  await shot(page, "task");

  // A completed task's output, downloaded whole.
  await page.goto(`${url}/ui/runs/${failed}/tasks/ok`);
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("link", { name: /Download the output/ }).click(),
  ]);
  const text = readFileSync(await download.path(), "utf8");
  check(text === "42", `the downloaded output is the task's (${text})`);
  check(download.suggestedFilename() === `${failed}-ok-output.json`, `the download is named for the run and task (${download.suggestedFilename()})`);
  await accessible(page, "task-output");
  await shot(page, "task-output");

  // Resume the failed run from a chosen task: it runs again (a second attempt on the timeline).
  await page.goto(`${url}/ui/runs/${failed}`);
  await page.getByText("Resume from chosen tasks").click();
  check((await page.locator('input[name="start"][value="ok"]').count()) === 0, "a completed task is not offered as a start task");
  await page.locator('input[name="start"][value="boom"]').check();
  await page.getByRole("button", { name: "Resume run" }).click();
  await page.waitForURL(`**/ui/runs/${failed}`);
  await page.locator("svg.timeline rect.bar title", { hasText: "boom, attempt 2" }).waitFor({ state: "attached", timeout: 30000 });
  await page.locator(".run-state .badge", { hasText: "Failed" }).waitFor({ timeout: 30000 });
  check(true, "the resumed run ran the chosen task again");
  await shot(page, "resumed");

  // A running run: cancel it, and watch it turn Cancelled (the page follows the live run).
  await page.goto(`${url}/ui/runs/${running}`);
  check((await page.locator(".run-state .badge").textContent()) === "Running", "the other run is Running");
  await page.getByRole("button", { name: "Cancel run" }).click();
  await page.locator(".run-state .badge", { hasText: "Cancelled" }).waitFor({ timeout: 30000 });
  check(true, "the cancelled run turns Cancelled");
  await shot(page, "cancelled");

  // Deployments: the list with next runs; pause, then resume from the deployment's page.
  await page.goto(`${url}/ui/deployments`);
  const row = page.locator("table.deployments tr", { hasText: "hourly" });
  check((await row.locator("time").count()) === 3, "the deployment shows its next three runs");
  await page.getByRole("button", { name: "Pause deployment hourly" }).click();
  await row.locator(".badge", { hasText: "paused" }).waitFor();
  check(page.url().endsWith("/ui/deployments"), "pausing from the list comes back to it");
  check((await row.locator("time").count()) === 0, "a paused deployment has no next runs");
  await accessible(page, "deployments");
  await shot(page, "deployments");
  await row.getByRole("link", { name: "hourly" }).click();
  await page.getByRole("button", { name: "Resume deployment hourly" }).click();
  await page.getByRole("button", { name: "Pause deployment hourly" }).waitFor();
  check(page.url().endsWith("/ui/deployments/hourly"), "resuming from its page comes back to it");
  check((await page.locator("dl.usage").textContent()).includes("active"), "the resumed deployment is active");
  check((await page.locator("table.slots").first().locator("tbody tr", { hasText: "Scheduled" }).count()) >= 1,
    "the resumed deployment has upcoming runs");
  await accessible(page, "deployment");
  await shot(page, "deployment");

  // Usage against quotas.
  await page.goto(`${url}/ui/usage`);
  const runsRow = page.locator("tr", { hasText: "Flow runs started in the last minute" });
  check((await runsRow.locator("td").nth(1).textContent()) === "100", "the runs-per-minute quota is shown");
  check((await runsRow.locator("meter").count()) === 1, "usage is measured against the quota");
  await accessible(page, "usage");
  await shot(page, "usage");

  // Another tenant's run is not reachable by URL.
  const resp = await page.goto(`${url}/ui/runs/${other}`);
  check(resp.status() === 404, `another tenant's run answers 404 (got ${resp.status()})`);
  await shot(page, "other-tenant");
  const forbidden = await page.goto(`${url}/ui/tenants`);
  check(forbidden.status() === 403, `a tenant may not list the tenants (got ${forbidden.status()})`);

  // An operator (a session of its own) sees every tenant, and views each in turn.
  const ops = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage();
  await ops.goto(`${url}/ui/login`);
  await ops.getByLabel("Tenant or operator token").fill(operatorToken);
  await ops.keyboard.press("Enter");
  await ops.waitForURL("**/ui/tenants");
  const names = await ops.locator("table.tenants tbody th").allTextContents();
  check(names.join(",") === "alice,bob", `the operator sees every tenant (${names})`);
  await accessible(ops, "tenants");
  await shot(ops, "tenants");
  await ops.getByRole("button", { name: "View tenant bob" }).click();
  await ops.waitForURL("**/ui/runs");
  check((await ops.locator("header .tenant").textContent()).includes("viewing tenant bob"), "the operator views bob");
  check((await ops.locator(`a[href="/ui/runs/${other}"]`).count()) === 1, "bob's run is listed for the operator");
  check((await ops.locator(`a[href="/ui/runs/${failed}"]`).count()) === 0, "alice's run is not listed under bob");
  await shot(ops, "operator-runs");
  await ops.goto(`${url}/ui/tenants`);
  await ops.getByRole("button", { name: "View tenant alice" }).click();
  await ops.waitForURL("**/ui/runs");
  check((await ops.locator(`a[href="/ui/runs/${failed}"]`).count()) === 1, "then alice's runs, after switching");
} finally {
  await browser.close();
}
