// Drives ComfyUI's real frontend in headless Chromium (Debian's /usr/bin/chromium) with playwright-core, for
// tests/test_browser.py. No browser download: playwright-core only talks to the Chromium given.
//
//   node tests/browser/drive.mjs JOB.json
//
// JOB.json: {"url": "http://127.0.0.1:PORT", "task": "training" | "synthetic" | "scores" | "graphs", "out_dir": "...",
//            "width"/"height": viewport (default 1400x900),
//            training:  "workflow": {UI workflow}, "node_type": "FinetuneTrainLoRA", "widgets": {"steps": 12, ...},
//                       "timeout_s": 240, "live_at_step": take the mid-run screenshot from this step on
//            synthetic: "workflow", "node_type", "events": how many fake progress events to dispatch
//            scores:    "workflow", "node_type", "events": [[type, detail], ...] (a scored run, dispatched in order,
//                       the node's ids added), "new_run_events": the same, dispatched after the reload
//            graphs:    "graphs": [{"name", "nodes", "links"}] as in tests/browser/bridge_graphs.json}
// Environment: PLAYWRIGHT_CORE_DIR (default /work/browser-tools/node_modules/playwright-core), CHROMIUM
// (default /usr/bin/chromium). Screenshots go to out_dir; the last line printed is a JSON result.
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE_DIR || "/work/browser-tools/node_modules/playwright-core");
const VIEW = { width: job.width ?? 1400, height: job.height ?? 900 };
const result = { task: job.task, console_errors: [], page_errors: [], screenshots: [] };

function log(...args) {
  process.stderr.write(`[drive] ${args.join(" ")}\n`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--use-gl=swiftshader"],
});
try {
  const page = await browser.newPage({ viewport: VIEW, deviceScaleFactor: 1 });
  page.on("console", (msg) => {
    if (msg.type() === "error") result.console_errors.push(msg.text());
  });
  page.on("pageerror", (err) => result.page_errors.push(String(err?.stack ?? err)));
  await page.goto(job.url, { waitUntil: "domcontentloaded" });
  // the app is up when the graph exists and our extension has been registered
  await page.waitForFunction(
    () => {
      const app = window.comfyAPI?.app?.app;
      return !!(app?.graph && app.canvas && window.LiteGraph?.registered_node_types?.FinetuneTrainLoRA);
    },
    null,
    { timeout: 120000 },
  );
  await page.waitForTimeout(1500); // let startup dialogs and the default workflow settle
  await page.keyboard.press("Escape");
  result.extensions = await page.evaluate(() =>
    (window.comfyAPI.app.app.extensions ?? []).map((e) => e.name).filter((n) => n.startsWith("comfy_finetune")),
  );

  if (job.task === "training") await training(page);
  else if (job.task === "graphs") await graphs(page);
  else if (job.task === "synthetic") await synthetic(page);
  else if (job.task === "scores") await scores(page);
  else throw new Error(`unknown task ${job.task}`);
} catch (err) {
  result.error = String(err?.stack ?? err);
} finally {
  await browser.close();
}
writeFileSync(join(job.out_dir, "result.json"), JSON.stringify(result, null, 1));
console.log(JSON.stringify(result));

// --------------------------------------------------------------------------------------------- helpers
async function focusNodes(page, ids, margin = 30) {
  // zoom and pan so that the nodes fill the visible canvas (scale at most 1); returns the clip rectangle
  return await page.evaluate(
    ({ ids, margin, view }) => {
      const app = window.comfyAPI.app.app;
      const canvas = app.canvas;
      const title = window.LiteGraph.NODE_TITLE_HEIGHT;
      const nodes = ids.map((id) => app.graph.getNodeById(id));
      let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
      for (const n of nodes) {
        const r = n.boundingRect ?? [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title];
        x0 = Math.min(x0, r[0]);
        y0 = Math.min(y0, r[1] - 24); // room for the node source badge above the title
        x1 = Math.max(x1, r[0] + r[2] + 12);
        y1 = Math.max(y1, r[1] + r[3]);
      }
      const rect = canvas.canvas.getBoundingClientRect();
      const top = Math.max(rect.top, 50); // below the top menu bar
      const left = Math.max(rect.left, 0);
      const right = Math.min(rect.right, view.width);
      const bottom = Math.min(rect.bottom, view.height);
      const scale = Math.min(1, (right - left - 2 * margin) / (x1 - x0), (bottom - top - 2 * margin) / (y1 - y0));
      canvas.ds.scale = scale;
      canvas.ds.offset[0] = (left - rect.left + margin) / scale - x0;
      canvas.ds.offset[1] = (top - rect.top + margin) / scale - y0;
      canvas.setDirty(true, true);
      canvas.draw(true, true);
      return {
        x: left + margin / 2,
        y: top + margin / 2,
        width: Math.min(right - left - margin, (x1 - x0) * scale + margin),
        height: Math.min(bottom - top - margin, (y1 - y0) * scale + margin),
      };
    },
    { ids, margin, view: VIEW },
  );
}

