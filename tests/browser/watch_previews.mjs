// Runs one prompt from ComfyUI's real web UI in headless Chromium and records the node previews the
// page receives while it runs.
//
// Usage: node watch_previews.mjs <job.json>
// job.json: {"url": "http://127.0.0.1:PORT", "chromium": "/usr/bin/chromium", "prompt": {API prompt},
//            "timeout_ms": 240000}
// The prompt is queued with the page's own client id (so the server sends this page its progress
// and previews). Prints one JSON object on stdout: {"events": [{"kind": "preview", "sha": ...,
// "width", "height"} | {"kind": "executed", "node"} | {"kind": "done", "status"}], "console_errors"}
// in the order the page saw them; "done" is execution_success / execution_error /
// execution_interrupted. The pytest test (tests/test_browser.py) asserts on it.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

async function main() {
  const profile = mkdtempSync(join(tmpdir(), "tlora-chromium-"));
  const consoleErrors = [];
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: job.chromium, headless: true, args: FLAGS, viewport: { width: 1600, height: 1000 },
  });
  await context.addInitScript(() => window.localStorage.setItem("vueNodesBannerDismissed", "true"));
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (msg) => { if (msg.type() === "error") consoleErrors.push(msg.text().slice(0, 300)); });
    page.on("pageerror", (err) => consoleErrors.push(`pageerror: ${String(err).slice(0, 300)}`));
    await page.goto(job.url, { waitUntil: "domcontentloaded", timeout: 60000 });
    await page.waitForFunction(() => window.app && window.app.api && window.app.api.clientId, null,
      { timeout: 90000 });
    const events = await page.evaluate(async ({ prompt, timeoutMs }) => {
      const api = window.app.api;
      const events = [];
      let finish;
      const finished = new Promise((resolve) => { finish = resolve; });
      // Each preview blob as the page gets it: a digest (to tell images apart) and its size.
      let pending = Promise.resolve();
      const onPreview = (blob) => {
        pending = pending.then(async () => {
          const bytes = await blob.arrayBuffer();
          const digest = Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)))
            .map((b) => b.toString(16).padStart(2, "0")).join("");
          const bitmap = await createImageBitmap(blob);
          events.push({ kind: "preview", sha: digest, width: bitmap.width, height: bitmap.height });
        });
      };
      api.addEventListener("b_preview", ({ detail }) => onPreview(detail));
      api.addEventListener("executed", ({ detail }) => {
        pending = pending.then(() => events.push({ kind: "executed", node: String(detail.node) }));
      });
      for (const status of ["execution_success", "execution_error", "execution_interrupted"]) {
        api.addEventListener(status, () => {
          pending = pending.then(() => { events.push({ kind: "done", status }); finish(); });
        });
      }
      const response = await fetch("/prompt", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ prompt, client_id: api.clientId }),
      });
      if (!response.ok) return [{ kind: "done", status: `rejected ${response.status}: ${await response.text()}` }];
      await Promise.race([finished, new Promise((resolve) => setTimeout(resolve, timeoutMs))]);
      await pending;
      return events;
    }, { prompt: job.prompt, timeoutMs: job.timeout_ms || 240000 });
    process.stdout.write(JSON.stringify({ events, console_errors: consoleErrors }));
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
