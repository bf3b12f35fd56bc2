"""What the Python side sends for the live training view in ComfyUI's frontend (web/finetune_training_view.js).

* ``comfy_finetune.train`` events carry the running node's ids inside ComfyUI (so the frontend finds the node).
* Validation samples go to the running node's progress preview and, as a small base64 JPEG, in
  ``comfy_finetune.train_preview`` events; headless, only the registered sinks get them and nothing fails.
The ComfyUI paths use stand-in modules here; the real host is exercised by test_browser.py.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfy_finetune import host
from comfy_finetune.training import loop
from comfy_finetune.training.settings import TrainSettings

CPU = torch.device("cpu")


class _Line:
    """A tiny objective: fit one vector (the loop only needs these four methods)."""

    def __init__(self) -> None:
        self.w = torch.nn.Parameter(torch.zeros(4))

    def param_groups(self):
        return [{"params": [self.w]}]

    def loss(self, step, batch, generator):
        return ((self.w - 1.0) ** 2).mean()

    def trainable_state(self):
        return {"w": self.w.detach()}

    def load_trainable_state(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])


def _images(b=2, h=8, w=6) -> torch.Tensor:
    """An IMAGE batch whose images differ: image i is filled with i / b in red, 1 - i / b in blue."""
    out = torch.zeros(b, h, w, 3)
    for i in range(b):
        out[i, ..., 0] = i / b
        out[i, ..., 2] = 1 - i / b
    return out


def _decode(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


@pytest.fixture
def sink():
    got: list[tuple[str, dict]] = []

    def fn(event, data):
        got.append((event, dict(data)))

    host.add_event_sink(fn)
    try:
        yield got
    finally:
        host._settings.event_sinks.remove(fn)


def test_preview_image_puts_the_batch_side_by_side():
    image = host.preview_image(_images(b=3, h=8, w=6))
    assert image.size == (18, 8) and image.mode == "RGB"
    for i in range(3):
        r, g, b = image.getpixel((i * 6 + 3, 4))
        assert abs(r - round(255 * i / 3)) <= 1 and g == 0 and abs(b - round(255 * (1 - i / 3))) <= 1
    assert host.preview_image(_images(b=9)).size[0] == host.PREVIEW_MAX_IMAGES * 6
    assert host.preview_image(torch.zeros(0, 8, 8, 3)) is None and host.preview_image(None) is None


def test_headless_preview_goes_to_sinks_only(sink):
    assert not host.in_comfyui()
    bar = host.Progress(5)
    bar.preview(_images(b=2, h=300, w=200), node="TrainLoRA", step=3, steps=5)
    bar.close()
    [(event, data)] = sink
    assert event == "comfy_finetune.train_preview"
    assert {k: data[k] for k in ("node", "step", "steps")} == {"node": "TrainLoRA", "step": 3, "steps": 5}
    assert "node_id" not in data  # headless there is no graph node id
    image = _decode(data["image"])
    assert image.size == (data["width"], data["height"]) and max(image.size) == host.EVENT_PREVIEW_MAX_SIZE
    assert abs(image.size[0] / image.size[1] - 400 / 300) < 0.02


def test_headless_preview_without_listeners_does_nothing(monkeypatch):
    def boom(images):
        raise AssertionError("nothing should be encoded when nobody listens")

    monkeypatch.setattr(host, "preview_image", boom)
    with host.Progress(3) as bar:
        bar.preview(_images())  # no sink, no ComfyUI: a no-op


def test_loop_sends_a_preview_at_every_validation(sink):
    seen_steps = []

    def validate(step):
        seen_steps.append(step)
        return _images(b=1) * (step / 6)

    settings = TrainSettings(steps=6, learning_rate=0.1, validate_every=2)
    loop.train(_Line(), lambda first: itertools.count(first), settings, node="LiveViewTest", device=CPU,
               validate=validate)
    previews = [d for e, d in sink if e == "comfy_finetune.train_preview"]
    progress = [d for e, d in sink if e == "comfy_finetune.train"]
    assert seen_steps == [2, 4, 6]
    assert [p["step"] for p in previews] == [2, 4, 6] and {p["steps"] for p in previews} == {6}
    assert {p["node"] for p in previews} == {"LiveViewTest"}
    assert [p["step"] for p in progress] == list(range(1, 7))
    assert set(progress[0]) == {"node", "step", "steps", "loss", "lr", "images_per_second", "eta_seconds"}
    # the preview is the validation image of that step: brighter later
    brightness = [sum(_decode(p["image"]).convert("L").getdata()) for p in previews]
    assert brightness == sorted(brightness) and brightness[0] < brightness[-1]


# ---------------------------------------------------------------------------------------------- inside ComfyUI
@pytest.fixture
def fake_comfyui(monkeypatch):
    """Just enough of ComfyUI for Progress and send_event: a progress bar, the server, the executing context."""
    calls: dict[str, list] = {"bar": [], "sent": [], "text": []}

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["bar"].append((value, total, preview))

    class Server:
        client_id = "client"
        last_node_id = None

        def send_sync(self, event, data, sid=None):
            calls["sent"].append((event, data))

        def send_progress_text(self, text, node_id, sid=None):
            calls["text"].append((text, node_id))

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = type("InterruptProcessingException", (Exception,), {})
    mm.throw_exception_if_processing_interrupted = lambda: None
    comfy.utils, comfy.model_management = utils, mm
    server = types.ModuleType("server")
    server.PromptServer = types.SimpleNamespace(instance=Server())
    execution = types.ModuleType("comfy_execution")
    exec_utils = types.ModuleType("comfy_execution.utils")
    context = {"value": types.SimpleNamespace(node_id="7:3", prompt_id="p")}
    exec_utils.get_executing_context = lambda: context["value"]
    progress = types.ModuleType("comfy_execution.progress")
    dynprompt = types.SimpleNamespace(get_display_node_id=lambda node_id: {"7:3": "7"}.get(node_id, node_id))
    progress.get_progress_state = lambda: types.SimpleNamespace(dynprompt=dynprompt)
    for name, mod in {"comfy": comfy, "comfy.utils": utils, "comfy.model_management": mm, "server": server,
                      "folder_paths": types.ModuleType("folder_paths"), "comfy_execution": execution,
                      "comfy_execution.utils": exec_utils, "comfy_execution.progress": progress}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert host.in_comfyui()
    return calls, context


def test_events_in_comfyui_name_the_running_node(fake_comfyui):
    calls, context = fake_comfyui
    host.send_event("comfy_finetune.train", {"node": "TrainLoRA", "step": 1})
    host.send_event("comfy_finetune.train", {"node": "TrainLoRA", "step": 2, "node_id": "given"})
    context["value"] = None  # not inside a node: the payload is left as it is
    host.send_event("comfy_finetune.train", {"node": "TrainLoRA", "step": 3})
    assert calls["sent"] == [
        ("comfy_finetune.train", {"node_id": "7:3", "display_node": "7", "node": "TrainLoRA", "step": 1}),
        ("comfy_finetune.train", {"node_id": "given", "display_node": "7", "node": "TrainLoRA", "step": 2}),
        ("comfy_finetune.train", {"node": "TrainLoRA", "step": 3}),
    ]


def test_preview_in_comfyui_goes_to_the_progress_bar_and_an_event(fake_comfyui):
    calls, _ = fake_comfyui
    with host.Progress(10) as bar:
        bar.update(4)
        bar.preview(_images(b=2, h=16, w=16), node="TrainLoRA", step=4, steps=10)
    value, total, preview = calls["bar"][-1]
    assert (value, total) == (4, 10)
    kind, image, max_size = preview
    assert kind == "JPEG" and max_size == host.PREVIEW_MAX_SIZE and image.size == (32, 16)
    [(event, data)] = [c for c in calls["sent"] if c[0] == "comfy_finetune.train_preview"]
    assert data["node_id"] == "7:3" and data["display_node"] == "7" and data["step"] == 4
    assert _decode(data["image"]).size == (32, 16) == (data["width"], data["height"])


def test_other_data_parallel_ranks_send_no_preview(sink, monkeypatch):
    """Data-parallel ranks other than 0 validate too but report nothing (rank 0 reports for all)."""
    monkeypatch.setattr(loop.distributed, "is_main", lambda: False)
    settings = TrainSettings(steps=4, learning_rate=0.1, validate_every=2)
    result = loop.train(_Line(), lambda first: itertools.count(first), settings, node="LiveViewTest", device=CPU,
                        validate=lambda step: _images(b=1))
    assert [s for s, _ in result.validation] == [2, 4]
    assert sink == []


# ---------------------------------------------------------------------------------------------- the JS view in Node
# web/finetune_training_view.js is an ES module that reads window.comfyAPI when it loads. Node runs it with stand-ins
# for ComfyUI's app and api (registerExtension, addEventListener, a graph with one training node) and a canvas context
# that records what is drawn; the events go through the listeners the extension registers, as in the browser.
VIEW_JS = Path(__file__).resolve().parents[1] / "web" / "finetune_training_view.js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js ('node') is not on PATH")

_JS_HARNESS = r"""
const listeners = {};
const extensions = [];
const nodes = [];
const graph = { nodes, getNodeById: (id) => nodes.find((n) => String(n.id) === String(id)) ?? null,
                setDirtyCanvas() {} };