async function focusView(page, nodeId, scale = 1.5) {
  // the training view widget of the node, enlarged; returns the clip rectangle
  return await page.evaluate(
    ({ nodeId, scale }) => {
      const app = window.comfyAPI.app.app;
      const canvas = app.canvas;
      const node = app.graph.getNodeById(nodeId);
      const widget = node.widgets.find((w) => w.name === "ft_training_view");
      const wy = widget.last_y ?? widget.y ?? 0;
      const height = widget.computeSize(node.size[0])[1];
      const left = 80;
      const top = 80;
      canvas.ds.scale = scale;
      canvas.ds.offset[0] = left / scale - node.pos[0];
      canvas.ds.offset[1] = top / scale - (node.pos[1] + wy);
      canvas.setDirty(true, true);
      canvas.draw(true, true);
      const rect = canvas.canvas.getBoundingClientRect();
      return {
        x: rect.left + left - 6,
        y: rect.top + top - 6,
        width: node.size[0] * scale + 12,
        height: height * scale + 12,
      };
    },
    { nodeId, scale },
  );
}

async function shoot(page, name, clip) {
  await page.waitForTimeout(250);
  const path = join(job.out_dir, name);
  await page.screenshot({ path, clip });
  result.screenshots.push(path);
}

// --------------------------------------------------------------------------------------------- training
async function training(page) {
  const setup = await page.evaluate(
    async ({ workflow, nodeType, widgets }) => {
      const app = window.comfyAPI.app.app;
      const api = window.comfyAPI.api.api;
      await app.loadGraphData(workflow);
      const node = app.graph.nodes.find((n) => n.type === nodeType);
      if (!node) return { error: `no ${nodeType} node in the workflow` };
      for (const [name, value] of Object.entries(widgets)) {
        const w = node.widgets.find((x) => x.name === name);
        if (!w) return { error: `${nodeType} has no widget ${name}` };
        w.value = value;
      }
      const seen = { train: [], previews: [], hostPreviews: [], done: null, error: null };
      window.__ftSeen = seen;
      api.addEventListener("comfy_finetune.train", (e) => seen.train.push(e.detail));
      api.addEventListener("comfy_finetune.train_preview", (e) =>
        seen.previews.push({ ...e.detail, image: e.detail.image?.slice(0, 30), chars: e.detail.image?.length }),
      );
      api.addEventListener("b_preview_with_metadata", (e) => seen.hostPreviews.push(String(e.detail.displayNodeId)));
      api.addEventListener("execution_success", () => (seen.done = "success"));
      api.addEventListener("execution_error", (e) => {
        seen.done = "error";
        seen.error = e.detail;
      });
      api.addEventListener("execution_interrupted", () => (seen.done = "interrupted"));
      const view = node.widgets.find((w) => w.name === "ft_training_view");
      app.canvas.draw(true, true);
      const before = app.graph.serialize().nodes.find((n) => n.id === node.id);
      return { node_id: node.id, has_view_widget: !!view, view_serialized: view ? view.serialize !== false : null,
               saved_before_training: before?.properties?.ft_training ?? null };
    },
    { workflow: job.workflow, nodeType: job.node_type, widgets: job.widgets ?? {} },
  );
  Object.assign(result, setup);
  if (setup.error) return;
  const nodeId = setup.node_id;
  const clip = await focusNodes(page, [nodeId]);
  await shoot(page, "training-before.png", clip);

  const t0 = Date.now();
  await page.evaluate(() => window.comfyAPI.app.app.queuePrompt(0, 1));
  const steps = job.widgets?.steps ?? 0;
  let midShot = false;
  while (Date.now() - t0 < (job.timeout_s ?? 240) * 1000) {
    const s = await page.evaluate(() => ({
      n: window.__ftSeen.train.length,
      previews: window.__ftSeen.previews.length,
      done: window.__ftSeen.done,
    }));
    if (!midShot && s.previews > 0 && s.n >= (job.live_at_step ?? 0) && s.n < steps) {
      await shoot(page, "training-live.png", await focusView(page, nodeId));
      midShot = true;
    }
    if (s.done) break;
    await page.waitForTimeout(200);
  }
  result.seconds = (Date.now() - t0) / 1000;
  await page.waitForTimeout(500);
  await shoot(page, "training-after.png", await focusNodes(page, [nodeId]));
  await shoot(page, "training-view.png", await focusView(page, nodeId));

  Object.assign(
    result,
    await page.evaluate((nodeId) => {
      const app = window.comfyAPI.app.app;
      const seen = window.__ftSeen;
      const node = app.graph.getNodeById(nodeId);
      const stored = node.properties?.ft_training;
      const serialized = app.graph.serialize().nodes.find((n) => n.id === nodeId);
      return {
        done: seen.done,
        execution_error: seen.error,
        events: seen.train,
        preview_events: seen.previews,
        host_previews: seen.hostPreviews,
        live_points: node.__ftTraining?.points?.length ?? 0,
        live_info: node.__ftTraining?.info ?? null,
        preview_drawn: !!(node.__ftTraining?.image?.complete && node.__ftTraining.image.naturalWidth),
        stored_points: stored?.points?.length ?? 0,
        stored_preview: typeof stored?.preview === "string" ? stored.preview.slice(0, 23) : null,
        serialized_points: serialized?.properties?.ft_training?.points ?? null,
        serialized_widgets_values: serialized?.widgets_values ?? null,
        node_size: [...node.size],
      };
    }, nodeId),
  );

  // reload the saved workflow: the chart comes back from the workflow alone
  const reloaded = await page.evaluate(async (nodeId) => {
    const app = window.comfyAPI.app.app;
    const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
    await app.loadGraphData({ ...saved });
    await new Promise((r) => setTimeout(r, 300));
    const node = app.graph.getNodeById(nodeId);
    app.canvas.draw(true, true); // drawing reads the saved series back into the view
    return {
      points: node.properties?.ft_training?.points?.length ?? 0,
      view_points: node.__ftTraining?.points?.length ?? 0,
      info: node.__ftTraining?.info ?? null,
      has_view_widget: !!node.widgets.find((w) => w.name === "ft_training_view"),
    };
  }, nodeId);
  result.reloaded = reloaded;
  await page.waitForTimeout(300);
  await shoot(page, "training-reloaded.png", await focusView(page, nodeId));
}

