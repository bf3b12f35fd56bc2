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
    # and so the denoiser: ComfyUI's UNet with its loader's patch and this pack's through Add LoRA give the same
    # prediction for the same latents, timesteps and context (hence the same images from any sampler)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ts = torch.tensor([999.0, 250.0])
    with torch.no_grad():
        theirs = base_model.diffusion_model(x, timesteps=ts, context=ctx)
        ours = handle.base.unet(x, ts, encoder_hidden_states=ctx).sample
    RESULT["native_unet_out_diff"] = float((theirs - ours).abs().max())
    RESULT["native_unet_out_scale"] = float(theirs.abs().max())
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
    assert r["native_unet_out_diff"] < 1e-4 * max(1.0, r["native_unet_out_scale"]), r


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


# ------------------------------------------------------------------------------------------ 9. the graph's own model
# ComfyUI detects a checkpoint as SD 1.5 from its UNet (model_channels 320, context 768) and builds CLIP-L (12 layers,
# 49408 tokens) and the SD VAE at their real sizes whatever the file holds. So the smallest SD 1.5 file ComfyUI
# loads whole has the real CLIP-L and VAE and a small UNet: two 320-channel levels with one resnet each.
SD15_SHAPED = "bridge_test/sd15_shaped.safetensors"
BRIDGE_LORA = "bridge_test/sd15_shaped_lora.safetensors"