globalThis.window = { comfyAPI: {
  app: { app: { rootGraph: graph, graph, registerExtension: (e) => extensions.push(e) } },
  api: { api: { addEventListener: (name, fn) => (listeners[name] ??= []).push(fn) } },
} };
const mod = await import(process.argv[2]);
class TrainNode {
  constructor(id) {
    Object.assign(this, { id, comfyClass: "FinetuneTrainLoRA", widgets: [], properties: {}, size: [420, 120] });
  }
  addCustomWidget(w) { this.widgets.push(w); }
  computeSize() { return [300, 60 + this.widgets.reduce((h, w) => h + w.computeSize(this.size[0])[1], 0)]; }
  setSize(size) { this.size = size; }
  setDirtyCanvas() {}
}
await extensions[0].beforeRegisterNodeDef(TrainNode, { name: "FinetuneTrainLoRA", category: "finetune/training" });
const send = (name, detail) =>
  listeners[name].forEach((fn) => fn({ detail: { node: "FinetuneTrainLoRA", ...detail } }));
const copy = (x) => JSON.parse(JSON.stringify(x));
function draw(node) {
  const widget = node.widgets.find((w) => w.name === "ft_training_view");
  const ops = [];
  const style = { fillStyle: "", strokeStyle: "", lineWidth: 1, font: "", textAlign: "left", dash: [] };
  const saved = [];
  let path = [];
  const ctx = new Proxy({}, {
    get(_, key) {
      if (key in style) return style[key];
      const record = (...args) => ops.push({ op: key, args, ...copy(style) });
      return { save: () => saved.push({ ...style }), restore: () => Object.assign(style, saved.pop()),
               setLineDash: (d) => (style.dash = d), measureText: (t) => ({ width: String(t).length * 5.5 }),
               beginPath: () => (path = []), moveTo: (x, y) => path.push([x, y]), lineTo: (x, y) => path.push([x, y]),
               stroke: () => ops.push({ op: "stroke", path: path.slice(), ...copy(style) }) }[key] ?? record;
    },
    set(_, key, value) { style[key] = value; return true; },
  });
  widget.draw(ctx, node, node.size[0], 0);
  return { ops, height: widget.computeSize(node.size[0])[1], size: node.size.slice() };
}
const out = { exports: Object.keys(mod).sort() };
const node = new TrainNode(5);
nodes.push(node);
node.onNodeCreated();
out.before = draw(node);
// run 1: 60 steps, scored before training and every 20 steps; the best is step 40
const metrics = (s) => ({ subject: 0.2 + s / 100, prompt: 0.5 + s / 400, val_loss: 0.3 - s / 1000 });
send("comfy_finetune.train_score", { display_node: "5", step: 0, steps: 60, score: 0.2, metrics: metrics(0),
  best_step: 0, best_score: 0.2, scoring_seconds: 1.5, training_seconds: 0 });
