// comfyui-finetune: live training view on the training nodes (FinetuneTrainLoRA, LearnEmbedding, DreamBoothTrain).
//
// Fed by the events the Python side sends through host.send_event while a node trains:
//   comfy_finetune.train          {node, node_id, display_node, step, steps, loss, lr, images_per_second, eta_seconds}
//   comfy_finetune.train_preview  {node, node_id, display_node, step, steps, image (data:image/jpeg;base64), ...}
//   comfy_finetune.train_rollback {node, node_id, display_node, step, to_step, ...}   (NaN rollback)
// it draws, on the node itself (a canvas-drawn widget, so it shows at every zoom level and in screenshots):
// a text line (step/steps, loss, lr, images/s, ETA), the raw loss points with an exponentially smoothed line
// (step on x), and the latest validation samples.
//
// The loss series (decimated to at most MAX_STORED_POINTS points), the last figures and the last preview are kept in
// node.properties.ft_training, so they stay on the node after the run and are saved with the workflow; loading the
// workflow redraws them. The view widget itself is never serialized (widgets_values keep their positions).
//
// Only window.comfyAPI is used (no deep imports); every hooked node method calls the previous one.
const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

// Old node ids of training nodes (kept loadable for saved workflows, hidden from search) -> the current id, which
// the events name.
const RENAMED = new Map([["TrainLoRA", "FinetuneTrainLoRA"]]);
const TRAINING_NODES = new Set(["FinetuneTrainLoRA", "LearnEmbedding", "DreamBoothTrain", ...RENAMED.keys()]);
const PROPERTY = "ft_training";
const WIDGET = "ft_training_view";
const MAX_STORED_POINTS = 300;
const MAX_LIVE_POINTS = 20000;
const MAX_STORED_PREVIEW_CHARS = 96 * 1024;
const SMOOTHING = 0.9;
const STORE_EVERY_MS = 1000;
const VIEW_HEIGHT = 170;
const HEADER_HEIGHT = 18;
const MARGIN = 10;
const RAW_COLOR = "rgba(120, 170, 255, 0.8)";
const SMOOTH_COLOR = "#ffa940";

// ------------------------------------------------------------------------------------------------ data
/** At most `max` points of `points`, evenly spread, keeping the first and the last. */
export function decimate(points, max = MAX_STORED_POINTS) {
  if (points.length <= max) return points.slice();
  const out = [];
  const stride = (points.length - 1) / (max - 1);
  for (let i = 0; i < max; i++) out.push(points[Math.round(i * stride)]);
  return out;
}

/** Exponential moving average of the losses, debiased at the start (as TensorBoard draws it). */
export function smooth(points, beta = SMOOTHING) {
  let avg = 0;
  return points.map(([step, loss], i) => {
    avg = beta * avg + (1 - beta) * loss;
    return [step, avg / (1 - Math.pow(beta, i + 1))];
  });
}

function state(node) {
  if (!node.__ftTraining) {
    const saved = node.properties?.[PROPERTY];
    node.__ftTraining = {
      points: Array.isArray(saved?.points) ? saved.points.filter((p) => Array.isArray(p) && p.length === 2) : [],
      info: saved?.info && typeof saved.info === "object" ? { ...saved.info } : null,
      preview: typeof saved?.preview === "string" ? saved.preview : null,
      previewStep: saved?.preview_step ?? null,
      image: null,
      storedAt: 0,
    };
  }
  return node.__ftTraining;
}

function stored(view) {
  const out = { points: decimate(view.points), info: view.info };
  if (view.preview && view.preview.length <= MAX_STORED_PREVIEW_CHARS) {
    out.preview = view.preview;
    out.preview_step = view.previewStep;
  }
  return out;
}

function store(node, force = false) {
  const view = state(node);
  const now = Date.now();
  if (!force && now - view.storedAt < STORE_EVERY_MS) return;
  view.storedAt = now;
  node.properties ??= {};
  node.properties[PROPERTY] = stored(view);
}

function previewImage(view, node) {
  if (!view.preview) return null;
  if (!view.image || view.image.__src !== view.preview) {
    const image = new Image();
    image.__src = view.preview;
    image.onload = () => node.setDirtyCanvas?.(true, true);
    image.src = view.preview;
    view.image = image;
  }
  return view.image.complete && view.image.naturalWidth ? view.image : null;
}

