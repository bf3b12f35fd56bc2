// comfyui-finetune: live training view on the training nodes (FinetuneTrainLoRA, LearnEmbedding, DreamBoothTrain).
//
// Fed by the events the Python side sends through host.send_event while a node trains:
//   comfy_finetune.train          {node, node_id, display_node, step, steps, loss, lr, images_per_second, eta_seconds}
//   comfy_finetune.train_preview  {node, node_id, display_node, step, steps, image (data:image/jpeg;base64), ...}
//   comfy_finetune.train_rollback {node, node_id, display_node, step, to_step, ...}   (NaN rollback)
//   comfy_finetune.train_score    {node, node_id, display_node, step, steps, score, metrics: {name: value, ...},
//                                  best_step, best_score, scoring_seconds, training_seconds}   (in-loop scoring)
// it draws, on the node itself (a canvas-drawn widget, so it shows at every zoom level and in screenshots):
// a text line (step/steps, loss, lr, images/s, ETA), the raw loss points with an exponentially smoothed line
// (step on x), and the latest validation samples. Once scores arrive, a second header line (score, best, scoring vs
// training time) and a score band under the loss chart, on the same step axis: one coloured line with dots per
// metric, the primary "score" bold, and a dashed marker at the best step through both charts.
//
// The loss series (decimated to at most MAX_STORED_POINTS points), the score series (each decimated the same way),
// the last figures and the last preview are kept in node.properties.ft_training, so they stay on the node after the
// run and are saved with the workflow; loading the workflow redraws them. The view widget itself is never serialized
// (widgets_values keep their positions).
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
const PRIMARY_SCORE = "score";
const MAX_SCORE_SERIES = 12;
const SCORE_HEIGHT = 112; // the score band (and its header line) the view grows by when scores exist
const SCORE_HEADER_HEIGHT = 16;
const BEST_COLOR = "rgba(255, 90, 90, 0.9)";
// the primary score first, then the metrics in the order they first arrived
const SCORE_COLORS = ["#73d13d", "#b37feb", "#36cfc9", "#ff85c0", "#fadb14", "#69b1ff", "#ff9c6e", "#bfbfbf"];

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

/** A number from an event field: numbers and numeric strings; null, missing, booleans and the rest are NaN. */
function num(v) {
  if (typeof v === "number") return v;
  return typeof v === "string" && v.trim() !== "" ? Number(v) : NaN;
}

/** The finite [step, value] pairs of a saved/received series (anything else is dropped). */
function cleanSeries(points) {
  return Array.isArray(points)
    ? points.filter((p) => Array.isArray(p) && p.length === 2 && Number.isFinite(p[0]) && Number.isFinite(p[1]))
    : [];
}

/** Saved score series ({name: [[step, value], ...]}) as a fresh object of clean series; junk becomes {}. */
export function readScores(saved) {
  const out = {};
  if (!saved || typeof saved !== "object" || Array.isArray(saved)) return out;
  for (const [name, points] of Object.entries(saved).slice(0, MAX_SCORE_SERIES)) {
    const clean = cleanSeries(points);
    if (clean.length) out[name] = clean;
  }
  return out;
}

/** True when any score series has a point. */
export function hasScores(scores) {
  return !!scores && Object.values(scores).some((points) => points.length > 0);
}

/** The last step of any score series (-Infinity without scores). */
export function lastScoreStep(scores) {
  let last = -Infinity;
  for (const points of Object.values(scores ?? {})) {
    if (points.length) last = Math.max(last, points[points.length - 1][0]);
  }
  return last;
}

/**
 * Add a comfy_finetune.train_score event to a view state ({points, info, scores, scoreInfo, preview, previewStep});
 * pure apart from mutating `view`. Returns false (and changes nothing) for an event without a finite step.
 *
 * Runs: a score at step 0 is taken before training, so it starts a new run: the old loss, header figures, preview
 * and scores are cleared (the run's first loss event, at step 1, then appends). A score at a step before the last
 * score step is a new run that sent no step-0 score: its loss series was already reset by its loss events, so only
 * the old scores go. A score at the last score step replaces that point (a resumed run re-scoring its starting
 * checkpoint).
 */
