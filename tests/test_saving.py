"""Saving LoRAs, embeddings and checkpoints: exact round trips, confined names, no silent overwrite, atomic writes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from comfy_finetune import host
from comfy_finetune.core.atomic import atomic_write
from comfy_finetune.core.embeddings import Embedding, load_embedding_file
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.core.handle import LoraPatch, ModelHandle
from comfy_finetune.core.loading import load_diffusers_folder, load_single_file
from comfy_finetune.core.lora import LoraModule, LoraWeights, lora_from_file
from comfy_finetune.core.lora_handle import lora_for_handle, module_shapes
from comfy_finetune.nodes.saving import NODES, SaveCheckpoint, SaveEmbedding, SaveLoRA
from comfy_finetune.training.saving import (
    safe_name,
    save_checkpoint,
    save_embedding,
    save_lora,
    target_path,
)

CPU = torch.device("cpu")
LORA_TARGETS = ("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.2", "self_attn.q_proj",
                "self_attn.v_proj", "mlp.fc1")


@pytest.fixture
def models(models_dir, tmp_path):
    """A fresh, empty models folder per test (with the tiny tokenizer, which single-file loading looks up)."""
    old = host._settings.models_dir
    root = tmp_path / "models"
    shutil.copytree(models_dir / "diffusers" / "tiny-sd1" / "tokenizer", root / "tokenizers" / "tiny")
    host.configure(models_dir=root)
    try:
        yield root
    finally:
        host._settings.models_dir = old


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _random_lora(handle: ModelHandle, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    base = handle.base
    modules = {}
    comps = [("unet", base.unet)] + [(f"te{i + 1}", te) for i, te in enumerate(base.text_encoders)]
    for comp, model in comps:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.endswith(LORA_TARGETS):
                rank, alpha = (4, 2.0) if len(modules) % 3 else (2, 1.5)
                down = torch.randn(rank, mod.in_features, generator=g)
                up = torch.randn(mod.out_features, rank, generator=g) * 0.1
                modules[(comp, name)] = LoraModule(down, up, alpha)
    return LoraWeights(handle.family, modules, {"ss_training_comment": "unit test"}, name="test_lora")


def _state_dicts(base) -> dict[str, dict[str, torch.Tensor]]:
    out = {"unet": base.unet.state_dict(), "vae": base.vae.state_dict()}
    for i, te in enumerate(base.text_encoders):
        out[f"te{i + 1}"] = {k: v for k, v in te.state_dict().items() if not k.endswith("position_ids")}
    return out


def _assert_same_weights(a, b) -> None:
    sa, sb = _state_dicts(a), _state_dicts(b)
    assert set(sa) == set(sb)
    for comp in sa:
        assert set(sa[comp]) == set(sb[comp]), comp
        for k, v in sa[comp].items():
            assert sb[comp][k].dtype == v.dtype and torch.equal(sb[comp][k], v), f"{comp}: {k}"


# ============================================================================================== names

@pytest.mark.parametrize("name,expected", [
    ("finetune/my_lora", "finetune/my_lora"),
    ("  my lora  ", "my lora"),
    ("中文/模型 v2", "中文/模型 v2"),
    ("Cafe\u0301", "Café"),  # NFC
    ("sub\\win\\name", "sub/win/name"),
    ("./a//b/", "a/b"),
    ("name.", "name"),
    ("v1.5-model.safetensors", "v1.5-model.safetensors"),
])
def test_safe_name_accepts(name, expected):
    assert safe_name(name, node="N", input="name") == expected


@pytest.mark.parametrize("name", [
    "", "   ", "/", "../x", "a/../../x", "a/..", "/abs/x", "\\\\server\\share\\x", "\\x", "C:\\x", "c:x", "~/x",
    "a\x00b", "a\nb", "a\x1bb", "x\u202egpj.safetensors", "CON", "con.safetensors", "sub/NUL", "COM1.txt",
    "lpt9", "a:b", "a*b", "a?b", "a|b", 'a"b', "<x>", ".hidden", "sub/.x", "...", "x" * 300,
])
def test_safe_name_refuses(name):
    with pytest.raises(FinetuneError) as exc:
        safe_name(name, node="SaveX", input="name")
    msg = str(exc.value)
    assert msg.startswith("[SaveX] input 'name':") and "Fix:" in msg


def test_target_path_folder_extension_and_numbering(models):
    root = models / "loras"
    p = target_path("loras", "finetune/a", ".safetensors", overwrite=False, node="N", input="name")
    assert p == root / "finetune" / "a.safetensors" and p.parent.is_dir()
    assert target_path("loras", "b.safetensors", "safetensors", overwrite=False, node="N", input="name").name \
        == "b.safetensors"
    p.write_bytes(b"old")
    p2 = target_path("loras", "finetune/a", ".safetensors", overwrite=False, node="N", input="name")
    assert p2.name == "a_2.safetensors"
    p2.write_bytes(b"old2")
    assert target_path("loras", "finetune/a", ".safetensors", overwrite=False, node="N", input="name").name \
        == "a_3.safetensors"
    assert target_path("loras", "finetune/a", ".safetensors", overwrite=True, node="N", input="name") == p
    # Folders (diffusers): same rules, no extension; a file cannot be replaced by a folder.
    d = target_path("diffusers", "m", "", overwrite=False, node="N", input="name")
    d.mkdir()
    assert target_path("diffusers", "m", "", overwrite=False, node="N", input="name").name == "m_2"
    (models / "diffusers" / "f").write_text("x")
    with pytest.raises(FinetuneError, match="exists as a file"):
        target_path("diffusers", "f", "", overwrite=True, node="N", input="name")


def test_target_path_confinement(models, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    loras = models / "loras"
    loras.mkdir(parents=True)
    for bad in ("../x", "/abs/x", "a/../../x", str(outside / "x")):
        with pytest.raises(FinetuneError, match=r"\[SaveLoRA\] input 'name'"):
            target_path("loras", bad, ".safetensors", overwrite=False, node="SaveLoRA", input="name")
    # A linked sub-folder or file leading outside is refused, also with overwrite.
    (loras / "escape").symlink_to(outside, target_is_directory=True)
    (loras / "link.safetensors").symlink_to(outside / "victim.safetensors")
    for name in ("escape/x", "link"):
        for overwrite in (False, True):
            with pytest.raises(FinetuneError, match="outside the loras folder"):
                target_path("loras", name, ".safetensors", overwrite=overwrite, node="SaveLoRA", input="name")
    assert list(outside.iterdir()) == []
    # Links that stay inside are fine, and so is a models/loras that is itself a link (common: other drive).
    (loras / "real").mkdir()
    (loras / "alias").symlink_to(loras / "real", target_is_directory=True)
    assert target_path("loras", "alias/x", ".safetensors", overwrite=False, node="N", input="name") \
        == loras / "alias" / "x.safetensors"
    elsewhere = tmp_path / "other_drive"
    elsewhere.mkdir()
    (models / "embeddings").symlink_to(elsewhere, target_is_directory=True)
    p = target_path("embeddings", "e", ".safetensors", overwrite=False, node="N", input="name")
    assert p == models / "embeddings" / "e.safetensors"


# ============================================================================================== atomic writes

def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write(target, lambda p: p.write_bytes(b"one"))
    atomic_write(target, lambda p: p.write_bytes(b"two"))
    assert target.read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_original(tmp_path, exc_type):
    target = tmp_path / "f.bin"
    target.write_bytes(b"previous")
    seen = []

    def half_then_fail(p: Path):
        with open(p, "wb") as f:
            f.write(b"partial data")
        seen.append(p)
        raise exc_type("disk full")

    with pytest.raises(exc_type):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"previous"
    assert seen and seen[0].parent == tmp_path and seen[0].name.startswith(".f.bin.tmp-")
    assert _leftovers(tmp_path) == []
    # A new file that fails leaves nothing at all.
    with pytest.raises(exc_type):
        atomic_write(tmp_path / "new.bin", half_then_fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_atomic_folder_is_replaced_whole_never_merged(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old_only.txt").write_text("old")
    (target / "shared.txt").write_text("old")

    def fail(p: Path):
        (p / "shared.txt").write_text("new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail, folder=True)
    assert (target / "shared.txt").read_text() == "old" and _leftovers(tmp_path) == []

    atomic_write(target, lambda p: (p / "shared.txt").write_text("new"), folder=True)
    assert sorted(x.name for x in target.iterdir()) == ["shared.txt"]
    assert (target / "shared.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_write_without_overwrite_never_replaces(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"first")
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda p: p.write_bytes(b"second"), overwrite=False)
    assert target.read_bytes() == b"first" and _leftovers(tmp_path) == []
    # with next_name the write moves on to the next free name, decided at the rename itself
    (tmp_path / "f_2.bin").write_bytes(b"taken too")
    names = iter(["f_2.bin", "f_3.bin"])
    got = atomic_write(target, lambda p: p.write_bytes(b"second"), overwrite=False,
                       next_name=lambda taken: taken.with_name(next(names)))
    assert got == tmp_path / "f_3.bin" and got.read_bytes() == b"second"
    assert target.read_bytes() == b"first" and (tmp_path / "f_2.bin").read_bytes() == b"taken too"
    assert _leftovers(tmp_path) == []
    # a folder is not replaced either
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "a.txt").write_text("old")
    with pytest.raises(FileExistsError):
        atomic_write(folder, lambda p: (p / "a.txt").write_text("new"), folder=True, overwrite=False)
    assert (folder / "a.txt").read_text() == "old" and _leftovers(tmp_path) == []


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    """Not the owner-only 0600 of mkstemp: 0o666 & ~umask, whatever the writer did."""
    def owner_only(p: Path) -> None:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x")
        os.close(fd)

    old = os.umask(0o022)
    try:
        for umask, want in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
            os.umask(umask)
            target = tmp_path / f"m{umask:o}.bin"
            atomic_write(target, owner_only)
            assert _mode(target) == want, (oct(umask), oct(_mode(target)))
    finally:
        os.umask(old)


def test_saved_files_get_normal_permissions(models, tiny_handles, tmp_path, monkeypatch, umask_022):
    """A user on a shared machine expects 0644 under umask 022 for everything the pack saves."""
    from comfy_finetune.headless.native_nodes import SaveImage
    from comfy_finetune.training.diffusion import DiskCache
    from comfy_finetune.training.loop import atomic_torch_save

    handle = tiny_handles["sd1"]
    lora_path = target_path("loras", "perm/lora", ".safetensors", overwrite=False, node="N", input="name")
    save_lora(_random_lora(handle), lora_path, family="sd1", unet_config=handle.base.unet.config)
    widths = [te.config.hidden_size for te in handle.base.text_encoders]
    emb_path = target_path("embeddings", "perm/emb", ".safetensors", overwrite=False, node="N", input="name")
    save_embedding(Embedding("emb", {"te1": torch.zeros(2, widths[0])}), emb_path, family="sd1", widths=widths)
    ckpt_path = target_path("checkpoints", "perm/ckpt", ".safetensors", overwrite=False, node="N", input="name")
    save_checkpoint(handle, ckpt_path, format="single_file", dtype="fp16")
    train_ckpt = tmp_path / "runs" / "run.pt"
    atomic_torch_save({"step": 1, "w": torch.ones(2)}, train_ckpt)
    monkeypatch.setenv("COMFY_FINETUNE_CACHE", str(tmp_path / "cache"))
    cache = DiskCache("latents", "model-key")
    cache.put("item", {"latent": torch.ones(1, 4, 2, 2)})
    monkeypatch.setattr(host._settings, "output_dir", tmp_path / "output")
    SaveImage().save_images(torch.zeros(1, 8, 8, 3), "perm/img")
    image = next((tmp_path / "output" / "perm").glob("img_*.png"))
    for path in (lora_path, emb_path, ckpt_path, train_ckpt, cache.path("item"), image):
        assert path.is_file() and _mode(path) == 0o644, (path.name, oct(_mode(path)))


def test_failed_safetensors_save_leaves_previous_file(models, tiny_handles, monkeypatch):
    import safetensors.torch

    handle = tiny_handles["sd1"]
    lora = _random_lora(handle)
    path = target_path("loras", "keep", ".safetensors", overwrite=False, node="N", input="name")
    save_lora(lora, path, family="sd1", unet_config=handle.base.unet.config)
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def broken(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # a partial file, then the crash
        raise OSError("no space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_lora(_random_lora(handle, seed=1), path, family="sd1", unet_config=handle.base.unet.config)
    assert path.read_bytes() == before
    assert _leftovers(path.parent) == []


# ============================================================================================== LoRA

@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_lora_round_trip_is_exact(models, tiny_handles, family, layout):
    handle = tiny_handles[family]
    lora = _random_lora(handle)
    path = target_path("loras", f"rt/{family}_{layout}", ".safetensors", overwrite=False, node="N", input="name")
    save_lora(lora, path, family=family, unet_config=handle.base.unet.config, layout=layout,
              metadata={"ss_learning_rate": 1e-4, "ss_network_dim": "999"})
    back, unmatched = lora_for_handle(path, handle)
    assert unmatched == []
    assert back.family is Family(family)
    assert set(back.modules) == set(lora.modules)
    for key, mod in lora.modules.items():
        got = back.modules[key]
        assert torch.equal(got.down, mod.down) and torch.equal(got.up, mod.up), key
        assert got.alpha == mod.alpha, key
    # The generic reader agrees (no handle, shapes only).
    base = handle.base
    again, unmatched = lora_from_file(path, family=Family(family), unet_config=base.unet.config,
                                      unet_modules=module_shapes(base.unet),
                                      te_modules=[module_shapes(te) for te in base.text_encoders])
    assert unmatched == [] and set(again.modules) == set(lora.modules)
    _, meta = _read(path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_learning_rate"] == "0.0001" and meta["ss_training_comment"] == "unit test"
    assert meta["modelspec.title"] == f"{family}_{layout}"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_keys_and_metadata(models, tiny_handles, family):
    handle = tiny_handles[family]
    lora = _random_lora(handle)
    path = target_path("loras", f"k_{family}", ".safetensors", overwrite=False, node="N", input="name")
    save_lora(lora, path, family=family, unet_config=handle.base.unet.config,
              metadata={"ss_network_dim": "999", "modelspec.architecture": "x", "ss_steps": 10, "ss_extra": None})
    tensors, meta = _read(path)
    te_prefixes = ("lora_te1_", "lora_te2_") if family == "sdxl" else ("lora_te_",)
    for key in tensors:
        assert key.startswith(("lora_unet_",) + te_prefixes), key
        assert key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), key
    n_modules = len(lora.modules)
    assert sum(k.endswith(".alpha") for k in tensors) == n_modules
    assert any(k.startswith(te_prefixes[-1]) for k in tensors)
    if family != "sdxl":
        assert "text_model_encoder_layers_0_self_attn_q_proj" in " ".join(tensors)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"  # computed, not the caller's 999
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
            "sdxl": "stable-diffusion-xl-v1-base"}[family]
    assert meta["modelspec.architecture"] == f"{arch}/lora"
    assert meta["ss_steps"] == "10" and meta["ss_extra"] == "None"
    assert meta["ss_base_model_version"].startswith({"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl"}[family])
    # A1111's LoRA hash: sha256 of the bytes after the header.
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]


def test_save_lora_refuses_wrong_family_and_empty(models, tiny_handles):
    sdxl_lora = _random_lora(tiny_handles["sdxl"])
    path = models / "loras" / "x.safetensors"
    with pytest.raises(FinetuneError, match="is for SDXL but the model is SD 1.x"):
        save_lora(sdxl_lora, path, family="sd1", unet_config=tiny_handles["sd1"].base.unet.config)
    with pytest.raises(FinetuneError, match="no modules"):
        save_lora(LoraWeights(Family.SD1, {}), path, family="sd1", unet_config=tiny_handles["sd1"].base.unet.config)
    with pytest.raises(FinetuneError, match="layout"):
        save_lora(_random_lora(tiny_handles["sd1"]), path, family="sd1",
                  unet_config=tiny_handles["sd1"].base.unet.config, layout="peft")
    assert not path.exists()


# ============================================================================================== embeddings

@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_embedding_round_trip_is_exact(models, tiny_handles, family):
    handle = tiny_handles[family]
    widths = [te.config.hidden_size for te in handle.base.text_encoders]
    g = torch.Generator().manual_seed(3)
    vectors = {f"te{i + 1}": torch.randn(3, w, generator=g) for i, w in enumerate(widths)}
    emb = Embedding("my_token", vectors, metadata={"ss_steps": 100})
    path = target_path("embeddings", f"ti/{family}_emb", ".safetensors", overwrite=False, node="N", input="name")
    save_embedding(emb, path, family=family, widths=widths)
    tensors, meta = _read(path)
    if family == "sdxl":
        assert set(tensors) == {"clip_l", "clip_g"}
    else:
        assert set(tensors) == {"emb_params"}  # one tensor: ComfyUI's fallback and A1111 both read it
    back = load_embedding_file(path, widths)
    assert set(back.vectors) == set(vectors)
    for comp, vec in vectors.items():
        assert back.vectors[comp].dtype == vec.dtype and torch.equal(back.vectors[comp], vec)
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
            "sdxl": "stable-diffusion-xl-v1-base"}[family]
    assert meta["modelspec.architecture"] == f"{arch}/textual-inversion"
    assert meta["num_vectors"] == "3" and meta["name"] == f"{family}_emb"
    assert meta["trigger_word"] == f"{family}_emb" and meta["ss_steps"] == "100"
    assert all(isinstance(v, str) for v in meta.values())


def test_embedding_refuses_mismatches(models):
    path = models / "embeddings" / "e.safetensors"
    with pytest.raises(FinetuneError, match="needs te1 and te2"):
        save_embedding(Embedding("e", {"te1": torch.zeros(1, 32)}), path, family="sdxl")
    with pytest.raises(FinetuneError, match="needs te1"):
        save_embedding(Embedding("e", {"te1": torch.zeros(1, 32), "te2": torch.zeros(1, 32)}), path, family="sd1")
    with pytest.raises(FinetuneError, match="768 wide"):
        save_embedding(Embedding("e", {"te1": torch.zeros(2, 32)}), path, family="sd1", widths=[768])
    with pytest.raises(FinetuneError, match="vector counts"):
        save_embedding(Embedding("e", {"te1": torch.zeros(1, 32), "te2": torch.zeros(2, 32)}), path, family="sdxl")
    assert not path.exists()


# ============================================================================================== checkpoints

def _load(path: Path):
    return load_single_file(path, torch.float32, CPU) if path.is_file() else load_diffusers_folder(path, torch.float32,
                                                                                                     CPU)


@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_checkpoint_round_trip_is_exact(models, tiny_handles, family, fmt):
    handle = tiny_handles[family]
    key, ext = ("checkpoints", ".safetensors") if fmt == "single_file" else ("diffusers", "")
    path = target_path(key, f"ckpt/{family}", ext, overwrite=False, node="N", input="name")
    save_checkpoint(handle, path, format=fmt, dtype="fp32")
    back = _load(path)
    assert back.family is handle.family
    assert back.prediction_type == handle.base.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    _assert_same_weights(handle.base, back)
    assert _leftovers(path.parent) == []
    if fmt == "single_file":
        tensors, meta = _read(path)
        assert meta["modelspec.implementation"] == "sgm" and meta["modelspec.title"] == family
        assert meta["modelspec.prediction_type"] == ("v" if family == "sd2" else "epsilon")
        assert meta["modelspec.architecture"] == {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-768-v",
                                                  "sdxl": "stable-diffusion-xl-v1-base"}[family]
        assert "model.diffusion_model.out.2.weight" in tensors and "v_pred" not in tensors
        te_key = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                  "sd2": "cond_stage_model.model.ln_final.weight",
                  "sdxl": "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"}[family]
        assert te_key in tensors
    else:
        index = json.loads((path / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
        toks = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
        for tok in toks:
            assert (path / tok / "vocab.json").is_file() and (path / tok / "merges.txt").is_file()
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        assert sched["prediction_type"] == handle.base.prediction_type
        text = "a photo of a red circle"
        for a, b in zip(handle.base.tokenizers, back.tokenizers):
            assert a(text).input_ids == b(text).input_ids
            assert a.pad_token_id == b.pad_token_id


def test_sdxl_v_prediction_marker(models, tiny_handles):
    base = tiny_handles["sdxl"].base
    vbase = dataclasses.replace(base, prediction_type="v_prediction",
                                scheduler_config={**base.scheduler_config, "prediction_type": "v_prediction"})
    handle = ModelHandle(vbase)
    path = target_path("checkpoints", "xl_v", ".safetensors", overwrite=False, node="N", input="name")
    save_checkpoint(handle, path, format="single_file", dtype="fp32")
    tensors, meta = _read(path)
    assert tensors["v_pred"].numel() == 0  # ComfyUI's marker
    assert meta["modelspec.prediction_type"] == "v"
    assert _load(path).prediction_type == "v_prediction"
    folder = target_path("diffusers", "xl_v", "", overwrite=False, node="N", input="name")
    save_checkpoint(handle, folder, format="diffusers", dtype="fp32")
    assert _load(folder).prediction_type == "v_prediction"


def test_checkpoint_merges_loras_and_leaves_the_handle_alone(models, tiny_handles):
    handle = tiny_handles["sd1"]
    before = {k: v.clone() for k, v in handle.base.unet.state_dict().items()}
    patched = handle.with_patch(LoraPatch(_random_lora(handle), 0.7, 1.0))
    with patched.patched():
        merged = _state_dicts(handle.base)
        merged = {c: {k: v.clone() for k, v in sd.items()} for c, sd in merged.items()}
    path = target_path("checkpoints", "merged", ".safetensors", overwrite=False, node="N", input="name")
    save_checkpoint(patched, path, format="single_file", dtype="fp32")
    back = _state_dicts(_load(path))
    changed = 0
    for comp, sd in merged.items():
        for k, v in sd.items():
            assert torch.equal(back[comp][k], v), (comp, k)
            changed += comp == "unet" and not torch.equal(v, before[k])
    assert changed > 0
    assert all(torch.equal(v, before[k]) for k, v in handle.base.unet.state_dict().items())
    _, meta = _read(path)
    assert "test_lora" in meta["modelspec.merged_from"]


def test_checkpoint_dtypes(models, tiny_handles):
    handle = tiny_handles["sdxl"]
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = target_path("checkpoints", f"xl_{dtype}", ".safetensors", overwrite=False, node="N", input="name")
        save_checkpoint(handle, path, dtype=dtype)
        tensors, _ = _read(path)
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch_dtype}
        back = _load(path)
        w = handle.base.unet.conv_in.weight
        assert torch.equal(back.unet.conv_in.weight, w.to(torch_dtype).float())
    with pytest.raises(FinetuneError, match="dtype"):
        save_checkpoint(handle, models / "checkpoints" / "bad.safetensors", dtype="int8")
    with pytest.raises(FinetuneError, match="format"):
        save_checkpoint(handle, models / "checkpoints" / "bad.safetensors", format="ckpt")


# ============================================================================================== nodes

@pytest.mark.parametrize("cls", NODES)
def test_node_schema(cls):
    assert cls.OUTPUT_NODE is True and cls.CATEGORY == "finetune/save"
    assert cls.RETURN_TYPES == () and cls.NODE_ID.startswith("Finetune") and len(cls.DESCRIPTION) > 20
    for section in cls.INPUT_TYPES().values():
        for name, spec in section.items():
            assert spec[1]["tooltip"].strip(), name
            if isinstance(spec[0], list):
                assert spec[1]["default"] in spec[0]


def test_nodes_save_and_report(models, tiny_handles):
    handle = tiny_handles["sd1"]
    lora = _random_lora(handle)
    out = SaveLoRA().run(lora, handle, "finetune/my_lora", "kohya", False)
    assert out == {"ui": {"text": ["saved loras/finetune/my_lora.safetensors"]}, "result": ()}
    out = SaveLoRA().run(lora, handle, "finetune/my_lora", "kohya", False)
    assert out["ui"]["text"][0] == "saved loras/finetune/my_lora_2.safetensors"
    assert "already exists" in out["ui"]["text"][1]
    out = SaveLoRA().run(lora, handle, "finetune/my_lora", "diffusers", True)
    assert out["ui"]["text"] == ["saved loras/finetune/my_lora.safetensors"]
    assert "lora_adapter_metadata" in _read(models / "loras" / "finetune" / "my_lora.safetensors")[1]

    emb = Embedding("tok", {"te1": torch.randn(2, 32)})
    out = SaveEmbedding().run(emb, handle, "finetune/tok", False)
    assert out["ui"]["text"] == ["saved embeddings/finetune/tok.safetensors", "prompt word: embedding:finetune/tok"]

    patched = handle.with_patch(LoraPatch(lora, 1.0, 1.0))
    out = SaveCheckpoint().run(patched, "finetune/model", "diffusers", "fp16", False)
    assert out["ui"]["text"][0] == "saved diffusers/finetune/model"
    assert any(line.startswith("merged LoRAs: test_lora") for line in out["ui"]["text"])
    assert (models / "diffusers" / "finetune" / "model" / "model_index.json").is_file()


@pytest.mark.parametrize("family,prediction,arch,resolution,kohya", [
    ("sd1", "epsilon", "stable-diffusion-v1", "512x512", "sd_v1"),
    ("sd2", "epsilon", "stable-diffusion-v2-512", "512x512", "sd_v2"),
    ("sd2", "v_prediction", "stable-diffusion-v2-768-v", "768x768", "sd_v2_v"),
    ("sdxl", "epsilon", "stable-diffusion-xl-v1-base", "1024x1024", "sdxl_base_v1-0"),
])
def test_lora_embedding_and_checkpoint_of_one_model_agree_on_modelspec(models, tiny_handles, family, prediction,
                                                                        arch, resolution, kohya):
    """An SD 2.x 512 (epsilon) model's files all say 512x512, a 768-v model's 768x768 (one table, every writer)."""
    base = tiny_handles[family].base
    scheduler_config = {**base.scheduler_config, "prediction_type": prediction}
    handle = ModelHandle(dataclasses.replace(base, prediction_type=prediction, scheduler_config=scheduler_config))
    widths = [te.config.hidden_size for te in base.text_encoders]
    emb = Embedding("tok", {f"te{i + 1}": torch.randn(2, w) for i, w in enumerate(widths)})
    SaveLoRA().run(_random_lora(handle), handle, "spec/lora", "kohya", False)
    SaveEmbedding().run(emb, handle, "spec/emb", False)
    SaveCheckpoint().run(handle, "spec/ckpt", "single_file", "fp16", False)
    _, lora_meta = _read(models / "loras" / "spec" / "lora.safetensors")
    _, emb_meta = _read(models / "embeddings" / "spec" / "emb.safetensors")
    _, ckpt_meta = _read(models / "checkpoints" / "spec" / "ckpt.safetensors")
    for meta in (lora_meta, emb_meta, ckpt_meta):
        assert meta["modelspec.resolution"] == resolution
        assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert lora_meta["modelspec.architecture"] == f"{arch}/lora"
    assert emb_meta["modelspec.architecture"] == f"{arch}/textual-inversion"
    assert ckpt_meta["modelspec.architecture"] == arch
    assert lora_meta["ss_base_model_version"] == kohya and lora_meta["ss_v2"] == str(family == "sd2")
    assert lora_meta["modelspec.implementation"] == ("diffusers" if family != "sdxl"
                                                     else "https://github.com/Stability-AI/generative-models")
    assert emb_meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert ckpt_meta["modelspec.implementation"] == "sgm"
    v = prediction == "v_prediction"
    assert lora_meta.get("modelspec.prediction_type") == ("v" if v else None)
    assert ckpt_meta["modelspec.prediction_type"] == ("v" if v else "epsilon")


def test_nodes_refuse_escaping_names_and_other_families(models, tiny_handles):
    handle = tiny_handles["sd1"]
    for bad in ("../evil", "/tmp/evil", "..\\evil"):
        with pytest.raises(FinetuneError, match=r"\[FinetuneSaveCheckpoint\] input 'name'"):
            SaveCheckpoint().run(handle, bad, "single_file", "fp16", False)
    with pytest.raises(FinetuneError, match=r"\[FinetuneSaveLoRA\] input 'lora'"):
        SaveLoRA().run(_random_lora(tiny_handles["sdxl"]), handle, "x", "kohya", False)
    with pytest.raises(FinetuneError, match=r"\[FinetuneSaveEmbedding\] input 'embedding'"):
        SaveEmbedding().run(Embedding("e", {"te1": torch.zeros(1, 768)}), handle, "e", False)
    assert not any(p.is_file() for p in models.rglob("*.safetensors"))
    assert not os.path.exists(models.parent / "evil.safetensors")
