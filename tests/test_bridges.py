"""Bridges to native graphs (nodes/bridges.py), headless: embedding → prompt word, ComfyUI LORA_MODEL → FT_LORA,
and the clear error of Apply LoRA to MODEL/CLIP without ComfyUI. The real-host parts are in
test_comfyui_integration.py."""

from __future__ import annotations

import inspect
import logging
import sys
import types
import uuid

import pytest
import torch

from comfy_finetune import host
from comfy_finetune.core.conditioning import encode_prompt
from comfy_finetune.core.embeddings import Embedding
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.handle import EmbeddingPatch, LoraPatch, ModelHandle
from comfy_finetune.core.ldm import unet_name_map
from comfy_finetune.core.lora import LoraModule, LoraWeights, to_kohya_state_dict
from comfy_finetune.nodes.bridges import NODES, ApplyLoRAToModel, EmbeddingToPrompt, NativeLoRAToFinetune
from comfy_finetune.nodes.generation import AddLoRA, Sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _result(out):
    return out["result"] if isinstance(out, dict) else out


def _ui(out):
    return (out.get("ui") or {}).get("text", []) if isinstance(out, dict) else []


# ---------------------------------------------------------------------------------------------- schema
@pytest.mark.parametrize("cls", NODES, ids=[c.NODE_ID for c in NODES])
def test_schema_follows_pack_conventions(cls):
    assert cls.NODE_ID and cls.DISPLAY_NAME.strip()
    assert cls.CATEGORY == "finetune/bridges"
    assert len(cls.DESCRIPTION) > 40
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)
    params = inspect.signature(cls.run).parameters
    for specs in cls.INPUT_TYPES().values():
        for name, (_, opts) in specs.items():
            assert opts.get("tooltip", "").strip(), f"{cls.NODE_ID}.{name}"
            assert name in params, f"{cls.NODE_ID}.run must accept {name}"
    assert repr(cls.INPUT_TYPES()) == repr(cls.INPUT_TYPES())


def test_native_types_are_declared():
    assert ApplyLoRAToModel.INPUT_TYPES()["required"]["model"][0] == "MODEL"
    assert ApplyLoRAToModel.INPUT_TYPES()["required"]["clip"][0] == "CLIP"
    assert ApplyLoRAToModel.RETURN_TYPES == ("MODEL", "CLIP")
    assert NativeLoRAToFinetune.INPUT_TYPES()["required"]["lora"][0] == "LORA_MODEL"
    assert NativeLoRAToFinetune.RETURN_TYPES == ("FT_LORA",)
    assert EmbeddingToPrompt.RETURN_TYPES == ("STRING",)


