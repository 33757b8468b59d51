// Dashboard in a real browser: Debian's Chromium driven by playwright-core, against a running controller
// (started by tests/api/dashboard.rs with a fresh PostgreSQL database). A worker is driven over HTTP
// with the admin key while the pages must follow without reload.
//
//   node tests/browser/dashboard.mjs <base-url> <admin-key> [screenshot-dir]
//
// Exits non-zero, naming the failed step, when anything is wrong.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { strict as assert } from "node:assert";

const [base, key, shots = "target/screenshots"] = process.argv.slice(2);
if (!base || !key) {
  console.error("usage: node dashboard.mjs <base-url> <admin-key> [screenshot-dir]");
  process.exit(2);
}
mkdirSync(shots, { recursive: true });
const LIVE_MS = 2000;

// ---------- the API, as a worker and a submitter would use it ----------
async function api(method, path, { json, form, headers = {} } = {}) {
  const init = { method, headers: { "X-API-Key": key, ...headers }, redirect: "manual" };
  if (json !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  if (form) init.body = form;
  const r = await fetch(base + path, init);
  const text = await r.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, body, headers: r.headers };
}
async function submit(platform = "ios") {
  const form = new FormData();
  form.append("source", new Blob([new Uint8Array(2048).fill(7)]), "app.zip");
  form.append("platform", platform);
  const r = await api("POST", "/api/builds/submit", { form });
  assert.equal(r.status, 200, `submit: ${JSON.stringify(r.body)}`);
  return r.body.id;
}
const buildState = async (id) => (await api("GET", `/api/v2/builds/${id}`)).body.state;

// ---------- the browser ----------
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const offOrigin = [];
const dialogs = [];
const scriptErrors = [];
const origin = new URL(base).origin;
function watch(page) {
  page.on("request", (req) => {
    const url = req.url();
    if (!url.startsWith(origin + "/") && !url.startsWith("data:") && url !== "about:blank") offOrigin.push(url);
  });
  page.on("pageerror", (e) => scriptErrors.push(`pageerror: ${e.message}`));
  page.on("console", (m) => {
    // Expected: the 401 of the wrong-key step (a document answer, logged by Chromium).
    if (m.type() === "error" && !/status of 40[13]/.test(m.text())) scriptErrors.push(`console: ${m.text()}`);
  });
  page.on("dialog", (d) => { dialogs.push(d.message()); d.accept(); });
}

let step = "start";
async function check(name, fn) {
  step = name;
  const started = Date.now();
  await fn();
  console.log(`ok   ${name} (${Date.now() - started} ms)`);
}

const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
const page = await context.newPage();
watch(page);
let buildId, workerId, secondTab;

