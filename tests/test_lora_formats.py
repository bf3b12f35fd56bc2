"""LoRA files: kohya and diffusers layouts round-trip, other spellings parse, diffusers' own loader is the oracle."""

from __future__ import annotations

import copy
import itertools
import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.core.ldm import unet_name_map
from comfy_finetune.core.lora import (
    LoraModule,
    LoraWeights,
    lora_from_file,
    parse_lora,
    to_diffusers_state_dict,
    to_kohya_state_dict,
)
from comfy_finetune.core.tiny import build_tiny_pipeline_folder

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
LOCON = "down_blocks.1.resnets.0.conv1"  # a 3x3 conv, kohya LoCon style


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_lora")
    return {f: build_tiny_pipeline_folder(root / f.value, f, seed=5) for f in (Family.SD1, Family.SDXL)}


def _pipe(folders, family):
    if family is Family.SDXL:
        return StableDiffusionXLPipeline.from_pretrained(folders[family])
    return StableDiffusionPipeline.from_pretrained(folders[family], safety_checker=None)


@pytest.fixture(scope="session")
def base(folders):
    return {f: _pipe(folders, f) for f in folders}


def _encoders(pipe) -> list[torch.nn.Module]:
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])


def _shapes(model: torch.nn.Module) -> dict[str, torch.Size]:
    return {n: m.weight.shape for n, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)}


def _kwargs(pipe, family) -> dict:
    return dict(family=family, unet_config=pipe.unet.config, unet_modules=_shapes(pipe.unet),
                te_modules=[_shapes(t) for t in _encoders(pipe)])


def _random_lora(pipe, family, seed=0, locon=True, mixed_alpha=True) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    targets = [("unet", n, m) for n, m in pipe.unet.named_modules() if n.endswith(UNET_TARGETS)]
    if locon:
        targets.append(("unet", LOCON, pipe.unet.get_submodule(LOCON)))
    for comp, te in zip(("te1", "te2"), _encoders(pipe)):
        targets += [(comp, n, m) for n, m in te.named_modules() if n.endswith(TE_TARGETS)]
    modules = {}
    for i, (comp, name, mod) in enumerate(targets):
        w = mod.weight
        rank, alpha = (4, 3.0) if i % 5 else (2, 1.5 if mixed_alpha else 3.0)  # mostly rank 4 / alpha 3
        if w.ndim == 2:
            down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        else:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g)
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g)
        modules[(comp, name)] = LoraModule(down * 0.3, up * 0.3, alpha)
    return LoraWeights(family, modules, {}, "tiny-test")


def _assert_same_modules(a: LoraWeights, b: LoraWeights) -> None:
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        o = b.modules[key]
        assert torch.equal(m.down, o.down) and torch.equal(m.up, o.up), key
        assert m.alpha == o.alpha, key
        torch.testing.assert_close(m.delta(0.7), o.delta(0.7), rtol=0, atol=0)


def _write(tmp_path, name, sd, meta):
    path = tmp_path / name
    save_file(sd, str(path), metadata=meta)
    return path


# ------------------------------------------------------------------------------------------ deltas