# ---------------------------------------------------------------------------------------------- embeddings
def _embedding(handle, name="bridge-emb", n=2, seed=0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    vectors = {f"te{i + 1}": torch.randn(n, int(te.config.hidden_size), generator=g)
               for i, te in enumerate(handle.base.text_encoders)}
    return Embedding(name=name, vectors=vectors)


def _sample(pipe, prompt):
    return Sample().run(pipe=pipe, prompt=prompt, seed=3, steps=2, cfg=3.0, sampler_name="euler",
                        scheduler="normal", width=64, height=64, batch_size=1)[0]


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
def test_embedding_prompt_word_resolves_like_the_in_memory_embedding(tiny_handles, models_dir, fam):
    handle = tiny_handles[fam]
    emb = _embedding(handle)
    folder = f"bridges_{uuid.uuid4().hex[:8]}"
    out = EmbeddingToPrompt().run(embedding=emb, pipe=handle, name=f"{folder}/concept", overwrite=False)
    (word,) = _result(out)
    assert word == f"embedding:{folder}/concept"
    assert (models_dir / "embeddings" / folder / "concept.safetensors").is_file()
    assert any(word in line for line in _ui(out))

    from_file = encode_prompt(handle, f"a photo of {word} on a red background")
    in_memory = encode_prompt(handle.with_patch(EmbeddingPatch(emb)),
                              f"a photo of embedding:{emb.name} on a red background")
    plain = encode_prompt(handle, "a photo of on a red background")
    assert torch.equal(from_file.cond, in_memory.cond)
    assert not torch.equal(from_file.cond, plain.cond)
    if fam == "sdxl":
        assert torch.equal(from_file.pooled, in_memory.pooled)

    # our own Sample node resolves the word from the file, with the same result as the in-memory embedding
    assert torch.equal(_sample(handle, f"a photo of {word}"),
                       _sample(handle.with_patch(EmbeddingPatch(emb)), f"a photo of embedding:{emb.name}"))


def test_embedding_names_never_overwrite_unless_asked(tiny_handles, models_dir):
    handle = tiny_handles["sd1"]
    folder = f"bridges_{uuid.uuid4().hex[:8]}"
    first = _embedding(handle, seed=1)
    second = _embedding(handle, seed=2)
    (w1,) = _result(EmbeddingToPrompt().run(embedding=first, pipe=handle, name=f"{folder}/x", overwrite=False))
    out = EmbeddingToPrompt().run(embedding=second, pipe=handle, name=f"{folder}/x", overwrite=False)
    (w2,) = _result(out)
    assert (w1, w2) == (f"embedding:{folder}/x", f"embedding:{folder}/x_2")
    assert not torch.equal(encode_prompt(handle, f"a {w1}").cond, encode_prompt(handle, f"a {w2}").cond)
    (w3,) = _result(EmbeddingToPrompt().run(embedding=second, pipe=handle, name=f"{folder}/x", overwrite=True))
    assert w3 == w1
    assert torch.equal(encode_prompt(handle, f"a {w1}").cond, encode_prompt(handle, f"a {w2}").cond)


def test_embedding_default_name_and_bad_names(tiny_handles, models_dir):
    handle = tiny_handles["sd1"]
    name = f"bridge-default-{uuid.uuid4().hex[:8]}"
    out = EmbeddingToPrompt().run(embedding=_embedding(handle, name=name), pipe=handle, name="", overwrite=False)
    (word,) = _result(out)
    assert word == f"embedding:{name}"
    for bad in ("my concept", "a(b)", "x,y"):
        with pytest.raises(FinetuneError) as err:
            EmbeddingToPrompt().run(embedding=_embedding(handle), pipe=handle, name=bad, overwrite=False)
        assert err.value.node == "FinetuneEmbeddingToPrompt" and err.value.input == "name", err.value
    with pytest.raises(FinetuneError) as err:
        EmbeddingToPrompt().run(embedding=_embedding(handle), pipe=handle, name="../escape", overwrite=False)
    assert err.value.node == "FinetuneEmbeddingToPrompt" and err.value.input == "name"
    with pytest.raises(FinetuneError) as err:  # an SDXL embedding for an SD 1.x model
        EmbeddingToPrompt().run(embedding=_embedding(tiny_handles["sdxl"]), pipe=handle, name="wrong_family",
                                overwrite=False)
    assert err.value.node == "FinetuneEmbeddingToPrompt"


# ---------------------------------------------------------------------------------------------- native LoRA
def _random_lora(handle, seed=0, rank=2) -> LoraWeights:
    """A LoRA on every weighted (>= 2-D) UNet layer: Linear [r, in] / [out, r], conv LoCon [r, in, k, k] /
    [out, r, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    ldm = unet_name_map(handle.base.unet.config)
    modules = {}
    for path, module in handle.base.unet.named_modules():
        w = getattr(module, "weight", None)
        if path not in ldm or not isinstance(w, torch.Tensor) or w.ndim < 2:
            continue
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g)
        modules[("unet", path)] = LoraModule(down, up, alpha=1.0)
    return LoraWeights(handle.family, modules, {}, "ours")


def _comfy_generic(lora: LoraWeights, handle, *, flat_convs: bool) -> dict[str, torch.Tensor]:
    """What ComfyUI's TrainLoraNode returns for these layers: diffusion_model.<LDM path>.lora_up/down.weight, alpha."""
    ldm = unet_name_map(handle.base.unet.config)
    sd = {}
    for (comp, path), m in lora.modules.items():
        assert comp == "unet"
        key = f"diffusion_model.{ldm[path]}"
        down, up = (m.down.flatten(1), m.up.flatten(1)) if flat_convs else (m.down, m.up)
        sd[f"{key}.lora_up.weight"] = up.clone()
        sd[f"{key}.lora_down.weight"] = down.clone()
        sd[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return sd


def _assert_same_modules(a: LoraWeights, b: LoraWeights):
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up), key
        assert float(m.alpha) == float(n.alpha) and n.mid is None, key


@pytest.mark.parametrize("fam", ["sd1", "sdxl"])
@pytest.mark.parametrize("flat_convs", [False, True], ids=["locon", "comfyui-flat"])
def test_native_lora_converts_back_to_identical_modules(tiny_handles, fam, flat_convs):
    handle = tiny_handles[fam]
    ours = _random_lora(handle)
    assert any(m.down.ndim == 4 and m.down.shape[-1] == 3 for m in ours.modules.values()), "needs a 3x3 conv"
    native = _comfy_generic(ours, handle, flat_convs=flat_convs)
    out = NativeLoRAToFinetune().run(lora=native, pipe=handle)
    (converted,) = _result(out)
    _assert_same_modules(ours, converted)
    assert converted.family is handle.family
    assert _ui(out) == [f"converted {len(ours.modules)} LoRA layers"]
    # the input dict is not changed, and the result does not share its tensors
    assert all(torch.equal(native[k], v) for k, v in _comfy_generic(ours, handle, flat_convs=flat_convs).items())
    first = next(k for k in native if k.endswith("lora_up.weight"))
    assert native[first].data_ptr() not in {m.up.data_ptr() for m in converted.modules.values()}
    # the same kohya file either way, and AddLoRA takes it
    cfg = dict(handle.base.unet.config)
    a, b = (to_kohya_state_dict(w, family=handle.family, unet_config=cfg)[0] for w in (ours, converted))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (pipe,) = _result(AddLoRA().run(pipe=handle, lora=converted, strength_unet=0.5, strength_text=1.0))
    assert isinstance(pipe.loras[-1], LoraPatch) and pipe.loras[-1].lora is converted


def test_native_lora_patches_like_the_original(tiny_handles):
    handle = tiny_handles["sd1"]
    ours = _random_lora(handle, seed=3)
    (converted,) = _result(NativeLoRAToFinetune().run(lora=_comfy_generic(ours, handle, flat_convs=True), pipe=handle))
    a = dict(handle.with_patch(LoraPatch(ours, 0.01, 1.0))._lora_deltas())
    b = dict(handle.with_patch(LoraPatch(converted, 0.01, 1.0))._lora_deltas())
    assert len(a) == len(b) == len(ours.modules)
    for param, delta in a.items():
        assert torch.equal(delta, b[param])


def test_native_lora_reports_what_it_leaves_out(tiny_handles):
    handle = tiny_handles["sd1"]
    ours = _random_lora(handle, seed=1)
    native = _comfy_generic(ours, handle, flat_convs=True)
    native["diffusion_model.out.0.diff"] = torch.zeros(32)  # a GroupNorm weight delta, untrained
    native["diffusion_model.out.0.diff_b"] = torch.full((32,), 0.25)  # its bias delta, trained
    native["diffusion_model.no_such_block.0.lora_up.weight"] = torch.zeros(4, 2)
    native["diffusion_model.no_such_block.0.lora_down.weight"] = torch.zeros(2, 4)
    out = NativeLoRAToFinetune().run(lora=native, pipe=handle)
    (converted,) = _result(out)
    norm = ("unet", "conv_norm_out")  # LDM out.0: the UNet's last GroupNorm
    deltas = converted.modules.pop(norm)
    _assert_same_modules(ours, converted)
    assert deltas.kind == "diff" and torch.equal(deltas.diff, torch.zeros(32))
    assert torch.equal(deltas.bias_delta(0.5), torch.full((32,), 0.125))  # the strength scales it
    notes = _ui(out)
    assert notes[0] == f"converted {len(ours.modules)} LoRA layers, 1 full-weight/bias deltas (.diff/.diff_b)", notes
    assert any("no_such_block" in n and "2 keys" in n for n in notes), notes


def test_native_lora_errors_name_the_node(tiny_handles):
    sd1, sdxl = tiny_handles["sd1"], tiny_handles["sdxl"]
    loha = {"diffusion_model.input_blocks.1.1.proj_in.hada_w1_a": torch.zeros(4, 2),
            "diffusion_model.input_blocks.1.1.proj_in.hada_w1_b": torch.zeros(2, 4)}
    for bad, pipe in ((loha, sd1), ({}, sd1), ("not a dict", sd1),
                      (_comfy_generic(_random_lora(sdxl), sdxl, flat_convs=True), sd1)):
        with pytest.raises(FinetuneError) as err:
            NativeLoRAToFinetune().run(lora=bad, pipe=pipe)
        assert err.value.node == "NativeLoRAToFinetune" and err.value.input == "lora", err.value
        assert err.value.fix


# ---------------------------------------------------------------------------------------------- apply to MODEL/CLIP
def test_apply_lora_to_native_model_headless_is_a_clear_error(tiny_handles):
    handle = tiny_handles["sd1"]
    with pytest.raises(FinetuneError) as err:
        ApplyLoRAToModel().run(model=object(), clip=object(), lora=_random_lora(handle), pipe=handle,
                               strength_model=1.0, strength_clip=1.0)
    e = err.value
    assert e.node == "FinetuneApplyLoRAToModel"
    assert "MODEL" in e.detail and "CLIP" in e.detail and "headless" in e.detail, e
    assert "AddLoRA" in e.fix and "ComfyUI" in e.fix


def test_apply_lora_refuses_a_lora_of_another_model(tiny_handles):
    with pytest.raises(FinetuneError) as err:
        ApplyLoRAToModel().run(model=object(), clip=object(), lora=_random_lora(tiny_handles["sdxl"]),
                               pipe=tiny_handles["sd1"], strength_model=1.0, strength_clip=1.0)
    assert err.value.node == "FinetuneApplyLoRAToModel" and err.value.input == "lora"


class _FakeWeight:
    def __init__(self, *shape):
        self.shape = torch.Size(shape)


@pytest.fixture
def fake_comfy(monkeypatch):
    """Just enough of ComfyUI's modules for host.apply_lora_to_native (the real host is in the integration test)."""
    calls = {}
    comfy = types.ModuleType("comfy")
    sd_mod, lora_mod, utils_mod = (types.ModuleType(f"comfy.{n}") for n in ("sd", "lora", "utils"))
    weights = {"w.a": _FakeWeight(8, 4), "w.b": _FakeWeight(8, 4)}

    def load_lora_for_models(model, clip, lora, sm, sc):
        calls["args"] = (model, clip, dict(lora), sm, sc)
        for key in calls.get("warn", []):
            logging.warning("lora key not loaded: %s", key)
        logging.warning("some other warning")
        return ("patched-model", "patched-clip")

    sd_mod.load_lora_for_models = load_lora_for_models
    lora_mod.model_lora_keys_unet = lambda m, key_map: {**key_map, "lora_unet_a": "w.a", "lora_unet_b": "w.b"}
    lora_mod.model_lora_keys_clip = lambda m, key_map: key_map
    utils_mod.get_attr = lambda root, key: weights[key]
    model = types.SimpleNamespace(model="unet")
    clip = types.SimpleNamespace(cond_stage_model="clip")
    for name, mod in {"comfy": comfy, "comfy.sd": sd_mod, "comfy.lora": lora_mod, "comfy.utils": utils_mod,
                      "comfy.model_management": types.ModuleType("comfy.model_management"),
                      "folder_paths": types.ModuleType("folder_paths")}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    comfy.sd, comfy.lora, comfy.utils = sd_mod, lora_mod, utils_mod
    assert host.in_comfyui()
    return calls, model, clip


def _pair(out_dim=8, in_dim=4, rank=2):
    return {"lora_unet_a.lora_down.weight": torch.zeros(rank, in_dim),
            "lora_unet_a.lora_up.weight": torch.zeros(out_dim, rank), "lora_unet_a.alpha": torch.tensor(1.0)}


def test_host_apply_returns_the_hosts_clones(fake_comfy):
    calls, model, clip = fake_comfy
    assert host.apply_lora_to_native(model, clip, _pair(), 0.5, 0.25) == ("patched-model", "patched-clip")
    assert calls["args"][0] is model and calls["args"][1] is clip and calls["args"][3:] == (0.5, 0.25)
    calls.clear()
    assert host.apply_lora_to_native(model, clip, _pair(), 0, 0) == (model, clip)  # like LoraLoader
    assert "args" not in calls


def test_host_apply_turns_not_loaded_warnings_into_an_error(fake_comfy):
    calls, model, clip = fake_comfy
    calls["warn"] = ["lora_te_text_model_x.lora_up.weight"]
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)  # even when the host only logs errors
    try:
        with pytest.raises(FinetuneError) as err:
            host.apply_lora_to_native(model, clip, _pair(), 1.0, 1.0)
    finally:
        root.setLevel(old)
    assert root.level == old
    assert "lora key not loaded: lora_te_text_model_x.lora_up.weight" in err.value.detail
    assert "some other warning" not in err.value.detail
    assert root.handlers == [h for h in root.handlers if type(h).__name__ != "_LoraWarningCapture"]