try {
  await check("no session: the sign-in form, and no data without a session", async () => {
    await page.goto(base + "/");
    assert.match(page.url(), /\/dashboard\/login$/);
    await page.getByLabel("API key").waitFor();
    for (const path of ["/dashboard/builds", "/dashboard/workers", "/dashboard/queues"]) {
      const r = await fetch(base + path, { redirect: "manual" });
      assert.ok([302, 303, 307].includes(r.status), `${path} without a session: ${r.status}`);
      assert.match(r.headers.get("location") || "", /\/dashboard\/login\?next=%2Fdashboard%2F\w+$/);
    }
    const ev = await fetch(base + "/dashboard/events", { redirect: "manual" });
    assert.equal(ev.status, 401, "event stream without a session");
    await page.screenshot({ path: `${shots}/login.png` });
  });

  await check("a wrong key is refused, after a delay, and sets no cookie", async () => {
    await page.getByLabel("API key").fill("not-the-key-" + "x".repeat(30));
    const started = Date.now();
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByText("Wrong key.").waitFor();
    assert.ok(Date.now() - started >= 900, `refused after ${Date.now() - started} ms`);
    assert.match(page.url(), /\/dashboard\/login$/);
    assert.equal((await context.cookies()).length, 0);
  });

  await check("sign in with the admin key: a deep link survives sign-in", async () => {
    await page.goto(base + "/dashboard/builds?state=failed");
    assert.match(page.url(), /\/dashboard\/login\?next=/);
    await page.getByLabel("API key").fill(key);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.waitForURL(base + "/dashboard/builds?state=failed");
    assert.equal(await page.locator('select[name="state"]').inputValue(), "failed");
    await page.goto(base + "/dashboard");
    await page.getByRole("heading", { name: "Overview" }).waitFor();
    const [cookie] = await context.cookies();
    assert.ok(cookie, "a session cookie");
    assert.equal(cookie.httpOnly, true);
    assert.equal(cookie.sameSite, "Strict");
    assert.ok(cookie.expires > Date.now() / 1000, "the cookie expires");
    assert.ok(!cookie.value.includes(key), "the cookie never holds the key");
    await page.locator("#live.ok").waitFor({ timeout: 5000 });
  });

  await check("a submitted build appears on the builds page within 2 s, without reload", async () => {
    const reg = await api("POST", "/api/workers/register", {
      json: { name: "mac-mini-01", capabilities: { platforms: ["ios"] } },
    });
    assert.equal(reg.status, 200);
    workerId = reg.body.id;
    await page.goto(base + "/dashboard/builds");
    await page.locator("#live.ok").waitFor({ timeout: 5000 });
    await page.evaluate(() => { window.__notReloaded = true; });
    buildId = await submit("ios");
    await page.locator(`tr[data-build="${buildId}"] .pill`, { hasText: "pending" }).waitFor({ timeout: LIVE_MS });
    assert.equal(await page.evaluate(() => window.__notReloaded), true, "the page was not reloaded");
  });

  await check("it moves through assigned and building as the worker drives it", async () => {
    const poll = await api("GET", `/api/workers/poll?worker_id=${workerId}`);
    assert.equal(poll.body.job?.id, buildId, JSON.stringify(poll.body));
    await page.locator(`tr[data-build="${buildId}"] .pill`, { hasText: "assigned" }).waitFor({ timeout: LIVE_MS });
    // The worker is shown by its name, its id on hover.
    const link = page.locator(`tr[data-build="${buildId}"] a.worker`);
    await link.filter({ hasText: "mac-mini-01" }).waitFor({ timeout: LIVE_MS });
    assert.match(await link.getAttribute("title"), new RegExp(workerId));
    const hb = await api("POST", `/api/builds/${buildId}/heartbeat?worker_id=${workerId}`, { json: { progress: 15, stage: "compiling" } });
    assert.equal(hb.status, 200, JSON.stringify(hb.body));
    await page.locator(`tr[data-build="${buildId}"] .pill`, { hasText: "building" }).waitFor({ timeout: LIVE_MS });
  });

  await check("log lines posted by the worker appear on the build page live", async () => {
    secondTab = await context.newPage();
    watch(secondTab);
    await secondTab.goto(`${base}/dashboard/builds/${buildId}`);
    await secondTab.locator("#live.ok").waitFor({ timeout: 5000 });
    const lines = [
      { level: "info", message: "Installing dependencies with yarn" },
      { level: "info", message: "› Compiling MyApp (Release, arm64)" },
      { level: "warn", message: "ld: warning: object file was built for newer iOS version" },
    ];
    const r = await api("POST", `/api/builds/${buildId}/logs?worker_id=${workerId}`, { json: { logs: lines } });
    assert.equal(r.status, 200, JSON.stringify(r.body));
    await secondTab.locator("#log .line", { hasText: "Compiling MyApp" }).waitFor({ timeout: LIVE_MS });
    const r2 = await api("POST", `/api/builds/${buildId}/logs?worker_id=${workerId}`, {
      json: { level: "info", message: "Archive succeeded" },
    });
    assert.equal(r2.status, 200);
    await secondTab.locator("#log .line", { hasText: "Archive succeeded" }).waitFor({ timeout: LIVE_MS });
    const shown = await secondTab.locator("#log .line").allTextContents();
    assert.equal(shown.filter((t) => t.includes("Archive succeeded")).length, 1, "each line once");
    // A coloured line, rendered with classes (no inline style under the CSP).
    const ansi = await api("POST", `/api/builds/${buildId}/logs?worker_id=${workerId}`, {
      json: { level: "info", message: "\u001b[1m\u001b[32m✔\u001b[0m Bundled 1,204 modules" },
    });
    assert.equal(ansi.status, 200);
    const colored = secondTab.locator("#log .line .ansi-fg2", { hasText: "✔" });
    await colored.waitFor({ timeout: LIVE_MS });
    assert.match(await colored.getAttribute("class"), /ansi-b/);
    assert.ok(!(await secondTab.locator("#log").textContent()).includes("[32m"), "no raw escape codes");
    for (let i = 0; i < 12; i++) {
      await api("POST", `/api/builds/${buildId}/telemetry?worker_id=${workerId}`, {
        json: { type: "cpu_snapshot", data: { cpu_percent: 120 + 60 * Math.sin(i / 2), memory_mb: 2500 + i * 90 } },
      });
    }
  });

  await check("the whole log: earlier lines, search and download (600 more lines)", async () => {
    for (let batch = 0; batch < 6; batch++) {
      const logs = [];
      for (let i = 1; i <= 100; i++) logs.push({ level: "info", message: `step ${batch * 100 + i} of 600` });
      const r = await api("POST", `/api/builds/${buildId}/logs?worker_id=${workerId}`, { json: { logs } });
      assert.equal(r.status, 200, JSON.stringify(r.body));
    }
    await secondTab.goto(`${base}/dashboard/builds/${buildId}`);
    await secondTab.locator("#log .line", { hasText: "step 600 of 600" }).waitFor();
    assert.equal(await secondTab.locator('#log .line[data-seq="1"]').count(), 0, "only the tail at first");
    while (await secondTab.locator("#log-earlier").count()) {
      await secondTab.locator("#log-earlier").click();
      await secondTab.waitForTimeout(150);
    }
    await secondTab.locator('#log .line[data-seq="1"]').waitFor();
    await secondTab.locator("#log .line", { hasText: "Installing dependencies" }).waitFor();
    const shownSeqs = await secondTab.locator("#log .line").evaluateAll((ls) => ls.map((l) => +l.dataset.seq));
    assert.deepEqual(shownSeqs, shownSeqs.map((_, i) => i + 1), "every line once, in order");
    await secondTab.locator("#log-q").fill("step 7 of");
    await secondTab.getByRole("button", { name: "Search" }).click();
    await secondTab.locator("#log-results .line", { hasText: "step 7 of 600" }).waitFor();
    assert.equal(await secondTab.locator("#log-results .line").count(), 1);
    await secondTab.screenshot({ path: `${shots}/build-log.png`, fullPage: true });
    const href = await secondTab.getByRole("link", { name: "Download log" }).getAttribute("href");
    const text = await (await secondTab.request.get(base + href)).text();
    const lines = text.trimEnd().split("\n");
    assert.equal(lines.length, shownSeqs.length, "the download holds every line");
    assert.ok(lines.slice(0, 3).some((l) => /Installing dependencies with yarn$/.test(l)), lines.slice(0, 3).join("\n"));
    assert.ok(text.includes("✔ Bundled 1,204 modules") && !text.includes("\u001b"), "plain text");
  });

  await check("completion shows on both pages without reload", async () => {
    const form = new FormData();
    form.append("build_id", buildId);
    form.append("worker_id", workerId);
    form.append("success", "true");
    form.append("result", new Blob([new Uint8Array(4096).fill(1)]), "MyApp.ipa");
    const up = await api("POST", "/api/workers/upload", { form });
    assert.equal(up.status, 200, JSON.stringify(up.body));
    await page.locator(`tr[data-build="${buildId}"] .pill`, { hasText: "completed" }).waitFor({ timeout: LIVE_MS });
    await secondTab.locator("h1 .pill", { hasText: "completed" }).waitFor({ timeout: LIVE_MS });
    await secondTab.getByRole("link", { name: "Download result" }).waitFor();
    const sha = await secondTab.locator("dd.mono").first().textContent();
    assert.match(sha.trim(), /^[0-9a-f]{64}$/);
    await secondTab.screenshot({ path: `${shots}/build.png`, fullPage: true });
  });

  await check("cancel from the build page cancels the build (checked through the API)", async () => {
    const id = await submit("android");
    await secondTab.goto(`${base}/dashboard/builds/${id}`);
    await secondTab.getByRole("button", { name: "Cancel" }).click();
    await secondTab.getByText("cancelled").first().waitFor();
    assert.equal(await buildState(id), "cancelled");
  });

  await check("select several builds and cancel them", async () => {
    const ids = [await submit("android"), await submit("ios")];
    await page.goto(base + "/dashboard/builds");
    const bar = page.locator(".bulk-bar");
    assert.equal(await bar.getByRole("button", { name: "Cancel" }).isDisabled(), true, "nothing selected: no action");
    for (const id of ids) await page.locator(`tr[data-build="${id}"] input[type=checkbox]`).check();
    await bar.getByText("2 selected").waitFor();
    // Only what applies: pending builds can be cancelled, not retried.
    assert.equal(await bar.getByRole("button", { name: "Retry" }).isVisible(), false, "Retry does not apply");
    dialogs.length = 0;
    await bar.getByRole("button", { name: "Cancel" }).click();
    await page.getByText("2 build(s) cancelled").waitFor();
    assert.deepEqual(dialogs, ["Cancel 2 builds?"], "the confirmation names the action and the count");
    for (const id of ids) assert.equal(await buildState(id), "cancelled");
    await page.screenshot({ path: `${shots}/builds.png`, fullPage: true });
  });

  let failedId;
  await check("a failure shows its error in the failed list, linked to its worker; short-id search", async () => {
    failedId = await submit("ios");
    const poll = await api("GET", `/api/workers/poll?worker_id=${workerId}`);
    assert.equal(poll.body.job?.id, failedId, JSON.stringify(poll.body));
    const form = new FormData();
    form.append("build_id", failedId);
    form.append("worker_id", workerId);
    form.append("success", "false");
    form.append("error_message", "xcodebuild: error: Signing for \"MyApp\" requires a development team.\n" + "detail ".repeat(300));
    const up = await api("POST", "/api/workers/upload", { form });
    assert.equal(up.status, 200, JSON.stringify(up.body));
    await page.goto(base + "/dashboard/builds?state=failed");
    const row = page.locator(`tr[data-build="${failedId}"]`);
    await row.locator("td.reason summary", { hasText: "requires a development team" }).waitFor();
    assert.ok(!(await row.locator("td.reason summary").textContent()).includes("detail detail"), "first line only");
    await row.locator("td.reason summary").click();
    await row.locator(".error-full", { hasText: "detail detail" }).waitFor();
    await row.locator("a.worker", { hasText: "mac-mini-01" }).waitFor();
    await page.screenshot({ path: `${shots}/builds-failed.png`, fullPage: true });
    // The tables show ten characters of an id: searching by them finds the build.
    await page.goto(base + "/dashboard/builds");
    await page.getByLabel("Build id").fill(failedId.slice(0, 10));
    await page.getByRole("button", { name: "Apply" }).click();
    await page.locator(`tr[data-build="${failedId}"]`).waitFor();
    assert.equal(await page.locator("tr[data-build]").count(), 1);
    // The overview's card stays narrow however long the error.
    await page.goto(base + "/dashboard");
    const failures = page.locator("section.card", { hasText: "Recent failures" });
    await failures.locator("a.worker", { hasText: "mac-mini-01" }).waitFor();
    const width = await failures.evaluate((el) => el.getBoundingClientRect().width);
    assert.ok(width <= 1366, `the failures card is ${width} px wide`);
  });

  await check("drain a worker (its latest diagnostics shown beside it)", async () => {
    const report = await api("POST", "/api/diagnostics/report", {
      json: {
        worker_id: workerId, status: "warning", duration_ms: 812,
        checks: [
          { name: "disk_space", status: "pass", message: "182 GB free" },
          { name: "xcode", status: "warn", message: "Xcode 16.1 (16.2 recommended)" },
        ],
      },
    });
    assert.equal(report.status, 200, JSON.stringify(report.body));
    await page.goto(base + "/dashboard/workers");
    await page.locator(`#w-${workerId} details summary .pill`, { hasText: "warning" }).waitFor();
    await page.locator(`#w-${workerId}`).getByRole("button", { name: "Drain" }).click();
    await page.getByText("Worker mac-mini-01 draining").waitFor();
    const w = await api("GET", `/api/v2/workers/${workerId}`);
    assert.equal(w.body.admin_state, "draining");
    await page.locator(`#w-${workerId}`).getByRole("button", { name: "Enable" }).waitFor();
    await page.screenshot({ path: `${shots}/workers.png`, fullPage: true });
  });

  await check("a worker's page: details, capabilities, attempts by kind, diagnostics, actions", async () => {
    const other = await api("POST", "/api/workers/register", {
      json: { name: "mac-studio-ams", capabilities: { platforms: ["ios", "android"], xcode_version: "16.2", macos_version: "15.1", maxMemoryGB: 64 } },
    });
    assert.equal(other.status, 200);
    await page.goto(base + "/dashboard/workers");
    await page.locator(`#w-${workerId} a.worker`, { hasText: "mac-mini-01" }).click();
    await page.waitForURL(`${base}/dashboard/workers/${workerId}`);
    await page.getByRole("heading", { name: /mac-mini-01/ }).waitFor();
    await page.locator(".pill", { hasText: "drained" }).first().waitFor();
    await page.locator(`table.attempts a[href="/dashboard/builds/${buildId}"]`).waitFor();
    await page.locator(`table.attempts tr[data-outcome="build_failure"] .kind.build`).waitFor();
    await page.locator("details.report .pill", { hasText: "warning" }).waitFor();
    await page.getByRole("button", { name: "Enable" }).waitFor();
    await page.screenshot({ path: `${shots}/worker.png`, fullPage: true });
    await page.goto(`${base}/dashboard/workers/${other.body.id}`);
    for (const text of ["16.2", "15.1", "64"]) await page.locator("dl.details dd", { hasText: text }).first().waitFor();
    // Idle counts only Macs that can take work: the drained one is not idle, the new one is.
    await page.goto(base + "/dashboard");
    const workers = page.locator("article.card", { hasText: "Workers" });
    assert.equal((await workers.locator("div", { has: page.locator("dt", { hasText: "Idle" }) }).locator("dd").textContent()).trim(), "1");
    await workers.getByText("1 drained").waitFor();
    // An unknown dashboard page is an HTML page.
    const r = await page.goto(base + "/dashboard/nowhere");
    assert.equal(r.status(), 404);
    assert.match(r.headers()["content-type"], /text\/html/);
    await page.getByRole("link", { name: "Back to the dashboard" }).waitFor();
    // Chromium logs that (expected) 404 as a console error.
    scriptErrors.splice(0, scriptErrors.length, ...scriptErrors.filter((e) => !/status of 404/.test(e)));
  });

  await check("pause and resume a queue", async () => {
    const paused = async () => (await api("GET", "/api/v2/queues")).body.items.find((q) => q.name === "ios").paused;
    await page.goto(base + "/dashboard/queues");
    await page.locator('tr[data-queue="ios"]').getByRole("button", { name: "Pause" }).click();
    await page.getByText("Queue ios paused").waitFor();
    assert.equal(await paused(), true);
    await page.screenshot({ path: `${shots}/queues.png`, fullPage: true });
    await page.locator('tr[data-queue="ios"]').getByRole("button", { name: "Resume" }).click();
    await page.getByText("Queue ios resumed").waitFor();
    assert.equal(await paused(), false);
  });

  await check("a cross-site POST with the session cookie changes nothing", async () => {
    const [cookie] = await context.cookies();
    const jar = `${cookie.name}=${cookie.value}`;
    const csrf = await page.locator('form.logout input[name="csrf"]').inputValue();
    const attempts = [
      { Origin: "http://evil.example", body: `csrf=${csrf}` },
      { Origin: "null", body: `csrf=${csrf}` },
      { Origin: origin, body: "csrf=forged" },
      { Origin: origin, body: "" },
    ];
    for (const a of attempts) {
      const r = await fetch(`${base}/dashboard/queues/ios/pause`, {
        method: "POST", redirect: "manual", body: a.body,
        headers: { Cookie: jar, Origin: a.Origin, "content-type": "application/x-www-form-urlencoded" },
      });
      assert.equal(r.status, 403, `origin ${a.Origin} body ${a.body}: ${r.status}`);
    }
    const queues = (await api("GET", "/api/v2/queues")).body.items;
    assert.equal(queues.find((q) => q.name === "ios").paused, false, "the queue was not paused");
    // And from a page on another origin in the browser itself: no cookie is sent, nothing changes.
    const evil = await context.newPage();
    watch(evil);
    const other = origin.replace("127.0.0.1", "localhost");
    await evil.route(other + "/evil", (route) => route.fulfill({
      contentType: "text/html",
      body: `<form id=f method=post action="${base}/dashboard/queues/ios/pause"></form><script>f.submit()</script>`,
    }));
    await evil.goto(other + "/evil");
    await evil.waitForLoadState("load");
    await evil.waitForTimeout(300);
    await evil.close();
    const after = (await api("GET", "/api/v2/queues")).body.items;
    assert.equal(after.find((q) => q.name === "ios").paused, false, "a cross-site form changed nothing");
    offOrigin.splice(0, offOrigin.length, ...offOrigin.filter((u) => !u.startsWith(other)));
  });

  await check("overview shows the fleet", async () => {
    await page.goto(base + "/dashboard");
    await page.getByRole("heading", { name: "Throughput, last 24 hours" }).waitFor();
    await page.locator("#live.ok").waitFor({ timeout: 5000 });
    await page.screenshot({ path: `${shots}/overview.png`, fullPage: true });
  });

  await check("usable on a phone (390 px)", async () => {
    const phone = await browser.newContext({
      viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true,
      storageState: await context.storageState(),
    });
    const p = await phone.newPage();
    watch(p);
    await p.goto(base + "/dashboard");
    await p.getByRole("heading", { name: "Overview" }).waitFor();
    const width = await p.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 392, `no horizontal page scroll on a phone (scrollWidth ${width})`);
    await p.screenshot({ path: `${shots}/overview-phone.png`, fullPage: true });
    await p.goto(`${base}/dashboard/builds/${buildId}`);
    await p.screenshot({ path: `${shots}/build-phone.png`, fullPage: true });
    await phone.close();
  });

  await check("keyboard: the sign-out button and navigation are reachable with Tab", async () => {
    await page.goto(base + "/dashboard/queues");
    const reached = new Set();
    for (let i = 0; i < 12; i++) {
      await page.keyboard.press("Tab");
      reached.add(await page.evaluate(() => document.activeElement?.textContent?.trim()));
    }
    for (const label of ["Builds", "Workers", "Log out", "Pause"]) assert.ok(reached.has(label), `Tab reaches ${label}`);
  });

  await check("a viewer sees who is signed in and no action controls; a forged action is 403", async () => {
    const created = await api("POST", "/api/v2/keys", { json: { name: "lobby screen", role: "viewer" } });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const ctx = await browser.newContext({ viewport: { width: 1366, height: 900 } });
    const v = await ctx.newPage();
    watch(v);
    await v.goto(base + "/dashboard/login");
    await v.getByLabel("API key").fill(created.body.key);
    await v.getByRole("button", { name: "Sign in" }).click();
    await v.waitForURL(base + "/dashboard");
    assert.equal((await v.locator("#signed-in").textContent()).trim(), "lobby screen · viewer");
    await v.goto(`${base}/dashboard/workers`);
    for (const name of ["Drain", "Disable", "Enable", "Revoke"]) {
      assert.equal(await v.getByRole("button", { name }).count(), 0, `a viewer sees no ${name}`);
    }
    await v.goto(`${base}/dashboard/builds/${buildId}`);
    for (const name of ["Cancel", "Retry", "Requeue", "Set priority"]) {
      assert.equal(await v.getByRole("button", { name }).count(), 0, `a viewer sees no ${name}`);
    }
    await v.goto(`${base}/dashboard/queues`);
    assert.equal(await v.getByRole("button", { name: "Pause" }).count(), 0);
    await v.screenshot({ path: `${shots}/viewer-queues.png`, fullPage: true });
    const paused = async () => JSON.stringify((await api("GET", "/api/v2/queues")).body.items.map((q) => [q.name, q.paused]));
    const before = await paused();
    const forged = await v.evaluate(async () => {
      const csrf = document.querySelector('input[name="csrf"]').value;
      const r = await fetch("/dashboard/queues/ios/pause", {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: "csrf=" + encodeURIComponent(csrf),
        redirect: "manual",
      });
      return r.status;
    });
    assert.equal(forged, 403, "a viewer's forged action");
    assert.equal(await paused(), before, "nothing changed");
    await ctx.close();
  });

  await check("an operator sees the actions it may take, not the admin's", async () => {
    const created = await api("POST", "/api/v2/keys", { json: { name: "night shift", role: "operator" } });
    assert.equal(created.status, 201);
    const ctx = await browser.newContext({ viewport: { width: 1366, height: 900 } });
    const o = await ctx.newPage();
    watch(o);
    await o.goto(base + "/dashboard/login");
    await o.getByLabel("API key").fill(created.body.key);
    await o.getByRole("button", { name: "Sign in" }).click();
    await o.waitForURL(base + "/dashboard");
    assert.equal((await o.locator("#signed-in").textContent()).trim(), "night shift · operator");
    await o.goto(`${base}/dashboard/workers`);
    assert.ok((await o.getByRole("button", { name: "Drain" }).count()) + (await o.getByRole("button", { name: "Enable" }).count()) > 0, "an operator sees worker actions");
    assert.equal(await o.getByRole("button", { name: "Revoke" }).count(), 0, "revoking is the admin's");
    await o.goto(`${base}/dashboard/queues`);
    assert.ok((await o.getByRole("button", { name: /Pause|Resume/ }).count()) > 0);
    await o.screenshot({ path: `${shots}/operator-workers.png`, fullPage: true });
    await ctx.close();
  });

  await check("log-out ends the session server-side", async () => {
    const [cookie] = await context.cookies();
    await secondTab.close();
    await page.getByRole("button", { name: "Log out" }).click();
    await page.waitForURL(base + "/dashboard/login");
    const r = await fetch(base + "/dashboard/builds", { redirect: "manual", headers: { Cookie: `${cookie.name}=${cookie.value}` } });
    assert.ok([302, 303, 307].includes(r.status), `old cookie after log-out: ${r.status}`);
  });

  await check("no request left the controller's origin, no script errors", async () => {
    assert.deepEqual(offOrigin, [], "requests to other origins");
    assert.deepEqual(scriptErrors, [], "script errors");
  });
} catch (error) {
  console.error(`FAILED at step "${step}": ${error.stack || error}`);
  try { await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }); } catch { /* closed */ }
  await browser.close();
  process.exit(1);
}
await browser.close();
console.log("dashboard browser tests passed");
