"""Image prompts (IP-Adapter): h94's file layouts, CLIP vision encoders, the sampling patch against diffusers' own
IP-Adapter implementation, and the Image Prompt node's refusals.

The adapters are random tensors in h94's layout for the tiny SD 1.x and SDXL UNets (``ip_adapter.<i>`` numbered by
the position of each ``attn2`` processor in diffusers' ``unet.attn_processors``, counted here independently of the
code under test). The reference is diffusers' ``UNet2DConditionModel._load_ip_adapter_weights`` (its own h94
converter, projections and ``IPAdapterAttnProcessor2_0``) on a copy of the UNet.
"""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from comfy_finetune import host
from comfy_finetune.core import image_prompt as IP
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.image_encoder import CLIP_MEAN, CLIP_STD, encoder_config, load_image_encoder, preprocess
from comfy_finetune.core.sampling import SampleSettings, sample
from comfy_finetune.nodes.generation import Sample
from comfy_finetune.nodes.image_prompt import AUTO, ImagePrompt, encoder_names

NODE = "FinetuneImagePrompt"
#: The tiny CLIP vision encoders: 16 px images in 4 px patches (17 tokens), 16 heads (what a config-less file is
#: read with), gelu.
ENC = dict(intermediate_size=64, num_hidden_layers=2, num_attention_heads=16, image_size=16, patch_size=4,
           hidden_act="gelu", layer_norm_eps=1e-5)
ENC_A = dict(hidden_size=32, projection_dim=24)   # the encoder the adapters below are made for
ENC_B = dict(hidden_size=48, projection_dim=40)   # another width
TOKENS_A = 17


# ------------------------------------------------------------------------------------------------ builders
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w(g, *shape, fan_in=None, scale=1.0):
    fan_in = fan_in if fan_in is not None else shape[-1]
    return (torch.randn(shape, generator=g) * scale / fan_in ** 0.5).contiguous()


def _norm(g, n, prefix):
    return {f"{prefix}.weight": 1 + 0.3 * torch.randn(n, generator=g),
            f"{prefix}.bias": 0.1 * torch.randn(n, generator=g)}