for (let s = 1; s <= 60; s++) {
  send("comfy_finetune.train", { display_node: "5", step: s, steps: 60, loss: 0.2 + 0.3 * Math.exp(-s / 20), lr: 1e-4,
    images_per_second: 2.5, eta_seconds: 60 - s });
  if (s % 20 === 0) {
    send("comfy_finetune.train_score", { display_node: "5", step: s, steps: 60, score: s === 40 ? 0.8 : 0.2 + s / 100,
      metrics: { ...metrics(s), bogus: "x" }, best_step: s >= 40 ? 40 : s, best_score: s >= 40 ? 0.8 : 0.2 + s / 100,
      scoring_seconds: 1.5 * (s / 20 + 1), training_seconds: s * 2 });
  }
}
out.run1 = { saved: copy(node.properties.ft_training), ...draw(node) };
// a workflow reload: a node configured from the saved properties draws the same, and saves the same
const loaded = new TrainNode(6);
nodes.push(loaded);
loaded.properties = copy({ ft_training: out.run1.saved });
loaded.onConfigure({});
out.reloaded = draw(loaded);
const serialized = {};
loaded.onSerialize(serialized);
out.reserialized = serialized.properties?.ft_training ?? null;
send("comfy_finetune.train_rollback", { display_node: "6", step: 45, to_step: 30 });
out.rolledBack = copy(loaded.__ftTraining.scores);
// run 2 on node 5: its step-0 score clears the old run; its first loss step appends
send("comfy_finetune.train_score", { display_node: "5", step: 0, steps: 30, score: 0.1, metrics: { subject: 0.05 },
  best_step: 0, best_score: 0.1, scoring_seconds: 1, training_seconds: 0 });
