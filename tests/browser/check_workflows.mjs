// Loads workflows into ComfyUI's real web UI in headless Chromium and reports what the UI made of them.
//
// Usage: node check_workflows.mjs <job.json>
// job.json: {"url": "http://127.0.0.1:PORT", "chromium": "/usr/bin/chromium", "outdir": "...",
//            "workflows": [{"name": "...", "path": "..."}], "closeups": {"NodeType": "workflow name"},
//            "width": 1920, "height": 1200, "canary": true}
// Saves <outdir>/<workflow name>.png (whole graph) and <outdir>/node_<NodeType>.png (that node at
// 100% zoom, from the named workflow).
// Prints one JSON object on stdout: {"ready_ms", "workflows": [{name, nodes, serialized, api_prompt,
// dialogs, error_toasts, screenshot, closeups}], "canary", "console_errors"}.
// "canary" (when the job asks for it, after the workflows): what the same checks report for a graph
// with a node type nobody registers and for an error toast the page raises itself, so the test can
// tell "nothing reported" from "looked in the wrong place" on this frontend.
// The pytest test (tests/test_browser.py) starts the server, runs this, and asserts on the report.
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

// Everything the page is asked is plain data, so the report is JSON-serialisable.
async function describeGraph(page) {
  return page.evaluate(async () => {
    const app = window.app;
    const nodes = app.graph.nodes.map((node) => ({
      id: node.id,
      type: node.type,
      registered: node.type in window.LiteGraph.registered_node_types,
      has_errors: Boolean(node.has_errors),
      size: Array.from(node.size),
      widgets: (node.widgets || []).map((w) => ({ name: w.name, type: w.type, value: w.value })),
      inputs: (node.inputs || []).map((slot) => ({ name: slot.name, type: slot.type, link: slot.link })),
    }));
    const prompt = await app.graphToPrompt();
    return { nodes, serialized: app.graph.serialize(), api_prompt: prompt.output };
  });
}

// Dialogs and the notices that replace them: the 1.32 frontend opens a dialog for missing nodes
// (.p-dialog, role=dialog); the 1.49 frontend shows a card over the canvas instead (role=status,
// "Missing node: ..." / "N errors found"). Toasts are reported apart (errorToasts).
async function visibleDialogs(page) {
  return page.evaluate(() => {
    const found = Array.from(document.querySelectorAll(
      ".p-dialog, [role=dialog], [role=alertdialog], [role=status]"))
      .filter((el) => el.offsetParent !== null && !el.closest(".p-toast"));
    return found.filter((el) => !found.some((other) => other !== el && other.contains(el)))
      .map((el) => el.innerText.slice(0, 500));
  });
}

async function errorToasts(page) {
  return page.evaluate(() => Array.from(document.querySelectorAll(".p-toast-message-error"))
    .map((el) => el.innerText.slice(0, 500)));
}

// Where the canvas is not covered by the side bar and the top bar, in canvas pixels.
const FREE = { left: 80, top: 130, right: 30, bottom: 30 };

async function settle(page) {
  await page.evaluate(() => new Promise((resolve) => {
    window.app.canvas.setDirty(true, true);
    requestAnimationFrame(() => requestAnimationFrame(resolve));
  }));
}

// Zooms so the whole graph fills the free part of the canvas (tighter than the UI's own fitView).
async function fitGraph(page) {
  await page.evaluate((free) => {
    const app = window.app;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    const boxes = app.graph.nodes.map((n) => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    const x0 = Math.min(...boxes.map((b) => b[0]));
    const y0 = Math.min(...boxes.map((b) => b[1]));
    const x1 = Math.max(...boxes.map((b) => b[2]));
    const y1 = Math.max(...boxes.map((b) => b[3]));
    const rect = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min((rect.width - free.left - free.right) / (x1 - x0),
      (rect.height - free.top - free.bottom) / (y1 - y0), 1);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [free.left / scale - x0, free.top / scale - y0];
  }, FREE);
  await settle(page);
}

// Puts one node at 100% zoom in the free part of the canvas and returns its screen rectangle.
async function focusNode(page, nodeType) {
  const clip = await page.evaluate(({ type, free }) => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => n.type === type);
    if (!node) return null;
    const title = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    app.canvas.ds.scale = 1;
    app.canvas.ds.offset = [free.left + 20 - node.pos[0], free.top + 20 + title - node.pos[1]];
    const rect = app.canvas.canvas.getBoundingClientRect();
    return { x: rect.left + free.left, y: rect.top + free.top, width: node.size[0] + 40, height: node.size[1] + title + 40 };
  }, { type: nodeType, free: FREE });
  if (clip) await settle(page);
  return clip;
}