def test_delta_shapes_and_scale():
    down, up = torch.randn(4, 6), torch.randn(5, 4)
    m = LoraModule(down, up, 2.0)
    torch.testing.assert_close(m.delta(0.5), 0.5 * 0.5 * up @ down)
    assert LoraModule(down, up, None).scale == 1.0 and LoraModule(down, up, 0.0).scale == 1.0
    assert m.delta(shape=(5, 6, 1, 1)).shape == (5, 6, 1, 1)
    conv = LoraModule(down[:, :, None, None], up[:, :, None, None], 4.0)
    assert conv.delta().shape == (5, 6, 1, 1)
    torch.testing.assert_close(conv.delta(shape=(5, 6)), up @ down)
    locon = LoraModule(torch.randn(4, 6, 3, 3), torch.randn(5, 4, 1, 1), 1.0)
    ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.ones(1, 6, 3, 3), locon.down), locon.up)
    got = torch.nn.functional.conv2d(torch.ones(1, 6, 3, 3), locon.delta() * 4)  # scale 1/4 undone
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tucker = LoraModule(torch.randn(4, 6, 1, 1), torch.randn(5, 4, 1, 1), 4.0, mid=torch.randn(4, 4, 3, 3))
    x = torch.randn(1, 6, 7, 7)
    seq = torch.nn.functional.conv2d(torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x, tucker.down), tucker.mid), tucker.up)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, tucker.delta()), seq, rtol=1e-4, atol=1e-4)
    half = LoraModule(down.half(), up.half(), 2.0)
    assert half.delta().dtype == torch.float32  # computed in fp32 whatever the stored dtype


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL])
def test_kohya_and_diffusers_round_trip(base, tmp_path, family):
    pipe = base[family]
    lora = _random_lora(pipe, family)
    k_sd, k_meta = to_kohya_state_dict(lora, family=family, unet_config=pipe.unet.config)
    d_sd, d_meta = to_diffusers_state_dict(lora, family=family, unet_config=pipe.unet.config)
    kohya, unmatched_k = lora_from_file(_write(tmp_path, "k.safetensors", k_sd, k_meta), **_kwargs(pipe, family))
    diff, unmatched_d = lora_from_file(_write(tmp_path, "d.safetensors", d_sd, d_meta), **_kwargs(pipe, family))
    assert unmatched_k == [] and unmatched_d == []
    _assert_same_modules(lora, kohya)
    _assert_same_modules(lora, diff)
    assert kohya.family is family and kohya.name == "k"

    # kohya/A1111 key spellings: lora_te_ (SD 1.x/2.x) or lora_te1_/lora_te2_ (SDXL), then the module path with
    # dots as underscores, then .lora_down/.lora_up.weight and .alpha
    te1 = "lora_te1_" if family is Family.SDXL else "lora_te_"
    assert f"{te1}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in k_sd
    assert f"{te1}text_model_encoder_layers_1_mlp_fc2.alpha" in k_sd
    if family is Family.SDXL:
        assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in k_sd
        assert "lora_unet_middle_block_1_proj_in.alpha" in k_sd
        assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight" in k_sd
        assert k_meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert k_meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1.lora_B.weight" in d_sd
    else:
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in k_sd
        assert k_sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].ndim == 4  # SD1 1x1 conv
        assert k_meta["ss_base_model_version"] == "sd_v1" and k_meta["ss_v2"] == "False"
        assert k_meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in d_sd
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in k_sd)
    alphas = {m.alpha for m in lora.modules.values()}
    assert alphas == {1.5, 3.0}
    for (comp, path), m in lora.modules.items():
        if comp == "te1":
            name = ("text_model." + path.removeprefix("text_model.")).replace(".", "_")
            assert k_sd[f"{te1}{name}.alpha"] == m.alpha
    assert (k_meta["ss_network_module"], k_meta["ss_network_dim"], k_meta["ss_network_alpha"]) == \
        ("networks.lora", "4", "3")
    assert json.loads(k_meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "3"}
    for key in ("modelspec.sai_model_spec", "modelspec.implementation", "modelspec.title"):
        assert k_meta[key]
    adapter = json.loads(d_meta["lora_adapter_metadata"])
    assert adapter["unet.r"] == 4 and adapter["unet.lora_alpha"] == 3.0 and adapter["unet.alpha_pattern"]


def test_other_spellings_parse_identically(base):
    family = Family.SD1
    pipe = base[family]
    lora = _random_lora(pipe, family, seed=1, locon=False)
    d_sd, d_meta = to_diffusers_state_dict(lora, family=family)
    ldm = unet_name_map(pipe.unet.config)

    def old_processor(k: str) -> str:  # diffusers' old attention-processor names
        k = re.sub(r"\.(attn[12])\.(to_q|to_k|to_v)\.lora_([AB])\.weight$",
                   lambda m: f".{m[1]}.processor.{m[2]}_lora.{'down' if m[3] == 'A' else 'up'}.weight", k)
        k = re.sub(r"\.(attn[12])\.to_out\.0\.lora_([AB])\.weight$",
                   lambda m: f".{m[1]}.processor.to_out_lora.{'down' if m[2] == 'A' else 'up'}.weight", k)
        return re.sub(r"\.self_attn\.(q|k|v|out)_proj\.lora_([AB])\.weight$",
                      lambda m: f".self_attn.to_{m[1]}_lora.{'down' if m[2] == 'A' else 'up'}.weight", k)

    def comfy(k: str) -> str:  # ComfyUI generic names
        if k.startswith("unet."):
            module, part = re.match(r"unet\.(.+)\.(lora_[AB]\.weight)$", k).groups()
            return f"diffusion_model.{ldm[module]}.{part}"
        return k.replace("text_encoder.text_model.", "text_encoders.clip_l.transformer.text_model.")

    spellings = {
        "lora.down": lambda k: k.replace(".lora_A.weight", ".lora.down.weight")
        .replace(".lora_B.weight", ".lora.up.weight"),
        "lora_linear_layer": lambda k: k.replace(".lora_A.", ".lora_linear_layer.down.")
        .replace(".lora_B.", ".lora_linear_layer.up."),
        "peft_default": lambda k: k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."),
        "old_processor": old_processor,
        "comfy_generic": comfy,
        "te_without_text_model": lambda k: k.replace("text_encoder.text_model.", "text_encoder."),
    }
    for label, fn in spellings.items():
        got, unmatched = parse_lora({fn(k): v for k, v in d_sd.items()}, d_meta, **_kwargs(pipe, family))
        assert unmatched == [], label
        _assert_same_modules(lora, got)
    # Raw PEFT: base_model.model.<path> of a UNet-only adapter, and bare paths (no component prefix).
    unet_only = {k.removeprefix("unet."): v for k, v in d_sd.items() if k.startswith("unet.")}
    for sd in (unet_only, {"base_model.model." + k: v for k, v in unet_only.items()}):
        got, unmatched = parse_lora(sd, d_meta, **_kwargs(pipe, family))
        assert unmatched == [] and set(got.modules) == {k for k in lora.modules if k[0] == "unet"}
    # Without adapter metadata diffusers files mean alpha = rank (scale 1).
    got, _ = parse_lora(d_sd, {"format": "pt"}, **_kwargs(pipe, family))
    assert all(m.alpha == m.rank for m in got.modules.values())


