"""Browser test: the live training view (web/finetune_training_view.js) in ComfyUI's real frontend.

A real ComfyUI (``tests/comfyui_harness.py``) serves its own frontend with this pack loaded; headless Chromium, driven
by ``playwright-core`` from a small Node.js script (``tests/browser/drive.mjs``), loads the "Train a LoRA" example,
queues it from the page, and the test checks that the loss chart drew every step on the right node, that validation
previews reached the node (the host's progress preview and our own), that the series is saved in the workflow and
redrawn after reloading it, that score curves (synthetic ``train_score`` events) are drawn in a score band, saved
and redrawn, and that the bridge nodes link to native nodes in the frontend. Screenshots are kept as
artefacts (``$FINETUNE_ARTIFACTS``, else pytest's temp folder).

Needs (skipped with the reason otherwise):

* ``COMFYUI_DIR``: a ComfyUI checkout (see ``test_comfyui_integration.py``);
* Node.js (``node`` on PATH);
* Chromium: ``$CHROMIUM``, default ``/usr/bin/chromium`` (Debian: ``apt-get install chromium``);
* playwright-core: ``$PLAYWRIGHT_CORE_DIR``, default ``/work/browser-tools/node_modules/playwright-core``
  (``mkdir -p /work/browser-tools && cd /work/browser-tools && npm install playwright-core``; no browser download).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

_COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not _COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (point it at a ComfyUI checkout to run the browser test)",
                allow_module_level=True)
if not (Path(_COMFYUI_DIR) / "main.py").is_file():
    pytest.skip(f"COMFYUI_DIR={_COMFYUI_DIR!r} is not a ComfyUI checkout (no main.py)", allow_module_level=True)

NODE = shutil.which("node")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PLAYWRIGHT_CORE_DIR = os.environ.get("PLAYWRIGHT_CORE_DIR", "/work/browser-tools/node_modules/playwright-core")
if NODE is None:
    pytest.skip("Node.js ('node') is not on PATH: the browser is driven by tests/browser/drive.mjs",
                allow_module_level=True)
if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set $CHROMIUM)", allow_module_level=True)
if not (Path(PLAYWRIGHT_CORE_DIR) / "package.json").is_file():
    pytest.skip(f"playwright-core not found at {PLAYWRIGHT_CORE_DIR} (npm install playwright-core in a folder outside "
                "the repo and set $PLAYWRIGHT_CORE_DIR to its node_modules/playwright-core)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

from comfy_finetune.headless.workflow import ui_to_api  # noqa: E402

pytestmark = pytest.mark.comfyui

REPO_ROOT = harness.REPO_ROOT
DRIVER = REPO_ROOT / "tests" / "browser" / "drive.mjs"
BRIDGE_GRAPHS = REPO_ROOT / "tests" / "browser" / "bridge_graphs.json"
STEPS = 40
VALIDATE_EVERY = 10
SMOOTH_RGB = (0xFF, 0xA9, 0x40)  # the smoothed line's colour in finetune_training_view.js
# finetune_training_view.js: SCORE_COLORS (the primary "score", then the metrics in arrival order) and BEST_COLOR
# (rgba(255, 90, 90, 0.9)) over the chart's #161616
SCORE_RGB = (0x73, 0xD1, 0x3D)
METRIC_RGB = {"judge fidelity": (0xB3, 0x7F, 0xEB), "judge class": (0x36, 0xCF, 0xC9)}
BEST_RGB = (232, 83, 83)
# startup settings of a fresh user folder: no first-run template dialog over the canvas, no minimap in the screenshots
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def _training_example() -> tuple[Path, dict]:
    for path in sorted((REPO_ROOT / "example_workflows").glob("*.json")):
        workflow = json.loads(path.read_text(encoding="utf-8"))
        if any(n.get("type") == "FinetuneTrainLoRA" for n in workflow.get("nodes", [])):
            return path, workflow
    pytest.fail("no example workflow with a FinetuneTrainLoRA node")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = harness.ComfyServer(Path(_COMFYUI_DIR).resolve(), tmp_path_factory.mktemp("comfyui-browser"))
    try:
        srv.start()
        status, _ = srv.post_json("/settings", UI_SETTINGS)
        assert status == 200, f"POST /settings answered {status}"
    except harness.ServerError as exc:
        srv.stop()
        pytest.fail(str(exc), pytrace=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def node_defs(server):
    return harness.node_defs_from_object_info(server.get_json("/object_info", timeout=60))


@pytest.fixture
def artifacts(tmp_path, request) -> Path:
    root = os.environ.get("FINETUNE_ARTIFACTS")
    folder = Path(root) / request.node.name if root else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _drive(server, artifacts: Path, job: dict, timeout: float = 300.0) -> dict:
    job = {"url": server.url, "out_dir": str(artifacts), **job}
    job_path = artifacts / "job.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    env = {**os.environ, "CHROMIUM": CHROMIUM, "PLAYWRIGHT_CORE_DIR": PLAYWRIGHT_CORE_DIR}
    proc = subprocess.run([NODE, str(DRIVER), str(job_path)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO_ROOT)
    result_path = artifacts / "result.json"
    if not result_path.exists():
        pytest.fail(f"the browser driver wrote no result (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if result.get("error"):
        pytest.fail(f"browser driver error: {result['error']}\n--- ComfyUI log tail ---\n{server.log_tail(60)}")
    ours = [e for e in result.get("page_errors", []) if "finetune" in e]
    assert not ours, f"errors from our extension in the page: {ours}"
    assert {"comfy_finetune.training_view", "comfy_finetune.notes"} <= set(result.get("extensions", []))
    return result


def _count_colour(png: Path, rgb: tuple[int, int, int], tol: int = 24) -> int:
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1).sum())


def test_training_view_draws_the_loss_and_previews_and_is_saved(server, node_defs, artifacts):
    path, workflow = _training_example()
    result = _drive(server, artifacts, {"task": "training", "workflow": workflow, "node_type": "FinetuneTrainLoRA",
                                        "widgets": {"steps": STEPS, "validate_every": VALIDATE_EVERY},
                                        "timeout_s": 240})
    assert result["done"] == "success", f"{path.name} did not run: {result.get('execution_error')}"
    node_id = str(result["node_id"])
    assert result["has_view_widget"] and result["view_serialized"] is False
    assert result["saved_before_training"] is None  # an untrained node adds nothing to the workflow

    # every optimizer step reached the page as an event naming this node, and became a point on its chart
    events = result["events"]
    assert [e["step"] for e in events] == list(range(1, STEPS + 1))
    assert {(e["node_id"], e["display_node"], e["node"]) for e in events} == {(node_id, node_id, "FinetuneTrainLoRA")}
    assert result["live_points"] == STEPS
    assert result["live_info"]["step"] == STEPS and result["live_info"]["steps"] == STEPS
    assert result["serialized_points"] == [[e["step"], e["loss"]] for e in events]  # saved in the workflow as drawn

    # validation samples: our event at every validate_every step, and the host's own preview on the node
    previews = result["preview_events"]
    assert [p["step"] for p in previews] == list(range(VALIDATE_EVERY, STEPS + 1, VALIDATE_EVERY))
    assert all(p["node_id"] == node_id and p["image"].startswith("data:image/jpeg;base64,") for p in previews)
    assert result["host_previews"].count(node_id) >= len(previews)
    assert result["preview_drawn"] and result["stored_preview"] == "data:image/jpeg;base64,"

    # the chart is in the pixels: the live screenshot (mid-run) and the final one show the smoothed line
    shots = {Path(p).name: Path(p) for p in result["screenshots"]}
    assert {"training-live.png", "training-view.png", "training-reloaded.png"} <= set(shots)
    for name in ("training-live.png", "training-view.png", "training-reloaded.png"):
        assert _count_colour(shots[name], SMOOTH_RGB) > 40, f"no smoothed loss line drawn in {name}"

    # reloading the saved workflow redraws the same series
    reloaded = result["reloaded"]
    assert reloaded["has_view_widget"] and reloaded["points"] == STEPS and reloaded["view_points"] == STEPS
    assert reloaded["info"]["step"] == STEPS

    # the view adds no widget value that shifts the others: the saved workflow converts to the inputs set
    saved_node = {"id": result["node_id"], "type": "FinetuneTrainLoRA", "inputs": [], "outputs": [],
                  "widgets_values": result["serialized_widgets_values"]}
    api = ui_to_api({"nodes": [saved_node], "links": []}, node_defs)
    inputs = api[node_id]["inputs"]
    assert inputs["steps"] == STEPS and inputs["validate_every"] == VALIDATE_EVERY


def test_training_view_routes_decimates_and_rolls_back(server, artifacts):
    _, workflow = _training_example()
    n = 1000
    result = _drive(server, artifacts, {"task": "synthetic", "workflow": workflow, "node_type": "FinetuneTrainLoRA",
                                        "events": n})
    assert result["first_points"] == 0 and result["second_live_points"] == n  # events go to the node they name
    assert result["after_rollback"] == n - 50  # a NaN rollback drops the steps undone
    assert 100 <= result["saved_count"] <= 300  # decimated in the saved workflow
    assert result["saved_first"] == [1, 1] and result["saved_last"][0] == n - 50
    assert result["saved_steps_increasing"]
    assert result["new_run_points"] == 1  # a new run replaces the old series
    assert result["ambiguous_ignored"] and result["single_node_fallback"] == 1


def _scored_run(steps: int = 100, every: int = 10, best_at: int = 40) -> tuple[list, dict[str, list]]:
    """Events of a scored run as the trainer sends them (without the node ids, which the driver adds): a score before
    training, a loss event per step, a score every ``every`` steps; the score rises to its best at ``best_at`` and then
    falls. Also the score series the view should keep: {name: [[step, value], ...]}."""
    import math  # noqa: PLC0415

    def metrics(s: int) -> dict[str, float]:
        score = round(0.62 + 0.25 * (1 - ((s - best_at) / (steps - best_at)) ** 2), 6)
        return {"score": score, "judge fidelity": round(0.55 + 0.35 * s / (s + 20), 6),
                "judge class": round(0.92 - 0.0025 * s, 6)}

    events, series = [], {"score": [], "judge fidelity": [], "judge class": []}
    best_step, best_score, scoring_seconds = None, -math.inf, 0.0
    for step in range(steps + 1):
        if step:
            loss = round(0.08 + 0.12 * math.exp(-step / 30) + 0.02 * math.sin(step), 6)
            events.append(["comfy_finetune.train", {"step": step, "steps": steps, "loss": loss, "lr": 1e-4,
                                                    "images_per_second": 2.5, "eta_seconds": (steps - step) * 0.4}])
        if step % every == 0:
            m = metrics(step)
            if m["score"] > best_score:
                best_step, best_score = step, m["score"]
            scoring_seconds += 1.5
            events.append(["comfy_finetune.train_score", {
                "step": step, "steps": steps, "score": m["score"], "metrics": m, "shortfall": 0.0,
                "best_step": best_step, "best_score": best_score, "scoring_seconds": scoring_seconds,
                "training_seconds": step * 0.4}])
            for name, value in m.items():
                series[name].append([step, value])
    return events, series


def test_training_view_draws_score_curves_and_saves_them(server, artifacts):
    _, workflow = _training_example()
    events, series = _scored_run()
    new_run = [["comfy_finetune.train_score", {"step": 0, "steps": 30, "score": 0.3,
                                               "metrics": {"score": 0.3, "judge fidelity": 0.4, "judge class": 0.9},
                                               "shortfall": 0.0, "best_step": 0, "best_score": 0.3,
                                               "scoring_seconds": 1.0, "training_seconds": 0.0}],
               ["comfy_finetune.train", {"step": 1, "steps": 30, "loss": 0.2, "lr": 1e-4, "images_per_second": 2.0,
                                         "eta_seconds": 29.0}]]
    result = _drive(server, artifacts, {"task": "scores", "workflow": workflow, "node_type": "FinetuneTrainLoRA",
                                        "events": events, "new_run_events": new_run})
    best = max(series["score"], key=lambda p: p[1])
    assert best[0] == 40
    header = f"score {series['score'][-1][1]:.4g} (best {best[1]:.4g} @ 40)"  # the view's fmt: 4 significant digits

    def header_lines(texts):
        return [t for t in texts if t.startswith("score ")]

    before, first, run = result["before"], result["after_first_score"], result["after_run"]
    assert before["stored"] is None and not before["view_scores"]  # the example carries no training data

    # the first score grows the view by the score band, and the node grows so that the band fits in it
    assert first["widget_height"] >= before["widget_height"] + 50, (before, first)
    assert first["node_size"][1] >= before["node_size"][1]
    for state in (first, run):
        assert state["widget_y"] is not None
        assert state["node_size"][1] >= state["widget_y"] + state["widget_height"], f"the view overflows: {state}"

    # every score of every series reached the node and its saved properties; the loss too
    assert run["view_scores"] == {name: len(points) for name, points in series.items()}
    assert run["stored"]["scores"] == series and run["saved"]["scores"] == series
    assert run["stored"]["score_info"]["best_step"] == 40 and run["stored"]["score_info"]["best_score"] == best[1]
    assert run["view_score_info"]["best_step"] == 40 and run["view_points"] == 100
    assert len(run["stored"]["points"]) == 100 and run["stored"]["info"]["step"] == 100
    assert any(t.startswith(header) for t in header_lines(run["texts"])), header_lines(run["texts"])
    assert any(t.startswith("step 100/100") for t in run["texts"])

    # the score band is in the pixels: the primary line in its colour, none before the scores came
    shots = {Path(p).name: Path(p) for p in result["screenshots"]}
    assert {"scores-before.png", "scores-view.png", "scores-reloaded.png", "scores-new-run.png"} <= set(shots)
    assert _count_colour(shots["scores-before.png"], SCORE_RGB) < 20
    assert _count_colour(shots["scores-view.png"], SCORE_RGB) > 300, "no primary score line drawn"
    for name, rgb in METRIC_RGB.items():
        assert _count_colour(shots["scores-view.png"], rgb) > 100, f"no {name} line drawn"
    assert _count_colour(shots["scores-before.png"], BEST_RGB) == 0
    assert _count_colour(shots["scores-view.png"], BEST_RGB) > 40, "no best-step marker drawn"

    # saved in the workflow, and redrawn from it after reloading
    assert result["serialized"]["ft_training"]["scores"] == series
    assert result["serialized"]["ft_training"]["score_info"]["best_step"] == 40
    reloaded = result["reloaded"]
    assert reloaded["stored"]["scores"] == series and reloaded["stored"]["score_info"]["best_step"] == 40
    assert reloaded["view_scores"] == run["view_scores"] and reloaded["view_score_info"]["best_step"] == 40
    assert reloaded["widget_height"] == run["widget_height"]
    assert reloaded["node_size"][1] >= reloaded["widget_y"] + reloaded["widget_height"]
    assert any(t.startswith(header) for t in header_lines(reloaded["texts"])), header_lines(reloaded["texts"])
    assert _count_colour(shots["scores-reloaded.png"], SCORE_RGB) > 300, "the scores were not redrawn after reload"

    # a new run: its score before training clears the old scores and loss; its first loss step appends
    new = result["new_run"]
    assert new["view_scores"] == {"score": 1, "judge fidelity": 1, "judge class": 1}
    assert new["stored"]["scores"] == {"score": [[0, 0.3]], "judge fidelity": [[0, 0.4]], "judge class": [[0, 0.9]]}
    assert new["stored"]["score_info"]["best_step"] == 0 and new["view_points"] == 1
    assert new["saved"]["points"] == [[1, 0.2]] and new["saved"]["info"]["steps"] == 30
    assert new["saved"]["scores"] == new["stored"]["scores"]
    assert not any("@ 40" in t for t in header_lines(new["texts"])), header_lines(new["texts"])


def test_bridge_graphs_link_to_native_nodes_in_the_frontend(server, artifacts):
    graphs = json.loads(BRIDGE_GRAPHS.read_text(encoding="utf-8"))["graphs"]
    result = _drive(server, artifacts, {"task": "graphs", "graphs": graphs, "width": 1600, "height": 1000})
    assert [g["name"] for g in result["graphs"]] == [g["name"] for g in graphs]
    for graph in result["graphs"]:
        assert graph["problems"] == [], graph["name"]
        refused = [f"{link['from']} -> {link['to']}" for link in graph["links"] if not link["linked"]]
        assert refused == [], f"{graph['name']}: the frontend refused {refused}"
    assert {Path(p).name for p in result["screenshots"]} == {f"{g['name']}.png" for g in graphs}
