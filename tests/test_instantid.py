"""InstantID: a face-embedding resampler adapter and its keypoint ControlNet on the tiny SDXL model.

insightface is replaced by a fake package in ``sys.modules`` (a FaceAnalysis that returns fixed faces), so the node's
plumbing runs for real: the image it is given, the largest face, the embedding through the adapter's Perceiver
resampler, the keypoint image, the ControlNet beside the UNet while sampling."""

from __future__ import annotations

import json
import math
import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from safetensors.torch import save_file

from comfy_finetune.core import face as face_mod
from comfy_finetune.core.controlnet import load_controlnet
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.face import KPS_COLORS, detect_face, draw_kps, face_analysis, hint_to_image
from comfy_finetune.core.image_prompt import (
    ControlHint,
    ImagePromptPatch,
    build_projection,
    cross_attention_layers,
    load_adapter,
    project,
)
from comfy_finetune.core.sampling import SampleSettings, sample
from comfy_finetune.nodes import instantid as node_mod
from comfy_finetune.nodes.instantid import InstantID

pytestmark = pytest.mark.usefixtures("one_thread")

QUERIES, DIM, HEADS, DEPTH, FF = 4, 64, 2, 2, 256  # tiny resampler (InstantID's: 16, 1280, 20, 4, 5120)
REF_W, REF_H = 96, 80
KPS = ((30.0, 30.0), (66.0, 30.0), (48.0, 48.0), (28.0, 70.0), (68.0, 70.0))
SETTINGS = SampleSettings(prompt="a photo of a person", negative="blurry", seed=3, steps=3, cfg=5.0, width=64,
                          height=64)


