"""Feature models for scoring (scoring/features.py): tiny CLIP, CLIP vision, DINO and DINOv2 models built here.

Each kind loads offline from where users keep it (a transformers folder, or a single file in ComfyUI's
models/clip_vision layout), gives the feature the DreamBooth metrics use (projected CLIP embeddings, the DINO CLS
token) equal to the model's own output on the same pixels, and bad inputs are FinetuneErrors naming the input
with a fix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_finetune import host
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.tokenizer import build_vocab, write_tokenizer
from comfy_finetune.scoring import features
from comfy_finetune.scoring.features import (
    FeatureModel,
    list_feature_models,
    load_feature_model,
    resolve_feature_model,
)

pytestmark = pytest.mark.usefixtures("one_thread")

INPUT = "feature_model"
WORDS = ("a photo of the dog cat red blue circle square sks").split()


def _images(n: int = 3, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """name -> path of each tiny model (folders in the hub layout save_pretrained writes, and single files)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        ViTConfig,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("feature_models")
    out: dict[str, Path] = {}
    vocab, merges = build_vocab(WORDS)
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16))
    out["clip"] = _save(clip, root / "clip-tiny")
    write_tokenizer(out["clip"], vocab, merges)
    out["clip-notok"] = _save(clip, root / "clip-tiny-notok")

    # what single files infer: 1 head under 64 wide, gelu for widths other than 768/1024
    torch.manual_seed(1)
    cv_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
                                 image_size=32, patch_size=8, projection_dim=16, hidden_act="gelu",
                                 layer_norm_eps=1e-5)
    clip_vision = CLIPVisionModelWithProjection(cv_config)
    out["clip-vision-folder"] = _save(clip_vision, root / "clip-vision-folder")
    out["clip-vision.safetensors"] = root / "clip-vision.safetensors"
    shutil.copy(out["clip-vision-folder"] / "model.safetensors", out["clip-vision.safetensors"])

    torch.manual_seed(2)
    dino_config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                               image_size=32, patch_size=8)
    out["dinov2"] = _save(Dinov2Model(dino_config), root / "dinov2-tiny")
    for swiglu in (False, True):  # single files: 64 wide -> 1 head, as inferred
        torch.manual_seed(3)
        model = Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, mlp_ratio=2,
                                         image_size=32, patch_size=8, use_swiglu_ffn=swiglu))
        folder = _save(model, root / f"dinov2-64-{'swiglu' if swiglu else 'mlp'}")
        out[folder.name + ".safetensors"] = root / f"{folder.name}.safetensors"
        shutil.copy(folder / "model.safetensors", out[folder.name + ".safetensors"])

    torch.manual_seed(4)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8), add_pooling_layer=False)
    out["vit"] = _save(vit, root / "dino-vit-tiny")
    return out


@pytest.fixture(autouse=True)
def fresh_cache():
    features.clear_cache()
    yield
    features.clear_cache()


@pytest.fixture
def models_root(tmp_path):
    """An empty models folder configured as the host's for one test; the session's folder is restored after."""
    saved = host._settings.models_dir
    host.configure(models_dir=tmp_path / "models")
    yield tmp_path / "models"
    host._settings.models_dir = saved


def _reference(fm: FeatureModel, images: torch.Tensor) -> torch.Tensor:
    """The transformers model's own output for the feature, on the same preprocessed pixels."""
    with torch.no_grad():
        pixels = fm.preprocess(images)
        m = fm.model
        if fm.kind == "clip":
            return m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        if fm.kind == "clip_vision":
            return m(pixel_values=pixels).image_embeds
        return m(pixel_values=pixels).last_hidden_state[:, 0]


# ---------------------------------------------------------------------------------------------- CLIP
def test_full_clip_folder_scores_images_and_prompts(tiny):
    fm = load_feature_model(tiny["clip"], input=INPUT)
    assert (fm.kind, fm.name, fm.dim, fm.has_text) == ("clip", "clip-tiny", 16, True)
    assert (fm.resize, fm.crop, fm.mean) == (32, 32, features.CLIP_MEAN)
    images = _images(5)
    feats = fm.image_features(images, batch_size=2)
    assert feats.shape == (5, 16) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert not feats.is_inference()  # callers may normalise in place
    assert torch.equal(feats, fm.image_features(images, batch_size=2))  # deterministic
    torch.testing.assert_close(feats, fm.image_features(images), atol=1e-5, rtol=1e-5)  # batching does not matter
    torch.testing.assert_close(feats, _reference(fm, images), atol=1e-5, rtol=1e-5)
    assert fm.image_features(images[:0]).shape == (0, 16)

    text = fm.text_features(["a photo of a dog", "a red circle", "sks"])
    assert text.shape == (3, 16) and text.dtype == torch.float32
    assert torch.equal(text, fm.text_features(["a photo of a dog", "a red circle", "sks"]))
    assert not torch.allclose(text[0], text[1])
    # the same text alone or padded in a batch gives the same embedding (the EOS token pools, padding is masked)
    torch.testing.assert_close(fm.text_features(["sks"])[0], text[2], atol=1e-5, rtol=1e-5)