// ------------------------------------------------------------------------------------------------ finding the node
let executing = null; // the id ComfyUI says is running (fallback for events without ids)

function isTrainingNode(node) {
  return !!node && TRAINING_NODES.has(node.comfyClass ?? node.type);
}

function nodeByExecutionId(id) {
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const part of String(id).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(part) ?? graph.getNodeById(Number(part));
    graph = node?.subgraph;
  }
  return node;
}

function nodeFor(detail) {
  for (const id of [detail?.display_node, detail?.node_id, executing]) {
    if (id === null || id === undefined) continue;
    const node = nodeByExecutionId(id);
    if (isTrainingNode(node)) return node;
  }
  const graph = app.rootGraph ?? app.graph;
  const same = (graph?.nodes ?? graph?._nodes ?? []).filter((n) => {
    const type = n.comfyClass ?? n.type;
    return (RENAMED.get(type) ?? type) === detail?.node;
  });
  return same.length === 1 ? same[0] : null;
}

function redraw(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

function onTrain(detail) {
  const node = nodeFor(detail);
  const step = Number(detail?.step);
  const loss = Number(detail?.loss);
  if (!node || !Number.isFinite(step) || !Number.isFinite(loss)) return;
  ensureView(node);
  const view = state(node);
  const last = view.points.length ? view.points[view.points.length - 1][0] : 0;
  if (step <= last) {
    // a new run (a resumed one continues after the last step and is simply appended)
    view.points = [];
    view.preview = null;
    view.previewStep = null;
  }
  view.points.push([step, loss]);
  if (view.points.length > MAX_LIVE_POINTS) view.points = decimate(view.points, MAX_LIVE_POINTS / 2);
  view.info = {
    step,
    steps: Number(detail.steps) || step,
    loss,
    lr: Number(detail.lr),
    images_per_second: Number(detail.images_per_second),
    eta_seconds: Number(detail.eta_seconds),
  };
  store(node, step >= view.info.steps);
  redraw(node);
}

function onPreview(detail) {
  const node = nodeFor(detail);
  if (!node || typeof detail?.image !== "string" || !detail.image.startsWith("data:image/")) return;
  ensureView(node);
  const view = state(node);
  view.preview = detail.image;
  view.previewStep = detail.step ?? null;
  store(node, true);
  redraw(node);
}

function onRollback(detail) {
  const node = nodeFor(detail);
  if (!node) return;
  const view = state(node);
  const to = Number(detail?.to_step);
  if (Number.isFinite(to)) view.points = view.points.filter(([s]) => s <= to);
  store(node, true);
  redraw(node);
}

// ------------------------------------------------------------------------------------------------ drawing
function fmt(v, digits = 4) {
  if (!Number.isFinite(v)) return "-";
  if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e4)) return v.toExponential(1);
  return Number(v.toPrecision(digits)).toString();
}

function fmtTime(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "-";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const pad = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
}

function headerText(info) {
  if (!info) return "loss chart: queue the workflow to train";
  return [
    `step ${info.step}/${info.steps}`,
    `loss ${fmt(info.loss)}`,
    `lr ${fmt(info.lr, 3)}`,
    `${fmt(info.images_per_second, 3)} img/s`,
    info.step >= info.steps ? "done" : `ETA ${fmtTime(info.eta_seconds)}`,
  ].join("  ·  ");
}

function drawChart(ctx, points, steps, x, y, w, h) {
  ctx.fillStyle = "#161616";
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
  if (!points.length) return;
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, v] of points) {
    lo = Math.min(lo, v);
    hi = Math.max(hi, v);
  }
  const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.1 || 1;
  lo -= pad;
  hi += pad;
  const x0 = Math.min(points[0][0], 1);
  const x1 = Math.max(steps || 0, points[points.length - 1][0], x0 + 1);
  const inner = { x: x + 4, y: y + 4, w: w - 8, h: h - 8 };
  const px = (s) => inner.x + ((s - x0) / (x1 - x0)) * inner.w;
  const py = (v) => inner.y + (1 - (v - lo) / (hi - lo)) * inner.h;
  ctx.fillStyle = RAW_COLOR;
  const dot = points.length > 400 ? 2 : 3;
  for (const [s, v] of points) ctx.fillRect(px(s) - dot / 2, py(v) - dot / 2, dot, dot);
  ctx.strokeStyle = SMOOTH_COLOR;
  ctx.lineWidth = 1.6;
  ctx.beginPath();
  smooth(points).forEach(([s, v], i) => (i ? ctx.lineTo(px(s), py(v)) : ctx.moveTo(px(s), py(v))));
  ctx.stroke();
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(fmt(hi - pad, 3), x + 4, y + 12);
  ctx.fillText(fmt(lo + pad, 3), x + 4, y + h - 5);
  ctx.textAlign = "right";
  ctx.fillText(`step ${x1}`, x + w - 4, y + h - 5);
  ctx.fillStyle = SMOOTH_COLOR;
  ctx.fillText("smoothed", x + w - 4, y + 12);
  const smoothedWidth = ctx.measureText("smoothed ").width;
  ctx.fillStyle = RAW_COLOR;
  ctx.fillText("raw", x + w - 4 - smoothedWidth, y + 12);
}