// --------------------------------------------------------------------------------------------- graphs
async function graphs(page) {
  result.graphs = [];
  for (const spec of job.graphs) {
    const made = await page.evaluate(async (spec) => {
      const app = window.comfyAPI.app.app;
      const LiteGraph = window.LiteGraph;
      app.graph.clear();
      const byKey = {};
      const problems = [];
      for (const n of spec.nodes) {
        const node = LiteGraph.createNode(n.type);
        if (!node) {
          problems.push(`unknown node type ${n.type}`);
          continue;
        }
        node.pos = [0, 0];
        if (n.title) node.title = n.title;
        for (const [name, value] of Object.entries(n.widgets ?? {})) {
          const w = node.widgets?.find((x) => x.name === name);
          if (w) w.value = value;
          else problems.push(`${n.type} has no widget ${name}`);
        }
        app.graph.add(node);
        if (n.size) node.setSize([Math.max(n.size[0], node.size[0]), Math.max(n.size[1] ?? 0, node.size[1])]);
        if (n.collapsed) node.collapse(true);
        byKey[n.key] = node;
      }
      const links = [];
      for (const [from, output, to, input] of spec.links) {
        const a = byKey[from];
        const b = byKey[to];
        if (!a || !b) continue;
        const out = a.outputs.findIndex((o) => o.name === output);
        const inp = b.inputs.findIndex((i) => i.name === input);
        const link = out >= 0 && inp >= 0 ? a.connect(out, b, inp) : null;
        links.push({ from: `${a.type}.${output}`, to: `${b.type}.${input}`, linked: !!link,
                     type: out >= 0 ? a.outputs[out].type : null });
      }
      // lay the nodes out in columns ("col"), stacked in the order given, with their real sizes
      app.canvas.draw(true, true);
      const title = LiteGraph.NODE_TITLE_HEIGHT;
      const columns = [];
      for (const n of spec.nodes) {
        if (byKey[n.key]) (columns[n.col ?? 0] ??= []).push(byKey[n.key]);
      }
      let x = 0;
      for (const column of columns) {
        if (!column) continue;
        let y = title;
        let width = 0;
        for (const node of column) {
          node.pos = [x, y];
          const r = node.boundingRect;
          y += r[3] + (node.collapsed ? 46 : 36);
          width = Math.max(width, r[2]);
        }
        x += width + 60;
      }
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      return { name: spec.name, ids: Object.values(byKey).map((n) => n.id), links, problems };
    }, spec);
    await page.waitForTimeout(300);
    const clip = await focusNodes(page, made.ids, 20);
    await shoot(page, `${spec.name}.png`, clip);
    delete made.ids;
    result.graphs.push(made);
  }
}

