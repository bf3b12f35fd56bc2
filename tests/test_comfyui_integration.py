"""Integration test against a real ComfyUI: the pack loads, its nodes are served, its example workflows run.

Runs only when ``COMFYUI_DIR`` points at a ComfyUI checkout (skipped otherwise)::

    COMFYUI_DIR=/path/to/ComfyUI pytest tests/test_comfyui_integration.py

ComfyUI runs with ``$COMFYUI_PYTHON``, else ``<COMFYUI_DIR>/../venv/bin/python`` if it exists, else this python.
One server is started for the whole module (see ``comfyui_harness.py``); nothing is written into the checkout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

_COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
if not _COMFYUI_DIR:
    pytest.skip("COMFYUI_DIR is not set (point it at a ComfyUI checkout to run the integration test)",
                allow_module_level=True)
if not (Path(_COMFYUI_DIR) / "main.py").is_file():
    pytest.skip(f"COMFYUI_DIR={_COMFYUI_DIR!r} is not a ComfyUI checkout (no main.py)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_harness as harness  # noqa: E402

from comfy_finetune.headless.workflow import apply_overrides, ui_to_api  # noqa: E402
from comfy_finetune.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, RENAMED_NODE_IDS  # noqa: E402

pytestmark = pytest.mark.comfyui

REPO_ROOT = harness.REPO_ROOT
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
PACK = harness.PACK_FOLDER_NAME
PROMPT_TIMEOUT_S = 600.0  # a ceiling for one prompt (the 500-step scorer example took 310 s on 2 shared cores)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = harness.ComfyServer(Path(_COMFYUI_DIR).resolve(), tmp_path_factory.mktemp("comfyui"))
    try:
        srv.start()
    except harness.ServerError as exc:
        srv.stop()
        pytest.fail(str(exc), pytrace=False)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get_json("/object_info", timeout=60)


@pytest.fixture(scope="session")
def node_defs(object_info):
    return harness.node_defs_from_object_info(object_info)


def _fail_with_log(server, message: str) -> None:
    pytest.fail(f"{message}\n--- ComfyUI log tail ({server.log_path}) ---\n{server.log_tail(80)}", pytrace=False)


def _run(server, prompt, what: str) -> harness.PromptResult:
    result = server.run_prompt(prompt, timeout=PROMPT_TIMEOUT_S)
    if result.status != "success":
        err = result.error or {}
        detail = {k: err.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}
        tb = "".join(err.get("traceback") or [])
        _fail_with_log(server, f"{what}: prompt {result.prompt_id} ended with status {result.status!r} after "
                               f"{result.seconds:.1f} s: {json.dumps(detail, indent=1)}\n{tb}")
    return result


def _example_api(path: Path, node_defs) -> dict:
    return ui_to_api(json.loads(path.read_text(encoding="utf-8")), node_defs)


# ---------------------------------------------------------------------------------------------- 1. import
def test_pack_imports_without_errors(server):
    log = server.log_text()
    bad = [line for line in log.splitlines()
           if PACK in line and ("Cannot import" in line or "IMPORT FAILED" in line or "Skip" in line)]
    assert not bad, "ComfyUI failed to import the pack:\n" + "\n".join(bad) + "\n--- log tail ---\n" + \
        server.log_tail(80)
    loaded = [line for line in log.splitlines() if re.search(r"seconds.*:\s.*" + re.escape(PACK) + r"\s*$", line)]
    assert loaded, f"the pack is not in ComfyUI's 'Import times for custom nodes' table\n{server.log_tail(80)}"


# ---------------------------------------------------------------------------------------------- 2. object_info
def _input_names(spec: dict) -> dict[str, list[str]]:
    return {section: list((spec.get(section) or {}).keys()) for section in ("required", "optional")}


@pytest.mark.parametrize("node_id", sorted(NODE_CLASS_MAPPINGS))
def test_object_info_matches_node_classes(object_info, node_id):
    cls = NODE_CLASS_MAPPINGS[node_id]
    assert node_id in object_info, f"{node_id} is missing from /object_info"
    info = object_info[node_id]

    assert _input_names(info["input"]) == _input_names(cls.INPUT_TYPES()), f"{node_id}: input names differ"
    assert info["output"] == list(cls.RETURN_TYPES), f"{node_id}: output types differ"
    assert info["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[node_id]
    assert str(info["category"]).startswith("finetune"), f"{node_id}: category {info['category']!r}"
    assert info.get("python_module") == f"custom_nodes.{PACK}"
    # an old id (kept so saved workflows load) is served as deprecated: hidden from search, same schema
    assert bool(info.get("deprecated")) == (node_id in RENAMED_NODE_IDS), f"{node_id}: deprecated flag"

    for section in ("required", "optional"):
        for name, spec in (info["input"].get(section) or {}).items():
            opts = spec[1] if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert str(opts.get("tooltip") or "").strip(), f"{node_id}: input {section}.{name} has no tooltip"
    tooltips = info.get("output_tooltips")
    assert tooltips is not None, f"{node_id}: no output_tooltips"
    assert len(tooltips) == len(info["output"]), f"{node_id}: {len(tooltips)} output tooltips for " \
                                                 f"{len(info['output'])} outputs"
    assert all(str(t).strip() for t in tooltips), f"{node_id}: empty output tooltip in {tooltips}"


# ---------------------------------------------------------------------------------------------- 3. templates
def test_example_workflows_are_served(server):
    """The template browser lists ``<stem>`` (its title) from /workflow_templates, loads
    /api/workflow_templates/<pack>/<stem>.json and shows /api/workflow_templates/<pack>/<stem>.jpg."""
    assert EXAMPLES, "the pack ships no example_workflows/*.json"
    templates = server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK, [])) == sorted(p.stem for p in EXAMPLES), templates  # no .jpg listed
    for path in EXAMPLES:
        base = f"/api/workflow_templates/{PACK}/{urllib.parse.quote(path.stem, safe='()')}"  # as a browser sends it
        served = server.get_json(base + ".json")
        assert served == json.loads(path.read_text(encoding="utf-8")), f"{path.name} served differently"
        status, body, headers = server.get_raw(base + ".jpg")
        assert status == 200, f"{path.stem}.jpg: HTTP {status} (run tools/make_thumbnails.py)"
        assert headers.get("Content-Type", "").startswith("image/jpeg"), headers
        assert body == path.with_suffix(".jpg").read_bytes() and body[:3] == b"\xff\xd8\xff", path.stem


def test_frontend_takes_custom_template_thumbnails_from_stem_jpg(server):
    """The frontend this ComfyUI requires (comfyui-frontend-package) builds a custom node template's entry as
    ``{name: <stem>, mediaType: "image", mediaSubtype: "jpg"}`` and its thumbnail URL as
    ``/workflow_templates/<module>/<name>.<mediaSubtype>``: what the thumbnails above are named for."""
    bundle = _frontend_bundle(server)
    custom = re.search(r"templates\.map\(\(name\d*\) => \(\{\s*name: name\d*,\s*mediaType: \"image\",\s*"
                       r"mediaSubtype: \"jpg\"", bundle)
    assert custom, "the frontend no longer gives custom node templates a .jpg thumbnail; check its template store"
    assert re.search(r"api\.apiURL\(`/workflow_templates/\$\{sourceModule\}/\$\{template\d*\.name\}`\)", bundle), \
        "the frontend no longer loads custom node thumbnails from /workflow_templates/<module>/<name>"


def _frontend_bundle(server) -> str:
    code = "import comfyui_frontend_package, os; print(os.path.dirname(comfyui_frontend_package.__file__))"
    proc = subprocess.run([server.python, "-c", code], capture_output=True, text=True, timeout=60,
                          env=server.env())
    if proc.returncode != 0:
        pytest.skip(f"comfyui_frontend_package is not importable in ComfyUI's python: {proc.stderr[-300:]}")
    assets = Path(proc.stdout.strip()) / "static" / "assets"
    for js in sorted(assets.glob("index-*.js")):
        text = js.read_text(encoding="utf-8", errors="replace")
        if "getWorkflowTemplates" in text:
            return text
    pytest.skip(f"no frontend bundle with the template store under {assets}")


# ---------------------------------------------------------------------------------------------- 4. run examples
@pytest.mark.parametrize("workflow", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_workflow_runs(server, node_defs, workflow):
    prompt = _example_api(workflow, node_defs)
    save_nodes = [nid for nid, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert save_nodes, f"{workflow.name} has no SaveImage node"

    result = _run(server, prompt, workflow.name)

    assert (result.history.get("status") or {}).get("status_str") == "success", result.history.get("status")
    saved = server.saved_images(prompt, result)
    for nid in save_nodes:
        paths = saved.get(nid) or []
        assert paths, f"{workflow.name}: SaveImage node {nid} saved nothing (outputs: {result.history.get('outputs')})"
        source = prompt[nid]["inputs"].get("images")
        batch = prompt[source[0]]["inputs"].get("batch_size") if isinstance(source, list) else None
        if isinstance(batch, int):
            assert len(paths) == batch, f"{workflow.name}: node {nid} saved {len(paths)} images, expected {batch}"
        for p in paths:
            assert p.suffix == ".png" and p.is_file(), f"{workflow.name}: node {nid} reported {p}, which is missing"
            assert p.read_bytes()[:8] == PNG_MAGIC, f"{p} is not a PNG"
            assert server.output_dir in p.parents


# ---------------------------------------------------------------------------------------------- 5. errors
def test_bad_input_is_reported_and_server_recovers(server, node_defs):
    good = _example_api(REPO_ROOT / "example_workflows" / "Generate images.json", node_defs)
    bad = apply_overrides(good, ["Sample.width=100"], node_defs)

    result = server.run_prompt(bad, timeout=PROMPT_TIMEOUT_S)
    assert result.status == "error", f"expected an execution_error, got {result.status}: {result.history}"
    err = result.error
    msg = str(err.get("exception_message"))
    assert err.get("node_type") == "Sample", err
    assert "Sample" in msg and "width" in msg, msg
    assert re.search(r"\bfix\b", msg, re.IGNORECASE), f"no fix suggested in: {msg}"
    assert "100" in msg, msg

    # the server keeps working: a good prompt (new seed, so Sample really runs again) succeeds
    again = apply_overrides(good, ["Sample.seed=7"], node_defs)
    result = _run(server, again, "good prompt after the error")
    assert any(server.saved_images(again, result).values())


# ---------------------------------------------------------------------------------------------- 6. bridges
_BRIDGES = ("FinetuneApplyLoRAToModel", "FinetuneEmbeddingToPrompt", "NativeLoRAToFinetune")


def _require_bridges() -> None:
    missing = [n for n in _BRIDGES if n not in NODE_CLASS_MAPPINGS]
    if missing:
        pytest.skip(f"bridge nodes are not registered in nodes/__init__.py yet: {missing}")


def test_bridge_nodes_are_served_with_native_types(object_info):
    _require_bridges()
    apply = object_info["FinetuneApplyLoRAToModel"]
    required = apply["input"]["required"]
    assert (required["model"][0], required["clip"][0], required["lora"][0], required["pipe"][0]) == \
        ("MODEL", "CLIP", "FT_LORA", "FT_PIPE")
    assert apply["output"] == ["MODEL", "CLIP"]
    native = object_info["NativeLoRAToFinetune"]
    assert native["input"]["required"]["lora"][0] == "LORA_MODEL"
    assert native["output"] == ["FT_LORA"]
    emb = object_info["FinetuneEmbeddingToPrompt"]
    assert emb["input"]["required"]["embedding"][0] == "FT_EMBEDDING" and emb["output"] == ["STRING"]
    for node_id in _BRIDGES:
        assert object_info[node_id]["category"] == "finetune/bridges"
    # the host's own nodes at the other end of each link use the same type names
    assert object_info["CheckpointLoaderSimple"]["output"][:2] == ["MODEL", "CLIP"]
    assert object_info["KSampler"]["input"]["required"]["model"][0] == "MODEL"
    assert object_info["CLIPTextEncode"]["input"]["required"]["clip"][0] == "CLIP"
    assert object_info["CLIPTextEncode"]["input"]["required"]["text"][0] == "STRING"
    assert object_info["TrainLoraNode"]["output"][1] == "LORA_MODEL"
    assert object_info["StringConcatenate"]["output"] == ["STRING"]


def test_embedding_prompt_word_through_a_native_string_node(server, node_defs):
    """LearnEmbedding → EmbeddingToPrompt → core StringConcatenate → Sample on the bare model (no in-memory
    embedding): the image can only use the embedding through the saved file and the prompt word."""
    _require_bridges()
    example = _example_api(REPO_ROOT / "example_workflows" / "Learn a word (Textual Inversion).json", node_defs)
    example = apply_overrides(example, ["LearnEmbedding.steps=4"], node_defs)
    keep = {"LoadBase", "FinetuneTrainingData", "LearnEmbedding"}
    prompt = {nid: n for nid, n in example.items() if n["class_type"] in keep}
    load = next(nid for nid, n in prompt.items() if n["class_type"] == "LoadBase")
    learn = next(nid for nid, n in prompt.items() if n["class_type"] == "LearnEmbedding")
    sample = next(n for n in example.values() if n["class_type"] == "Sample")
    name = f"bridge_test/word_{os.getpid()}"
    prompt.update({
        "900": {"class_type": "FinetuneEmbeddingToPrompt",
                "inputs": {"embedding": [learn, 0], "pipe": [load, 0], "name": name, "overwrite": False}},
        "901": {"class_type": "StringConcatenate",
                "inputs": {"string_a": "a photo of", "string_b": ["900", 0], "delimiter": " "}},
        "902": {"class_type": "Sample", "inputs": {**sample["inputs"], "pipe": [load, 0], "prompt": ["901", 0],
                                                   "batch_size": 1}},
        "903": {"class_type": "SaveImage", "inputs": {"images": ["902", 0], "filename_prefix": "bridge/embedding"}},
    })

    result = _run(server, prompt, "EmbeddingToPrompt graph")

    saved = server.models_dir / "embeddings" / f"{name}.safetensors"
    assert saved.is_file(), sorted(p.name for p in (server.models_dir / "embeddings").rglob("*"))
    text = ((result.history.get("outputs") or {}).get("900") or {}).get("text") or []
    assert f"prompt word: embedding:{name}" in text, result.history.get("outputs")
    images = server.saved_images(prompt, result)["903"]
    assert len(images) == 1 and images[0].read_bytes()[:8] == PNG_MAGIC


_IN_COMFYUI_SCRIPT = r'''
import functools, json, os
import torch
torch.set_num_threads(1)
import comfy.model_detection, comfy.model_management, comfy.model_patcher, comfy.sd, comfy.sd1_clip
import comfy.supported_models, comfy.utils
import comfy_extras.nodes_train as nodes_train

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.ldm import unet_name_map
from comfy_finetune.core.loading import load_base
from comfy_finetune.core.lora import LoraModule, LoraWeights
from comfy_finetune.core.lora_keys import canonical_te_path
from comfy_finetune.core.tiny import build_tiny_pipeline_folder
from comfy_finetune.nodes.bridges import ApplyLoRAToModel, NativeLoRAToFinetune
from comfy_finetune.training.saving import save_checkpoint

CPU = torch.device("cpu")
RESULT = {"in_comfyui": host.in_comfyui()}
models = os.path.join(WORK, "models")
build_tiny_pipeline_folder(os.path.join(models, "diffusers", "tiny-sd1"), "sd1", seed=0)
handle = load_base("diffusers/tiny-sd1", "fp32", "cpu")
ckpt = str(save_checkpoint(handle, os.path.join(models, "checkpoints", "tiny-sd1.safetensors"), dtype="fp32"))
ldm = unet_name_map(handle.base.unet.config)

# CheckpointLoaderSimple's loader: does ComfyUI detect the tiny architecture?
try:
    comfy.sd.load_checkpoint_guess_config(ckpt, output_vae=False, output_clip=False)
    RESULT["checkpoint_detected"] = True
except RuntimeError as exc:
    RESULT["checkpoint_detected"], RESULT["detect_error"] = False, str(exc).strip()

# MODEL and CLIP built the way load_state_dict_guess_config does, with the SD 1.5 model class forced
sd = comfy.utils.load_torch_file(ckpt)
model_config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(sd, "model.diffusion_model."))
model_config.set_inference_dtype(torch.float32, None)
base_model = model_config.get_model(sd, "model.diffusion_model.", device=CPU)
base_model.load_model_weights(sd, "model.diffusion_model.")
model = comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)
with open(os.path.join(models, "diffusers", "tiny-sd1", "text_encoder", "config.json")) as f:
    te_config = json.load(f)
target = model_config.clip_target(state_dict=sd)
target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
    comfy.sd1_clip.SDClipModel, textmodel_json_config=te_config, return_projected_pooled=False))
# ComfyUI's CLIP keeps a fixed 49408-token table; the tiny vocabulary is smaller (LoRAs never touch that table)
clip_sd = {k: v for k, v in model_config.process_clip_state_dict(sd).items() if "token_embedding" not in k}
clip = comfy.sd.CLIP(target, embedding_directory=None, tokenizer_data=clip_sd, model_options={"dtype": torch.float32})
clip.load_sd(clip_sd, full_model=True)
unet_before = {k: v.clone() for k, v in base_model.state_dict().items()}
te_before = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items()}

# 1. ApplyLoRAToModel: every UNet layer (LoCon convs too) and the text encoder's attention/MLP layers
g = torch.Generator().manual_seed(0)
modules = {}
for path, m in handle.base.unet.named_modules():
    w = getattr(m, "weight", None)
    if path in ldm and isinstance(w, torch.Tensor) and w.ndim >= 2:
        modules[("unet", path)] = LoraModule(torch.randn(2, w.shape[1], *w.shape[2:], generator=g) * 0.1,
                                             torch.randn(w.shape[0], 2, *([1, 1] if w.ndim == 4 else []),
                                                         generator=g) * 0.1, 1.5)
TE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
for path, m in handle.base.text_encoders[0].named_modules():
    if path.endswith(TE):
        modules[("te1", path)] = LoraModule(torch.randn(2, m.weight.shape[1], generator=g) * 0.1,
                                            torch.randn(m.weight.shape[0], 2, generator=g) * 0.1, 2.0)
lora = LoraWeights(handle.family, modules, {}, "bridge-check")
new_model, new_clip = ApplyLoRAToModel().run(model=model, clip=clip, lora=lora, pipe=handle, strength_model=0.7,
                                             strength_clip=0.4)
RESULT["clones"] = new_model is not model and new_clip is not clip
RESULT["input_patches"] = [len(model.patches), len(clip.patcher.patches)]
RESULT["output_patches"] = [len(new_model.patches), len(new_clip.patcher.patches)]
RESULT["lora_layers"] = [sum(c == "unet" for c, _ in modules), sum(c == "te1" for c, _ in modules)]
with handle.with_patch(LoraPatch(lora, 0.7, 0.4)).patched():
    want_unet = {ldm[p]: m.weight.detach().clone()
                 for p, m in handle.base.unet.named_modules() if ("unet", p) in modules}
    want_te = {canonical_te_path(p): m.weight.detach().clone()
               for p, m in handle.base.text_encoders[0].named_modules() if ("te1", p) in modules}
comfy.model_management.load_models_gpu([new_model, new_clip.patcher], force_full_load=True)
RESULT["unet_max_diff"] = max(float((comfy.utils.get_attr(base_model, f"diffusion_model.{k}.weight") - w).abs().max())
                              for k, w in want_unet.items())
RESULT["te_max_diff"] = max(float((comfy.utils.get_attr(clip.cond_stage_model, f"clip_l.transformer.{k}.weight")
                                   - w).abs().max()) for k, w in want_te.items())
RESULT["lora_changes_weights"] = min(float((want_unet[k] - unet_before[f"diffusion_model.{k}.weight"]).abs().max())
                                     for k in want_unet) > 0
comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)  # back to the inputs
RESULT["inputs_unchanged"] = (
    all(torch.equal(v, base_model.state_dict()[k]) for k, v in unet_before.items())
    and all(torch.equal(v, clip.cond_stage_model.state_dict()[k]) for k, v in te_before.items()))

# 2. keys ComfyUI cannot place are an error, not a warning
try:
    host.apply_lora_to_native(model, clip, {"lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
                                            "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2)}, 1.0, 1.0)
    RESULT["unknown_key_error"] = None
except FinetuneError as exc:
    RESULT["unknown_key_error"] = str(exc)

# 3. ComfyUI's own trainer: its LORA_MODEL through NativeLoRAToFinetune patches exactly like ComfyUI applies it
trained = nodes_train.TrainLoraNode().train(
    model=model, latents={"samples": torch.randn(1, 4, 8, 8, generator=g)},
    positive=[[torch.randn(1, 77, 32, generator=g), {}]], batch_size=1, steps=3, grad_accumulation_steps=1,
    learning_rate=1e-2, rank=2, optimizer="AdamW", loss_function="MSE", seed=0, training_dtype="fp32",
    lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False, existing_lora="[None]")
native = trained[1]
out = NativeLoRAToFinetune().run(lora=native, pipe=handle)
converted = out["result"][0]
RESULT["native_keys"] = len(native)
RESULT["native_lora_layers"] = sum(k.endswith(".lora_up.weight") for k in native)
RESULT["native_diff_keys"] = sum(k.endswith((".diff", ".diff_b")) for k in native)
_with_lora = {k[: -len(".lora_up.weight")] for k in native if k.endswith(".lora_up.weight")}
_with_diff = {k.rsplit(".", 1)[0] for k in native if k.endswith((".diff", ".diff_b"))}
RESULT["native_diff_modules"] = len(_with_diff - _with_lora)  # norms: differences only
RESULT["native_lora_with_bias"] = len(_with_diff & _with_lora)  # LoRA layers whose bias trained too
RESULT["converted_layers"] = sum(m.kind == "lora" for m in converted.modules.values())
RESULT["converted_diff_layers"] = sum(m.kind == "diff" for m in converted.modules.values())
RESULT["converted_lora_with_bias"] = sum(m.kind == "lora" and m.bias is not None for m in converted.modules.values())
RESULT["converted_notes"] = out["ui"]["text"]
# every key, the norm/bias differences included: what LoraModelLoader does with the trainer's output
native_model, _ = comfy.sd.load_lora_for_models(model, None, native, 1.0, 0)
comfy.model_management.load_models_gpu([native_model], force_full_load=True)
with handle.with_patch(LoraPatch(converted, 1.0, 1.0)).patched():
    RESULT["native_max_diff"] = max(
        float((comfy.utils.get_attr(base_model, f"diffusion_model.{ldm[p]}.{name}")
               - getattr(handle.base.unet.get_submodule(p), name)).abs().max())
        for (_, p), m in converted.modules.items() for name in ("weight", "bias")
        if (m.delta() if name == "weight" else m.bias_delta()) is not None)
'''


def test_bridges_inside_comfyui(tmp_path):
    """In ComfyUI's own python (no server): the bridges against real ModelPatcher/CLIP objects and the real trainer.

    ComfyUI's checkpoint loader cannot detect the tiny test architecture (its SD1.5 config needs 320 channels and
    768-wide context), so MODEL and CLIP are built like ``load_state_dict_guess_config`` does with the SD1.5 class.
    """
    r = harness.run_in_comfyui(Path(_COMFYUI_DIR).resolve(), tmp_path / "inproc", _IN_COMFYUI_SCRIPT, timeout=600)
    assert r["in_comfyui"] is True
    if not r["checkpoint_detected"]:
        assert "Could not detect model type" in r["detect_error"], r["detect_error"]

    # ApplyLoRAToModel: clones, every layer applied, same weights as this pack's own merge
    assert r["clones"] and r["input_patches"] == [0, 0], r
    assert r["output_patches"] == r["lora_layers"] and min(r["lora_layers"]) > 0, r
    assert r["lora_changes_weights"], r
    assert r["unet_max_diff"] < 1e-5 and r["te_max_diff"] < 1e-5, r
    assert r["inputs_unchanged"], r
    err = r["unknown_key_error"]
    assert err and "[FinetuneApplyLoRAToModel]" not in err, err
    assert "lora key not loaded: lora_unet_no_such_block" in err, err

    # ComfyUI's own TrainLoraNode → NativeLoRAToFinetune: every LoRA layer and every norm/bias difference converts,
    # and the patched weights and biases equal those of ComfyUI's LoRA loader given the whole file
    assert r["converted_layers"] == r["native_lora_layers"] > 0, r
    assert r["converted_diff_layers"] == r["native_diff_modules"], r
    assert r["converted_lora_with_bias"] == r["native_lora_with_bias"], r
    assert r["native_keys"] == 3 * r["native_lora_layers"] + r["native_diff_keys"], r
    assert r["converted_notes"][0].startswith(f"converted {r['converted_layers']} LoRA layers"), r
    if r["native_diff_keys"]:
        assert f"{r['native_diff_modules']} full-weight/bias deltas" in r["converted_notes"][0], r
    assert r["native_max_diff"] < 1e-5, r


# ---------------------------------------------------------------------------------------------- 7. robustness
TRAIN_EVENT = "comfy_finetune.train"
TEMP_NAME = re.compile(r"(^\.|\.tmp|\.partial|\.part$)", re.IGNORECASE)  # atomic_write's .<name>.tmp-<pid>-<rand>


def _node_id(prompt: dict, class_type: str) -> str:
    ids = [nid for nid, n in prompt.items() if n["class_type"] == class_type]
    assert len(ids) == 1, f"expected one {class_type} node, found {ids}"
    return ids[0]


def _train_events(events) -> list[dict]:
    return [d for t, d in events if t == TRAIN_EVENT]


def _leftover_temp_files(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots if root.exists() for p in root.rglob("*") if TEMP_NAME.search(p.name))


def _error_text(result: harness.PromptResult) -> str:
    err = result.error or {}
    return f"{err.get('node_type')}: {err.get('exception_message')}"


def test_cancel_through_interrupt_keeps_a_resumable_checkpoint_and_the_queue_goes_on(server, node_defs):
    """POST /interrupt while TrainLoRA runs (after its first loss event): the prompt ends 'interrupted' at the
    training node, the step reached is saved as a resumable checkpoint (and resuming continues from it), no temp
    or partial file is left anywhere, and the prompt queued behind it runs."""
    from comfy_finetune.training.loop import load_checkpoint

    train_wf = _example_api(REPO_ROOT / "example_workflows" / "Train a LoRA.json", node_defs)
    train_id = _node_id(train_wf, "FinetuneTrainLoRA")
    long_run = apply_overrides(train_wf, [f"{train_id}.steps=100000", f"{train_id}.seed=11",
                                          f"{train_id}.validate_every=0"], node_defs)
    save_id = _node_id(long_run, "FinetuneSaveLoRA")
    long_run[save_id]["inputs"]["name"] = f"cancel_test/never_{os.getpid()}"
    nxt = apply_overrides(_example_api(REPO_ROOT / "example_workflows" / "Generate images.json", node_defs),
                          ["Sample.seed=1234", "SaveImage.filename_prefix=after_cancel/img"], node_defs)
    ckpt_dir = server.output_dir / "finetune_checkpoints"
    before = set(ckpt_dir.glob("lora-*.pt")) if ckpt_dir.exists() else set()
    saved_loras_before = sorted((server.models_dir / "loras").rglob("*"))

    with server.session() as session:
        pid = session.queue(long_run)
        next_pid = session.queue(nxt)  # waits in the queue behind the training
        session.wait_for(lambda t, d: t == TRAIN_EVENT, PROMPT_TIMEOUT_S, "comfy_finetune.train event")
        assert server.interrupt(pid) == 200
        cancelled = session.follow(pid, PROMPT_TIMEOUT_S)
        after = session.follow(next_pid, PROMPT_TIMEOUT_S)

    assert cancelled.status == "interrupted", (cancelled.status, _error_text(cancelled))
    stopped = next(d for t, d in cancelled.events if t == "execution_interrupted")
    assert stopped.get("node_type") == "FinetuneTrainLoRA", stopped
    steps_seen = [d["step"] for d in _train_events(cancelled.events)]
    assert steps_seen and steps_seen[-1] < 100000, steps_seen

    new = sorted(set(ckpt_dir.glob("lora-*.pt")) - before)
    assert len(new) == 1, f"expected one new checkpoint in {ckpt_dir}, found {new} (had {before})"
    state = load_checkpoint(new[0])
    assert steps_seen[-1] <= state["step"] <= steps_seen[-1] + 1, (state["step"], steps_seen)
    assert len(state["losses"]) == state["step"] and state["trainable"], sorted(state)
    assert not _leftover_temp_files(server.output_dir, server.models_dir), \
        _leftover_temp_files(server.output_dir, server.models_dir)
    assert sorted((server.models_dir / "loras").rglob("*")) == saved_loras_before, "a cancelled run saved a LoRA"

    assert after.status == "success", (after.status, _error_text(after))
    assert any(server.saved_images(nxt, after).values()), after.history.get("outputs")

    # the checkpoint is resumable: the same run with resume on goes on from the step it reached
    resumed = apply_overrides(long_run, [f"{train_id}.steps={state['step'] + 2}", f"{train_id}.resume=true"],
                              node_defs)
    resumed[save_id]["inputs"]["name"] = f"cancel_test/resumed_{os.getpid()}"
    result = _run(server, resumed, "resumed training")
    steps = [d["step"] for d in _train_events(result.events)]
    assert steps == [state["step"] + 1, state["step"] + 2], (state["step"], steps)


def test_rerun_with_only_a_sampling_widget_changed_does_not_retrain(server, node_defs):
    """Re-queue a training graph with only Sample's seed changed: ComfyUI reports the trainer cached
    (``execution_cached``), no loss event arrives and the trainer never executes; only sampling runs again."""
    wf = _example_api(REPO_ROOT / "example_workflows" / "Train a LoRA.json", node_defs)
    train_id = _node_id(wf, "FinetuneTrainLoRA")
    sample_id = _node_id(wf, "Sample")
    first = apply_overrides(wf, [f"{train_id}.steps=3", f"{train_id}.validate_every=0", f"{train_id}.seed=21",
                                 "SaveImage.filename_prefix=cache_test/first"], node_defs)
    first[_node_id(first, "FinetuneSaveLoRA")]["inputs"]["name"] = f"cache_test/lora_{os.getpid()}"
    seed = first[sample_id]["inputs"]["seed"]
    second = apply_overrides(first, [f"Sample.seed={seed + 1}"], node_defs)

    r1 = _run(server, first, "training graph")
    r2 = _run(server, second, "same graph, new sampling seed")

    assert [d["step"] for d in _train_events(r1.events)] == [1, 2, 3]
    assert any(t == "executing" and d.get("node") == train_id for t, d in r1.events)
    cached = next(d["nodes"] for t, d in r2.events if t == "execution_cached")
    assert train_id in cached, f"TrainLoRA ({train_id}) not in execution_cached {cached}"
    assert not _train_events(r2.events), "training ran again"
    executed = {d.get("node") for t, d in r2.events if t == "executing"}
    assert train_id not in executed and sample_id in executed, executed
    images1 = server.saved_images(first, r1)
    images2 = server.saved_images(second, r2)
    assert any(images2.values()) and images1 != images2


def _settled_rss(server, seconds: float = 4.0) -> int:
    """The server's RSS once it stops changing (ComfyUI finishes a prompt's bookkeeping after the last event)."""
    last, end = server.rss_bytes(), time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.5)
        now = server.rss_bytes()
        if abs(now - last) < (1 << 20):
            return now
        last = now
    return last


def test_cancelled_and_failed_training_give_their_memory_back(server, node_defs):
    """Full DreamBooth fine-tuning (batch 8 at 256 px, cancelled after its first step) grows the server's resident
    memory by well over 10 %;
    after a cancel, and after a failure (the loss turns NaN at step 2), it is back within 10 % of the growth of
    what it was before the run (and so within 10 % of before). A warm-up run at batch 1 loads the model and
    caches the data first, so "before" holds everything that legitimately stays. The failure reaches the host as
    a normal execution_error with our message (node, input, fix), and the next prompt runs."""
    if not Path(f"/proc/{server.proc.pid}/status").exists():
        pytest.skip("process memory is read from /proc (Linux)")
    example = _example_api(REPO_ROOT / "example_workflows" / "Teach a subject (DreamBooth).json", node_defs)
    keep = {"LoadBase", "FinetuneTrainingData", "DreamBoothTrain"}
    base = {nid: n for nid, n in example.items() if n["class_type"] in keep}
    train_id = _node_id(base, "DreamBoothTrain")
    base["990"] = {"class_type": "PreviewImage", "inputs": {"images": [train_id, 2]}}  # the loss plot
    base = apply_overrides(base, ["FinetuneTrainingData.resolution=256",
                                  "FinetuneTrainingData.repeats=4",
                                  f"{train_id}.method=full", f"{train_id}.prior_preservation=false",
                                  f"{train_id}.validate_every=0", f"{train_id}.validation_prompt=",
                                  f"{train_id}.batch_size=1", f"{train_id}.steps=2"], node_defs)
    _run(server, base, "warm-up training (batch 1)")

    def measured(prompt, stop_at_step: int | None):
        server.reset_peak_rss()
        with server.session() as session:
            pid = session.queue(prompt)
            if stop_at_step:
                session.wait_for(lambda t, d: t == TRAIN_EVENT and d.get("step", 0) >= stop_at_step,
                                 PROMPT_TIMEOUT_S, f"training step {stop_at_step}")
                assert server.interrupt(pid) == 200
            result = session.follow(pid, PROMPT_TIMEOUT_S)
        return result, server.peak_rss_bytes(), _settled_rss(server)

    mib = 1 << 20
    before = _settled_rss(server)
    cancel = apply_overrides(base, [f"{train_id}.batch_size=8", f"{train_id}.steps=100000", f"{train_id}.seed=3"],
                             node_defs)
    r_cancel, peak_cancel, after_cancel = measured(cancel, stop_at_step=1)
    fail = apply_overrides(base, [f"{train_id}.batch_size=8", f"{train_id}.steps=20", f"{train_id}.seed=4",
                                  f"{train_id}.learning_rate=10"], node_defs)
    r_fail, peak_fail, after_fail = measured(fail, stop_at_step=None)

    report = (f"RSS before {before / mib:.0f} MiB; cancel: peak {peak_cancel / mib:.0f}, after "
              f"{after_cancel / mib:.0f}; failure: peak {peak_fail / mib:.0f}, after {after_fail / mib:.0f}")
    print(report)
    assert r_cancel.status == "interrupted", (r_cancel.status, _error_text(r_cancel))
    assert r_fail.status == "error", (r_fail.status, r_fail.history.get("status"))
    for what, peak, after in (("cancel", peak_cancel, after_cancel), ("failure", peak_fail, after_fail)):
        growth = peak - before
        assert growth > 0.10 * before, f"{what}: the run grew RSS by only {growth / mib:.0f} MiB, too little to " \
                                        f"tell a leak from noise ({report})"
        assert after - before <= 0.10 * growth, f"{what}: {(after - before) / mib:.0f} of the run's " \
                                                 f"{growth / mib:.0f} MiB growth stayed resident ({report})"

    err = r_fail.error
    msg = str(err.get("exception_message"))
    assert err.get("node_type") == "DreamBoothTrain" and err.get("node_id") == train_id, err
    assert "[DreamBoothTrain]" in msg and "learning_rate" in msg and "nan" in msg.lower(), msg
    assert re.search(r"\bFix:", msg), msg
    nxt = apply_overrides(_example_api(REPO_ROOT / "example_workflows" / "Generate images.json", node_defs),
                          ["Sample.seed=99", "SaveImage.filename_prefix=after_failure/img"], node_defs)
    assert any(server.saved_images(nxt, _run(server, nxt, "prompt after the failure")).values())


# ---------------------------------------------------------------------------------------------- 8. link types
def link_allowed(output_type, input_type) -> bool:
    """The frontend's link check (LiteGraph ``isValidConnection``, frontend 1.27): "" / "*" match anything, else
    the type names compared case-insensitively, comma-separated unions matching if any member does."""
    a = 0 if output_type in ("", "*") else output_type
    b = 0 if input_type in ("", "*") else input_type
    if not a or not b or a == b:
        return True
    a, b = str(a).lower(), str(b).lower()
    if "," not in a and "," not in b:
        return a == b
    return any(link_allowed(x, y) for x in a.split(",") for y in b.split(","))


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _link_types(info: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """``([(input name, type)], [output types])`` of a node's link (non-widget) sockets in /object_info."""
    inputs = []
    for section in ("required", "optional"):
        for name, spec in ((info.get("input") or {}).get(section) or {}).items():
            kind = spec[0] if isinstance(spec, list) and spec else spec
            if isinstance(kind, str) and kind not in WIDGET_TYPES:
                inputs.append((name, kind))
    return inputs, [t for t in info.get("output") or [] if isinstance(t, str)]