function drawPreview(ctx, image, step, x, y, size) {
  ctx.fillStyle = "#161616";
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.rect(x, y, size, size);
  ctx.fill();
  ctx.stroke();
  if (!image) return;
  const scale = Math.min((size - 4) / image.naturalWidth, (size - 16) / image.naturalHeight);
  const w = image.naturalWidth * scale;
  const h = image.naturalHeight * scale;
  ctx.drawImage(image, x + (size - w) / 2, y + 2 + (size - 16 - h) / 2, w, h);
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.textAlign = "center";
  ctx.fillText(step != null ? `validation @ ${step}` : "validation", x + size / 2, y + size - 4);
}

function drawView(ctx, node, width, y) {
  const view = state(node);
  ctx.save();
  const x = MARGIN;
  const w = Math.max(width - 2 * MARGIN, 40);
  ctx.fillStyle = "#ccc";
  ctx.font = "11px sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(headerText(view.info), x, y + 12, w);
  const top = y + HEADER_HEIGHT;
  const h = VIEW_HEIGHT - HEADER_HEIGHT - 4;
  const image = previewImage(view, node);
  const previewSize = view.preview && w > 2.2 * h ? h : 0;
  drawChart(ctx, view.points, view.info?.steps, x, top, w - (previewSize ? previewSize + 6 : 0), h);
  if (previewSize) drawPreview(ctx, image, view.previewStep, x + w - previewSize, top, previewSize);
  ctx.restore();
}

function ensureView(node) {
  if (node.widgets?.some((w) => w.name === WIDGET)) return;
  const widget = {
    name: WIDGET,
    type: WIDGET,
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      drawView(ctx, n, width, y);
    },
    computeSize(width) {
      return [width ?? 0, VIEW_HEIGHT];
    },
  };
  node.addCustomWidget(widget);
  fitView(node);
}

function fitView(node) {
  const min = node.computeSize?.();
  if (!min || !node.size) return;
  const width = Math.max(node.size[0], min[0], 360);
  const height = Math.max(node.size[1], min[1]);
  if (width !== node.size[0] || height !== node.size[1]) node.setSize([width, height]);
}

// ------------------------------------------------------------------------------------------------ registration
api.addEventListener("executing", (e) => {
  executing = e?.detail ?? null;
});
api.addEventListener("comfy_finetune.train", (e) => onTrain(e.detail));
api.addEventListener("comfy_finetune.train_preview", (e) => onPreview(e.detail));
api.addEventListener("comfy_finetune.train_rollback", (e) => onRollback(e.detail));

app.registerExtension({
  name: "comfy_finetune.training_view",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.category ?? "").startsWith("finetune") || !TRAINING_NODES.has(nodeData?.name)) return;
    const proto = nodeType.prototype;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      ensureView(this);
      return result;
    };

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (info) {
      const result = onConfigure?.apply(this, arguments);
      this.__ftTraining = null; // re-read the saved series from properties
      ensureView(this);
      fitView(this);
      return result;
    };

    const onSerialize = proto.onSerialize;
    proto.onSerialize = function (o) {
      const result = onSerialize?.apply(this, arguments);
      const view = this.__ftTraining;
      if (o && view && (view.points.length || view.preview)) {
        o.properties ??= {};
        o.properties[PROPERTY] = stored(view);
      }
      return result;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function () {
      const result = onExecuted?.apply(this, arguments);
      if (this.__ftTraining) store(this, true);
      return result;
    };
  },
});