const CANARY_TYPE = "TLoRATestNoSuchNode";

// What the checks report for faults they must see: a node type nobody registers, and an error toast.
async function checkCanary(page) {
  const graph = { last_node_id: 1, last_link_id: 0, links: [], groups: [], config: {}, extra: {}, version: 0.4,
    nodes: [{ id: 1, type: CANARY_TYPE, pos: [200, 200], size: [300, 100], flags: {}, order: 0, mode: 0,
      inputs: [], outputs: [], properties: {}, widgets_values: [] }] };
  await page.evaluate(async (g) => { await window.app.loadGraphData(g, true, true, "canary"); }, graph);
  await page.waitForTimeout(1000);
  const dialogs = await visibleDialogs(page);
  const described = await page.evaluate(() => window.app.graph.nodes.map((node) => ({
    type: node.type, registered: node.type in window.LiteGraph.registered_node_types })));
  await page.evaluate(() => window.app.extensionManager.toast.add({
    severity: "error", summary: "T-LoRA test canary", detail: "an error toast raised by the test", life: 60000 }));
  await page.waitForTimeout(500);
  const toasts = await errorToasts(page);
  return { type: CANARY_TYPE, dialogs, error_toasts: toasts, nodes: described };
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), "tlora-chromium-"));
  const consoleErrors = [];
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: job.chromium, headless: true, args: FLAGS,
    viewport: { width: job.width || 1600, height: job.height || 1000 },
  });
  // A returning user's state: the "try the new node renderer" banner dismissed.
  await context.addInitScript(() => window.localStorage.setItem("vueNodesBannerDismissed", "true"));
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.on("console", (msg) => { if (msg.type() === "error") consoleErrors.push(msg.text().slice(0, 300)); });
    page.on("pageerror", (err) => consoleErrors.push(`pageerror: ${String(err).slice(0, 300)}`));
    const started = Date.now();
    await page.goto(job.url, { waitUntil: "domcontentloaded", timeout: 60000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas
      && window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 100,
    null, { timeout: 90000 });
    const readyMs = Date.now() - started;
    // Close whatever the first start opens (templates browser, release notes) before loading.
    await page.keyboard.press("Escape");
    const results = [];
    for (const wf of job.workflows) {
      const graph = JSON.parse(readFileSync(wf.path, "utf8"));
      await page.evaluate(async ({ g, name }) => {
        await window.app.loadGraphData(g, true, true, name);
      }, { g: graph, name: wf.name });
      // Let the canvas lay out and draw the nodes (and the UI's own fitView run) before fitting.
      await page.waitForTimeout(1000);
      await fitGraph(page);
      const dialogs = await visibleDialogs(page);
      const toasts = await errorToasts(page);
      const screenshot = join(job.outdir, `${wf.name}.png`);
      await page.screenshot({ path: screenshot });
      const described = await describeGraph(page);
      const closeups = {};
      for (const [type, source] of Object.entries(job.closeups || {})) {
        if (source !== wf.name) continue;
        const clip = await focusNode(page, type);
        if (!clip) continue;
        closeups[type] = join(job.outdir, `node_${type}.png`);
        await page.screenshot({ path: closeups[type], clip });
      }
      results.push({ name: wf.name, dialogs, error_toasts: toasts, screenshot, closeups, ...described });
      for (let i = 0; i < dialogs.length; i += 1) await page.keyboard.press("Escape");
    }
    const canary = job.canary ? await checkCanary(page) : null;
    process.stdout.write(JSON.stringify({ ready_ms: readyMs, workflows: results, canary, console_errors: consoleErrors }));
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