def test_custom_types_are_namespaced_and_never_link_to_native_sockets(object_info):
    """Every socket type only this pack uses is FT_*; no native node (any other pack or ComfyUI's own) has an
    output the frontend would let into an FT_* input, or an input (other than "*" wildcards) an FT_* output could
    go into. So an incompatible input can never be linked to a training node."""
    ours = {k: v for k, v in object_info.items() if v.get("python_module") == f"custom_nodes.{PACK}"}
    native = {k: v for k, v in object_info.items() if k not in ours}
    assert set(ours) == set(NODE_CLASS_MAPPINGS) and len(native) > 100, (len(ours), len(native))

    native_in, native_out = set(), set()
    for info in native.values():
        ins, outs = _link_types(info)
        native_in.update(t for _, t in ins)
        native_out.update(outs)
    native_types = native_in | native_out
    our_types = set()
    for info in ours.values():
        ins, outs = _link_types(info)
        our_types.update(t for _, t in ins)
        our_types.update(outs)
        assert "*" not in {t for _, t in ins} and not any("," in t for _, t in ins), info["name"]

    ft = {t for t in our_types if t.startswith("FT_")}
    assert ft, our_types
    own = our_types - native_types  # used by no other node: must be namespaced
    assert own == ft, f"types only this pack uses but not FT_*: {sorted(own - ft)}; FT_* types a native node " \
                      f"uses: {sorted(ft - own)}"
    assert not {t.lower() for t in ft} & {t.lower() for t in native_types}  # the check is case-insensitive

    for node_id, info in ours.items():
        ins, outs = _link_types(info)
        for name, kind in ins:
            if kind in ft:
                bad = sorted(t for t in native_out if link_allowed(t, kind))
                assert not bad, f"{node_id}.{name} ({kind}) would accept native outputs {bad}"
        for kind in outs:
            if kind in ft:
                bad = sorted(t for t in native_in if t not in ("", "*") and link_allowed(kind, t))
                assert not bad, f"{node_id} output {kind} would link into native inputs {bad}"
    # and the rule the test relies on is the frontend's
    assert not link_allowed("MODEL", "FT_PIPE") and not link_allowed("FT_LORA", "LORA_MODEL")
    assert link_allowed("FT_LORA", "FT_LORA") and link_allowed("IMAGE", "*") and link_allowed("A,FT_X", "ft_x")