export function applyScore(view, detail) {
  const step = num(detail?.step);
  if (!Number.isFinite(step)) return false;
  view.scores ??= {};
  const last = lastScoreStep(view.scores);
  if (step === 0 && (view.points?.length || last > 0)) {
    view.points = [];
    view.info = null;
    view.preview = null;
    view.previewStep = null;
    view.scores = {};
  } else if (step < last) {
    view.scores = {};
  }
  const values = [[PRIMARY_SCORE, num(detail?.score)]];
  const metrics = detail?.metrics && typeof detail.metrics === "object" ? detail.metrics : {};
  for (const [name, value] of Object.entries(metrics)) if (name !== PRIMARY_SCORE) values.push([name, num(value)]);
  for (const [name, value] of values) {
    if (!Number.isFinite(value)) continue;
    if (!view.scores[name] && Object.keys(view.scores).length >= MAX_SCORE_SERIES) continue;
    const series = (view.scores[name] ??= []);
    while (series.length && series[series.length - 1][0] >= step) series.pop();
    series.push([step, value]);
    if (series.length > MAX_LIVE_POINTS) view.scores[name] = decimate(series, MAX_LIVE_POINTS / 2);
  }
  const bestStep = num(detail?.best_step);
  const bestScore = num(detail?.best_score);
  view.scoreInfo = {
    step,
    score: num(detail?.score),
    best_step: Number.isFinite(bestStep) ? bestStep : null,
    best_score: Number.isFinite(bestScore) ? bestScore : null,
    scoring_seconds: num(detail?.scoring_seconds),
    training_seconds: num(detail?.training_seconds),
  };
  return true;
}

/** The step range [lo, hi] both charts share: from 0 when a score was taken before training (else from the first
 * loss step, at most 1) to the planned steps or the last loss or score step, whichever is furthest. */
export function stepRange(points, scores, steps) {
  let lo = points.length ? Math.min(points[0][0], 1) : 1;
  let hi = Math.max(steps || 0, points.length ? points[points.length - 1][0] : 0);
  for (const series of Object.values(scores ?? {})) {
    if (!series.length) continue;
    lo = Math.min(lo, series[0][0]);
    hi = Math.max(hi, series[series.length - 1][0]);
  }
  return [lo, Math.max(hi, lo + 1)];
}

/** Colour of each score series: the primary first, then the others in the order they first arrived. */
export function scoreColors(scores) {
  const names = Object.keys(scores ?? {});
  const ordered = [...names.filter((n) => n === PRIMARY_SCORE), ...names.filter((n) => n !== PRIMARY_SCORE)];
  return Object.fromEntries(ordered.map((name, i) => [name, SCORE_COLORS[i % SCORE_COLORS.length]]));
}

/** The score header line: "score <v> (best <b> @ <step>)  ·  scoring <s>s / training <t>s". */
export function scoreText(info) {
  if (!info) return "";
  const parts = [`score ${fmt(info.score)}`];
  if (Number.isFinite(info.best_score) && info.best_step != null) {
    parts[0] += ` (best ${fmt(info.best_score)} @ ${info.best_step})`;
  }
  if (Number.isFinite(info.scoring_seconds) || Number.isFinite(info.training_seconds)) {
    parts.push(`scoring ${fmtSeconds(info.scoring_seconds)} / training ${fmtSeconds(info.training_seconds)}`);
  }
  return parts.join("  ·  ");
}

function state(node) {
  if (!node.__ftTraining) {
    const saved = node.properties?.[PROPERTY];
    node.__ftTraining = {
      points: Array.isArray(saved?.points) ? saved.points.filter((p) => Array.isArray(p) && p.length === 2) : [],
      info: saved?.info && typeof saved.info === "object" ? { ...saved.info } : null,
      preview: typeof saved?.preview === "string" ? saved.preview : null,
      previewStep: saved?.preview_step ?? null,
      scores: readScores(saved?.scores),
      scoreInfo: saved?.score_info && typeof saved.score_info === "object" ? { ...saved.score_info } : null,
      image: null,
      storedAt: 0,
    };
  }
  return node.__ftTraining;
}