def test_host_apply_refuses_shape_mismatches(fake_comfy):
    calls, model, clip = fake_comfy
    with pytest.raises(FinetuneError) as err:
        host.apply_lora_to_native(model, clip, _pair(out_dim=16), 1.0, 1.0)
    assert "lora_unet_a" in err.value.detail and "[16, 4]" in err.value.detail and "[8, 4]" in err.value.detail


# ---------------------------------------------------------------------------------------------- MODEL/CLIP/VAE -> pipe
def _host_parts(handle, *, te_dtype=None, unet_dtype=None, extra_text_layer=False) -> dict:
    """What host.native_model_parts returns for ComfyUI's load of ``handle``'s checkpoint: copies of its tensors
    made under inference mode (as ComfyUI runs nodes), the UNet and VAE under LDM names (VAE attention as 1x1
    convolutions), the text encoders under HF names with ``text_model.`` (ComfyUI's). ``extra_text_layer``: SD 2.x
    as ComfyUI holds it, with the OpenCLIP tower's last layer, which diffusers' encoder drops."""
    from comfy_finetune.core.ldm import is_vae_conv_as_linear, rename_keys, vae_name_map

    base = handle.base
    with torch.inference_mode():
        unet = {k: v.clone().to(unet_dtype or v.dtype)
                for k, v in rename_keys(base.unet.state_dict(), unet_name_map(base.unet.config)).items()}
        vae = {k: (v[:, :, None, None] if v.ndim == 2 and is_vae_conv_as_linear(k.rpartition(".")[0]) else v).clone()
               for k, v in rename_keys(base.vae.state_dict(), vae_name_map(base.vae.config)).items()}
        texts = []
        for te in base.text_encoders:
            sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k):
                  v.clone().to(te_dtype or v.dtype) for k, v in te.state_dict().items() if "position_ids" not in k}
            if extra_text_layer:
                n = int(te.config.num_hidden_layers)
                sd.update({k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone() * 3 for k, v in sd.items()
                           if f"encoder.layers.{n - 1}." in k})
            texts.append(sd)
    return {"family": handle.family.value, "prediction_type": base.prediction_type,
            "schedule": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "zero_snr": False},
            "latent_scale": float(base.vae.config.scaling_factor), "unet": unet, "vae": vae, "text_encoders": texts,
            "text_layers": [int(base.text_encoders[0].config.num_hidden_layers)] if extra_text_layer else None,
            "patched": {"unet": [], "vae": [], "text_encoders": [[] for _ in texts]}, "notes": []}