out.run2 = { saved: copy(node.properties.ft_training), ...draw(node) };
send("comfy_finetune.train", { display_node: "5", step: 1, steps: 30, loss: 0.5, lr: 1e-4, images_per_second: 2,
  eta_seconds: 29 });
out.run2.step1 = copy({ points: node.__ftTraining.points, scores: node.__ftTraining.scores });
// run 3 without a step-0 score: its loss events reset the run, scores included
send("comfy_finetune.train", { display_node: "5", step: 1, steps: 30, loss: 0.4, lr: 1e-4, images_per_second: 2,
  eta_seconds: 29 });
out.run3 = copy({ points: node.__ftTraining.points, scores: node.__ftTraining.scores, height: draw(node).height });
// the pure helpers
const view = { points: [[1, 0.5], [2, 0.4]], scores: {} };
mod.applyScore(view, { step: 10, score: 0.5, metrics: { a: 1, score: 99, nan: NaN, none: null } });
const afterFirst = copy(view);
mod.applyScore(view, { step: 10, score: 0.6, metrics: { a: 2 } });
const replaced = copy(view.scores);
mod.applyScore(view, { step: 5, score: 0.7, metrics: {}, best_step: null, best_score: null });
const nulls = { points: [], scores: {} };
mod.applyScore(nulls, { step: 3, score: null, metrics: { a: "0.25", b: true, c: "" }, best_step: "2" });
const many = { points: [], scores: {} };
mod.applyScore(many, { step: 1, score: 1,
  metrics: Object.fromEntries([...Array(20).keys()].map((i) => [`m${i}`, i])) });