# ------------------------------------------------------------------------------------------ 10. training algorithms
_ALGORITHM_LOAD_SCRIPT = r'''
import functools, json, logging, os
import torch
torch.set_num_threads(1)
import comfy.model_detection, comfy.model_management, comfy.model_patcher, comfy.sd, comfy.sd1_clip
import comfy.supported_models, comfy.utils
import nodes

from comfy_finetune.core.handle import LoraPatch
from comfy_finetune.core.ldm import unet_name_map
from comfy_finetune.core.loading import load_base
from comfy_finetune.core.lora_handle import lora_for_handle
from comfy_finetune.core.lora_keys import canonical_te_path
from comfy_finetune.core.tiny import build_tiny_pipeline_folder
from comfy_finetune.training.saving import save_checkpoint

CPU = torch.device("cpu")
FILES = json.loads(FILES_JSON)
models = os.path.join(WORK, "models")
build_tiny_pipeline_folder(os.path.join(models, "diffusers", "tiny-sd1"), "sd1", seed=0)  # the server's, rebuilt
handle = load_base("diffusers/tiny-sd1", "fp32", "cpu")
ckpt = str(save_checkpoint(handle, os.path.join(models, "checkpoints", "tiny-sd1.safetensors"), dtype="fp32"))
ldm = unet_name_map(handle.base.unet.config)

# MODEL and CLIP as load_state_dict_guess_config builds them, with the SD 1.5 class forced (ComfyUI does not detect
# the tiny architecture)
sd = comfy.utils.load_torch_file(ckpt)
model_config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(sd, "model.diffusion_model."))
model_config.set_inference_dtype(torch.float32, None)
base_model = model_config.get_model(sd, "model.diffusion_model.", device=CPU)
base_model.load_model_weights(sd, "model.diffusion_model.")
model = comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)
with open(os.path.join(models, "diffusers", "tiny-sd1", "text_encoder", "config.json")) as f:
    te_config = json.load(f)
target = model_config.clip_target(state_dict=sd)
target.clip = functools.partial(comfy.sd1_clip.SD1ClipModel, clip_model=functools.partial(
    comfy.sd1_clip.SDClipModel, textmodel_json_config=te_config, return_projected_pooled=False))
clip_sd = {k: v for k, v in model_config.process_clip_state_dict(sd).items() if "token_embedding" not in k}
clip = comfy.sd.CLIP(target, embedding_directory=None, tokenizer_data=clip_sd, model_options={"dtype": torch.float32})
clip.load_sd(clip_sd, full_model=True)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


RESULT = {}
for algorithm, name in FILES.items():
    capture = Capture()
    logging.getLogger().addHandler(capture)
    try:
        new_model, new_clip = nodes.LoraLoader().load_lora(model, clip, name, 1.0, 1.0)
        comfy.model_management.load_models_gpu([new_model, new_clip.patcher], force_full_load=True)
    finally:
        logging.getLogger().removeHandler(capture)
    lora, unmatched = lora_for_handle(os.path.join(models, "loras", name), handle)
    layers = {key: handle.base.component(key[0]).get_submodule(key[1]) for key in lora.modules}
    before = {key: layer.weight.detach().clone() for key, layer in layers.items()}
    diffs, moved = [], []
    with handle.with_patch(LoraPatch(lora)).patched():
        for (comp, path), layer in layers.items():
            if comp == "unet":
                theirs = comfy.utils.get_attr(base_model, f"diffusion_model.{ldm[path]}.weight")
            else:
                theirs = comfy.utils.get_attr(clip.cond_stage_model,
                                              f"clip_l.transformer.{canonical_te_path(path)}.weight")
            diffs.append(float((theirs - layer.weight.reshape(theirs.shape)).abs().max()))
            moved.append(float((theirs - before[(comp, path)].reshape(theirs.shape)).abs().max()))
    comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)  # back to the inputs
    RESULT[algorithm] = {"warnings": capture.lines, "unmatched": unmatched, "max_diff": max(diffs),
                         "moved": max(moved), "modules": len(lora.modules),
                         "kinds": sorted({m.kind for m in lora.modules.values()}),
                         "dora": sum(getattr(m, "dora_scale", None) is not None for m in lora.modules.values()),
                         "patches": len(new_model.patches) + len(new_clip.patcher.patches)}
'''