def _host_tensors(parts) -> list[torch.Tensor]:
    return [*parts["unet"].values(), *parts["vae"].values(),
            *(t for te in parts["text_encoders"] for t in te.values())]


def _bridged(handle, **kwargs):
    from comfy_finetune.core.native import base_from_native

    parts = _host_parts(handle, **kwargs)
    base, notes = base_from_native(parts, "cpu", tokenizers=handle.base.tokenizers)
    return parts, base, notes


def test_native_model_to_pipe_headless_needs_comfyui(tiny_handles):
    from comfy_finetune.nodes.bridges import NativeModelToPipe

    with pytest.raises(FinetuneError) as err:
        NativeModelToPipe().run(model=object(), clip=object(), vae=object(), device="cpu")
    e = err.value
    assert e.node == "FinetuneNativeModelToPipe" and e.input == "model", e
    assert "needs ComfyUI" in e.detail and "headless" in e.detail, e
    assert "Load Base Model" in e.fix and "ComfyUI" in e.fix
    schema = NativeModelToPipe.INPUT_TYPES()["required"]
    assert [schema[n][0] for n in ("model", "clip", "vae")] == ["MODEL", "CLIP", "VAE"]
    assert NativeModelToPipe.RETURN_TYPES == ("FT_PIPE",)