out.pure = {
  afterFirst, replaced, backwards: copy(view), nulls: copy(nulls),
  many: Object.keys(many.scores).length,
  bad: mod.applyScore({ points: [], scores: {} }, { step: "x", score: 1 }),
  range: mod.stepRange([[1, 0.5], [50, 0.2]], { score: [[0, 0.1], [60, 0.3]] }, 40),
  rangeNoScores: mod.stepRange([[3, 0.5], [50, 0.2]], null, 100),
  colors: mod.scoreColors({ subject: [], score: [], prompt: [] }),
  text: mod.scoreText({ score: 0.71234, best_step: 150, best_score: 0.8, scoring_seconds: 12.3,
    training_seconds: 340 }),
  noText: mod.scoreText(null),
  read: [mod.readScores(null), mod.readScores([1, 2]), mod.readScores({ a: [[1, 2], [3], "x", [NaN, 1]], b: 5 })],
  has: [mod.hasScores({}), mod.hasScores({ a: [] }), mod.hasScores({ a: [[1, 2]] })],
  last: [mod.lastScoreStep({}), mod.lastScoreStep({ a: [[3, 1], [7, 1]], b: [[9, 0]] })],
};
console.log(JSON.stringify(out));
"""


def _run_view(tmp_path) -> dict:
    module = tmp_path / "finetune_training_view.mjs"  # .mjs: Node loads it as an ES module
    module.write_text(VIEW_JS.read_text(encoding="utf-8"), encoding="utf-8")
    harness = tmp_path / "harness.mjs"
    harness.write_text(_JS_HARNESS, encoding="utf-8")
    proc = subprocess.run([NODE, str(harness), module.as_uri()], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@needs_node
def test_view_js_is_valid_module_syntax(tmp_path):
    module = tmp_path / "finetune_training_view.mjs"
    module.write_text(VIEW_JS.read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run([NODE, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@needs_node
def test_view_js_pure_score_helpers(tmp_path):
    out = _run_view(tmp_path)
    assert {"decimate", "smooth", "applyScore", "stepRange", "scoreColors", "scoreText", "readScores",
            "hasScores", "lastScoreStep"} <= set(out["exports"])
    pure = out["pure"]
    # the primary comes from `score` (a metric named "score" does not override it); non-finite metrics are skipped
    assert pure["afterFirst"]["scores"] == {"score": [[10, 0.5]], "a": [[10, 1]]}
    assert pure["afterFirst"]["points"] == [[1, 0.5], [2, 0.4]]  # a later score keeps the loss
    assert pure["replaced"] == {"score": [[10, 0.6]], "a": [[10, 2]]}  # the same step again replaces the point
    assert pure["backwards"]["scores"] == {"score": [[5, 0.7]]}  # a step back: a new run's scores
    assert pure["backwards"]["scoreInfo"]["best_step"] is None  # null is no step (not step 0)
    # null / true / "" are no values; numeric strings are
    assert pure["nulls"]["scores"] == {"a": [[3, 0.25]]} and pure["nulls"]["scoreInfo"]["best_step"] == 2
    assert pure["many"] == 12 and pure["bad"] is False
    assert pure["range"] == [0, 60] and pure["rangeNoScores"] == [1, 100]
    assert pure["colors"]["score"] == "#73d13d" and len(set(pure["colors"].values())) == 3
    assert pure["text"] == "score 0.7123 (best 0.8 @ 150)  ·  scoring 12s / training 340s"
    assert pure["noText"] == ""
    assert pure["read"] == [{}, {}, {"a": [[1, 2]]}]
    assert pure["has"] == [False, False, True]
    assert pure["last"] == [None, 9]  # JSON writes -Infinity as null


@needs_node
def test_view_js_draws_and_saves_the_scores(tmp_path):
    out = _run_view(tmp_path)
    before, run1 = out["before"], out["run1"]
    # the view grows by the score band once scores arrive, and the node with it
    assert run1["height"] > before["height"] == 170
    assert run1["size"][1] > before["size"][1]
    saved = run1["saved"]
    assert set(saved["scores"]) == {"score", "subject", "prompt", "val_loss"}  # "bogus" (not a number) is skipped
    assert [s for s, _ in saved["scores"]["score"]] == [0, 20, 40, 60]
    assert saved["scores"]["score"][2] == [40, 0.8]
    assert saved["score_info"]["best_step"] == 40 and saved["score_info"]["scoring_seconds"] == 6
    assert len(saved["points"]) == 60
    texts = [op["args"][0] for op in run1["ops"] if op["op"] == "fillText"]
    assert "score 0.8 (best 0.8 @ 40)  ·  scoring 6.0s / training 120s" in texts
    assert {"score 0.8", "subject 0.8", "prompt 0.65", "val_loss 0.24"} <= set(texts)  # the legend
    strokes = [op for op in run1["ops"] if op["op"] == "stroke"]
    by_colour = {op["strokeStyle"]: op for op in strokes if len(op["path"]) == 4}  # the 4 scored steps
    assert {"#73d13d", "#b37feb", "#36cfc9", "#ff85c0"} <= set(by_colour)
    assert by_colour["#73d13d"]["lineWidth"] > by_colour["#b37feb"]["lineWidth"]  # the primary is bold
    # the best marker: a dashed vertical line at the same x in both charts, where the scores put step 40
    dashed = [op for op in strokes if op["dash"]]
    assert len(dashed) == 2 and all(op["path"][0][0] == op["path"][1][0] for op in dashed)
    assert dashed[0]["path"][0][0] == dashed[1]["path"][0][0] == by_colour["#73d13d"]["path"][2][0]
    # x aligned: the loss chart's steps 1..60 sit where the score band puts them (its axis starts at step 0)
    score_xs = [p[0] for p in by_colour["#73d13d"]["path"]]  # steps 0, 20, 40, 60
    raw = [op["args"] for op in run1["ops"] if op["op"] == "fillRect" and op["fillStyle"].startswith("rgba(120")]
    raw_xs = [x + size / 2 for x, _, size, _ in raw]  # one dot per loss step
    per_step = (score_xs[-1] - score_xs[0]) / 60
    assert len(raw_xs) == 60 and per_step > 0
    for step, x in ((1, raw_xs[0]), (20, raw_xs[19]), (60, raw_xs[-1])):
        assert x == pytest.approx(score_xs[0] + step * per_step)
    # both charts have the same frame across, and steps 0..60 span it (4 px inside)
    (loss_x, _, loss_w, _), (band_x, _, band_w, _) = [op["args"] for op in run1["ops"] if op["op"] == "rect"]
    assert (loss_x, loss_w) == (band_x, band_w)
    assert score_xs[0] == pytest.approx(band_x + 4) and score_xs[-1] == pytest.approx(band_x + band_w - 4)
    # a reloaded workflow draws the same and saves the same; a rollback drops the later scores
    assert out["reloaded"]["height"] == run1["height"] and len(out["reloaded"]["ops"]) == len(run1["ops"])
    assert out["reserialized"] == saved
    assert {name: [s for s, _ in pts] for name, pts in out["rolledBack"].items()} == {
        name: [0, 20] for name in saved["scores"]}


@needs_node
def test_view_js_new_run_clears_the_old_scores(tmp_path):
    out = _run_view(tmp_path)
    run2 = out["run2"]
    # the new run's score before training clears the old loss and scores and shows step 0 of the new run
    assert run2["saved"]["points"] == []
    assert run2["saved"]["scores"] == {"score": [[0, 0.1]], "subject": [[0, 0.05]]}
    texts = [op["args"][0] for op in run2["ops"] if op["op"] == "fillText"]
    assert texts[0].startswith("step 0/30") and texts[1].startswith("score 0.1 (best 0.1 @ 0)")
    # its first loss step appends and keeps that score
    assert run2["step1"] == {"points": [[1, 0.5]], "scores": {"score": [[0, 0.1]], "subject": [[0, 0.05]]}}
    # a run without a score before training is reset by its loss events, scores included; the band goes
    assert out["run3"]["points"] == [[1, 0.4]] and out["run3"]["scores"] == {} and out["run3"]["height"] == 170
