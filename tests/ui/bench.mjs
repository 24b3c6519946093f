// The web UI's pages in Chromium, timed (started by `cargo bench --bench server -- mapped`
// against its in-process server, with the 10,000-task run it made): for each page, its first
// load in a new browser, then LOADS more; from navigation to the page being interactive (its
// script has run: `domContentLoadedEventEnd`) and to its `load` event, from the browser's own
// Navigation Timing. Prints one line per page.
import { chromium } from "playwright-core";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const url = env("SLUICE_URL");
const token = env("TOKEN");
const run = env("RUN");
const loads = Number(process.env.LOADS ?? 10);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox"],
});
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const host = new URL(url).hostname;
  await context.addCookies([
    { name: "sluice_token", value: token, domain: host, path: "/ui", httpOnly: true, sameSite: "Strict" },
  ]);
  const page = await context.newPage();

  const timed = async (path, ready) => {
    await page.goto(url + path, { waitUntil: "load" });
    await ready();
    return page.evaluate(() => {
      const n = performance.getEntriesByType("navigation")[0];
      return { interactive: n.domContentLoadedEventEnd, load: n.loadEventEnd, bytes: n.transferSize };
    });
  };
  const ms = (v) => `${v.toFixed(0)} ms`;
  const report = async (name, path, ready) => {
    const first = await timed(path, ready);
    const rest = [];
    for (let i = 0; i < loads; i++) rest.push(await timed(path, ready));
    const sorted = (k) => rest.map((r) => r[k]).sort((a, b) => a - b);
    const [i, l] = [sorted("interactive"), sorted("load")];
    const median = (s) => s[Math.floor(s.length / 2)];
    console.log(
      `${name}: first load interactive ${ms(first.interactive)}, load ${ms(first.load)} ` +
        `(${(first.bytes / 1024).toFixed(0)} KiB); then ${loads} loads: interactive p50 ` +
        `${ms(median(i))} max ${ms(i[i.length - 1])}, load p50 ${ms(median(l))} max ${ms(l[l.length - 1])}`,
    );
  };

  await report("run page (10,000-task map)", `/ui/runs/${run}`, async () => {
    await page.locator('a.node[data-task="add"]').waitFor();
    await page.locator("svg.timeline").waitFor();
  });
  await report("mapped task page (100 children a page)", `/ui/runs/${run}/tasks/add`, async () => {
    await page.locator("table.children").waitFor();
  });
  await report("runs list", "/ui/runs", async () => {
    await page.locator("table.runs").waitFor();
  });
} finally {
  await browser.close();
}