def test_plain_alias_shares_an_inference_tensors_memory_and_trains_through_it():
    from comfy_finetune.core.native import plain_alias

    with torch.inference_mode():
        w = torch.randn(6, 4)
        conv = torch.randn(3, 3, 1, 1)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="Inference tensors"):
        torch.nn.functional.linear(x, w).sum().backward()
    alias = plain_alias(w)
    assert not alias.is_inference() and alias.data_ptr() == w.data_ptr() and torch.equal(alias, w)
    torch.nn.functional.linear(x, alias).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(2, -1))
    view = plain_alias(conv)[:, :, 0, 0]
    assert view.data_ptr() == conv.data_ptr() and view.shape == (3, 3)


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_bridged_modules_share_every_tensor_and_compute_the_same(tiny_handles, fam):
    handle = tiny_handles[fam]
    parts, base, notes = _bridged(handle)
    host_ptrs = {t.data_ptr() for t in _host_tensors(parts)}
    modules = (base.unet, base.vae, *base.text_encoders)
    params = [(n, p) for m in modules for n, p in m.named_parameters()]
    assert params and [n for n, p in params if p.data_ptr() not in host_ptrs] == []
    assert not any(p.is_inference() or p.requires_grad for _, p in params)
    assert notes == []  # nothing copied
    from comfy_finetune.core.native import shared_fraction

    shared, own = shared_fraction(modules, _host_tensors(parts))
    position_ids = sum(b.untyped_storage().nbytes() for te in base.text_encoders for _, b in te.named_buffers())
    assert own == position_ids <= 2 * 77 * 8  # CLIP's position ids (0..76) per encoder, made for the pipe
    assert shared == sum(t.untyped_storage().nbytes() for t in _host_tensors(parts))
    assert (base.family, base.dtype, base.device.type) == (handle.family, torch.float32, "cpu")
    assert base.vae.config.scaling_factor == handle.base.vae.config.scaling_factor
    assert base.source.startswith(f"comfyui-native:{fam}:")

    # the same images from the same seed as the model the tensors came from
    a, b = _sample(handle, "a red circle"), _sample(ModelHandle(base), "a red circle")
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_bridged_sd2_keeps_the_layers_the_host_reads(tiny_handles):
    """ComfyUI holds SD 2.x's whole OpenCLIP tower and reads its penultimate layer (normed); the bridge keeps the
    layers up to it, which is diffusers' SD 2.x encoder: the same conditioning."""
    handle = tiny_handles["sd2"]
    parts, base, _ = _bridged(handle, extra_text_layer=True)
    n = int(handle.base.text_encoders[0].config.num_hidden_layers)
    assert len(parts["text_encoders"][0]) > len(handle.base.text_encoders[0].state_dict()) - 1
    assert int(base.text_encoders[0].config.num_hidden_layers) == n
    prompt = "a blue square"
    assert torch.equal(encode_prompt(handle, prompt).cond, encode_prompt(ModelHandle(base), prompt).cond)