def test_unmatched_keys_are_reported(base):
    family = Family.SD1
    pipe = base[family]
    lora = _random_lora(pipe, family, seed=2, locon=False)
    sd, meta = to_kohya_state_dict(lora, family=family, unet_config=pipe.unet.config)
    extra = {
        "lora_unet_not_a_module.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_not_a_module.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight": torch.zeros(2, 32, 1, 1),  # no up
        "lora_unet_down_blocks_0_attentions_0_proj_out.dora_scale": torch.ones(32, 1, 1, 1),  # beside a lone down
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),  # SD1 has no te2
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(128, 2),
    }
    bundled = {"bundle_emb.sks.string_to_param.*": torch.zeros(1, 32)}  # read as an embedding, not a module
    got, unmatched = parse_lora({**sd, **extra, **bundled}, meta, **{**_kwargs(pipe, family), "family": None})
    assert sorted(unmatched) == sorted(extra)
    _assert_same_modules(lora, got)
    assert list(got.embeddings) == ["sks"] and got.embeddings["sks"].vectors["te1"].shape == (1, 32)


# ------------------------------------------------------------------------------------------ family checks

def test_family_mismatch_errors(base):
    sd1, sdxl = base[Family.SD1], base[Family.SDXL]
    xl_lora = _random_lora(sdxl, Family.SDXL, seed=3)
    sd, meta = to_kohya_state_dict(xl_lora, family=Family.SDXL, unet_config=sdxl.unet.config)
    with pytest.raises(FinetuneError) as exc:  # metadata says SDXL
        parse_lora(sd, meta, **_kwargs(sd1, Family.SD1))
    assert exc.value.node is None and exc.value.input == "lora_name"  # the core names no node; AddLoRA does
    assert "this LoRA is for SDXL but the model is SD 1.x" in str(exc.value)
    with pytest.raises(FinetuneError, match="is for SDXL but the model is SD 1.x.*second text encoder"):
        parse_lora(sd, {}, **_kwargs(sd1, Family.SD1))  # structure: lora_te2_
    unet_only = {k: v for k, v in sd.items() if k.startswith("lora_unet_")}
    with pytest.raises(FinetuneError, match=r"^input 'lora_name': this LoRA does not fit the SD 1.x model: only"):
        parse_lora(unet_only, {}, **_kwargs(sd1, Family.SD1))  # shapes: SGM names exist in SD1 with other widths
    real_width = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
                  torch.zeros(4, 2048), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
                  ".lora_up.weight": torch.zeros(320, 4)}
    with pytest.raises(FinetuneError, match="is for SDXL but the model is SD 1.x.*width is 2048"):
        parse_lora(real_width, {"ss_base_model_version": "sd_v1"}, **_kwargs(sd1, Family.SD1))
    sd2_meta = {"ss_v2": "True", "ss_base_model_version": "sd_v2"}
    without_te2 = {k: v for k, v in sd.items() if not k.startswith("lora_te2_")}
    with pytest.raises(FinetuneError, match="is for SD 2.x but the model is SDXL.*metadata"):
        parse_lora(without_te2, sd2_meta, **_kwargs(sdxl, Family.SDXL))
    got, _ = parse_lora(without_te2, {}, **_kwargs(sdxl, Family.SDXL))  # no evidence: accepted as the target family
    assert got.family is Family.SDXL


