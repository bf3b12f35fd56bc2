"""Every node class honours ComfyUI's V1 node contract (INPUT_TYPES, RETURN_TYPES, FUNCTION, CATEGORY and
the optional attributes ComfyUI's server reads in ``server.py::node_info``)."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

import comfy_finetune
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, RENAMED_NODE_IDS

ROOT = Path(comfy_finetune.__file__).parent
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NATIVE_TYPES = {"IMAGE", "MASK", "LATENT", "CONDITIONING", "MODEL", "CLIP", "VAE", "LORA_MODEL"}
# A sample of ComfyUI's built-in node ids: a pack cannot override them (the host skips them silently).
CORE_IDS = {"KSampler", "CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "SaveImage", "PreviewImage",
            "LoadImage", "VAEDecode", "EmptyLatentImage", "TrainLoraNode", "SaveLoRANode", "LoraModelLoader"}

NODES = sorted(NODE_CLASS_MAPPINGS.items())


def test_expected_nodes_registered():
    assert {"LoadBase", "AddLoRA", "NegativePrompt", "Sample"} <= set(NODE_CLASS_MAPPINGS)
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert not (set(NODE_CLASS_MAPPINGS) & CORE_IDS)


def test_old_ids_are_hidden_aliases_with_the_same_schema():
    """Each id from before a rename is registered as a subclass of the current class that only sets
    ``DEPRECATED = True`` (ComfyUI then loads it in saved workflows but leaves it out of search and the node menu):
    same inputs, outputs, function, category and display name. Current ids are not deprecated."""
    current = set(NODE_CLASS_MAPPINGS) - set(RENAMED_NODE_IDS)
    assert RENAMED_NODE_IDS and not set(RENAMED_NODE_IDS) & current
    for old_id, new_id in RENAMED_NODE_IDS.items():
        old, new = NODE_CLASS_MAPPINGS[old_id], NODE_CLASS_MAPPINGS[new_id]
        assert new.NODE_ID == new_id and new_id.startswith("Finetune") and old is not new
        assert old.__bases__ == (new,) and old.DEPRECATED is True
        assert set(vars(old)) <= {"DEPRECATED", "__module__", "__doc__", "__qualname__", "__dict__", "__weakref__"}
        assert repr(old.INPUT_TYPES()) == repr(new.INPUT_TYPES())
        for attr in ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_TOOLTIPS", "FUNCTION", "CATEGORY", "DESCRIPTION",
                     "OUTPUT_NODE", "NODE_ID"):
            assert getattr(old, attr, None) == getattr(new, attr, None), (old_id, attr)
        assert getattr(old, new.FUNCTION) is getattr(new, new.FUNCTION)
        assert NODE_DISPLAY_NAME_MAPPINGS[old_id] == NODE_DISPLAY_NAME_MAPPINGS[new_id]
    assert not any(getattr(NODE_CLASS_MAPPINGS[i], "DEPRECATED", False) for i in current)


def _specs(cls):
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}, cls
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            yield section, name, spec


@pytest.mark.parametrize("node_id,cls", NODES)
def test_schema(node_id, cls):
    assert cls.CATEGORY.startswith("finetune"), "one category tree"
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
    assert NODE_DISPLAY_NAME_MAPPINGS[node_id].strip()
    assert isinstance(cls.RETURN_TYPES, tuple)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert all(t.strip() for t in cls.OUTPUT_TOOLTIPS)
    for t in cls.RETURN_TYPES:
        assert t in NATIVE_TYPES or t in PRIMITIVES or t.startswith("FT_"), f"custom type {t} must be namespaced"
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    for section, name, spec in _specs(cls):
        assert isinstance(spec, tuple) and len(spec) in (1, 2), (name, spec)
        typ = spec[0]
        opts = spec[1] if len(spec) == 2 else {}
        assert opts.get("tooltip", "").strip(), f"{node_id}.{name} needs a tooltip"
        if isinstance(typ, list):
            assert typ, f"{node_id}.{name}: empty combo"
            if "default" in opts:
                assert opts["default"] in typ
        else:
            assert typ in PRIMITIVES or typ in NATIVE_TYPES or typ.startswith("FT_"), (name, typ)
        if typ in ("INT", "FLOAT") and "default" in opts:
            assert opts.get("min", float("-inf")) <= opts["default"] <= opts.get("max", float("inf"))
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert name in params or takes_kwargs, f"{node_id}.{cls.FUNCTION} must accept '{name}'"
        if section == "optional" and name in params:
            assert params[name].default is not inspect.Parameter.empty, f"optional '{name}' needs a default"


@pytest.mark.parametrize("node_id,cls", NODES)
def test_input_types_is_cheap_and_deterministic(node_id, cls):
    assert repr(cls.INPUT_TYPES()) == repr(cls.INPUT_TYPES())


def test_seed_has_control_after_generate():
    seed = NODE_CLASS_MAPPINGS["Sample"].INPUT_TYPES()["required"]["seed"]
    assert seed[0] == "INT" and seed[1]["control_after_generate"] is True
    assert seed[1]["max"] == 0xFFFFFFFFFFFFFFFF


def _py_files(*dirs):
    for d in dirs:
        yield from (ROOT / d).rglob("*.py") if d else ROOT.glob("*.py")


def test_no_absolute_self_imports():
    """ComfyUI imports the pack by file path: absolute imports of our own name would fail there."""
    pat = re.compile(r"^\s*(from|import)\s+comfy_finetune\b", re.M)
    for path in [*_py_files("", "core", "nodes", "training", "headless")]:
        assert not pat.search(path.read_text()), f"{path} imports comfy_finetune absolutely"


def test_core_never_imports_comfyui():
    pat = re.compile(r"^\s*(from|import)\s+(comfy|folder_paths|server|nodes|execution|comfy_execution)\b", re.M)
    for path in [*_py_files("core", "nodes", "training", "headless")]:
        assert not pat.search(path.read_text()), f"{path} imports ComfyUI; only host.py may"


def test_core_names_no_node():
    """The core raises with the input and the fix; the node boundary (nodes/base.py) says which node it was."""
    names = "|".join(re.escape(n) for n in NODE_CLASS_MAPPINGS)
    pat = re.compile(rf"""node(: str(\s*\|\s*None)?)?\s*=\s*["']({names})["']""")
    runner = {"executor.py", "workflow.py"}  # the headless runner's graph code: it names the graph's nodes
    for path in _py_files("core"):
        if path.name not in runner:
            assert not pat.search(path.read_text()), f"{path} attributes an error to a node by name"


def test_errors_read_well_with_and_without_a_node():
    from comfy_finetune.core.errors import FinetuneError

    bare = FinetuneError("the file is damaged.", input="ckpt_name", fix="pick another file.")
    assert str(bare) == "input 'ckpt_name': the file is damaged. Fix: pick another file."
    assert str(FinetuneError("no input at all")) == "no input at all."
    named = bare.with_node("LoadBase")
    assert str(named) == "[LoadBase] input 'ckpt_name': the file is damaged. Fix: pick another file."
    assert (named.node, named.input, named.fix) == ("LoadBase", "ckpt_name", "pick another file.")
    assert named.with_node("Other") is named  # a given node is kept


def test_node_boundary_fills_a_missing_node_and_keeps_a_given_one():
    from comfy_finetune.core.errors import FinetuneError
    from comfy_finetune.nodes.base import FTNode

    class Probe(FTNode):
        NODE_ID = "Probe"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"default": 0})}}

        def run(self, x):
            raise FinetuneError("bad", input="x", fix="use 1", node="Elsewhere" if x else None)

    with pytest.raises(FinetuneError) as err:
        Probe().run(0)
    assert (err.value.node, err.value.input, err.value.fix) == ("Probe", "x", "use 1")
    assert str(err.value) == "[Probe] input 'x': bad. Fix: use 1."
    with pytest.raises(FinetuneError) as err:
        Probe().run(1)
    assert err.value.node == "Elsewhere"


def test_loads_like_comfyui_does(tmp_path):
    """ComfyUI registers the package under its folder path (dashes and all) via spec_from_file_location."""
    name = str(tmp_path / "custom_nodes" / "comfyui-finetune").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
        assert (ROOT / module.WEB_DIRECTORY).is_dir()
        # the headless tier (runner, workflow loader, executor, native stand-ins) is not part of what ComfyUI loads
        loaded = [k for k in sys.modules if k.startswith(name + ".")]
        assert f"{name}.nodes" in loaded and not [k for k in loaded if k.startswith(f"{name}.headless")], loaded
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
