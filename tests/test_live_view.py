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
import sys
import types

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