// --------------------------------------------------------------------------------------------- synthetic events
// Events as the server sends them, dispatched on the frontend's api object: routing by node id between two
// training nodes, decimation of a long run, a NaN rollback, a new run replacing the old series.
async function synthetic(page) {
  Object.assign(
    result,
    await page.evaluate(
      async ({ workflow, nodeType, n }) => {
        const app = window.comfyAPI.app.app;
        const api = window.comfyAPI.api.api;
        await app.loadGraphData(workflow);
        const first = app.graph.nodes.find((x) => x.type === nodeType);
        const second = window.LiteGraph.createNode(nodeType);
        second.pos = [first.pos[0] + first.size[0] + 100, first.pos[1]];
        app.graph.add(second);
        const send = (type, detail) => api.dispatchCustomEvent(type, detail);
        const ids = (node) => ({ node: nodeType, node_id: String(node.id), display_node: String(node.id) });
        for (let step = 1; step <= n; step++) {
          send("comfy_finetune.train", { ...ids(second), step, steps: n, loss: 1 / step, lr: 1e-4,
                                          images_per_second: 2.5, eta_seconds: n - step });
        }
        const out = {
          first_points: first.__ftTraining?.points?.length ?? 0,
          second_live_points: second.__ftTraining.points.length,
        };
        send("comfy_finetune.train_rollback", { ...ids(second), step: n, to_step: n - 50, lr_scale: 0.5 });
        out.after_rollback = second.__ftTraining.points.length;
        const saved = app.graph.serialize().nodes.find((x) => x.id === second.id).properties.ft_training.points;
        out.saved_count = saved.length;
        out.saved_first = saved[0];
        out.saved_last = saved[saved.length - 1];
        out.saved_steps_increasing = saved.every((p, i) => i === 0 || p[0] > saved[i - 1][0]);
        // a new run on the same node replaces the series
        send("comfy_finetune.train", { ...ids(second), step: 1, steps: 10, loss: 0.5, lr: 1e-4,
                                        images_per_second: 1, eta_seconds: 9 });
        out.new_run_points = second.__ftTraining.points.length;
        // an event with no ids goes to the only node of that class when there is one: here two, so nowhere
        send("comfy_finetune.train", { node: nodeType, step: 2, steps: 10, loss: 0.4, lr: 1e-4 });
        const firstPoints = first.__ftTraining?.points?.length ?? 0;
        out.ambiguous_ignored = second.__ftTraining.points.length === 1 && firstPoints === 0;
        app.graph.remove(second);
        send("comfy_finetune.train", { node: nodeType, step: 1, steps: 10, loss: 0.4, lr: 1e-4 });
        out.single_node_fallback = first.__ftTraining?.points?.length ?? 0;
        return out;
      },
      { workflow: job.workflow, nodeType: job.node_type, n: job.events ?? 1000 },
    ),
  );
}