# ---------------------------------------------------------------------------------------------- tiny files
def instantid_state(unet, seed: int = 0, embed: int = 512) -> dict:
    """Random weights in InstantID's flat layout (image_proj.* resampler without pos_emb, ip_adapter.<odd>.*)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    inner = HEADS * 64
    cross = int(unet.config.cross_attention_dim)
    proj = {"latents": rnd(1, QUERIES, DIM, std=1.0), "proj_in.weight": rnd(DIM, embed), "proj_in.bias": rnd(DIM),
            "proj_out.weight": rnd(cross, DIM, std=0.2), "proj_out.bias": rnd(cross),
            "norm_out.weight": 1 + rnd(cross), "norm_out.bias": rnd(cross)}
    for n in range(DEPTH):
        p = f"layers.{n}."
        proj.update({p + "0.norm1.weight": 1 + rnd(DIM), p + "0.norm1.bias": rnd(DIM),
                     p + "0.norm2.weight": 1 + rnd(DIM), p + "0.norm2.bias": rnd(DIM),
                     p + "0.to_q.weight": rnd(inner, DIM, std=0.2), p + "0.to_kv.weight": rnd(2 * inner, DIM, std=0.2),
                     p + "0.to_out.weight": rnd(DIM, inner), p + "1.0.weight": 1 + rnd(DIM), p + "1.0.bias": rnd(DIM),
                     p + "1.1.weight": rnd(FF, DIM), p + "1.3.weight": rnd(DIM, FF)})
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    for i, attn in enumerate(cross_attention_layers(unet)):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = rnd(*attn.to_k.weight.shape, std=0.3)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = rnd(*attn.to_v.weight.shape, std=0.3)
    return state


def plain_ip_state(unet) -> dict:
    """An ordinary (linear-token) IP-Adapter for the same UNet."""
    cross = int(unet.config.cross_attention_dim)
    state = {"image_proj.proj.weight": torch.randn(4 * cross, 32) * 0.05,
             "image_proj.proj.bias": torch.zeros(4 * cross), "image_proj.norm.weight": torch.ones(cross),
             "image_proj.norm.bias": torch.zeros(cross)}
    for i, attn in enumerate(cross_attention_layers(unet)):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = torch.randn(*attn.to_k.weight.shape) * 0.05
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = torch.randn(*attn.to_v.weight.shape) * 0.05
    return state


def tiny_controlnet(unet):
    """A ControlNet from the tiny UNet with its zero convolutions made non-zero (so its residuals do something)."""
    from diffusers import ControlNetModel

    torch.manual_seed(7)
    cn = ControlNetModel.from_unet(unet)
    with torch.no_grad():
        for mod in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            mod.weight.normal_(0, 0.05)
            mod.bias.normal_(0, 0.02)
    return cn.eval()


@pytest.fixture(scope="module")
def files(models_dir, tiny_handles):
    """InstantID files in the test models folder (removed afterwards: other tests snapshot the folder listings)."""
    unet = tiny_handles["sdxl"].base.unet
    made = []

    def folder(name):
        path = models_dir / name
        if not path.exists():
            path.mkdir(parents=True)
            made.append(path)
        return path

    ins, cnd, face_root = folder("instantid"), folder("controlnet"), folder("insightface")
    state = instantid_state(unet)
    save_file(state, str(ins / "ft-instantid.safetensors"))
    nested = {part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
              for part in ("image_proj", "ip_adapter")}
    torch.save(nested, ins / "ft-instantid.bin")
    save_file(plain_ip_state(unet), str(ins / "ft-plain-ip-adapter.safetensors"))
    cn = tiny_controlnet(unet)
    cn.save_pretrained(cnd / "ft-identitynet", safe_serialization=True)
    shutil.copy(cnd / "ft-identitynet" / "diffusion_pytorch_model.safetensors", cnd / "ft-identitynet.safetensors")
    save_file({"control_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
               "control_model.zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1)},
              str(cnd / "ft-ldm-control.safetensors"))
    models = face_root / "models" / "antelopev2"
    models.mkdir(parents=True, exist_ok=True)
    (models / "scrfd_10g_bnkps.onnx").write_bytes(b"fake")
    yield {"state": state, "controlnet": cn, "instantid": ins, "controlnet_dir": cnd, "insightface": face_root}
    for path in (ins / "ft-instantid.safetensors", ins / "ft-instantid.bin", ins / "ft-plain-ip-adapter.safetensors",
                 cnd / "ft-identitynet.safetensors", cnd / "ft-ldm-control.safetensors"):
        path.unlink(missing_ok=True)
    shutil.rmtree(cnd / "ft-identitynet", ignore_errors=True)
    shutil.rmtree(face_root / "models", ignore_errors=True)
    for path in reversed(made):
        shutil.rmtree(path, ignore_errors=True)


def face(embedding, kps, bbox):
    return types.SimpleNamespace(embedding=np.asarray(embedding, np.float32), kps=np.asarray(kps, np.float32),
                                 bbox=np.asarray(bbox, np.float32))


EMBEDDING = (torch.randn(512, generator=torch.Generator().manual_seed(11)) * 1.5).numpy()
OTHER = (torch.randn(512, generator=torch.Generator().manual_seed(12)) * 1.5).numpy()
OTHER_KPS = tuple((x + 4, y + 2) for x, y in KPS)


@pytest.fixture
def fake_insightface(monkeypatch):
    """A fake ``insightface`` package: FaceAnalysis records what it is given and returns ``state.faces``."""
    faces = [face(OTHER, OTHER_KPS, (60, 60, 70, 72)), face(EMBEDDING, KPS, (15, 10, 80, 75))]  # the 2nd is larger
    state = types.SimpleNamespace(faces=faces, inits=[], prepared=[], images=[])

    class FaceAnalysis:
        def __init__(self, name, root, providers):
            state.inits.append((name, root, tuple(providers)))

        def prepare(self, ctx_id, det_size):
            state.prepared.append((ctx_id, tuple(det_size)))

        def get(self, image):
            state.images.append(image.copy())
            return list(state.faces(image) if callable(state.faces) else state.faces)

    pkg = types.ModuleType("insightface")
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FaceAnalysis
    pkg.app = app
    monkeypatch.setitem(sys.modules, "insightface", pkg)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    return state


def reference(w=REF_W, h=REF_H):
    img = torch.full((1, h, w, 3), 0.5)
    img[0, :10, :10] = torch.tensor([1.0, 0.0, 0.0])  # a red corner: BGR order puts it in the last channel
    return img


# ---------------------------------------------------------------------------------------------- the Perceiver
def perceiver(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The Perceiver resampler written out: latents attend (64-wide heads, softmax(q k^T / sqrt(64))) over the
    projected inputs and themselves, plus a GELU feed-forward, residual each; then proj_out and a LayerNorm."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"])

    x = x @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = sd["latents"].expand(x.shape[0], -1, -1)
    for n in range(DEPTH):
        p = f"layers.{n}."
        xn, ln_lat = ln(x, p + "0.norm1"), ln(lat, p + "0.norm2")
        q = ln_lat @ sd[p + "0.to_q.weight"].T
        k, v = (torch.cat([xn, ln_lat], 1) @ sd[p + "0.to_kv.weight"].T).chunk(2, -1)

        def heads(t):
            return t.reshape(t.shape[0], t.shape[1], HEADS, 64).transpose(1, 2)

        w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(64), -1)
        o = (w @ heads(v)).transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1)
        lat = o @ sd[p + "0.to_out.weight"].T + lat
        h = F.gelu(ln(lat, p + "1.0") @ sd[p + "1.1.weight"].T)
        lat = h @ sd[p + "1.3.weight"].T + lat
    return ln(lat @ sd["proj_out.weight"].T + sd["proj_out.bias"], "norm_out")


def proj_sd(state):
    return {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_proj.")}


def test_adapter_files_parse_as_face_resamplers(files, tiny_handles):
    unet = tiny_handles["sdxl"].base.unet
    a = load_adapter(files["instantid"] / "ft-instantid.safetensors")
    b = load_adapter(files["instantid"] / "ft-instantid.bin")
    for ad in (a, b):
        assert (ad.kind, ad.input, ad.embed_dim, ad.cross_dim) == ("resampler", "face", 512, 64)
        assert ad.num_tokens == QUERIES
        assert ad.config == {"dim": DIM, "depth": DEPTH, "heads": HEADS, "dim_head": 64, "queries": QUERIES,
                             "embed": 512, "output": 64, "ff_inner": FF, "pos": 0}
        assert len(ad.ip_layers) == len(cross_attention_layers(unet)) == 8
        assert ad.label == "InstantID"
    assert set(a.image_proj) == set(b.image_proj)
    assert all(torch.equal(a.image_proj[k], b.image_proj[k]) for k in a.image_proj)
    assert all(torch.equal(x, y) for pa, pb in zip(a.ip_layers, b.ip_layers) for x, y in zip(pa, pb))


def test_resampler_tokens_follow_the_perceiver_formula(files):
    adapter = load_adapter(files["instantid"] / "ft-instantid.safetensors")
    x = torch.from_numpy(EMBEDDING)[None]
    want = perceiver(proj_sd(files["state"]), x[:, None, :])
    got = project(adapter, x)
    assert got.shape == (1, QUERIES, 64)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    zeros = project(adapter, torch.zeros(1, 512))
    assert torch.allclose(zeros, perceiver(proj_sd(files["state"]), torch.zeros(1, 1, 512)), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(zeros, got, atol=1e-2)


# ---------------------------------------------------------------------------------------------- the node
def run_node(pipe, **kw):
    args = dict(image=reference(), instantid_name="ft-instantid.safetensors",
                controlnet_name="ft-identitynet.safetensors", ip_strength=0.8, controlnet_strength=0.8)
    args.update(kw)
    return InstantID().run(pipe=pipe, **args)


def test_node_builds_the_face_prompt(files, tiny_handles, fake_insightface):
    pipe = tiny_handles["sdxl"]
    out, preview = run_node(pipe)
    assert out is not pipe and out.patches[:-1] == pipe.patches
    patch = out.patches[-1]
    assert isinstance(patch, ImagePromptPatch) and patch.strength == pytest.approx(0.8)
    # insightface was set up as InstantID does and got the first image as uint8 BGR
    assert fake_insightface.inits[-1] == ("antelopev2", str(files["insightface"]), ("CPUExecutionProvider",))
    assert fake_insightface.prepared[-1] == (0, (640, 640))
    seen = fake_insightface.images[-1]
    assert seen.dtype == np.uint8 and seen.shape == (REF_H, REF_W, 3)
    assert tuple(seen[0, 0]) == (0, 0, 255) and tuple(seen[50, 50]) == (128, 128, 128)
    # the largest face's embedding through the resampler; "no face" = a zero embedding
    sd = proj_sd(files["state"])
    assert torch.allclose(patch.cond, perceiver(sd, torch.from_numpy(EMBEDDING)[None, None]), atol=1e-4, rtol=1e-4)
    assert torch.allclose(patch.uncond, perceiver(sd, torch.zeros(1, 1, 512)), atol=1e-4, rtol=1e-4)
    # the ControlNet hint: the largest face's keypoints drawn at the reference's size
    assert patch.control is not None and patch.control.strength == pytest.approx(0.8)
    assert patch.control.image.shape == (1, 3, REF_H, REF_W)
    assert torch.equal(patch.control.image, draw_kps(REF_W, REF_H, KPS))
    assert preview.shape == (1, REF_H, REF_W, 3) and torch.equal(preview, hint_to_image(patch.control.image))


def test_kps_image_gives_the_pose(files, tiny_handles, fake_insightface):
    kps_image = torch.zeros(1, 72, 88, 3)
    pipe = tiny_handles["sdxl"]
    first = run_node(pipe)[0].patches[-1]
    # the reference gives the identity, the kps_image (another size) other keypoints and another face
    fake_insightface.faces = lambda image: ([face(EMBEDDING, KPS, (15, 10, 80, 75))] if image.shape[0] == REF_H
                                            else [face(OTHER, OTHER_KPS, (1, 1, 80, 70))])
    out, preview = run_node(pipe, kps_image=kps_image)
    patch = out.patches[-1]
    assert torch.equal(patch.cond, first.cond)
    assert patch.control.image.shape == (1, 3, 72, 88) and preview.shape == (1, 72, 88, 3)
    assert torch.equal(patch.control.image, draw_kps(88, 72, OTHER_KPS))
    fake_insightface.faces = lambda image: [face(EMBEDDING, KPS, (15, 10, 80, 75))] if image.shape[0] == REF_H else []
    with pytest.raises(FinetuneError, match="no face found") as e:
        run_node(pipe, kps_image=kps_image)
    assert e.value.input == "kps_image"


def _processors(unet):
    return [a.processor for a in cross_attention_layers(unet)]


def test_sampling_with_instantid(files, tiny_handles, fake_insightface):
    pipe = tiny_handles["sdxl"]
    unet = pipe.base.unet
    before = _processors(unet)
    plain = sample(pipe, SETTINGS)
    full = run_node(pipe)[0]
    img = sample(full, SETTINGS)
    assert _processors(unet) == before  # the UNet's own processors are back
    assert (img - plain).abs().max() > 1e-3
    assert torch.allclose(sample(full, SETTINGS), img, atol=1e-6)  # reproducible
    ip_only = run_node(pipe, controlnet_name="None")[0]
    assert ip_only.patches[-1].control is None
    img_ip = sample(ip_only, SETTINGS)
    assert (img_ip - plain).abs().max() > 1e-3 and (img - img_ip).abs().max() > 1e-3  # both parts act
    # controlnet_strength 0: no ControlNet at all (the node's patch), and a ControlNet at 0 adds nothing
    zero = run_node(pipe, controlnet_strength=0.0)[0]
    assert zero.patches[-1].control is None
    assert torch.allclose(sample(zero, SETTINGS), img_ip, atol=1e-6)
    p = full.patches[-1]
    at_zero = pipe.with_patch(ImagePromptPatch(p.adapter, p.cond, p.uncond, p.strength,
                                               ControlHint(p.control.controlnet, p.control.image, 0.0)))
    assert torch.allclose(sample(at_zero, SETTINGS), img_ip, atol=1e-5)
    assert _processors(unet) == before


def test_controlnet_gets_the_image_tokens_and_a_hint_of_the_sampled_size(files, tiny_handles, fake_insightface):
    pipe = tiny_handles["sdxl"]
    out = run_node(pipe)[0]
    patch = out.patches[-1]
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs["encoder_hidden_states"].clone(), kwargs["controlnet_cond"].clone(),
                     kwargs["conditioning_scale"]))

    handle = patch.control.controlnet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        sample(out, SETTINGS)
    finally:
        handle.remove()
    assert len(seen) == SETTINGS.steps
    tokens, hint, scale = seen[0]
    want = torch.cat([patch.uncond, patch.cond])  # cfg: unconditional rows first, then the reference's
    assert tokens.shape == (2, QUERIES, 64) and torch.allclose(tokens, want, atol=1e-6)
    assert hint.shape == (2, 3, SETTINGS.height, SETTINGS.width)
    resized = F.interpolate(patch.control.image, size=(SETTINGS.height, SETTINGS.width), mode="bilinear",
                            align_corners=False)
    assert torch.allclose(hint[1:], resized, atol=1e-6)
    assert scale == pytest.approx(0.8)


def test_zero_ip_strength(files, tiny_handles, fake_insightface):
    pipe = tiny_handles["sdxl"]
    out, preview = run_node(pipe, ip_strength=0.0, controlnet_name="None")
    assert out is pipe and preview.shape == (1, REF_H, REF_W, 3)
    out, _ = run_node(pipe, ip_strength=0.0, controlnet_strength=0.0)
    assert out is pipe
    # IdentityNet alone: the face tokens add nothing to the UNet, the ControlNet still steers from them
    out, _ = run_node(pipe, ip_strength=0.0, controlnet_name="ft-identitynet.safetensors")
    assert out is not pipe and out.patches[-1].strength == 0 and out.patches[-1].control is not None
    assert not torch.equal(sample(out, SETTINGS), sample(pipe, SETTINGS))


# ---------------------------------------------------------------------------------------------- ControlNet files
def test_controlnet_config_beside_wins_and_the_derived_one_matches(files, tiny_handles):
    unet = tiny_handles["sdxl"].base.unet
    cnd = files["controlnet_dir"]
    folder = load_controlnet(cnd / "ft-identitynet" / "diffusion_pytorch_model.safetensors", unet)
    derived = load_controlnet(cnd / "ft-identitynet.safetensors", unet)
    for model in (folder, derived):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert next(model.parameters()).dtype == torch.float32
    a, b = folder.state_dict(), derived.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert tuple(derived.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)
    # a config beside the file that does not fit this UNet is used, and refused
    other = cnd / "ft-identitynet-other"
    other.mkdir()
    try:
        cfg = json.loads((cnd / "ft-identitynet" / "config.json").read_text())
        cfg["block_out_channels"] = [32, 32]
        (other / "config.json").write_text(json.dumps(cfg))
        shutil.copy(cnd / "ft-identitynet.safetensors", other / "diffusion_pytorch_model.safetensors")
        with pytest.raises(FinetuneError, match="made for another UNet") as e:
            load_controlnet(other / "diffusion_pytorch_model.safetensors", unet, input="controlnet_name")
        assert e.value.input == "controlnet_name"
    finally:
        shutil.rmtree(other)


def test_controlnet_errors(files, tiny_handles, fake_insightface):
    with pytest.raises(FinetuneError, match="ldm") as e:
        run_node(tiny_handles["sdxl"], controlnet_name="ft-ldm-control.safetensors")
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "controlnet_name")
    assert "diffusers layout" in e.value.fix
    # a diffusers ControlNet of another model: shapes do not fit this UNet
    with pytest.raises(FinetuneError) as e:
        load_controlnet(files["controlnet_dir"] / "ft-identitynet.safetensors", tiny_handles["sd1"].base.unet)
    assert e.value.input == "controlnet_name" and e.value.fix


# ---------------------------------------------------------------------------------------------- errors
def test_insightface_missing(files, tiny_handles, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.delitem(sys.modules, "insightface.app", raising=False)
    with pytest.raises(FinetuneError) as e:
        run_node(tiny_handles["sdxl"])
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "image")
    assert "insightface" in e.value.detail and "pip install insightface onnxruntime" in e.value.fix


def test_face_models_folder_missing_or_nested(files, tiny_handles, fake_insightface, tmp_path, monkeypatch):
    monkeypatch.setattr(node_mod, "insightface_root", lambda: tmp_path)
    with pytest.raises(FinetuneError) as e:
        run_node(tiny_handles["sdxl"])
    folder = tmp_path / "models" / "antelopev2"
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "image")
    assert str(folder) in e.value.detail and str(folder) in e.value.fix and "antelopev2" in e.value.fix
    nested = folder / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "glintr100.onnx").write_bytes(b"x")
    with pytest.raises(FinetuneError, match="one folder too deep") as e:
        face_analysis(tmp_path, input="image")
    assert str(folder) in e.value.fix
    assert not fake_insightface.inits  # insightface was never asked to fetch the models itself


def test_no_face(files, tiny_handles, fake_insightface):
    fake_insightface.faces = []
    with pytest.raises(FinetuneError, match="no face found") as e:
        run_node(tiny_handles["sdxl"])
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "image") and e.value.fix
    with pytest.raises(FinetuneError, match="no face found") as e:
        detect_face(reference(), face_analysis(files["insightface"]), input="kps_image")
    assert e.value.input == "kps_image"


def test_wrong_adapters(files, tiny_handles, fake_insightface):
    with pytest.raises(FinetuneError) as e:
        run_node(tiny_handles["sdxl"], instantid_name="ft-plain-ip-adapter.safetensors")
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "instantid_name")
    assert "Image Prompt" in e.value.fix
    with pytest.raises(FinetuneError) as e:  # an SDXL InstantID adapter on an SD 1.x model
        run_node(tiny_handles["sd1"], controlnet_name="None")
    assert (e.value.node, e.value.input) == ("FinetuneInstantID", "instantid_name")
    assert "model family" in e.value.fix
    with pytest.raises(FinetuneError) as e:
        run_node(tiny_handles["sdxl"], instantid_name="missing.safetensors")
    assert e.value.input == "instantid_name"
    assert not fake_insightface.images  # refused before any face analysis


def test_bin_adapter_gives_the_same_prompt(files, tiny_handles, fake_insightface):
    a = run_node(tiny_handles["sdxl"], controlnet_name="None")[0].patches[-1]
    b = run_node(tiny_handles["sdxl"], controlnet_name="None", instantid_name="ft-instantid.bin")[0].patches[-1]
    assert torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond)
    assert build_projection(b.adapter).latents.shape == (1, QUERIES, DIM)


# ---------------------------------------------------------------------------------------------- draw_kps
def test_draw_kps_colours():
    hint = draw_kps(REF_W, REF_H, KPS)
    assert hint.shape == (1, 3, REF_H, REF_W) and hint.dtype == torch.float32
    px = (hint[0].permute(1, 2, 0) * 255).round().to(torch.uint8)

    def at(x, y):
        return tuple(int(v) for v in px[y, x])

    for (x, y), colour in zip(KPS, KPS_COLORS):
        assert at(int(x), int(y)) == colour
        assert at(int(x) + 9, int(y)) == colour  # inside the radius-10 disc
    # the limbs' midpoints, away from the discs: the colour of the limb's first keypoint times 0.6
    assert at(39, 39) == (153, 0, 0)      # left eye - nose
    assert at(57, 39) == (0, 153, 0)      # right eye - nose
    assert at(38, 59) == (153, 153, 0)    # left mouth corner - nose
    assert at(58, 59) == (153, 0, 153)    # right mouth corner - nose
    assert at(44, 34) == (0, 0, 0)        # 7 px beside the first limb: outside its 4 px half-width
    assert at(0, 0) == (0, 0, 0) and at(REF_W - 1, REF_H - 1) == (0, 0, 0)
    image = hint_to_image(hint)
    assert image.shape == (1, REF_H, REF_W, 3) and torch.equal(image[0, 30, 30], hint[0, :, 30, 30])
    assert face_mod.KPS_LIMBS == ((0, 2), (1, 2), (3, 2), (4, 2))