# ------------------------------------------------------------------------------------------ pickles

_CALLED: list[str] = []


def _payload() -> dict:
    _CALLED.append("unpickled")
    return {}


class Payload:
    def __reduce__(self):
        return (_payload, ())


def test_pickles_load_weights_only(base, tmp_path):
    family = Family.SD1
    pipe = base[family]
    lora = _random_lora(pipe, family, seed=4, locon=False)
    sd, _ = to_kohya_state_dict(lora, family=family, unet_config=pipe.unet.config)
    torch.save(sd, tmp_path / "plain.pt")
    got, unmatched = lora_from_file(tmp_path / "plain.pt", **_kwargs(pipe, family))
    assert unmatched == [] and got.name == "plain"
    _assert_same_modules(lora, got)

    torch.save({**sd, "trap": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(FinetuneError, match="cannot be loaded safely") as exc:
        lora_from_file(tmp_path / "evil.pt", **_kwargs(pipe, family))
    assert exc.value.node is None and exc.value.input == "lora_name" and "safetensors" in exc.value.fix
    assert _CALLED == []
    with pytest.raises(FinetuneError, match="unsupported LoRA file type"):
        (tmp_path / "x.txt").write_text("hi")
        lora_from_file(tmp_path / "x.txt", **_kwargs(pipe, family))


# ------------------------------------------------------------------------------------------ oracle

def _outputs(pipe, family, unet, encoders):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if family is Family.SDXL:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    ids = torch.randint(0, pipe.tokenizer.vocab_size - 2, (2, 10), generator=g)
    with torch.no_grad():
        outs = [unet(x, torch.tensor([10, 700]), ctx, **kw).sample]
        for te in encoders:
            o = te(ids, output_hidden_states=True)
            outs += [o.last_hidden_state, o.hidden_states[-2]] + ([o.text_embeds] if hasattr(o, "text_embeds") else [])
    return outs


def _merged(pipe, lora: LoraWeights):
    unet, encoders = copy.deepcopy(pipe.unet), [copy.deepcopy(t) for t in _encoders(pipe)]
    models = {"unet": unet, "te1": encoders[0], "te2": encoders[-1]}
    with torch.no_grad():
        for (comp, path), module in lora.modules.items():
            w = models[comp].get_submodule(path).weight
            w += module.delta(shape=w.shape).to(w.dtype)
    return unet, encoders


@pytest.mark.parametrize("family,layout", list(itertools.product([Family.SD1, Family.SDXL], ["kohya", "diffusers"])))
def test_merged_deltas_match_diffusers_loader(base, folders, tmp_path, family, layout):
    pipe = base[family]
    # diffusers 0.42 turns per-module kohya alphas into malformed PEFT alpha_pattern keys (e.g.
    # '...attn2.processor.to_q_lora.down.weight', 'text_model.encoder.layers.0.self_attn') that match nothing, so
    # the oracle only gets a kohya file with one alpha (ranks still vary). Our diffusers files carry alpha_pattern.
    lora = _random_lora(pipe, family, seed=6, mixed_alpha=layout == "diffusers")
    writer = to_kohya_state_dict if layout == "kohya" else to_diffusers_state_dict
    sd, meta = writer(lora, family=family, unet_config=pipe.unet.config)
    path = _write(tmp_path, f"{layout}.safetensors", sd, meta)
    parsed, unmatched = lora_from_file(path, **_kwargs(pipe, family))
    assert unmatched == []
    ours = _outputs(pipe, family, *_merged(pipe, parsed))

    oracle = _pipe(folders, family)
    oracle.load_lora_weights(str(path))
    theirs = _outputs(oracle, family, oracle.unet, _encoders(oracle))
    plain = _outputs(pipe, family, pipe.unet, _encoders(pipe))
    for a, b, c in zip(ours, theirs, plain):
        assert not torch.allclose(a, c, atol=1e-3)  # the LoRA does change every output
        # Merged weights (W + scale * up @ down, rounded once) against diffusers' unmerged W x + scale * up(down x):
        # the fp32 rounding differs in every layer and grows through the UNet's ~30 layers and GroupNorms to ~1e-5
        # of the output's largest value (measured, 1.2e-5 at |out| <= 1.2), in small elements as much as in big
        # ones, and the last bits move with the CPU's kernels (AVX2/AVX-512/AMX). So the absolute tolerance scales
        # with the tensor's magnitude: 1e-4 of it (~1000 fp32 ulps); a wrong scale or a missed module is off by
        # far more (the LoRA moves every output by ~1).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()))
