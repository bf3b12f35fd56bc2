"""Headless executor (ComfyUI's validation and execution order) and the native image node stand-ins."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError, Interrupted, WorkflowError
from comfy_finetune.headless.executor import Executor, NodeExecutionError, PromptValidationError, execute
from comfy_finetune.headless.native_nodes import NATIVE_NODE_CLASSES, LoadImage

RUNS: list[tuple[str, object]] = []  # (class name, value) per call of a dummy node


class Const:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -10, "max": 100})}}

    def run(self, value):
        RUNS.append(("Const", value))
        return (value,)


class Add:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT",), "b": ("INT",)}, "optional": {"scale": ("FLOAT", {"min": 0.0})}}

    def run(self, a, b, **kw):
        RUNS.append(("Add", (a, b, kw)))
        return (int((a + b) * kw.get("scale", 1)),)


class Collect:
    OUTPUT_NODE = True
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}, "hidden": {"uid": "UNIQUE_ID", "prompt": "PROMPT",
                                                            "pnginfo": "EXTRA_PNGINFO"}}

    def run(self, value, uid, prompt, pnginfo):
        RUNS.append(("Collect", value))
        self.seen = (uid, prompt, pnginfo)
        return {"ui": {"values": [value], "uid": [uid]}, "result": (value,)}


class Pick:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mode": (["fast", "slow"],), "flag": ("BOOLEAN",), "ratio": ("FLOAT", {"max": 1.0})},
                "optional": {"image": ("IMAGE",), "n": ("INT",)}}

    def run(self, mode, flag, ratio, image=None, n=None):
        RUNS.append(("Pick", (mode, flag, ratio, n)))
        return {"ui": {"text": [mode]}}


class Checked:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (["a", "b"],), "count": ("INT", {"min": 0, "max": 3}), "x": ("INT",)}}

    @classmethod
    def VALIDATE_INPUTS(cls, name, count, x):
        RUNS.append(("VALIDATE", (name, count, x)))
        return True if name != "bad" else f"name {name!r} is not allowed"

    def run(self, name, count, x):
        return {"ui": {"name": [name]}}


class MakeImage:
    RETURN_TYPES = ("IMAGE", "*")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"h": ("INT", {"default": 8}), "w": ("INT", {"default": 8})}}

    def run(self, h, w):
        RUNS.append(("MakeImage", (h, w)))
        ramp = torch.linspace(0, 1, h * w * 3).reshape(1, h, w, 3)
        return (ramp, None)


class Boom:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": ("STRING",)}}

    def run(self, kind):
        if kind == "interrupt":
            raise Interrupted("stop")
        raise ValueError("disk on fire")


class Fan:
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"n": ("INT",)}}

    def run(self, n):
        return (list(range(n)),)


class Gather:
    OUTPUT_NODE = True
    INPUT_IS_LIST = True
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT",)}}

    def run(self, values):
        return {"ui": {"got": [list(values)]}, "result": (sum(values),)}


class Volatile:
    OUTPUT_NODE = True
    RETURN_TYPES = ()
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"v": ("INT",)}}

    @classmethod
    def IS_CHANGED(cls, v):
        return float("nan") if v < 0 else v

    def run(self, v):
        RUNS.append(("Volatile", (v, id(self))))
        return {}


NODES = {c.__name__: c for c in (Const, Add, Collect, Pick, Checked, MakeImage, Boom, Fan, Gather, Volatile)}
NODES.update(NATIVE_NODE_CLASSES)


@pytest.fixture(autouse=True)
def _clean(tmp_path, monkeypatch):
    RUNS.clear()
    (tmp_path / "in").mkdir()
    monkeypatch.setattr(host._settings, "output_dir", tmp_path / "out")
    monkeypatch.setattr(host._settings, "input_dir", tmp_path / "in")
    monkeypatch.setattr(host._settings, "force_headless", True)


def graph(a=5, b=7):
    return {"1": {"class_type": "Const", "inputs": {"value": a}, "_meta": {"title": "A"}},
            "2": {"class_type": "Const", "inputs": {"value": b}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "4": {"class_type": "Collect", "inputs": {"value": ["3", 0]}},
            "5": {"class_type": "Const", "inputs": {"value": 99}}}  # not reachable from an output


def names(runs):
    return sorted(name for name, _ in runs)


# ---------------------------------------------------------------------------------------------- running
def test_runs_reachable_nodes_in_order_with_hidden_inputs():
    ex = Executor(NODES)
    api = graph()
    res = ex.execute(api, workflow={"nodes": []})
    assert res.outputs["4"] == (12,)
    assert res.ui["4"] == {"values": [12], "uid": ["4"]}
    assert res.executed.index("3") > max(res.executed.index("1"), res.executed.index("2"))
    assert res.executed[-1] == "4" and "5" not in res.executed and res.cached == []
    uid, prompt, pnginfo = ex._objects[("4", "Collect")].seen
    assert (uid, prompt, pnginfo) == ("4", api, {"workflow": {"nodes": []}})
    assert execute(graph(), NODES).outputs["4"] == (12,)  # module-level helper; no workflow -> None
    assert RUNS[-1] == ("Collect", 12)


def test_optional_inputs_absent_are_not_passed_and_constants_are_coerced():
    api = {"1": {"class_type": "Pick", "inputs": {"mode": "slow", "flag": 0, "ratio": "0.5"}}}
    execute(api, NODES)
    assert RUNS == [("Pick", ("slow", False, 0.5, None))]
    api["1"]["inputs"]["n"] = "3"
    execute(api, NODES)
    assert RUNS[-1] == ("Pick", ("slow", False, 0.5, 3))


def test_cache_reuses_outputs_and_reruns_only_changed_nodes_and_descendants():
    ex = Executor(NODES)
    first = ex.execute(graph())
    assert names(RUNS) == ["Add", "Collect", "Const", "Const"]
    RUNS.clear()
    second = ex.execute(graph())
    assert RUNS == [] and second.executed == [] and sorted(second.cached) == ["4"]
    assert second.outputs["4"] == (12,) and second.ui["4"] == first.ui["4"]  # ui replayed from cache
    third = ex.execute(graph(b=8))
    assert sorted(third.executed) == ["2", "3", "4"] and "1" in third.cached
    assert ("Const", 5) not in RUNS and third.outputs["4"] == (13,)
    RUNS.clear()
    execute(graph(b=8), NODES)  # a fresh executor has no cache
    assert len(RUNS) == 4


def test_instances_persist_and_is_changed_controls_reruns():
    ex = Executor(NODES)
    api = {"1": {"class_type": "Volatile", "inputs": {"v": 1}}}
    ex.execute(api)
    ex.execute(api)
    assert len(RUNS) == 1
    api["1"]["inputs"]["v"] = -1  # IS_CHANGED -> NaN: runs every time, same instance
    ex.execute(api)
    ex.execute(api)
    assert len(RUNS) == 3 and RUNS[1][1][1] == RUNS[2][1][1] == RUNS[0][1][1]
    ex.execute({"9": {"class_type": "Volatile", "inputs": {"v": 1}}})  # node 1 gone: cache cleaned
    assert ("1", "Volatile") not in ex._objects


def test_list_fan_out_and_input_is_list():
    api = {"1": {"class_type": "Fan", "inputs": {"n": 3}},
           "2": {"class_type": "Const", "inputs": {"value": 10}},
           "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
           "4": {"class_type": "Gather", "inputs": {"values": ["3", 0]}}}
    res = execute(api, NODES)
    assert res.outputs["3"] == ([10, 11, 12],)  # Add ran 3 times, the short input repeated
    assert res.outputs["1"] == ([0, 1, 2],)
    assert res.ui["4"] == {"got": [[10, 11, 12]]} and res.outputs["4"] == (33,)


def test_outputs_argument_limits_the_run():
    res = execute(graph(), NODES, outputs=["5"])
    assert res.executed == ["5"] and RUNS == [("Const", 99)]
    with pytest.raises(WorkflowError, match="not in the workflow"):
        execute(graph(), NODES, outputs=["42"])
    with pytest.raises(WorkflowError, match="no output node"):
        execute({"1": {"class_type": "Const", "inputs": {"value": 1}}}, NODES)


# ---------------------------------------------------------------------------------------------- validation
def problems_of(api):
    with pytest.raises(PromptValidationError) as err:
        execute(api, NODES)
    assert RUNS == [] or all(name == "VALIDATE" for name, _ in RUNS)  # nothing ran
    return err.value, {(p.node_id, p.input): p for p in err.value.problems}


def test_validation_collects_every_problem_with_node_input_and_fix():
    api = {"1": {"class_type": "MakeImage", "inputs": {"h": 4, "w": 4}},
           "2": {"class_type": "Const", "inputs": {"value": 500}},
           "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},  # IMAGE into INT; no 'b' issue
           "4": {"class_type": "Collect", "inputs": {"value": ["3", 0]}},
           "5": {"class_type": "Pick", "inputs": {"mode": "medium", "flag": True, "ratio": "x"}},
           "6": {"class_type": "Collect", "inputs": {}}}
    err, found = problems_of(api)
    assert set(found) == {("3", "a"), ("2", "value"), ("5", "mode"), ("5", "ratio"), ("6", "value")}
    assert "IMAGE" in found[("3", "a")].problem and "INT" in found[("3", "a")].fix
    assert "maximum 100" in found[("2", "value")].problem
    assert "'fast'" in found[("5", "mode")].fix
    assert "cannot be converted to FLOAT" in found[("5", "ratio")].problem
    assert "missing" in found[("6", "value")].problem
    text = str(err)
    assert "Node 2 (Const/Const) input 'value'" in text and "Fix:" in text and "5 problems" in text


def test_star_is_not_a_wildcard_and_unions_overlap():
    api = {"1": {"class_type": "MakeImage", "inputs": {"h": 4, "w": 4}},
           "2": {"class_type": "Pick", "inputs": {"mode": "fast", "flag": True, "ratio": 0.1, "image": ["1", 1]}}}
    _, found = problems_of(api)
    assert "'*'" in found[("2", "image")].problem
    RUNS.clear()
    MakeImage.RETURN_TYPES = ("IMAGE,MASK", "*")
    try:
        api["2"]["inputs"]["image"] = ["1", 0]
        execute(api, NODES)
    finally:
        MakeImage.RETURN_TYPES = ("IMAGE", "*")
    assert ("Pick", ("fast", True, 0.1, None)) in RUNS


def test_min_and_below_min():
    _, found = problems_of({"1": {"class_type": "Const", "inputs": {"value": -11}},
                            "2": {"class_type": "Collect", "inputs": {"value": ["1", 0]}}})
    assert "minimum -10" in found[("1", "value")].problem


def test_validate_inputs_gets_constants_and_none_for_links_and_exempts_its_inputs():
    api = {"1": {"class_type": "Const", "inputs": {"value": 1}},
           "2": {"class_type": "Checked", "inputs": {"name": "zzz", "count": 50, "x": ["1", 0]}}}
    execute(api, NODES)  # 'zzz' and 50 would fail the combo/max checks, but VALIDATE_INPUTS owns them
    assert ("VALIDATE", ("zzz", 50, None)) in RUNS
    RUNS.clear()
    api["2"]["inputs"]["name"] = "bad"
    _, found = problems_of(api)
    assert "name 'bad' is not allowed" in found[("2", None)].problem


def test_unknown_class_and_dangling_link():
    with pytest.raises(PromptValidationError, match="'Nope' is not available"):
        execute({"1": {"class_type": "Nope", "inputs": {}}}, NODES)
    _, found = problems_of({"1": {"class_type": "Collect", "inputs": {"value": ["77", 0]}}})
    assert "node 77" in found[("1", "value")].problem
    _, found = problems_of({"1": {"class_type": "Const", "inputs": {"value": 1}},
                            "2": {"class_type": "Collect", "inputs": {"value": ["1", 3]}}})
    assert "only 1 output" in found[("2", "value")].problem


# ---------------------------------------------------------------------------------------------- errors
def test_node_exception_is_wrapped_naming_the_node():
    api = {"7": {"class_type": "Boom", "inputs": {"kind": "x"}, "_meta": {"title": "Kaboom"}}}
    with pytest.raises(NodeExecutionError) as err:
        execute(api, NODES)
    assert str(err.value).startswith("Node 7 (Boom/Kaboom) failed: disk on fire")
    assert isinstance(err.value.__cause__, ValueError) and isinstance(err.value, FinetuneError)


def test_interrupt_propagates_unchanged_and_finished_nodes_stay_cached():
    ex = Executor(NODES)
    api = graph()
    api["9"] = {"class_type": "Boom", "inputs": {"kind": "interrupt"}}
    with pytest.raises(Interrupted):
        ex.execute(api)
    assert [name for name, _ in RUNS] == ["Const", "Const", "Add", "Collect"]
    RUNS.clear()
    assert ex.execute(api, outputs=["4"]).executed == [] and RUNS == []


# ---------------------------------------------------------------------------------------------- native nodes
def save_api(prefix="ComfyUI", node="SaveImage"):
    inputs = {"images": ["1", 0]} if node == "PreviewImage" else {"images": ["1", 0], "filename_prefix": prefix}
    return {"1": {"class_type": "MakeImage", "inputs": {"h": 6, "w": 5}},
            "2": {"class_type": node, "inputs": inputs}}


def test_save_image_counter_metadata_and_ui(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ComfyUI_00003_.png", "ComfyUI_00007_.png", "Other_00099_.png", "ComfyUI_x_.png"):
        (out / name).write_bytes(b"")
    api = save_api()
    res = execute(api, NODES, workflow={"nodes": [1]})
    assert res.ui["2"] == {"images": [{"filename": "ComfyUI_00008_.png", "subfolder": "", "type": "output"}]}
    with Image.open(out / "ComfyUI_00008_.png") as img:
        assert img.size == (5, 6)
        assert json.loads(img.text["prompt"]) == api and json.loads(img.text["workflow"]) == {"nodes": [1]}
        pixels = np.asarray(img)
    expected = np.clip(255.0 * MakeImage().run(6, 5)[0][0].numpy(), 0, 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    res = execute(save_api("runs/cat"), NODES)
    assert res.ui["2"]["images"][0] == {"filename": "cat_00001_.png", "subfolder": "runs", "type": "output"}
    assert sorted(os.listdir(out / "runs")) == ["cat_00001_.png"]  # no temp files left behind


def test_save_image_write_is_atomic(tmp_path, monkeypatch):
    calls = []
    real_link = os.link

    def spy(src, dst):  # the temp file is published by a hard link, which never replaces an existing file
        calls.append((os.path.dirname(src), os.path.dirname(dst), os.path.exists(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "link", spy)
    execute(save_api(), NODES)
    assert calls == [(str(tmp_path / "out"), str(tmp_path / "out"), False)]

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(NodeExecutionError, match="disk full"):
        execute(save_api(), NODES)
    assert sorted(os.listdir(tmp_path / "out")) == ["ComfyUI_00001_.png"]


@pytest.mark.parametrize("prefix", ["../evil", "/tmp/evil", "a/../../evil", "link/evil"])
def test_save_image_never_escapes_the_output_folder(tmp_path, prefix):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(NodeExecutionError, match="outside the output folder"):
        execute(save_api(prefix), NODES)
    assert list((tmp_path / "elsewhere").iterdir()) == [] and not (tmp_path / "evil_00001_.png").exists()


def test_preview_image_goes_to_temp(tmp_path):
    res = execute(save_api(node="PreviewImage"), NODES)
    (entry,) = res.ui["2"]["images"]
    assert entry["type"] == "temp" and entry["subfolder"] == ""
    assert entry["filename"].startswith("ComfyUI_temp_") and entry["filename"].endswith("_00001_.png")
    assert len(entry["filename"]) == len("ComfyUI_temp_abcde_00001_.png")
    assert (host.temp_dir() / entry["filename"]).is_file()


def test_load_image_rgba_mask_and_plain_rgb(tmp_path):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = [[0, 51, 255, 255]] * 3
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "a.png")
    Image.new("RGB", (4, 3), (0, 0, 255)).save(tmp_path / "in" / "b.png")
    assert LoadImage.INPUT_TYPES()["required"]["image"][0] == ["a.png", "b.png"]
    image, mask = LoadImage().load_image("a.png")
    assert image.shape == (1, 3, 4, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert torch.allclose(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert mask.shape == (1, 3, 4) and torch.allclose(mask[0, 0], torch.tensor([1.0, 0.8, 0.0, 0.0]))
    image, mask = LoadImage().load_image("b.png")
    assert image.shape == (1, 3, 4, 3) and mask.shape == (1, 64, 64) and not mask.any()


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)  # H=2, W=4, a white top-left pixel
    pixels[0, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "in" / "r.png", exif=exif)
    image, _ = LoadImage().load_image("r.png")
    assert image.shape == (1, 4, 2, 3)
    assert image[0, 0, 1].tolist() == [1.0, 1.0, 1.0] and image[0].sum().item() == 3.0


def test_load_image_annotations_and_folder_escape(tmp_path):
    (tmp_path / "out").mkdir()
    Image.new("RGB", (2, 2), (255, 255, 255)).save(tmp_path / "out" / "o.png")
    Image.new("RGB", (2, 2)).save(tmp_path / "secret.png")
    image, _ = LoadImage().load_image("o.png [output]")
    assert image.min().item() == 1.0
    with pytest.raises(FinetuneError, match="outside the folder"):
        LoadImage().load_image("../secret.png")
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "../secret.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    _, found = problems_of(api)
    assert "outside the folder" in found[("1", "image")].problem
    api["1"]["inputs"]["image"] = "missing.png"
    _, found = problems_of(api)
    assert "Invalid image file: missing.png" in found[("1", "image")].problem


def test_load_image_reruns_when_the_file_changes(tmp_path):
    path = tmp_path / "in" / "c.png"
    Image.new("RGB", (2, 2), (0, 0, 0)).save(path)
    ex = Executor(NODES)
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "c.png"}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "c"}}}
    ex.execute(api)
    assert ex.execute(api).executed == []
    Image.new("RGB", (2, 2), (255, 0, 0)).save(path)
    assert ex.execute(api).executed == ["1", "2"]
    assert math.isclose(ex.execute(api, outputs=["1"]).outputs["1"][0][0, 0, 0, 0].item(), 1.0)


def test_nodes_run_under_inference_mode_like_comfyui():
    class Probe:
        OUTPUT_NODE = True
        RETURN_TYPES = ()
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {}

        def run(self):
            RUNS.append(("Probe", torch.is_inference_mode_enabled()))
            return {}

    execute({"1": {"class_type": "Probe", "inputs": {}}}, {"Probe": Probe})
    Executor({"Probe": Probe}, inference_mode=False).execute({"1": {"class_type": "Probe", "inputs": {}}})
    assert RUNS == [("Probe", True), ("Probe", False)]


def test_any_type_with_custom_ne_and_input_types_skip_the_type_check():
    class AnyType(str):  # comfy.comfy_types.IO.ANY: "*" whose __ne__ always says equal
        def __ne__(self, other):
            return False

    class Sink:
        OUTPUT_NODE = True
        RETURN_TYPES = ()
        FUNCTION = "run"
        kind = "INT"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": (cls.kind,)}}

        def run(self, x):
            RUNS.append(("Sink", x))
            return {}

    class TypedSink(Sink):
        @classmethod
        def VALIDATE_INPUTS(cls, input_types):
            RUNS.append(("VALIDATE", input_types))
            return True

    nodes = dict(NODES, Sink=Sink, TypedSink=TypedSink)
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Sink", "inputs": {"x": ["1", 0]}}}
    Sink.kind = "IMAGE"
    with pytest.raises(PromptValidationError, match="takes 'IMAGE'"):
        execute(api, nodes)
    Sink.kind = AnyType("*")
    execute(api, nodes)
    assert RUNS[-1] == ("Sink", 3)
    Sink.kind = "IMAGE"
    api["2"]["class_type"] = "TypedSink"
    execute(api, nodes)
    assert ("VALIDATE", {"x": "INT"}) in RUNS and RUNS[-1] == ("Sink", 3)


def test_ui_workflow_converted_with_native_nodes_runs_end_to_end(tmp_path):
    from comfy_finetune.headless.workflow import ui_to_api

    Image.new("RGBA", (3, 2), (10, 20, 30, 0)).save(tmp_path / "in" / "pic.png")
    ui = {"nodes": [
        {"id": 1, "type": "LoadImage", "mode": 0, "widgets_values": ["pic.png", "image"], "inputs": [],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}, {"name": "MASK", "type": "MASK", "links": []}]},
        {"id": 2, "type": "Note", "mode": 0, "widgets_values": ["hello"]},
        {"id": 3, "type": "SaveImage", "mode": 0, "widgets_values": ["e2e/run"], "title": "Save it",
         "inputs": [{"name": "images", "type": "IMAGE", "link": 1}]}],
        "links": [[1, 1, 0, 3, 0, "IMAGE"]], "version": 0.4}
    api = ui_to_api(ui, NATIVE_NODE_CLASSES)
    res = execute(api, NATIVE_NODE_CLASSES, workflow=ui)
    assert res.ui["3"]["images"] == [{"filename": "run_00001_.png", "subfolder": "e2e", "type": "output"}]
    with Image.open(tmp_path / "out" / "e2e" / "run_00001_.png") as img:
        assert img.getpixel((0, 0)) == (10, 20, 30) and json.loads(img.text["workflow"]) == ui
    assert res.outputs["1"][1].shape == (1, 2, 3) and res.outputs["1"][1].min().item() == 1.0