def ip_layers(unet, g) -> dict:
    """h94's ``ip_adapter`` part: a key/value pair per attn2 at its position in diffusers' processor order."""
    out = {}
    for i, name in enumerate(unet.attn_processors):
        if not name.endswith("attn2.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert i % 2 == 1, "attn1 and attn2 alternate"
        out[f"{i}.to_k_ip.weight"] = _w(g, *attn.to_k.weight.shape, scale=3.0)
        out[f"{i}.to_v_ip.weight"] = _w(g, *attn.to_v.weight.shape, scale=3.0)
    return out


def _cross(unet) -> int:
    return int(unet.config.cross_attention_dim)


def linear_adapter(unet, embed=24, tokens=4, seed=1) -> dict:
    g, cross = _gen(seed), _cross(unet)
    proj = {"proj.weight": _w(g, tokens * cross, embed), "proj.bias": 0.1 * torch.randn(tokens * cross, generator=g),
            **_norm(g, cross, "norm")}
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def resampler_adapter(unet, embed=32, queries=4, dim=64, depth=4, pos=0, seed=2) -> dict:
    """h94's Resampler (ip-adapter-plus): 64-wide heads, ff 4x, ``pos`` rows of pos_emb (0: none)."""
    g, cross, inner, ff = _gen(seed), _cross(unet), dim, 4 * dim  # heads = dim / 64
    proj = {"latents": torch.randn(1, queries, dim, generator=g) / dim ** 0.5,
            "proj_in.weight": _w(g, dim, embed), "proj_in.bias": 0.1 * torch.randn(dim, generator=g),
            "proj_out.weight": _w(g, cross, dim), "proj_out.bias": 0.1 * torch.randn(cross, generator=g),
            **_norm(g, cross, "norm_out")}
    if pos:
        proj["pos_emb.weight"] = torch.randn(pos, embed, generator=g)
    for n in range(depth):
        p = f"layers.{n}"
        proj.update({**_norm(g, dim, f"{p}.0.norm1"), **_norm(g, dim, f"{p}.0.norm2"),
                     f"{p}.0.to_q.weight": _w(g, inner, dim), f"{p}.0.to_kv.weight": _w(g, 2 * inner, dim),
                     f"{p}.0.to_out.weight": _w(g, dim, inner), **_norm(g, dim, f"{p}.1.0"),
                     f"{p}.1.1.weight": _w(g, ff, dim), f"{p}.1.3.weight": _w(g, dim, ff)})
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def mlp_adapter(unet, embed=32, seed=3) -> dict:
    """h94's full-face MLPProjModel: Linear(embed, embed), GELU, Linear(embed, cross), LayerNorm(cross)."""
    g, cross = _gen(seed), _cross(unet)
    proj = {"proj.0.weight": _w(g, embed, embed), "proj.0.bias": 0.1 * torch.randn(embed, generator=g),
            "proj.2.weight": _w(g, cross, embed), "proj.2.bias": 0.1 * torch.randn(cross, generator=g),
            **_norm(g, cross, "proj.3")}
    return {"image_proj": proj, "ip_adapter": ip_layers(unet, g)}


def flat(nested: dict) -> dict:
    return {f"{part}.{k}": v.contiguous() for part in ("image_proj", "ip_adapter") for k, v in nested[part].items()}


def write_adapter(nested: dict, path) -> None:
    """``.safetensors``: flat keys; ``.bin``: the nested dict, as h94 ships both."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save(nested, path)
    else:
        save_file(flat(nested), str(path))


def make_encoder(seed: int, *, projection=True, **dims):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(**{**ENC, **dims})
    cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
    return cls(config).eval()


def image(h=16, w=16, c=3, seed=0, b=1) -> torch.Tensor:
    return torch.rand((b, h, w, c), generator=_gen(seed))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def unet_inputs(handle, batch=2, text_len=8, seed=0):
    """Latents, a timestep, a random text context and SDXL's added conditioning for one UNet call."""
    unet, g = handle.base.unet, _gen(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, text_len, _cross(unet), generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return x, torch.tensor(500), ctx, added


def reference_unet(unet, nested: list[dict], scales: list[float]):
    """diffusers' own IP-Adapter on a copy of ``unet`` (its h94 converter, projections and attention processor)."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([copy.deepcopy(n) for n in nested], low_cpu_mem_usage=False)
    procs = [p for p in ref.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(procs) == len(IP.cross_attention_layers(unet))
    for p in procs:
        p.scale = list(scales)
    return ref


def ours(handle, patches, x, t, ctx, added, uncond_rows):
    h = handle
    for p in patches:
        h = h.with_patch(p)
    with torch.no_grad(), IP.attached(h) as att:
        context = att.extend(ctx, uncond_rows=uncond_rows)
        return h.base.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample


def theirs(ref, features: list, x, t, ctx, added):
    """``features``: per adapter, the projection inputs of every batch row ([B, E] or [B, T, E])."""
    kwargs = dict(added or {})
    kwargs["image_embeds"] = [f[:, None] for f in features]  # [B, images=1, ...]
    with torch.no_grad():
        return ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=kwargs).sample


def plain(handle, x, t, ctx, added):
    with torch.no_grad():
        return handle.base.unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The original encoder models and their files: A as a transformers folder and as a single file, B as a file."""
    root = tmp_path_factory.mktemp("encoders")
    a, b = make_encoder(0, **ENC_A), make_encoder(1, **ENC_B)
    a.save_pretrained(root / "enc-a")
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, str(root / "enc-a.safetensors"))
    save_file({k: v.contiguous() for k, v in b.state_dict().items()}, str(root / "enc-b.safetensors"))
    return {"a": a, "b": b, "root": root}


@pytest.fixture
def folders(models_dir, tmp_path, monkeypatch, encoders):
    """A models folder of its own (clip_vision, ipadapter) for one test; ``put(name)`` copies an encoder in."""
    root = tmp_path / "models"
    (root / "clip_vision").mkdir(parents=True)
    (root / "ipadapter").mkdir()
    monkeypatch.setattr(host._settings, "models_dir", root)

    def put(name: str, as_name: str | None = None):
        src, dst = encoders["root"] / name, root / "clip_vision" / (as_name or name)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        return dst

    return root, put


def node_run(pipe, img, adapter_name, clip_vision_name=AUTO, strength=1.0, node=None):
    node = node or ImagePrompt()
    return node.run(pipe=pipe, image=img, adapter_name=adapter_name, clip_vision_name=clip_vision_name,
                    strength=strength)[0]


def refused(fn, input_name: str, match: str) -> FinetuneError:
    with pytest.raises(FinetuneError, match=match) as info:
        fn()
    err = info.value
    assert err.node == NODE and err.input == input_name and err.fix, str(err)
    return err


# ------------------------------------------------------------------------------------------------ encoders
def test_a_transformers_folder_encoder_gives_the_original_outputs(encoders, folders):
    root, put = folders
    put("enc-a")
    assert encoder_names() == [AUTO, "enc-a"]  # the folder, not its model.safetensors
    enc = load_image_encoder(root / "clip_vision" / "enc-a")
    assert (enc.image_size, enc.hidden_size, enc.projection_dim) == (16, 32, 24)
    pixels = torch.randn(2, 3, 16, 16, generator=_gen(5))
    embeds, hidden = enc.encode_pixels(pixels)
    with torch.no_grad():
        want = encoders["a"](pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(embeds, want.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden, want.hidden_states[-2], rtol=1e-5, atol=1e-6)
    assert hidden.shape == (2, TOKENS_A, 32)
    assert not torch.allclose(hidden, want.hidden_states[-1])  # the penultimate layer, not the last


@pytest.mark.parametrize("layout", ["with projection", "vision_model.*", "bare"])
def test_a_single_file_encoder_has_its_config_inferred(tmp_path, layout):
    """ComfyUI's / transformers 4's layout is ``vision_model.*`` (+ ``visual_projection.weight``); transformers 5's
    CLIPVisionModel has no ``vision_model.`` prefix."""
    projection = layout == "with projection"
    model = make_encoder(3, projection=projection, **ENC_A)
    path = tmp_path / "enc.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "vision_model.*":
        state = {f"vision_model.{k}": v for k, v in state.items()}
    assert any(k.startswith("vision_model.") for k in state) == (layout != "bare")
    save_file(state, str(path))
    config = encoder_config(state)
    assert config["hidden_size"] == 32 and config["image_size"] == 16 and config["patch_size"] == 4
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 64
    assert config.get("projection_dim") == (24 if projection else None)
    enc = load_image_encoder(path)
    assert enc.projection_dim == (24 if projection else None) and enc.hidden_size == 32
    pixels = torch.randn(1, 3, 16, 16, generator=_gen(6))
    embeds, hidden = enc.encode_pixels(pixels)
    with torch.no_grad():
        want = model(pixel_values=pixels, output_hidden_states=True)
    torch.testing.assert_close(hidden, want.hidden_states[-2], rtol=1e-5, atol=1e-6)
    if projection:
        torch.testing.assert_close(embeds, want.image_embeds, rtol=1e-5, atol=1e-6)
    else:
        assert embeds is None
    # "no image" is an all-zero pixel tensor after normalisation
    with torch.no_grad():
        zero = model(pixel_values=torch.zeros(1, 3, 16, 16), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(enc.zeros()[1], zero, rtol=1e-5, atol=1e-6)


def test_a_config_less_encoder_of_an_unreleased_width_is_refused(tmp_path):
    model = make_encoder(4, hidden_size=40, projection_dim=8, **{**ENC, "num_attention_heads": 8})
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(FinetuneError, match="40 wide") as info:
        load_image_encoder(path, node=NODE)
    assert info.value.input == "clip_vision_name" and "config.json" in info.value.fix


def test_preprocess_is_clip_s_crop_and_normalisation():
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    img = image(16, 16)
    torch.testing.assert_close(preprocess(img, 16), (img.permute(0, 3, 1, 2) - mean) / std)
    wide = image(16, 24)  # already at the size on its short side: only the center crop
    torch.testing.assert_close(preprocess(wide, 16), (wide[:, :, 4:20].permute(0, 3, 1, 2) - mean) / std)
    assert preprocess(image(40, 32), 16).shape == (1, 3, 16, 16)


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_h94_layouts_parse(tiny_handles, tmp_path, suffix):
    sd1, sdxl = tiny_handles["sd1"].base.unet, tiny_handles["sdxl"].base.unet
    cases = [  # (nested, kind, input, embed, cross, tokens, layers, config)
        (linear_adapter(sd1), "linear", "image_embeds", 24, 32, 4, 4, {}),
        (linear_adapter(sdxl, embed=40), "linear", "image_embeds", 40, 64, 4, 8, {}),
        (resampler_adapter(sd1), "resampler", "hidden", 32, 32, 4, 4,
         dict(dim=64, depth=4, heads=1, dim_head=64, queries=4, embed=32, output=32, ff_inner=256, pos=0)),
        (resampler_adapter(sdxl, queries=6, depth=2, dim=128, pos=17), "resampler", "hidden", 32, 64, 6, 8,
         dict(dim=128, depth=2, heads=2, dim_head=64, queries=6, embed=32, output=64, ff_inner=512, pos=17)),
        (mlp_adapter(sd1), "mlp", "hidden", 32, 32, 0, 4, {}),
        (mlp_adapter(sdxl, embed=48), "mlp", "hidden", 48, 64, 0, 8, {}),
    ]
    for n, (nested, kind, source, embed, cross, tokens, layers, config) in enumerate(cases):
        path = tmp_path / f"a{n}{suffix}"
        write_adapter(nested, path)
        a = IP.load_adapter(path)
        assert (a.kind, a.input, a.embed_dim, a.cross_dim, a.num_tokens) == (kind, source, embed, cross, tokens)
        assert len(a.ip_layers) == layers and dict(a.config) == config
        ids = sorted(int(k.split(".")[0]) for k in nested["ip_adapter"] if k.endswith("to_k_ip.weight"))
        for (k, v), i in zip(a.ip_layers, ids):  # in processor order
            assert torch.equal(k, nested["ip_adapter"][f"{i}.to_k_ip.weight"])
            assert torch.equal(v, nested["ip_adapter"][f"{i}.to_v_ip.weight"])
        assert IP.ip_state_dict(a).keys() == flat(nested).keys()
        IP.check_adapter_fits(a, sdxl if cross == 64 else sd1)
        with pytest.raises(FinetuneError, match="made for a UNet with"):
            IP.check_adapter_fits(a, sd1 if cross == 64 else sdxl)


def test_the_pos_emb_resampler_adds_its_positions_to_the_input(tiny_handles):
    unet = tiny_handles["sd1"].base.unet
    nested = resampler_adapter(unet, pos=TOKENS_A)
    with_pos = IP.adapter_from_state_dict("p", nested)
    without = IP.adapter_from_state_dict("n", {"image_proj": {k: v for k, v in nested["image_proj"].items()
                                                              if k != "pos_emb.weight"},
                                               "ip_adapter": nested["ip_adapter"]})
    assert (with_pos.config["pos"], without.config["pos"]) == (TOKENS_A, 0)
    x = torch.randn(2, TOKENS_A, 32, generator=_gen(7))
    pos = with_pos.image_proj["pos_emb.weight"]
    torch.testing.assert_close(IP.project(with_pos, x), IP.project(without, x + pos[None]), rtol=1e-5, atol=1e-6)
    assert rel(IP.project(with_pos, x), IP.project(without, x)) > 1e-2


# ------------------------------------------------------------------------------------------------ the patch
def _case(kind: str, unet, seed=0):
    """(nested adapter, cond features [1, ...], uncond features [1, ...])."""
    g = _gen(100 + seed)
    if kind == "linear":
        return linear_adapter(unet, seed=seed + 1), torch.randn(1, 24, generator=g), torch.zeros(1, 24)
    if kind == "plus":
        return (resampler_adapter(unet, seed=seed + 2), torch.randn(1, TOKENS_A, 32, generator=g),
                torch.randn(1, TOKENS_A, 32, generator=g))
    return mlp_adapter(unet, seed=seed + 3), torch.randn(1, TOKENS_A, 32, generator=g), \
        torch.randn(1, TOKENS_A, 32, generator=g)


def _patch(name, nested, cond_feat, uncond_feat, strength):
    a = IP.adapter_from_state_dict(name, nested)
    return IP.ImagePromptPatch(a, IP.project(a, cond_feat), IP.project(a, uncond_feat), strength)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["linear", "plus", "full"])
def test_the_patched_unet_matches_diffusers_ip_adapter(tiny_handles, family, kind, one_thread):
    h = tiny_handles[family]
    nested, cond_f, uncond_f = _case(kind, h.base.unet)
    x, t, ctx, added = unet_inputs(h)
    patch = _patch(kind, nested, cond_f, uncond_f, 0.8)
    got = ours(h, [patch], x, t, ctx, added, uncond_rows=1)
    want = theirs(reference_unet(h.base.unet, [nested], [0.8]), [torch.cat([uncond_f, cond_f])], x, t, ctx, added)
    assert rel(got, want) < 1e-5
    base = plain(h, x, t, ctx, added)
    assert rel(want, base) > 1e-2, "the image term must show in the output"
    assert rel(want[1:], base[1:]) > 1e-2 and rel(want[:1], base[:1]) > 1e-3  # both rows get their tokens


def test_the_pos_emb_resampler_matches_diffusers_fed_the_shifted_input(tiny_handles, one_thread):
    h = tiny_handles["sd1"]
    nested = resampler_adapter(h.base.unet, pos=TOKENS_A)
    plain_nested = {"image_proj": {k: v for k, v in nested["image_proj"].items() if k != "pos_emb.weight"},
                    "ip_adapter": nested["ip_adapter"]}
    pos = nested["image_proj"]["pos_emb.weight"][None]
    cond_f, uncond_f = torch.randn(1, TOKENS_A, 32, generator=_gen(8)), torch.randn(1, TOKENS_A, 32, generator=_gen(9))
    x, t, ctx, added = unet_inputs(h)
    got = ours(h, [_patch("pos", nested, cond_f, uncond_f, 1.0)], x, t, ctx, added, uncond_rows=1)
    want = theirs(reference_unet(h.base.unet, [plain_nested], [1.0]), [torch.cat([uncond_f, cond_f]) + pos],
                  x, t, ctx, added)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_two_chained_image_prompts_add_up(tiny_handles, family, one_thread):
    h = tiny_handles[family]
    unet = h.base.unet
    (na, ca, ua), (nb, cb, ub) = _case("linear", unet, seed=10), _case("plus", unet, seed=20)
    x, t, ctx, added = unet_inputs(h, batch=3)
    patches = [_patch("a", na, ca, ua, 0.6), _patch("b", nb, cb, ub, 1.4)]
    got = ours(h, patches, x, t, ctx, added, uncond_rows=1)
    feats = [torch.cat([ua, ca, ca]), torch.cat([ub, cb, cb])]
    want = theirs(reference_unet(unet, [na, nb], [0.6, 1.4]), feats, x, t, ctx, added)
    assert rel(got, want) < 1e-5
    only_a = theirs(reference_unet(unet, [na, nb], [0.6, 0.0]), feats, x, t, ctx, added)
    assert rel(want, only_a) > 1e-2, "the second prompt must count"


def _attn_case(unet, strength, seed=0):
    """An attn2 layer of ``unet``, its own processor wrapped with one image prompt, and inputs for it."""
    attn = IP.cross_attention_layers(unet)[0]
    g = _gen(seed)
    inner, cross = attn.to_k.weight.shape
    k_w, v_w = _w(g, inner, cross, scale=3.0), _w(g, inner, cross, scale=3.0)
    hidden = torch.randn(2, 16, attn.to_q.weight.shape[1], generator=g)
    text, tokens = torch.randn(2, 8, cross, generator=g), torch.randn(2, 4, cross, generator=g)
    wrapped = IP.ImagePromptAttention(attn.processor, [(k_w, v_w, strength, 4)])
    return attn, wrapped, hidden, text, tokens, (k_w, v_w)


def _formula(attn, hidden, text, tokens, k_w, v_w, strength):
    """``to_out(attention(q, k_text, v_text) + scale * attention(q, to_k_ip(t), to_v_ip(t)))``, written out."""
    def heads(x):
        return x.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

    def attention(q, k, v):
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        o = w @ v
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    q = heads(attn.to_q(hidden))
    a = attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
    b = attention(q, heads(tokens @ k_w.T), heads(tokens @ v_w.T))
    return attn.to_out[0](a + strength * b)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_the_attention_is_the_formula_and_linear_in_strength(tiny_handles, family):
    unet = tiny_handles[family].base.unet
    terms = {}
    with torch.no_grad():
        for s in (0.5, 2.0):
            attn, wrapped, hidden, text, tokens, (k_w, v_w) = _attn_case(unet, s)
            out = wrapped(attn, hidden, torch.cat([text, tokens], dim=1))
            want = _formula(attn, hidden, text, tokens, k_w, v_w, s)
            assert rel(out, want) < 1e-5
            text_only = attn.processor(attn, hidden, text)
            terms[s] = out - text_only
    assert float(terms[0.5].abs().max()) > 1e-2
    torch.testing.assert_close(terms[2.0], 4 * terms[0.5], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ sampling
def _settings(**kw) -> SampleSettings:
    return SampleSettings(**{**dict(prompt="a red circle", negative="blurry", seed=3, steps=2, cfg=5.0, width=64,
                                    height=64, batch_size=2), **kw})


@pytest.fixture
def sd1_prompt(tiny_handles):
    h = tiny_handles["sd1"]
    nested, cond_f, uncond_f = _case("plus", h.base.unet)
    return h, _patch("plus", nested, cond_f, uncond_f, 1.0)


def test_sampling_with_an_image_prompt_changes_the_image_and_restores_the_processors(sd1_prompt, one_thread):
    h, patch = sd1_prompt
    unet = h.base.unet
    before = dict(unet.attn_processors)
    seen = []

    def progress(i, n):
        seen.append([type(a.processor) for a in IP.cross_attention_layers(unet)])

    with_ip = sample(h.with_patch(patch), _settings(), progress=progress)
    assert seen and all(t is IP.ImagePromptAttention for row in seen for t in row), "wrapped while sampling"
    assert all(unet.attn_processors[k] is p for k, p in before.items())
    without = sample(h, _settings())
    assert float((with_ip - without).abs().max()) > 1e-3

    def boom(i, n):
        raise RuntimeError("cancelled mid-sampling")

    with pytest.raises(RuntimeError, match="cancelled mid-sampling"):
        sample(h.with_patch(patch), _settings(), progress=boom)
    after = unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is p for k, p in before.items())
    assert torch.equal(sample(h, _settings()), without)


def test_strength_zero_is_exactly_no_adapter(sd1_prompt, one_thread):
    h, patch = sd1_prompt
    zero = h.with_patch(IP.ImagePromptPatch(patch.adapter, patch.cond, patch.uncond, 0.0))
    assert IP.image_prompts(zero) == []
    assert torch.equal(sample(zero, _settings()), sample(h, _settings()))


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_classifier_free_guidance_rows_get_the_uncond_tokens(sd1_prompt, monkeypatch, cfg, one_thread):
    h, patch = sd1_prompt
    extended, contexts = [], []
    real_extend, real_call = IP.Attached.extend, IP.ImagePromptAttention.__call__

    def extend(self, context, uncond_rows=0):
        out = real_extend(self, context, uncond_rows)
        extended.append((out, uncond_rows))
        return out

    def call(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        contexts.append(encoder_hidden_states)
        return real_call(self, attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(IP.Attached, "extend", extend)
    monkeypatch.setattr(IP.ImagePromptAttention, "__call__", call)
    sample(h.with_patch(patch), _settings(cfg=cfg, steps=1))
    (ctx, rows), = extended
    n = patch.cond.shape[1]
    b = 2
    assert rows == (b if cfg != 1.0 else 0) and ctx.shape[0] == (2 * b if cfg != 1.0 else b)
    image = ctx[:, -n:]
    for r in range(ctx.shape[0]):
        want = patch.uncond[0] if r < rows else patch.cond[0]
        torch.testing.assert_close(image[r], want, rtol=0, atol=0)
    assert not torch.allclose(patch.cond, patch.uncond)
    assert contexts and all(torch.equal(c[:, -n:], image) for c in contexts), "every attn2 gets those tokens"


# ------------------------------------------------------------------------------------------------ the node
BUILDERS = {"lin": linear_adapter, "plus": resampler_adapter, "full": mlp_adapter}


@pytest.fixture
def sd1_files(tiny_handles, folders):
    """models/clip_vision/enc-a (a folder) and models/ipadapter with adapters of each kind for SD1 and SDXL, as flat
    .safetensors and as nested .bin; the SD1 ones also as lin.safetensors, plus.bin, full.safetensors and SDXL's
    linear one as xl.safetensors."""
    root, put = folders
    put("enc-a")
    for fam in ("sd1", "sdxl"):
        for kind, build in BUILDERS.items():
            nested = build(tiny_handles[fam].base.unet)
            for suffix in (".safetensors", ".bin"):
                write_adapter(nested, root / "ipadapter" / fam / f"{kind}{suffix}")
    for src, dst in [("sd1/lin.safetensors", "lin.safetensors"), ("sd1/plus.bin", "plus.bin"),
                     ("sd1/full.safetensors", "full.safetensors"), ("sdxl/lin.safetensors", "xl.safetensors")]:
        shutil.copyfile(root / "ipadapter" / src, root / "ipadapter" / dst)
    return root, put


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
@pytest.mark.parametrize("kind", ["lin", "plus", "full"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_node_adds_an_image_prompt(tiny_handles, sd1_files, encoders, family, kind, suffix, one_thread):
    h = tiny_handles[family]
    name = f"{family}/{kind}{suffix}"
    assert name in ImagePrompt.INPUT_TYPES()["required"]["adapter_name"][0]
    patches = h.patches
    img = image(20, 24, seed=1)
    out = node_run(h, img, name)
    assert h.patches is patches and out is not h and out.base is h.base
    (p,) = out.patches[len(patches):]
    assert isinstance(p, IP.ImagePromptPatch) and p.strength == 1.0
    # the tokens are the adapter's projection of the encoder's features (and of "no image" for the uncond rows)
    adapter = IP.load_adapter(sd1_files[0] / "ipadapter" / name)
    assert adapter.kind == {"lin": "linear", "plus": "resampler", "full": "mlp"}[kind]
    enc = encoders["a"]
    pixels = preprocess(img, 16)
    with torch.no_grad():
        o = enc(pixel_values=pixels, output_hidden_states=True)
        z = enc(pixel_values=torch.zeros_like(pixels), output_hidden_states=True)
    if adapter.input == "image_embeds":
        cond, uncond = IP.project(adapter, o.image_embeds), IP.project(adapter, torch.zeros_like(o.image_embeds))
    else:
        cond, uncond = IP.project(adapter, o.hidden_states[-2]), IP.project(adapter, z.hidden_states[-2])
    torch.testing.assert_close(p.cond, cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.uncond, uncond, rtol=1e-5, atol=1e-6)
    assert p.cond.shape == (1, 4 if adapter.kind != "mlp" else TOKENS_A, _cross(h.base.unet))
    assert "IP-Adapter" in out.describe()


def test_the_node_signature_strength_zero_and_sample(tiny_handles, sd1_files, one_thread):
    h = tiny_handles["sd1"]
    node = ImagePrompt()
    a = node_run(h, image(seed=1), "lin.safetensors", strength=1.0, node=node)
    assert a.signature() == node_run(h, image(seed=1), "lin.safetensors", strength=1.0, node=node).signature()
    assert a.signature() != node_run(h, image(seed=1), "lin.safetensors", strength=0.5, node=node).signature()
    assert a.signature() != node_run(h, image(seed=2), "lin.safetensors", strength=1.0, node=node).signature()
    assert a.signature() != h.signature()
    changed = ImagePrompt.IS_CHANGED(adapter_name="lin.safetensors", clip_vision_name="enc-a")
    path = sd1_files[0] / "ipadapter" / "lin.safetensors"
    stamp = path.stat().st_mtime
    write_adapter(linear_adapter(h.base.unet, seed=9), path)  # same size: the new modification time tells
    os.utime(path, (stamp + 2, stamp + 2))
    assert ImagePrompt.IS_CHANGED(adapter_name="lin.safetensors", clip_vision_name="enc-a") != changed
    assert node_run(h, image(seed=1), "lin.safetensors", node=node).signature() != a.signature()  # reloaded
    zero = node_run(h, image(seed=1), "lin.safetensors", strength=0.0, node=node)
    assert zero is h
    kw = dict(prompt="a red circle", seed=1, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", width=64,
              height=64, batch_size=1)
    plain_img = Sample().run(pipe=h, **kw)[0]
    assert torch.equal(Sample().run(pipe=zero, **kw)[0], plain_img)
    assert not torch.equal(Sample().run(pipe=a, **kw)[0], plain_img)


def test_the_training_frame_refuses_a_handle_with_an_image_prompt(tiny_handles, sd1_files, one_thread):
    from comfy_finetune.nodes.training import TrainLoRA
    from comfy_finetune.training.data import from_image_batch

    h = node_run(tiny_handles["sd1"], image(seed=1), "lin.safetensors")
    data = from_image_batch(torch.rand((1, 64, 64, 3), generator=_gen(0)), ["a red circle"], resolution=64)
    with pytest.raises(FinetuneError, match="image prompt") as info:
        TrainLoRA().run(pipe=h, dataset=data, rank=2, alpha=2.0, targets="attention", train_text_encoder=False,
                        text_learning_rate=5e-5, steps=1, learning_rate=1e-4, batch_size=1, grad_accum=1,
                        lr_schedule="constant", warmup_steps=0, optimizer="adamw", precision="fp32",
                        gradient_checkpointing=False, min_snr_gamma=0.0, noise_offset=0.0, seed=0)
    assert info.value.node == "FinetuneTrainLoRA" and info.value.input == "pipe" and info.value.fix


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("img, match", [
    (image(c=4), "RGBA"), (image(c=1), "grayscale"), (image(3, 3), "too small"), (image(16, 40), "center crop"),
    (image(b=0), "empty"),
], ids=["rgba", "gray", "small", "wide", "empty"])
def test_bad_references_are_refused(tiny_handles, sd1_files, img, match):
    refused(lambda: node_run(tiny_handles["sd1"], img, "lin.safetensors"), "image", match)


def test_an_sdxl_adapter_on_an_sd1_model_is_refused(tiny_handles, sd1_files):
    refused(lambda: node_run(tiny_handles["sd1"], image(), "xl.safetensors"), "adapter_name",
            "8 cross-attention layers of context width 64.*has 4 of width 32")


def test_an_encoder_of_the_wrong_width_is_refused(tiny_handles, sd1_files):
    root, put = sd1_files
    put("enc-b.safetensors")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "lin.safetensors", "enc-b.safetensors"),
            "clip_vision_name", "image_embeds are 40 wide, the adapter reads 24")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "plus.bin", "enc-b.safetensors"),
            "clip_vision_name", "hidden states are 48 wide, the adapter reads 32")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "lin.safetensors", "nothing.safetensors"),
            "clip_vision_name", "not found")