def test_clip_folder_without_tokenizer_scores_images_only(tiny):
    fm = load_feature_model(tiny["clip-notok"], input=INPUT)
    assert fm.kind == "clip" and not fm.has_text
    assert fm.image_features(_images(2)).shape == (2, 16)
    with pytest.raises(FinetuneError, match="full CLIP folder") as err:
        fm.text_features(["a dog"])
    assert "no tokenizer files" in str(err.value) and "Fix:" in str(err.value)


def test_loads_are_cached_until_the_file_changes(tiny, tmp_path):
    a = load_feature_model(tiny["clip"])
    b = load_feature_model(str(tiny["clip"]), input=INPUT)
    assert b.model is a.model and b.input == INPUT and a.input is None  # shared weights, the caller's error names
    path = tmp_path / "cv.safetensors"
    shutil.copy(tiny["clip-vision.safetensors"], path)
    c = load_feature_model(path)
    assert load_feature_model(path) is c
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    assert load_feature_model(path).model is not c.model
    load_feature_model(tiny["dinov2"])
    assert len(features._cache) == features.CACHE_SIZE


# ---------------------------------------------------------------------------------------------- CLIP vision
def _strip_prefix(src: Path, dst: Path) -> Path:
    sd = load_file(src)
    save_file({k.removeprefix("vision_model."): v for k, v in sd.items()}, dst)
    return dst


def _full_clip_file(src: Path, dst: Path) -> Path:
    """A full CLIP state dict in one file: the vision tower plus a (fake) text tower and logit scale."""
    sd = load_file(src)
    sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(10, 32)
    sd["text_projection.weight"] = torch.zeros(16, 32)
    sd["logit_scale"] = torch.tensor(2.6592)
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(sd, dst)
    return dst


@pytest.mark.parametrize("layout", ["comfyui", "unprefixed", "full-clip", "pickle", "folder"])
def test_clip_vision_single_file(tiny, tmp_path, layout):
    src = tiny["clip-vision.safetensors"]
    path = {
        "comfyui": lambda: src,
        "unprefixed": lambda: _strip_prefix(src, tmp_path / "unprefixed.safetensors"),
        "full-clip": lambda: _full_clip_file(src, tmp_path / "full.safetensors"),
        "pickle": lambda: (torch.save(load_file(src), tmp_path / "cv.bin"), tmp_path / "cv.bin")[1],
        "folder": lambda: tiny["clip-vision-folder"],
    }[layout]()
    fm = load_feature_model(path, input=INPUT)
    assert (fm.kind, fm.dim, fm.has_text, fm.crop) == ("clip_vision", 16, False, 32)
    images = _images(3, 48, 80)
    feats = fm.image_features(images)
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats, _reference(fm, images), atol=1e-5, rtol=1e-5)
    # the same weights whatever the layout
    ref = load_feature_model(tiny["clip-vision-folder"])
    torch.testing.assert_close(feats, ref.image_features(images), atol=1e-5, rtol=1e-5)
    with pytest.raises(FinetuneError, match="full CLIP folder") as err:
        fm.text_features(["a dog"])
    assert f"input '{INPUT}'" in str(err.value) and "openai/clip-vit-base-patch32" in str(err.value)