@pytest.mark.parametrize("unet_dtype,te_dtype", [(torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32-unet-fp16-clip", "bf16"])
def test_bridged_models_keep_the_hosts_dtypes(tiny_handles, unet_dtype, te_dtype):
    """ComfyUI keeps text encoders in fp16 beside an fp32 UNet on a CPU, and may hold everything in bf16: the bridge
    keeps the host's dtypes (no copy); the pipe's dtype is the UNet's, and it samples."""
    parts, base, notes = _bridged(tiny_handles["sd1"], te_dtype=te_dtype, unet_dtype=unet_dtype)
    assert base.dtype == unet_dtype and next(base.text_encoders[0].parameters()).dtype == te_dtype
    assert next(base.unet.parameters()).dtype == unet_dtype and notes == []
    host_ptrs = {t.data_ptr() for t in _host_tensors(parts)}
    assert all(p.data_ptr() in host_ptrs for m in (base.unet, *base.text_encoders) for p in m.parameters())
    images = _sample(ModelHandle(base), "a red circle")
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()


def test_bridge_reads_the_schedule_and_refuses_what_it_cannot_train(tiny_handles):
    from comfy_finetune.core.native import base_from_native

    handle = tiny_handles["sd1"]
    parts = _host_parts(handle)
    parts.update(prediction_type="v_prediction", schedule={"num_train_timesteps": 1000, "beta_start": 0.001,
                                                           "beta_end": 0.02, "zero_snr": True})
    base, _ = base_from_native(parts, "cpu", tokenizers=handle.base.tokenizers)
    assert base.prediction_type == "v_prediction"
    cfg = base.scheduler_config
    assert (cfg["prediction_type"], cfg["beta_start"], cfg["beta_end"], cfg["rescale_betas_zero_snr"]) == \
        ("v_prediction", 0.001, 0.02, True)

    def refused(input, match, **change):
        bad = {**_host_parts(handle), **change}
        with pytest.raises(FinetuneError, match=match) as err:
            base_from_native(bad, "cpu", node="FinetuneNativeModelToPipe", tokenizers=handle.base.tokenizers)
        assert err.value.input == input and err.value.node == "FinetuneNativeModelToPipe" and err.value.fix

    refused("model", "x0", prediction_type="x0")
    refused("model", "Kolors", family="kolors")
    unet = dict(parts["unet"])
    unet["input_blocks.0.0.weight"] = torch.zeros(unet["input_blocks.0.0.weight"].shape[0], 9, 3, 3)
    refused("model", "inpainting", unet=unet)
    refused("clip", "text encoder", text_encoders=_host_parts(tiny_handles["sdxl"])["text_encoders"])
    refused("clip", "layers", text_layers=[99])


@pytest.mark.parametrize("kind", ["lora", "ti", "dreambooth-full", "lora-fp16-clip", "ti-fp16-clip"])
def test_trainers_on_a_bridged_pipe_leave_the_hosts_tensors_as_they_were(tiny_handles, kind, tmp_path, monkeypatch):
    """The pack's trainers on a pipe over the host's (inference-mode) tensors: they train (peft LoRA with the text
    encoder, embedding vectors, a full DreamBooth copy of the UNet; also with ComfyUI's fp16 text encoder beside an
    fp32 UNet), every host tensor keeps its values, and the pipe still reads the host's memory afterwards."""
    from comfy_finetune.training.data import from_image_batch
    from comfy_finetune.training.dreambooth import DreamBoothSpec, train_dreambooth
    from comfy_finetune.training.lora_trainer import LoraSpec, train_lora
    from comfy_finetune.training.settings import TrainSettings
    from comfy_finetune.training.ti_trainer import TISpec, train_embedding

    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path / "cache"))
    parts, base, _ = _bridged(tiny_handles["sd1"], te_dtype=torch.float16 if kind.endswith("fp16-clip") else None)
    kind = kind.removesuffix("-fp16-clip")
    tensors = _host_tensors(parts)
    before = [t.clone() for t in tensors]
    pipe = ModelHandle(base)
    g = torch.Generator().manual_seed(0)
    data = from_image_batch(torch.rand((2, 64, 64, 3), generator=g), ["a red circle", "a blue square"], resolution=64)
    settings = TrainSettings(steps=2, learning_rate=1e-2, batch_size=1, seed=3, cache_to_disk=False)
    if kind == "lora":
        trained, _ = train_lora(pipe, data, settings, LoraSpec(rank=2, alpha=2, train_text_encoder=True))
        assert any(c == "te1" for c, _ in trained.modules)
        assert sum(float(m.up.abs().sum()) for m in trained.modules.values()) > 0  # peft's B starts at zero
    elif kind == "ti":
        embedding, _ = train_embedding(pipe, data, settings, TISpec(token="<bridge>", initializer="shape"))
        assert embedding.vectors
    else:
        spec = DreamBoothSpec(instance_prompt="a sks shape", class_prompt="a shape", method="full",
                              prior_preservation=False)
        trained_handle, _, _ = train_dreambooth(pipe, data, settings, spec)
        trained_unet = trained_handle.base.unet
        host_ptrs = {t.data_ptr() for t in tensors}
        assert not any(p.data_ptr() in host_ptrs for p in trained_unet.parameters())  # a copy
        changed = [n for (n, p), q in zip(trained_unet.named_parameters(), base.unet.parameters())
                   if not torch.equal(p, q)]
        assert changed
    assert all(torch.equal(a, b) for a, b in zip(before, tensors))
    host_ptrs = {t.data_ptr() for t in tensors}
    assert all(p.data_ptr() in host_ptrs for m in (base.unet, base.vae, *base.text_encoders)
               for p in m.parameters())