function stored(view) {
  const out = { points: decimate(view.points), info: view.info };
  if (hasScores(view.scores)) {
    out.scores = Object.fromEntries(Object.entries(view.scores).map(([name, pts]) => [name, decimate(pts)]));
    out.score_info = view.scoreInfo;
  }
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
    view.scores = {};
    view.scoreInfo = null;
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

function onScore(detail) {
  const node = nodeFor(detail);
  if (!node) return;
  ensureView(node);
  const view = state(node);
  const had = hasScores(view.scores);
  if (!applyScore(view, detail)) return;
  const steps = Number(detail?.steps);
  if (Number.isFinite(steps) && steps > 0) {
    // before the run's first loss event (a score taken before training), the header shows step 0 of the run
    view.info ??= { step: 0, steps, loss: NaN, lr: NaN, images_per_second: NaN, eta_seconds: NaN };
    view.info.steps = steps;
  }
  store(node, true);
  if (had !== hasScores(view.scores)) fitView(node); // the view grows by the score band
  redraw(node);
}

function onRollback(detail) {
  const node = nodeFor(detail);
  if (!node) return;
  const view = state(node);
  const to = Number(detail?.to_step);
  if (Number.isFinite(to)) {
    view.points = view.points.filter(([s]) => s <= to);
    for (const name of Object.keys(view.scores)) view.scores[name] = view.scores[name].filter(([s]) => s <= to);
  }
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

function fmtSeconds(seconds) {
  return Number.isFinite(seconds) && seconds >= 0 ? `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)}s` : "-";
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

function drawBestMarker(ctx, bestX, y, h) {
  if (!Number.isFinite(bestX)) return;
  ctx.save();
  ctx.strokeStyle = BEST_COLOR;
  ctx.lineWidth = 1;
  ctx.setLineDash?.([4, 3]);
  ctx.beginPath();
  ctx.moveTo(bestX, y + 1);
  ctx.lineTo(bestX, y + h - 1);
  ctx.stroke();
  ctx.restore();
}

function drawChart(ctx, points, steps, x, y, w, h, range = null, best = null) {
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
  const [x0, x1] = range ?? stepRange(points, null, steps);
  const inner = { x: x + 4, y: y + 4, w: w - 8, h: h - 8 };
  const px = (s) => inner.x + ((s - x0) / (x1 - x0)) * inner.w;
  const py = (v) => inner.y + (1 - (v - lo) / (hi - lo)) * inner.h;
  if (best != null && Number.isFinite(best)) drawBestMarker(ctx, px(best), y, h);
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
  axisLabel(ctx, fmt(hi - pad, 3), x + 4, y + 12);
  axisLabel(ctx, fmt(lo + pad, 3), x + 4, y + h - 5);
  ctx.textAlign = "right";
  ctx.fillText(`step ${x1}`, x + w - 4, y + h - 5);
  ctx.fillStyle = SMOOTH_COLOR;
  ctx.fillText("smoothed", x + w - 4, y + 12);
  const smoothedWidth = ctx.measureText("smoothed ").width;
  ctx.fillStyle = RAW_COLOR;
  ctx.fillText("raw", x + w - 4 - smoothedWidth, y + 12);
}

/** A y-axis label at the chart's left edge, on a dark backing so the points under it (step 0) stay readable. */
function axisLabel(ctx, text, x, y) {
  const width = ctx.measureText(text).width;
  const fill = ctx.fillStyle;
  ctx.fillStyle = "rgba(20, 20, 20, 0.7)";
  ctx.fillRect(x - 2, y - 9, width + 4, 12);
  ctx.fillStyle = fill;
  ctx.fillText(text, x, y);
}

function drawScores(ctx, scores, range, best, x, y, w, h) {
  ctx.fillStyle = "#161616";
  ctx.strokeStyle = "#444";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.fill();
  ctx.stroke();
  const entries = Object.entries(scores).filter(([, pts]) => pts.length);
  if (!entries.length) return;
  let lo = Infinity;
  let hi = -Infinity;
  for (const [, pts] of entries) {
    for (const [, v] of pts) {
      lo = Math.min(lo, v);
      hi = Math.max(hi, v);
    }
  }
  const pad = (hi - lo) * 0.1 || Math.abs(hi) * 0.1 || 1;
  lo -= pad;
  hi += pad;
  const [x0, x1] = range;
  const inner = { x: x + 4, y: y + 17, w: w - 8, h: h - 21 }; // the top line is the legend's
  const px = (s) => inner.x + ((s - x0) / (x1 - x0)) * inner.w;
  const py = (v) => inner.y + (1 - (v - lo) / (hi - lo)) * inner.h;
  if (best != null && Number.isFinite(best)) drawBestMarker(ctx, px(best), y, h);
  const colors = scoreColors(scores);
  // the primary last, so it is on top
  entries.sort(([a], [b]) => (a === PRIMARY_SCORE) - (b === PRIMARY_SCORE));
  for (const [name, pts] of entries) {
    const primary = name === PRIMARY_SCORE;
    ctx.strokeStyle = colors[name];
    ctx.fillStyle = colors[name];
    ctx.lineWidth = primary ? 2.4 : 1.2;
    ctx.beginPath();
    pts.forEach(([s, v], i) => (i ? ctx.lineTo(px(s), py(v)) : ctx.moveTo(px(s), py(v))));
    ctx.stroke();
    const r = primary ? 2.5 : 1.8;
    if (pts.length <= 200) {
      for (const [s, v] of pts) {
        ctx.beginPath();
        ctx.arc(px(s), py(v), r, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
  }
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#999";
  ctx.textAlign = "left";
  axisLabel(ctx, fmt(hi - pad, 3), x + 4, y + 12);
  axisLabel(ctx, fmt(lo + pad, 3), x + 4, y + h - 5);
  // legend on the top line, right-aligned: name and last value, the primary first; what does not fit is left out
  const legend = [entries[entries.length - 1], ...entries.slice(0, -1)].map(([name, pts]) => {
    ctx.font = name === PRIMARY_SCORE ? "bold 10px sans-serif" : "10px sans-serif";
    const text = `${name} ${fmt(pts[pts.length - 1][1], 3)}`;
    return { name, text, width: ctx.measureText(text).width };
  });
  const room = w - 52;
  let used = 0;
  let shown = 0;
  while (shown < legend.length && used + legend[shown].width + (shown ? 8 : 0) <= room) {
    used += legend[shown].width + (shown ? 8 : 0);
    shown++;
  }
  ctx.textAlign = "left";
  let left = x + w - 4 - used;
  for (const { name, text, width } of legend.slice(0, shown)) {
    ctx.fillStyle = colors[name];
    ctx.font = name === PRIMARY_SCORE ? "bold 10px sans-serif" : "10px sans-serif";
    ctx.fillText(text, left, y + 12);
    left += width + 8;
  }
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
  const scored = hasScores(view.scores);
  if (scored) ctx.fillText(scoreText(view.scoreInfo), x, y + HEADER_HEIGHT + 11, w);
  const top = y + HEADER_HEIGHT + (scored ? SCORE_HEADER_HEIGHT : 0);
  const h = VIEW_HEIGHT - HEADER_HEIGHT - 4;
  const image = previewImage(view, node);
  const previewSize = view.preview && w > 2.2 * h ? h : 0;
  const chartWidth = w - (previewSize ? previewSize + 6 : 0);
  const range = stepRange(view.points, scored ? view.scores : null, view.info?.steps);
  const best = scored ? view.scoreInfo?.best_step : null;
  drawChart(ctx, view.points, view.info?.steps, x, top, chartWidth, h, range, best);
  if (previewSize) drawPreview(ctx, image, view.previewStep, x + w - previewSize, top, previewSize);
  if (scored) {
    drawScores(ctx, view.scores, range, best, x, top + h + 4, chartWidth, SCORE_HEIGHT - SCORE_HEADER_HEIGHT - 4);
  }
  ctx.restore();
}

function viewHeight(node) {
  return VIEW_HEIGHT + (hasScores(state(node).scores) ? SCORE_HEIGHT : 0);
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
      return [width ?? 0, viewHeight(node)];
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
api.addEventListener("comfy_finetune.train_score", (e) => onScore(e.detail));

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
      if (o && view && (view.points.length || view.preview || hasScores(view.scores))) {
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