def test_clip_vision_file_without_projection_gives_the_pooled_output(tiny, tmp_path):
    sd = load_file(tiny["clip-vision.safetensors"])
    del sd["visual_projection.weight"]
    save_file(sd, tmp_path / "noproj.safetensors")
    fm = load_feature_model(tmp_path / "noproj.safetensors")
    assert fm.kind == "clip_vision" and fm.dim == 32 and not hasattr(fm.model, "visual_projection")
    images = _images(2)
    with torch.no_grad():
        want = fm.model(pixel_values=fm.preprocess(images)).pooler_output
    torch.testing.assert_close(fm.image_features(images), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- DINO
@pytest.mark.parametrize("name,kind,dim", [("dinov2", "dinov2", 32), ("vit", "dino", 32),
                                           ("dinov2-64-mlp.safetensors", "dinov2", 64),
                                           ("dinov2-64-swiglu.safetensors", "dinov2", 64)])
def test_dino_models_give_the_cls_token(tiny, name, kind, dim):
    fm = load_feature_model(tiny[name], input=INPUT)
    assert (fm.kind, fm.dim, fm.has_text) == (kind, dim, False)
    assert fm.mean == features.IMAGENET_MEAN and fm.crop == 32
    images = _images(3)
    feats = fm.image_features(images)
    assert feats.shape == (3, dim)
    torch.testing.assert_close(feats, _reference(fm, images), atol=1e-5, rtol=1e-5)
    if name.endswith(".safetensors"):  # the single file equals its folder
        folder = load_feature_model(tiny[name].with_suffix(""))
        torch.testing.assert_close(feats, folder.image_features(images), atol=1e-5, rtol=1e-5)


def test_folder_with_only_a_pickle_loads_weights_only(tiny, tmp_path):
    folder = tmp_path / "dinov2-bin"
    folder.mkdir()
    shutil.copy(tiny["dinov2"] / "config.json", folder / "config.json")
    torch.save(load_file(tiny["dinov2"] / "model.safetensors"), folder / "pytorch_model.bin")
    fm = load_feature_model(folder)
    images = _images(2)
    torch.testing.assert_close(fm.image_features(images), load_feature_model(tiny["dinov2"]).image_features(images),
                               atol=1e-6, rtol=1e-6)


def test_preprocessor_config_sets_resize_crop_and_normalisation(tiny, tmp_path):
    folder = tmp_path / "dinov2-pre"
    shutil.copytree(tiny["dinov2"], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 24}, "do_center_crop": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    fm = load_feature_model(folder)
    assert (fm.resize, fm.crop, fm.mean, fm.std) == (40, 24, (0.5,) * 3, (0.25,) * 3)
    pixels = fm.preprocess(_images(2, 60, 90))
    assert pixels.shape == (2, 3, 24, 24)
    flat = torch.full((1, 50, 70, 3), 0.75)  # a flat image stays flat through resize and crop: (0.75-0.5)/0.25
    torch.testing.assert_close(fm.preprocess(flat), torch.ones(1, 3, 24, 24), atol=1e-5, rtol=0)
    assert fm.image_features(_images(2, 60, 90)).shape == (2, 32)


# ---------------------------------------------------------------------------------------------- where they live
def test_list_and_resolve_through_the_host(tiny, models_root):
    cv, fmodels = models_root / "clip_vision", models_root / "feature_models"
    (cv / "sub").mkdir(parents=True)
    shutil.copy(tiny["clip-vision.safetensors"], cv / "clip_vision_tiny.safetensors")
    shutil.copy(tiny["clip-vision.safetensors"], cv / "sub" / "other.safetensors")
    (cv / "notes.txt").write_text("not a model")
    shutil.copytree(tiny["clip-vision-folder"], cv / "encoder")  # a folder: listed once, not its model file
    fmodels.mkdir()
    shutil.copytree(tiny["dinov2"], fmodels / "dinov2-tiny")
    shutil.copytree(tiny["vit"], fmodels / "dino" / "vit-tiny")
    (fmodels / "empty").mkdir()
    names = list_feature_models()
    assert names == ["clip_vision_tiny.safetensors", "dino/vit-tiny", "dinov2-tiny", "encoder",
                     "sub/other.safetensors"]
    assert resolve_feature_model("dinov2-tiny") == (fmodels / "dinov2-tiny").resolve()
    assert resolve_feature_model("sub/other.safetensors") == (cv / "sub" / "other.safetensors").resolve()
    assert resolve_feature_model(str(tiny["vit"])) == tiny["vit"].resolve()  # absolute paths, headless
    fm = load_feature_model(resolve_feature_model("dino/vit-tiny", input=INPUT))
    assert fm.kind == "dino" and fm.name == "vit-tiny"

    (models_root / "x").mkdir()
    for bad in ("../x", "clip_vision/../../x", "missing-model", str(models_root / "nope")):
        with pytest.raises(FinetuneError) as err:
            resolve_feature_model(bad, node="Score", input=INPUT)
        msg = str(err.value)
        assert f"input '{INPUT}'" in msg and "Fix:" in msg
        assert "models/feature_models/<name>/" in msg and "facebook/dinov2-small" in msg


def test_feature_models_folder_unregistered_in_comfyui(tiny, models_root, monkeypatch):
    """Inside ComfyUI folder_paths_for('feature_models') raises KeyError: the folder beside clip_vision is used."""
    elsewhere = models_root.parent / "comfy_models"
    shutil.copytree(tiny["dinov2"], elsewhere / "feature_models" / "dinov2-tiny")
    (elsewhere / "clip_vision").mkdir()
    real = host.folder_paths_for

    def comfy_folder_paths_for(key):
        if key == "feature_models":
            raise KeyError(key)
        return [elsewhere / key] if key == "clip_vision" else real(key)

    monkeypatch.setattr(host, "folder_paths_for", comfy_folder_paths_for)
    assert list_feature_models() == ["dinov2-tiny"]
    assert resolve_feature_model("dinov2-tiny") == (elsewhere / "feature_models" / "dinov2-tiny").resolve()
    with pytest.raises(FinetuneError, match="not found"):
        resolve_feature_model("../feature_models/dinov2-tiny", input=INPUT)


# ---------------------------------------------------------------------------------------------- bad inputs
class _Payload:
    """Unpickling this would create a marker file: the weights-only loader must refuse it before it runs."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_input(kind: str, tmp: Path, tiny: dict[str, Path]) -> tuple[Path, str]:
    if kind == "missing":
        return tmp / "nope.safetensors", "not found"
    if kind == "no-config":
        (tmp / "folder").mkdir()
        shutil.copy(tiny["clip-vision.safetensors"], tmp / "folder" / "model.safetensors")
        return tmp / "folder", "without config.json"
    if kind == "unet":
        save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight":
                   torch.zeros(4, 4, 3, 3)}, tmp / "unet.safetensors")
        return tmp / "unet.safetensors", "first key is 'conv_in.weight'; it looks like a UNet"
    if kind == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
                  tmp / "lora.safetensors")
        return tmp / "lora.safetensors", "looks like a LoRA"
    if kind == "corrupt":
        (tmp / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage")
        return tmp / "corrupt.safetensors", "corrupt.safetensors"
    if kind == "truncated":
        data = tiny["clip-vision.safetensors"].read_bytes()
        (tmp / "cut.safetensors").write_bytes(data[: len(data) // 2])
        return tmp / "cut.safetensors", "truncated"
    if kind == "pickle-code":
        payload = _Payload()
        payload.marker = tmp / "ran"
        torch.save({"vision_model.embeddings.patch_embedding.weight": torch.zeros(1), "x": payload}, tmp / "p.bin")
        return tmp / "p.bin", "cannot be loaded safely"
    if kind == "bert":
        (tmp / "bert").mkdir()
        (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
        return tmp / "bert", "type 'bert'"
    if kind == "missing-tensor":
        sd = load_file(tiny["clip-vision.safetensors"])
        del sd["vision_model.post_layernorm.weight"]
        save_file(sd, tmp / "partial.safetensors")
        return tmp / "partial.safetensors", "missing 'vision_model.post_layernorm.weight'"
    if kind == "wrong-shape":
        sd = load_file(tiny["clip-vision.safetensors"])
        sd["vision_model.encoder.layers.1.layer_norm1.weight"] = torch.ones(7)
        save_file(sd, tmp / "shape.safetensors")
        return tmp / "shape.safetensors", "wrong shapes: 'vision_model.encoder.layers.1.layer_norm1.weight' is [7]"
    if kind == "folder-no-weights":
        (tmp / "noweights").mkdir()
        shutil.copy(tiny["dinov2"] / "config.json", tmp / "noweights" / "config.json")
        return tmp / "noweights", "no weights"
    if kind == "bad-config":
        (tmp / "badcfg").mkdir()
        (tmp / "badcfg" / "config.json").write_text("{not json")
        return tmp / "badcfg", "cannot be read"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "no-config", "unet", "lora", "corrupt", "truncated", "pickle-code",
                                  "bert", "missing-tensor", "wrong-shape", "folder-no-weights", "bad-config"])
def test_bad_inputs_are_finetune_errors_with_a_fix(tiny, tmp_path, kind):
    path, expected = _bad_input(kind, tmp_path, tiny)
    with pytest.raises(FinetuneError) as err:
        load_feature_model(path, node="Score", input=INPUT)
    msg = str(err.value)
    assert expected in msg, msg
    assert f"input '{INPUT}'" in msg and "Fix:" in msg and msg.startswith("[Score]"), msg
    assert not (tmp_path / "ran").exists()


def test_not_an_image_batch(tiny):
    fm = load_feature_model(tiny["dinov2"], input=INPUT)
    for bad in (torch.rand(3, 32, 32), torch.rand(1, 3, 32, 32), "image"):
        with pytest.raises(FinetuneError, match="IMAGE batch"):
            fm.image_features(bad)
    assert fm.image_features(torch.rand(1, 40, 40, 4)).shape == (1, 32)  # RGBA: alpha dropped
    assert fm.image_features(torch.rand(1, 40, 40, 1)).shape == (1, 32)  # grey: repeated


def test_scoring_a_batch_is_quick(tiny):
    """Scoring a handful of 64x64 images with each tiny model is quick (about 0.1 s here; the bound is loose)."""
    start = time.perf_counter()
    for name in ("clip", "dinov2", "vit"):
        load_feature_model(tiny[name]).image_features(_images(8))
    assert time.perf_counter() - start < 10