def test_auto_needs_exactly_one_fitting_encoder(tiny_handles, folders):
    root, put = folders
    write_adapter(linear_adapter(tiny_handles["sd1"].base.unet), root / "ipadapter" / "lin.safetensors")
    put("enc-b.safetensors")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "lin.safetensors"), "clip_vision_name", "none fits")
    put("enc-a")
    assert node_run(tiny_handles["sd1"], image(), "lin.safetensors").patches  # one fits: it is used
    put("enc-a.safetensors")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "lin.safetensors"), "clip_vision_name",
            r"several fit \(enc-a, enc-a.safetensors\)")


class CodeOnLoad:
    """Unpickling this runs ``os.mkdir(path)``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_bin_that_needs_code_is_refused_unrun(tiny_handles, folders, tmp_path):
    root, put = folders
    put("enc-a")
    marker = tmp_path / "ran"
    nested = linear_adapter(tiny_handles["sd1"].base.unet)
    nested["image_proj"]["hook"] = CodeOnLoad(str(marker))
    path = root / "ipadapter" / "evil.bin"
    torch.save(nested, path)
    refused(lambda: node_run(tiny_handles["sd1"], image(), "evil.bin"), "adapter_name", "needs arbitrary code")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.is_dir()


def test_broken_and_unsupported_adapter_files_are_refused(tiny_handles, folders):
    root, put = folders
    put("enc-a")
    unet = tiny_handles["sd1"].base.unet
    nested = linear_adapter(unet)
    save_file({f"image_proj.{k}": v for k, v in nested["image_proj"].items()},
              str(root / "ipadapter" / "no_ip.safetensors"))
    pooled = resampler_adapter(unet)
    pooled["image_proj"]["to_latents_from_mean_pooled_seq.1.weight"] = torch.zeros(4 * 64, 32)
    write_adapter(pooled, root / "ipadapter" / "pooled.safetensors")
    h = tiny_handles["sd1"]
    refused(lambda: node_run(h, image(), "no_ip.safetensors"), "adapter_name", "no ip_adapter")
    refused(lambda: node_run(h, image(), "pooled.safetensors"), "adapter_name", "mean-pooled resampler")
    refused(lambda: node_run(h, image(), "missing.safetensors"), "adapter_name", "not found")


def test_faceid_and_damaged_projections_are_refused_when_read(tiny_handles, folders):
    """FaceID's projection (proj.0, proj.2, norm) is not full-face's MLP (proj.0, proj.2, proj.3); a projection whose
    tensors do not fit its own layout is a damaged file. Both are refused by name, not by a shape error."""
    root, put = folders
    put("enc-a")
    unet = tiny_handles["sd1"].base.unet
    g = _gen(30)
    faceid = {"image_proj": {"proj.0.weight": _w(g, 64, 32), "proj.0.bias": torch.zeros(64),
                             "proj.2.weight": _w(g, 4 * 32, 64), "proj.2.bias": torch.zeros(4 * 32),
                             **_norm(g, 32, "norm")}, "ip_adapter": ip_layers(unet, g)}
    write_adapter(faceid, root / "ipadapter" / "faceid.safetensors")
    damaged = linear_adapter(unet)
    damaged["image_proj"]["norm.weight"] = torch.ones(16)
    write_adapter(damaged, root / "ipadapter" / "damaged.safetensors")
    h = tiny_handles["sd1"]
    refused(lambda: node_run(h, image(), "faceid.safetensors", "enc-a"), "adapter_name", "FaceID")
    refused(lambda: node_run(h, image(), "damaged.safetensors", "enc-a"), "adapter_name", "norm.weight")


def test_a_kolors_unet_is_refused(tiny_handles, folders):
    """Kolors' UNet projects its whole text context (encoder_hid_proj, 4096 -> 2048 wide) inside its forward: image
    tokens appended to that context cannot pass (it failed mid-sampling with a shape error)."""
    import dataclasses

    from diffusers import UNet2DConditionModel

    from comfy_finetune.core.families import Family
    from comfy_finetune.core.tiny import unet_config

    root, put = folders
    put("enc-a")
    sdxl = tiny_handles["sdxl"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config("sdxl"), encoder_hid_dim=32, encoder_hid_dim_type="text_proj").eval()
    kolors = dataclasses.replace(sdxl, base=dataclasses.replace(sdxl.base, unet=unet, family=Family.KOLORS))
    write_adapter(linear_adapter(unet), root / "ipadapter" / "k.safetensors")
    refused(lambda: node_run(kolors, image(), "k.safetensors", "enc-a"), "pipe",
            "projects its text context inside the UNet")
    with pytest.raises(FinetuneError, match="encoder_hid_proj"):  # also for direct callers of the check
        IP.check_adapter_fits(IP.load_adapter(root / "ipadapter" / "k.safetensors"), unet)


def test_a_resampler_with_fewer_positions_than_the_encoder_s_tokens_is_refused(tiny_handles, folders):
    root, put = folders
    put("enc-a")
    write_adapter(resampler_adapter(tiny_handles["sd1"].base.unet, pos=TOKENS_A - 1), root / "ipadapter" / "p.bin")
    refused(lambda: node_run(tiny_handles["sd1"], image(), "p.bin", "enc-a"), "clip_vision_name", "positions")
    write_adapter(resampler_adapter(tiny_handles["sd1"].base.unet, pos=TOKENS_A), root / "ipadapter" / "q.bin")
    assert node_run(tiny_handles["sd1"], image(), "q.bin", "enc-a").patches


def test_an_encoder_without_projection_feeds_a_plus_adapter(tiny_handles, folders):
    """A projection-less CLIP vision file (hidden states only) in both layouts, picked by 'auto' for a plus adapter."""
    root, put = folders
    model = make_encoder(7, projection=False, **ENC_A)
    bare = {k: v.contiguous() for k, v in model.state_dict().items()}
    unet = tiny_handles["sd1"].base.unet
    write_adapter(resampler_adapter(unet), root / "ipadapter" / "plus.safetensors")
    img = image(seed=4)
    with torch.no_grad():
        hidden = model(pixel_values=preprocess(img, 16), output_hidden_states=True).hidden_states[-2]
    want = IP.project(IP.load_adapter(root / "ipadapter" / "plus.safetensors"), hidden)
    for n, state in enumerate([bare, {f"vision_model.{k}": v for k, v in bare.items()}]):
        for f in (root / "clip_vision").iterdir():
            f.unlink()
        save_file(state, str(root / "clip_vision" / f"vit{n}.safetensors"))
        (p,) = node_run(tiny_handles["sd1"], img, "plus.safetensors", node=ImagePrompt()).patches
        torch.testing.assert_close(p.cond, want, rtol=1e-5, atol=1e-6)