def test_each_training_algorithm_loads_in_comfyuis_lora_loader(server, node_defs, tmp_path):
    """TrainLoRA with each algorithm (lora, dora, loha, lokr) through /prompt, saved by SaveLoRA in the kohya layout;
    then ComfyUI's own LoraLoader (in ComfyUI's python, on MODEL/CLIP of the same tiny model) loads every file with
    no "lora key not loaded" or other warning, patches every module, and its weights equal the pack's."""
    from comfy_finetune.core.tiny import build_tiny_pipeline_folder
    from comfy_finetune.training.lora_trainer import ALGORITHMS

    model_dir = server.models_dir / "diffusers" / "tiny-sd1-algorithms"
    if not model_dir.exists():
        build_tiny_pipeline_folder(model_dir, "sd1", seed=0)
    example = _example_api(REPO_ROOT / "example_workflows" / "Train a LoRA.json", node_defs)
    load, data, train = (_node_id(example, c) for c in ("LoadBase", "FinetuneTrainingData", "FinetuneTrainLoRA"))
    prompt = {load: example[load], data: example[data]}
    prompt[load]["inputs"].update(ckpt_name="diffusers/tiny-sd1-algorithms", dtype="fp32", device="cpu")
    names = {}
    for i, algorithm in enumerate(ALGORITHMS):
        names[algorithm] = f"algorithm_test/{algorithm}_{os.getpid()}.safetensors"
        prompt[f"{900 + 2 * i}"] = {"class_type": "FinetuneTrainLoRA", "inputs": {
            **example[train]["inputs"], "steps": 3, "learning_rate": 1e-2, "rank": 4, "alpha": 3.0,
            "targets": "attention+feedforward+conv", "train_text_encoder": True, "text_learning_rate": 1e-3,
            "validation_prompt": "", "validate_every": 0, "recipe": "custom", "algorithm": algorithm}}
        prompt[f"{901 + 2 * i}"] = {"class_type": "FinetuneSaveLoRA", "inputs": {
            "lora": [f"{900 + 2 * i}", 0], "pipe": [load, 0], "name": names[algorithm][:-len(".safetensors")],
            "layout": "kohya", "overwrite": False}}
    log_before = len(server.log_text())

    _run(server, prompt, "TrainLoRA with every algorithm")

    loras = server.models_dir / "loras"
    work = tmp_path / "inproc"
    for name in names.values():
        assert (loras / name).is_file(), sorted(p.name for p in loras.rglob("*"))
        (work / "models" / "loras" / name).parent.mkdir(parents=True, exist_ok=True)
        (work / "models" / "loras" / name).write_bytes((loras / name).read_bytes())
    assert "lora key not loaded" not in server.log_text()[log_before:]
    script = f"FILES_JSON = {json.dumps(json.dumps(names))}\n" + _ALGORITHM_LOAD_SCRIPT
    r = harness.run_in_comfyui(Path(_COMFYUI_DIR).resolve(), work, script, timeout=600)

    kinds = {"lora": ["lora"], "dora": ["lora"], "loha": ["loha"], "lokr": ["lokr"]}
    for algorithm in ALGORITHMS:
        got = r[algorithm]
        assert got["warnings"] == [] and got["unmatched"] == [], (algorithm, got)
        assert got["kinds"] == kinds[algorithm] and got["patches"] == got["modules"] > 0, (algorithm, got)
        assert got["dora"] == (got["modules"] if algorithm == "dora" else 0), (algorithm, got)
        assert got["max_diff"] < 1e-5 and got["moved"] > 1e-4, (algorithm, got)