def _write_sd15_shaped(folder: Path) -> tuple[Path, Path]:
    """A random-weight SD 1.5-shaped checkpoint (251 M parameters, 500 MB in fp16) and a LoRA for it (rank 4 on the
    UNet's cross-attention k/v, kohya keys on CLIP layers 0-1), under ``folder``/checkpoints and /loras."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy_finetune.core.ldm import diffusers_to_ldm

    configs = REPO_ROOT / "configs" / "sd15"

    def read(name):
        return {k: v for k, v in json.loads((configs / name).read_text()).items()
                if not k.startswith("_") and k != "architectures"}

    ckpt, lora = folder / "checkpoints" / SD15_SHAPED, folder / "loras" / BRIDGE_LORA
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    lora.parent.mkdir(parents=True, exist_ok=True)
    unet_cfg = {**read("unet.json"), "block_out_channels": [320, 320], "layers_per_block": 1, "sample_size": 8,
                "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**read("vae.json"))
        te = CLIPTextModel(CLIPTextConfig(**read("text_encoder.json")))
        sd = diffusers_to_ldm("sd1", unet.state_dict(), vae.state_dict(), [te.state_dict()], unet_config=unet_cfg,
                              vae_config=vae.config)
        save_file({k: v.half().contiguous() for k, v in sd.items() if not k.endswith("position_ids")}, str(ckpt))
        g = torch.Generator().manual_seed(1)
        tensors = {}
        pairs = [("diffusion_model." + k[len("model.diffusion_model."):-len(".weight")], tuple(t.shape))
                 for k, t in sd.items() if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))]
        pairs += [(f"lora_te_text_model_encoder_layers_{i}_{part}", shape) for i in (0, 1)
                  for part, shape in (("self_attn_q_proj", (768, 768)), ("mlp_fc1", (3072, 768)))]
        for name, (out_dim, in_dim) in pairs:
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.05
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.05
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
        save_file(tensors, str(lora))
    return ckpt, lora


@pytest.fixture(scope="session")
def sd15_shaped(tmp_path_factory) -> Path:
    """A models folder holding the SD 1.5-shaped checkpoint and its LoRA (built once; about 10 s)."""
    folder = tmp_path_factory.mktemp("sd15_shaped")
    _write_sd15_shaped(folder)
    return folder


def _link_models(source: Path, models: Path) -> None:
    """Hard links (Load Base Model refuses a symlink that leads out of its folder), copies where they fail."""
    import shutil

    for rel in (f"checkpoints/{SD15_SHAPED}", f"loras/{BRIDGE_LORA}"):
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        if not (models / rel).exists():
            try:
                os.link(source / rel, models / rel)
            except OSError:
                shutil.copyfile(source / rel, models / rel)


def _api_node(node_defs, class_type: str, **inputs) -> dict:
    """An API-format node with every required widget at its default (the server fills in none), then ``inputs``."""
    values = {}
    for name, spec in (node_defs[class_type].get("required") or {}).items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if "default" in opts:
            values[name] = opts["default"]
        elif isinstance(kind, list) and kind:
            values[name] = kind[0]
    return {"class_type": class_type, "inputs": {**values, **inputs}}


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_train_the_graphs_own_model_and_apply_the_lora_back(server, node_defs, sd15_shaped):
    """Load Checkpoint + Load LoRA → ComfyUI MODEL/CLIP/VAE → Finetune Pipe → Train LoRA → Apply Finetune LoRA to
    MODEL/CLIP → KSampler → VAEDecode → SaveImage, on an SD 1.5-shaped checkpoint ComfyUI detects itself.

    The trained LoRA is saved and is not zero, the image with it differs from the loaded model's, and the loaded
    model is unchanged by the training: a KSampler branch on the Load LoRA outputs draws the same pixels before and
    after (it runs again after the training prompt: ComfyUI keeps only the outputs of the last prompt's nodes)."""
    _link_models(sd15_shaped, server.models_dir)
    def api(class_type: str, **inputs) -> dict:
        return _api_node(node_defs, class_type, **inputs)

    loaders = {
        "1": api("CheckpointLoaderSimple", ckpt_name=SD15_SHAPED),
        "2": api("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=BRIDGE_LORA, strength_model=0.8,
                 strength_clip=0.6),
    }

    def sampled(model, clip, prefix: str, first: int) -> dict:
        ids = [str(first + i) for i in range(6)]
        return {
            ids[0]: api("CLIPTextEncode", clip=clip, text="a photo of a red square"),
            ids[1]: api("CLIPTextEncode", clip=clip, text=""),
            ids[2]: api("EmptyLatentImage", width=64, height=64, batch_size=1),
            ids[3]: api("KSampler", model=model, positive=[ids[0], 0], negative=[ids[1], 0],
                        latent_image=[ids[2], 0], seed=5, steps=3, cfg=4.0, sampler_name="euler",
                        scheduler="normal", denoise=1.0),
            ids[4]: api("VAEDecode", samples=[ids[3], 0], vae=["1", 2]),
            ids[5]: api("SaveImage", images=[ids[4], 0], filename_prefix=prefix),
        }

    untouched = {**loaders, **sampled(["2", 0], ["2", 1], "bridge_own/untouched", 20)}
    lora_name = f"bridge_test/trained_{os.getpid()}"
    training = {
        **loaders,
        "3": api("FinetuneNativeModelToPipe", model=["2", 0], clip=["2", 1], vae=["1", 2], device="cpu"),
        "4": api("EmptyImage", width=64, height=64, batch_size=2, color=0xCC2020),
        "5": api("FinetuneTrainingDataFromImages", images=["4", 0], captions="a photo of a red square",
                 resolution=64),
        "6": api("FinetuneTrainLoRA", pipe=["3", 0], dataset=["5", 0], steps=3, learning_rate=1e-3, seed=2),
        "7": api("FinetuneApplyLoRAToModel", model=["2", 0], clip=["2", 1], lora=["6", 0], pipe=["3", 0],
                 strength_model=1.0, strength_clip=1.0),
        "8": api("FinetuneSaveLoRA", lora=["6", 0], pipe=["3", 0], name=lora_name, layout="kohya", overwrite=True),
        **sampled(["7", 0], ["7", 1], "bridge_own/trained", 40),
    }

    before = _run(server, untouched, "untouched branch, before training")
    trained = _run(server, training, "bridge → train → apply graph")
    after = _run(server, untouched, "untouched branch, after training")

    text = ((trained.history.get("outputs") or {}).get("3") or {}).get("text") or []
    assert any(line.startswith("SD 1.x, epsilon") for line in text), text
    assert any("patched weights" in line for line in text), text  # Load LoRA's weights, as KSampler sees them
    assert [d["step"] for d in _train_events(trained.events)] == [1, 2, 3]
    assert any(t == "executing" and d.get("node") == "23" for t, d in after.events), "the branch did not run again"

    from safetensors.torch import load_file
    saved = load_file(str(server.models_dir / "loras" / f"{lora_name}.safetensors"))
    ups = [v for k, v in saved.items() if k.endswith("lora_up.weight")]
    assert ups and max(float(v.abs().max()) for v in ups) > 0, "the trained LoRA is zero"

    u1 = _pixels(server.saved_images(untouched, before)["25"][0])
    u2 = _pixels(server.saved_images(untouched, after)["25"][0])
    t = _pixels(server.saved_images(training, trained)["45"][0])
    assert (u1 == u2).all(), "training on the bridged pipe changed the loaded model"
    assert not (t == u1).all(), "the applied LoRA changed nothing"


_MEMORY_SCRIPT = r'''
import gc, hashlib, time
import torch
torch.set_num_threads(1)
import nodes
import comfy.model_management as mm
from comfy_finetune.core.conditioning import encode_prompt
from comfy_finetune.core.loading import load_base
from comfy_finetune.core.native import shared_fraction
from comfy_finetune.nodes.bridges import NativeModelToPipe
import diffusers, transformers  # loaded before measuring: both paths use them

def rss():
    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

def storages(modules):
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return seen

def digest(modules):
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()

RESULT = {}
r0 = rss()
with torch.inference_mode():  # as ComfyUI runs nodes
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(CKPT)[:3]
    lmodel, lclip = nodes.LoraLoader().load_lora(model, clip, LORA, 0.8, 0.6)
host_modules = [model.model, clip.cond_stage_model, vae.first_stage_model]
host_bytes = sum(storages(host_modules).values())
r1 = rss()
t = time.time()
with torch.inference_mode():
    out = NativeModelToPipe().run(model=lmodel, clip=lclip, vae=vae, device="cpu")
RESULT["bridge_seconds"] = time.time() - t
pipe = out["result"][0]
r2 = rss()
shared, own = shared_fraction([pipe.base.unet, pipe.base.vae, *pipe.base.text_encoders],
                              [t for m in host_modules for t in [*m.parameters(), *m.buffers()]])
RESULT.update(ui=out["ui"]["text"], host_bytes=host_bytes, bridge_shared=shared, bridge_own=own)

with torch.inference_mode():
    loaded = load_base(CKPT, "fp32", "cpu")
r3 = rss()
RESULT["loadbase_bytes"] = sum(storages([loaded.base.unet, loaded.base.vae, *loaded.base.text_encoders]).values())
RESULT["rss"] = [r0, r1, r2, r3]
del loaded

# the patched weights the pipe holds are the ones ComfyUI samples with (Load LoRA applied on load)
diffusion = pipe.base.unet
before = digest(host_modules)
mm.load_models_gpu([lmodel, lclip.patcher], force_full_load=True)
import comfy.utils
from comfy_finetune.core.ldm import unet_name_map
ldm = {v: k for k, v in unet_name_map(diffusion.config).items()}
diffs = []
for key in lmodel.patches:
    path = ldm[key[len("diffusion_model."):-len(".weight")]]
    diffs.append(float((comfy.utils.get_attr(model.model, key) - diffusion.get_submodule(path).weight).abs().max()))
RESULT["patched_keys"] = len(diffs)
RESULT["patched_max_diff"] = max(diffs)
# the UNet computes what ComfyUI's does with the same weights, and the CLIP gives ComfyUI's conditioning
x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    theirs = model.model.diffusion_model(x, torch.tensor([500.0]), context=context)
    ours = diffusion(x, torch.tensor([500]), encoder_hidden_states=context).sample
RESULT["unet_rel_diff"] = float((theirs - ours).abs().max() / theirs.abs().max())
with torch.inference_mode():
    tokens = lclip.tokenize("a photo of a red square")
    cond_theirs = lclip.encode_from_tokens(tokens)
    cond_ours = encode_prompt(pipe, "a photo of a red square").cond.float()
RESULT["clip_rel_diff"] = float((cond_theirs - cond_ours).abs().max() / cond_theirs.abs().max())
mm.unload_all_models()
RESULT["unpatched_again"] = digest(host_modules) == before

'''


def test_bridge_holds_no_second_copy_of_the_model(tmp_path, sd15_shaped):
    """In ComfyUI's python, on the SD 1.5-shaped checkpoint (Load Checkpoint + Load LoRA, under inference mode as
    ComfyUI runs nodes): the bridged pipe shares the host's tensors (its own tensors are the LoRA-patched weights),
    process memory grows by a small fraction of the model for the bridge and by about one model for Load Base Model
    of the same file. The patched weights equal ComfyUI's own patched weights, and the UNet and CLIP compute what
    ComfyUI's do."""
    if not Path("/proc/self/status").exists():
        pytest.skip("process memory is read from /proc (Linux)")
    work = tmp_path / "memory"
    _link_models(sd15_shaped, work / "models")
    script = f"CKPT = {SD15_SHAPED!r}\nLORA = {BRIDGE_LORA!r}\n" + _MEMORY_SCRIPT
    r = harness.run_in_comfyui(Path(_COMFYUI_DIR).resolve(), work, script, timeout=900)

    mib = 1 << 20
    r0, r1, r2, r3 = r["rss"]
    report = (f"host model tensors {r['host_bytes'] / mib:.0f} MiB; RSS load {(r1 - r0) / mib:+.0f}, bridge "
              f"{(r2 - r1) / mib:+.0f}, Load Base Model {(r3 - r2) / mib:+.0f} MiB; bridge tensors shared "
              f"{r['bridge_shared'] / mib:.0f} MiB, own {r['bridge_own'] / mib:.1f} MiB; Load Base Model tensors "
              f"{r['loadbase_bytes'] / mib:.0f} MiB; bridge {r['bridge_seconds']:.1f} s")
    print(report)
    assert r["host_bytes"] > 600 * mib, report
    assert r["bridge_own"] < 0.05 * r["host_bytes"], report  # only the Load LoRA-patched weights
    assert r["bridge_shared"] > 0.9 * r["host_bytes"], report
    # RSS also keeps what the allocator retains from transient fp32 patch computations and one-time costs
    # (tokenizer, module classes): 60-90 MiB here, against 720+ MiB for a copy
    assert r2 - r1 < 0.25 * r["host_bytes"], report
    assert r3 - r2 > 0.6 * r["host_bytes"], report  # the measurement would see a second copy
    assert r["patched_keys"] > 0 and r["patched_max_diff"] < 1e-5, r
    assert r["unet_rel_diff"] < 1e-4, r
    assert r["clip_rel_diff"] < 2e-2, r  # ComfyUI computes CLIP in fp32 from its fp16 weights, the pipe in fp16
    assert r["unpatched_again"], r


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


_FAMILIES_SCRIPT = r'''
import hashlib, json, os
import torch
torch.set_num_threads(1)
import comfy.model_base, comfy.model_detection, comfy.model_patcher, comfy.sd, comfy.supported_models, comfy.utils
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

from comfy_finetune.core.conditioning import encode_prompt, sdxl_added
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.loading import load_base
from comfy_finetune.core.tiny import build_tiny_pipeline_folder
from comfy_finetune.nodes.bridges import NativeModelToPipe
from comfy_finetune.nodes.data import TrainingDataFromImages
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.training.saving import save_checkpoint

CPU = torch.device("cpu")
CONFIGS = {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20, "sdxl": comfy.supported_models.SDXL}
ENCODERS = {"sd1": [("clip_l", "text_encoder")], "sd2": [("clip_h", "text_encoder")],
            "sdxl": [("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")]}
PROMPT = "a photo of a red square"
g = torch.Generator().manual_seed(0)


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


def native(fam):
    """ComfyUI's MODEL / CLIP / VAE of the tiny checkpoint, built as load_state_dict_guess_config does with the
    family's model class forced (ComfyUI's detection needs real sizes), under inference mode."""
    folder = os.path.join(WORK, "models", "diffusers", f"tiny-{fam}")
    build_tiny_pipeline_folder(folder, fam, seed=0)
    handle = load_base(f"diffusers/tiny-{fam}", "fp32", "cpu")
    ckpt = str(save_checkpoint(handle, os.path.join(WORK, "models", "checkpoints", f"tiny-{fam}.safetensors"),
                               dtype="fp32"))
    sd = comfy.utils.load_torch_file(ckpt)
    with torch.inference_mode():
        config = CONFIGS[fam](comfy.model_detection.detect_unet_config(sd, "model.diffusion_model."))
        if fam != "sd1":  # one head per block like the tiny model (ComfyUI's 64 channels per head: 0 heads at 32)
            config.unet_config.update(num_heads=1, num_head_channels=-1)
        config.set_inference_dtype(torch.float32, None)
        kind = comfy.model_base.ModelType.V_PREDICTION if fam == "sd2" else comfy.model_base.ModelType.EPS
        cls = comfy.model_base.SDXL if fam == "sdxl" else comfy.model_base.BaseModel
        base_model = cls(config, model_type=kind, device=CPU)
        if fam == "sdxl":  # SDXL's size/crop embedding: 256 channels per number; the tiny UNet's 8
            base_model.embedder = comfy.model_base.Timestep(handle.base.unet.config.addition_time_embed_dim)
        base_model.load_model_weights(sd, "model.diffusion_model.")
        model = comfy.model_patcher.ModelPatcher(base_model, load_device=CPU, offload_device=CPU)
        options = {"dtype": torch.float32}
        for name, sub in ENCODERS[fam]:
            with open(os.path.join(folder, sub, "config.json")) as f:
                tc = json.load(f)
            # SD 2.x: ComfyUI holds the whole OpenCLIP tower (one layer more than diffusers' encoder) and reads
            # its penultimate layer. SDXL: ComfyUI needs more layers than the 2 it reads from: a third, random.
            options[f"{name}_model_config"] = {
                "num_hidden_layers": tc["num_hidden_layers"] + (0 if fam == "sd1" else 1),
                "hidden_size": tc["hidden_size"], "intermediate_size": tc["intermediate_size"],
                "num_attention_heads": tc["num_attention_heads"]}
        clip = comfy.sd.CLIP(config.clip_target(state_dict=sd), embedding_directory=None, model_options=options)
        clip_sd = {k: v for k, v in config.process_clip_state_dict(dict(sd)).items() if "token_embedding" not in k}
        missing, _ = clip.load_sd(clip_sd, full_model=True)
        for key in missing:  # ComfyUI's fixed 49408-token tables, SD 2.x's extra layer: random
            p = comfy.utils.get_attr(clip.cond_stage_model, key)
            p.copy_(torch.ones_like(p) if "norm" in key and key.endswith("weight") else
                    torch.randn(p.shape, generator=g) * 0.05)
        ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
        vae_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        vae = comfy.sd.VAE(sd=vae_sd, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    return model, clip, vae


def digest(modules):
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(pipe, host_modules):
    """Learn Embedding and full DreamBooth (as nodes, under inference mode) on the pipe: they train, and ComfyUI's
    weights stay as they were (Train LoRA runs in the graph test)."""
    before = digest(host_modules)
    common = dict(steps=2, learning_rate=1e-2, batch_size=1, grad_accum=1, lr_schedule="constant", warmup_steps=0,
                  optimizer="adamw", precision="auto", gradient_checkpointing=False, min_snr_gamma=0.0,
                  noise_offset=0.0, seed=0)
    with torch.inference_mode():
        data = TrainingDataFromImages().run(images=torch.rand(2, 64, 64, 3, generator=g), captions=PROMPT,
                                            resolution=64)[0]
        emb = LearnEmbedding().run(pipe=pipe, dataset=data, token="<bridge-word>", initializer="square",
                                   num_vectors=1, templates="object", **common)[0]
        db = DreamBoothTrain().run(pipe=pipe, dataset=data, instance_prompt="a photo of sks square",
                                   class_prompt="a photo of a square", method="full", prior_preservation=False,
                                   prior_loss_weight=1.0, prior_mode="class_images", num_class_images=1,
                                   train_text_encoder=False, text_learning_rate=1e-5, rank=4, alpha=4, **common)
    trained = db[0].base.unet
    host_ptrs = {t.untyped_storage().data_ptr() for m in host_modules for t in m.parameters()}
    return {"embedding_vectors": sorted(emb.vectors),
            "dreambooth_changed": any(not torch.equal(a, b) for a, b in zip(trained.parameters(),
                                                                             pipe.base.unet.parameters())),
            "dreambooth_copy": not any(p.untyped_storage().data_ptr() in host_ptrs for p in trained.parameters()),
            "host_unchanged": digest(host_modules) == before}


def bridge(model, clip, vae):
    with torch.inference_mode():
        out = NativeModelToPipe().run(model=model, clip=clip, vae=vae, device="cpu")
    return out["result"][0], out["ui"]["text"]


def compare(fam, model, clip, vae, pipe):
    base = pipe.base
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)
        ours = encode_prompt(pipe, PROMPT)
        x = torch.randn(1, 4, 8, 8, generator=g)
        kwargs, added = {}, None
        if fam == "sdxl":
            kwargs["y"] = model.model.encode_adm(pooled_output=pooled, width=64, height=64, crop_w=0, crop_h=0,
                                                 target_width=64, target_height=64)
            added = sdxl_added(pooled, 64, 64, torch.float32, CPU)
        theirs = model.model.diffusion_model(x, torch.tensor([500.0]), context=cond, **kwargs)
        unet = base.unet(x, torch.tensor([500]), encoder_hidden_states=cond, added_cond_kwargs=added).sample
        z = torch.randn(1, 4, 8, 8, generator=g)
        out = {"cond": rel(cond, ours.cond), "unet": rel(theirs, unet),
               "vae": rel(vae.first_stage_model.decode(z), base.vae.decode(z).sample)}
        if fam == "sdxl":
            out["pooled"] = rel(pooled, ours.pooled)
    return out


RESULT = {}
for fam in ("sd1", "sd2", "sdxl"):
    model, clip, vae = native(fam)
    pipe, ui = bridge(model, clip, vae)
    r = {"family": pipe.family.value, "prediction": pipe.base.prediction_type, "ui": ui,
         "layers": [int(te.config.num_hidden_layers) for te in pipe.base.text_encoders],
         "host_layers": [int(getattr(clip.cond_stage_model, n).num_layers) for n, _ in ENCODERS[fam]],
         "scheduler": {k: pipe.base.scheduler_config.get(k) for k in ("num_train_timesteps", "beta_start",
                                                                       "beta_end", "prediction_type")},
         "latent_scale": pipe.base.vae.config.scaling_factor, "diff": compare(fam, model, clip, vae, pipe)}
    if fam == "sd1":  # CLIP Set Last Layer -2: the pipe's encoder stops where ComfyUI reads
        skip = clip.clone()
        skip.clip_layer(-2)
        pipe2, _ = bridge(model, skip, vae)
        r["skip_layers"] = int(pipe2.base.text_encoders[0].config.num_hidden_layers)
        r["skip_diff"] = compare(fam, model, skip, vae, pipe2)["cond"]
    if fam == "sd2":  # the prediction is read from the model sampling ComfyUI uses (object patches included)
        eps = ModelSamplingDiscrete().patch(model, "eps", True)[0]
        pipe3, _ = bridge(eps, clip, vae)
        r["patched_sampling"] = [pipe3.base.prediction_type,
                                 bool(pipe3.base.scheduler_config.get("rescale_betas_zero_snr"))]
    refusals = {}
    for what, args in (("lcm", (ModelSamplingDiscrete().patch(model, "lcm", False)[0], clip, vae)),
                       ("clip_layer", (model, clip.clone(), vae))):
        if what == "clip_layer":
            if fam != "sdxl":
                continue
            args[1].clip_layer(-1)
        try:
            bridge(*args)
            refusals[what] = None
        except FinetuneError as exc:
            refusals[what] = [exc.node, exc.input, str(exc)]
    r["refusals"] = refusals
    if fam == "sdxl":
        r["training"] = train(pipe, [model.model, clip.cond_stage_model, vae.first_stage_model])
    RESULT[fam] = r
'''


def test_bridge_reads_each_family_as_comfyui_runs_it(tmp_path):
    """Tiny SD 1.x, SD 2.x (v-prediction) and SDXL models built as ComfyUI's own MODEL / CLIP / VAE (model classes
    forced: ComfyUI's detection needs real sizes): the bridged pipe has the family, prediction and schedule ComfyUI
    samples with, its conditioning (SD 2.x's penultimate layer, SDXL's two encoders and pooled output, CLIP Set Last
    Layer on SD 1.x), UNet and VAE compute what ComfyUI's do, and what it cannot reproduce is refused clearly.
    Learn Embedding and full DreamBooth train on the SDXL pipe and leave ComfyUI's weights as they were."""
    r = harness.run_in_comfyui(Path(_COMFYUI_DIR).resolve(), tmp_path / "families", _FAMILIES_SCRIPT, timeout=600)
    for fam, latent_scale in (("sd1", 0.18215), ("sd2", 0.18215), ("sdxl", 0.13025)):
        f = r[fam]
        assert f["family"] == fam and f["latent_scale"] == latent_scale, f
        assert f["prediction"] == ("v_prediction" if fam == "sd2" else "epsilon"), f
        assert f["scheduler"] == {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                  "prediction_type": f["prediction"]}, f
        assert all(v < 1e-4 for v in f["diff"].values()), f
        assert any("shared with ComfyUI" in line and "held by the pipe: 0 MiB" in line for line in f["ui"]), f
        node, input, message = f["refusals"]["lcm"]
        assert (node, input) == ("FinetuneNativeModelToPipe", "model") and "LCM" in message, message
    assert r["sd2"]["layers"] == [r["sd2"]["host_layers"][0] - 1], r["sd2"]  # ComfyUI's penultimate layer
    assert r["sd1"]["layers"] == r["sd1"]["host_layers"] and r["sdxl"]["layers"] == r["sdxl"]["host_layers"]
    assert r["sd1"]["skip_layers"] == r["sd1"]["host_layers"][0] - 1 and r["sd1"]["skip_diff"] < 1e-4, r["sd1"]
    assert r["sd2"]["patched_sampling"] == ["epsilon", True], r["sd2"]
    node, input, message = r["sdxl"]["refusals"]["clip_layer"]
    assert input == "clip" and "CLIP Set Last Layer" in message, message
    assert r["sdxl"]["training"] == {"embedding_vectors": ["te1", "te2"], "dreambooth_changed": True,
                                     "dreambooth_copy": True, "host_unchanged": True}, r["sdxl"]["training"]