// --------------------------------------------------------------------------------------------- synthetic scores
// A scored run as the server sends it (loss events and comfy_finetune.train_score events), dispatched on the
// frontend's api object: the score series reach the node and its saved properties, the view grows by the score band,
// the header names the best step, the band is drawn, the series survive a save and reload, and a new run's step-0
// score clears the old scores.
async function scores(page) {
  const setup = await page.evaluate(
    async ({ workflow, nodeType }) => {
      const app = window.comfyAPI.app.app;
      await app.loadGraphData(workflow);
      const node = app.graph.nodes.find((n) => n.type === nodeType);
      if (!node) return { error: `no ${nodeType} node in the workflow` };
      const copy = (v) => (v === undefined ? null : JSON.parse(JSON.stringify(v)));
      // the node's view as laid out and drawn now
      window.__ftLayout = (nodeId) => {
        const node = app.graph.getNodeById(nodeId);
        const widget = node.widgets?.find((w) => w.name === "ft_training_view");
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true); // lays the widgets out (their y) and reads a reloaded series back into the view
        const view = node.__ftTraining;
        const seriesLengths = (scores) =>
          scores ? Object.fromEntries(Object.entries(scores).map(([k, v]) => [k, v.length])) : null;
        return {
          node_size: [...node.size],
          widget_height: widget ? widget.computeSize(node.size[0])[1] : null,
          widget_y: widget ? (widget.last_y ?? widget.y ?? null) : null,
          view_points: view?.points?.length ?? 0,
          view_scores: seriesLengths(view?.scores),
          view_score_info: copy(view?.scoreInfo),
          stored: copy(node.properties?.ft_training), // stored on the node (loss steps: at most once a second)
          // as saved in the workflow
          saved: copy(app.graph.serialize().nodes.find((n) => n.id === nodeId)?.properties?.ft_training),
        };
      };
      // the texts the canvas draws in one frame (the view draws its header with fillText)
      window.__ftDrawnTexts = () => {
        const proto = CanvasRenderingContext2D.prototype;
        const fillText = proto.fillText;
        const texts = [];
        proto.fillText = function (text, ...rest) {
          texts.push(String(text));
          return fillText.call(this, text, ...rest);
        };
        try {
          app.canvas.setDirty(true, true);
          app.canvas.draw(true, true);
        } finally {
          proto.fillText = fillText;
        }
        return texts;
      };
      // dispatch [type, detail] events as the server's, with the node's ids; the layout after the first score event
      window.__ftDispatch = (nodeId, events) => {
        const api = window.comfyAPI.api.api;
        const node = app.graph.getNodeById(nodeId);
        const ids = { node: node.type, node_id: String(nodeId), display_node: String(nodeId) };
        let afterFirstScore = null;
        for (const [type, detail] of events) {
          api.dispatchCustomEvent(type, { ...ids, ...detail });
          if (!afterFirstScore && type === "comfy_finetune.train_score") afterFirstScore = window.__ftLayout(nodeId);
        }
        return afterFirstScore;
      };
      return { node_id: node.id };
    },
    { workflow: job.workflow, nodeType: job.node_type },
  );
  Object.assign(result, setup);
  if (setup.error) return;
  const nodeId = setup.node_id;
  const layout = () => page.evaluate((id) => window.__ftLayout(id), nodeId);

  result.before = await layout();
  await shoot(page, "scores-before.png", await focusView(page, nodeId));

  result.after_first_score = await page.evaluate(({ id, events }) => window.__ftDispatch(id, events),
                                                 { id: nodeId, events: job.events });
  result.after_run = await layout();
  await shoot(page, "scores-node.png", await focusNodes(page, [nodeId]));
  const clip = await focusView(page, nodeId);
  result.after_run.texts = await page.evaluate(() => window.__ftDrawnTexts());
  await shoot(page, "scores-view.png", clip);

  // save the workflow and load it again: the scores come back from the workflow alone
  result.serialized = await page.evaluate(async (id) => {
    const app = window.comfyAPI.app.app;
    const saved = JSON.parse(JSON.stringify(app.graph.serialize()));
    const node = saved.nodes.find((n) => n.id === id);
    await app.loadGraphData({ ...saved });
    await new Promise((r) => setTimeout(r, 300));
    return { ft_training: node?.properties?.ft_training ?? null, size: node?.size ?? null };
  }, nodeId);
  result.reloaded = await layout();
  await page.waitForTimeout(300);
  const reloadedClip = await focusView(page, nodeId);
  result.reloaded.texts = await page.evaluate(() => window.__ftDrawnTexts());
  await shoot(page, "scores-reloaded.png", reloadedClip);

  // a new run on the reloaded node: its score before training clears the old series
  await page.evaluate(({ id, events }) => window.__ftDispatch(id, events), { id: nodeId, events: job.new_run_events });
  result.new_run = await layout();
  const newRunClip = await focusView(page, nodeId);
  result.new_run.texts = await page.evaluate(() => window.__ftDrawnTexts());
  await shoot(page, "scores-new-run.png", newRunClip);
}
