"""Image feature models the user already has, loaded offline, for scoring generated images.

The DreamBooth paper's metrics: DINO and CLIP-I subject fidelity (mean cosine between the embeddings of generated
and reference images), CLIP-T prompt fidelity (cosine between an image's and its prompt's CLIP embeddings), and the
Frechet distance between feature distributions (DINOv2 or CLIP features). This module only makes the features;
they come back unnormalised (callers L2-normalise for cosines, the Frechet distance uses them raw).

What each kind of model gives:

- ``clip``: a full CLIP (``model_type: clip``, ``transformers.CLIPModel``). Image feature: the projected image
  embedding, ``visual_projection(vision_model(pixels).pooler_output)`` (``image_embeds``; the pooler output is the
  post-layernorm CLS token). Text feature: ``text_projection(text_model(ids).pooler_output)`` (``text_embeds``; the
  EOS token's state). Text needs tokenizer files in the folder (``tokenizer.json``, or ``vocab.json`` +
  ``merges.txt``); without them the model still scores images and ``has_text`` is False.
- ``clip_vision``: a CLIP image tower alone (``model_type: clip_vision_model`` folders, ComfyUI's models/clip_vision
  files used for IP-Adapter): ``image_embeds`` when the weights have ``visual_projection.weight``, else the pooled
  output.
- ``dino``: DINO v1 (``model_type: vit``, e.g. facebook/dino-vits16; ``ViTModel`` without pooler) and ``dinov2``
  (``Dinov2Model``): the CLS token of the last hidden state, which is after the final layernorm
  (``last_hidden_state[:, 0]``).

Sources. A transformers folder (``config.json`` + ``model.safetensors``, sharded or not) loads with
``from_pretrained(local_files_only=True, use_safetensors=True)``. A folder with only ``pytorch_model.bin`` is read by
the pack's weights-only loader and handed to ``from_pretrained(None, config=..., state_dict=...)`` (never a full
unpickle). A single weights file (.safetensors, or .bin/.pt/.pth through the weights-only loader) is read by
:mod:`..core.safeio` and its config inferred from tensor shapes, in the hub's (transformers') key layout:

- CLIP vision: ``vision_model.embeddings.patch_embedding.weight`` [hidden, channels, patch, patch],
  ``vision_model.embeddings.position_embedding.weight`` [1 + (image/patch)^2, hidden],
  ``vision_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}``,
  ``vision_model.{pre_layrnorm, post_layernorm}``, optionally ``visual_projection.weight`` [projection, hidden].
  The ``vision_model.`` prefix may be absent; a full CLIP file's text tower (``text_model.*``, ``text_projection``,
  ``logit_scale``) is dropped. Heads: 768 -> 12 (ViT-B), 1024 -> 16 (ViT-L), 1280 -> 16 (ViT-H), 1664 -> 16
  (ViT-bigG), else hidden // 64; activation ``quick_gelu`` for 768 and 1024 wide towers (OpenAI ViT-B/L),
  ``gelu`` otherwise (LAION ViT-H/bigG), as ComfyUI's own clip_vision configs say.
- DINOv2: ``embeddings.cls_token`` [1, 1, hidden], ``embeddings.patch_embeddings.projection.weight``,
  ``embeddings.position_embeddings`` [1, 1 + grid^2, hidden] (image size = grid * patch, 518 for the released
  models), ``encoder.layer.N.{norm1, attention.attention.{query,key,value}, attention.output.dense, layer_scale1,
  norm2, mlp.{fc1,fc2} or mlp.{weights_in,weights_out} (SwiGLU, giant), layer_scale2}``, ``layernorm``; a
  ``dinov2.`` prefix (from an image-classification checkpoint) is stripped. Heads: hidden // 64.
  Transformers renames these hub names to its module names while loading.

Loading is strict: a missing, unexpected or wrongly shaped tensor is a :class:`FinetuneError` naming the first few
(a transformers folder may have extra tensors, e.g. a pooler).

Preprocessing is in torch on the IMAGE batch ([B, H, W, C] floats in 0..1): bicubic antialiased resize so the
shorter side is the resize size, clamp to 0..1, center crop to crop x crop, normalise with the model's mean/std.
They come from the folder's ``preprocessor_config.json`` ("size": shortest edge, "crop_size", "image_mean",
"image_std") when present, else the standard ones: CLIP mean/std, ImageNet mean/std for DINO/DINOv2. CLIP and ViT
crop to their config's ``image_size`` (their position embeddings are fixed); DINOv2 interpolates its position
embeddings and its config's ``image_size`` (518) is the pretraining grid, so it is cropped to the preprocessor's
crop size, else 224 (or the config's image_size when smaller: tiny test models).

Where models live: files in ComfyUI's ``models/clip_vision`` and transformers folders (holding ``config.json``)
under ``models/clip_vision`` or ``models/feature_models`` (e.g. ``models/feature_models/dinov2-small``). Folders are
found through :mod:`..host`; inside ComfyUI, where ``feature_models`` is not a registered folder key, it is the
``feature_models`` folder next to ``clip_vision`` (and under the pack's models folder).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import host
from ..core.errors import FinetuneError
from ..core.safeio import load_pickle_weights_only, load_weights, read_safetensors_header

log = logging.getLogger("comfy_finetune")

KINDS = ("clip", "clip_vision", "dino", "dinov2")
FOLDER_KEYS = ("clip_vision", "feature_models")
FILE_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth")
_LOADABLE_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".pth", ".ckpt")
MODEL_TYPES = {"clip": "clip", "clip_vision_model": "clip_vision", "vit": "dino", "dinov2": "dinov2"}

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224
CLIP_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
QUICK_GELU_WIDTHS = (768, 1024)
CACHE_SIZE = 2

FIX_PLACE = ("put a CLIP vision .safetensors file in models/clip_vision, or a transformers CLIP/DINOv2 folder "
             "(config.json + model.safetensors, e.g. a download of openai/clip-vit-base-patch32 or "
             "facebook/dinov2-small) in models/feature_models/<name>/, then pick it from the list")
FIX_FULL_CLIP = ("pick a full CLIP folder (vision + text towers and tokenizer files: config.json, model.safetensors, "
                 "vocab.json + merges.txt or tokenizer.json), e.g. a download of openai/clip-vit-base-patch32 in "
                 "models/feature_models/clip-vit-base-patch32/")
FIX_LAYOUT = ("use a CLIP vision .safetensors file in transformers layout (the kind ComfyUI's models/clip_vision "
              "holds for IP-Adapter), or a transformers CLIP/DINOv2 folder such as openai/clip-vit-base-patch32 or "
              "facebook/dinov2-small in models/feature_models/<name>/")


class FeatureModel:
    """A loaded feature model: ``image_features`` for every kind, ``text_features`` for a full CLIP."""

    def __init__(self, *, kind: str, name: str, path: Path, model: Any, dim: int, resize: int, crop: int,
                 mean: Iterable[float], std: Iterable[float], device: torch.device, tokenizer: Any = None,
                 text_note: str = "", node: str | None = None, input: str | None = None) -> None:
        self.kind = kind
        self.name = name
        self.path = path
        self.model = model
        self.dim = int(dim)
        self.resize = int(resize)
        self.crop = int(crop)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.device = device
        self.tokenizer = tokenizer
        self.has_text = kind == "clip" and tokenizer is not None
        self._text_note = text_note
        self.node = node
        self.input = input

    def __repr__(self) -> str:
        return (f"FeatureModel(kind={self.kind!r}, name={self.name!r}, dim={self.dim}, has_text={self.has_text}, "
                f"crop={self.crop}px)")

    # ------------------------------------------------------------------------------------------------ images
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, C] in 0..1 -> normalised pixel values [B, 3, crop, crop] on the model's device."""
        x = _check_images(images, node=self.node, input="images").to(self.device, torch.float32)
        if x.shape[-1] == 1:
            x = x.expand(-1, -1, -1, 3)
        x = x[..., :3].permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        short = min(h, w)
        if short != self.resize:
            nh = max(self.resize, round(h * self.resize / short))
            nw = max(self.resize, round(w * self.resize / short))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
        h, w = x.shape[-2:]
        top, left = (h - self.crop) // 2, (w - self.crop) // 2
        x = x[..., top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.kind == "clip":
            return m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)
        if self.kind == "clip_vision":
            out = m(pixel_values=pixels)
            return out.image_embeds if hasattr(m, "visual_projection") else out.pooler_output
        return m(pixel_values=pixels).last_hidden_state[:, 0]

    def image_features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """[B, dim] float32 CPU features of an IMAGE batch (any size), unnormalised."""
        images = _check_images(images, node=self.node, input="images")
        step = max(1, int(batch_size))
        out = []
        with torch.inference_mode():
            for start in range(0, images.shape[0], step):
                out.append(self._embed(self.preprocess(images[start:start + step])).float().cpu())
        if not out:
            return torch.zeros(0, self.dim)
        return torch.cat(out).clone()  # cloned outside inference mode: an ordinary tensor callers may edit in place

    # ------------------------------------------------------------------------------------------------ text
    def text_features(self, texts: list[str]) -> torch.Tensor:
        """[N, dim] float32 CPU projected CLIP text embeddings (``text_embeds``), unnormalised."""
        if not self.has_text:
            what = {"clip": "a CLIP folder without tokenizer files", "clip_vision": "a CLIP vision model",
                    "dino": "a DINO model", "dinov2": "a DINOv2 model"}[self.kind]
            note = f" ({self._text_note})" if self._text_note else ""
            raise FinetuneError(f"'{self.name}' is {what}{note}: it has no text tower and tokenizer, and prompt "
                                "alignment (CLIP-T) needs a full CLIP folder (vision + text + tokenizer), "
                                "e.g. openai/clip-vit-base-patch32", node=self.node, input=self.input,
                                fix=FIX_FULL_CLIP)
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise FinetuneError("prompts must be a list of strings", node=self.node, input="prompts",
                                fix="pass one prompt string per image")
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        max_len = int(self.model.config.text_config.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", max_len)
        if isinstance(tok_max, int) and 0 < tok_max < max_len:
            max_len = tok_max
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.inference_mode():
            ids = enc["input_ids"].to(self.device)
            mask = enc.get("attention_mask")
            mask = mask.to(self.device) if mask is not None else None
            pooled = self.model.text_model(input_ids=ids, attention_mask=mask).pooler_output
            feats = self.model.text_projection(pooled).float().cpu()
        return feats.clone()


def _check_images(images: Any, *, node: str | None, input: str | None) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4) \
            or 0 in images.shape[1:]:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise FinetuneError(f"expected an IMAGE batch [B, H, W, 3] of floats in 0..1, got {shape}", node=node,
                            input=input, fix="connect an IMAGE output (e.g. from VAE Decode or Load Image)")
    return images


# ---------------------------------------------------------------------------------------------- cache / entry
_cache: OrderedDict[tuple, FeatureModel] = OrderedDict()
_cache_lock = threading.Lock()


def _signature(path: Path) -> tuple:
    """What changes when the model on disk changes: a file's mtime and size; a folder's files' (not recursive)."""
    if path.is_file():
        st = path.stat()
        return (st.st_mtime_ns, st.st_size)
    sig = []
    for child in sorted(path.iterdir()):
        if child.is_file():
            st = child.stat()
            sig.append((child.name, st.st_mtime_ns, st.st_size))
    return tuple(sig)


def _device(device: str | torch.device, *, node: str | None) -> torch.device:
    if isinstance(device, str) and device == "auto":
        device = host.torch_device_name()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FinetuneError(f"unknown device '{device}'", node=node, input="device",
                            fix="use 'cpu', 'cuda' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("CUDA was requested but torch sees no CUDA device", node=node, input="device",
                            fix="choose 'auto' or 'cpu'")
    return dev


def clear_cache() -> None:
    """Forget the loaded models (tests; freeing memory)."""
    with _cache_lock:
        _cache.clear()


def load_feature_model(path: str | os.PathLike, *, node: str | None = None, input: str | None = None,
                       device: str = "cpu") -> FeatureModel:
    """Load a feature model from a transformers folder or a single weights file (see the module docstring).

    The last two models loaded are kept, by (resolved path, what is on disk, device), so scoring every N steps does
    not reload.
    """
    raw = Path(path)
    if not raw.exists():
        raise FinetuneError(f"feature model not found: {raw}", node=node, input=input, fix=FIX_PLACE)
    resolved = raw.resolve()
    dev = _device(device, node=node)
    try:
        key = (str(resolved), _signature(resolved), str(dev))
    except OSError as exc:
        raise FinetuneError(f"cannot read '{resolved.name}': {exc.strerror or exc}", node=node, input=input,
                            fix="check that the model exists and is readable") from exc
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
    if hit is not None:
        return _attributed(hit, node, input)
    if resolved.is_dir():
        fm = _load_folder(resolved, dev, node=node, input=input)
    else:
        fm = _load_file(resolved, dev, node=node, input=input)
    with _cache_lock:
        _cache[key] = fm
        _cache.move_to_end(key)
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return fm


def _attributed(fm: FeatureModel, node: str | None, input: str | None) -> FeatureModel:
    """The cached model, its errors naming this caller's node and input (the weights are shared)."""
    if fm.node == node and fm.input == input:
        return fm
    other = copy.copy(fm)
    other.node, other.input = node, input
    return other


# ---------------------------------------------------------------------------------------------- folders
def _read_json(path: Path, what: str, *, node: str | None, input: str | None) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FinetuneError(f"'{path.parent.name}/{path.name}' ({what}) cannot be read: {exc}", node=node,
                            input=input, fix="re-download the model folder; the file is damaged") from None
    if not isinstance(doc, dict):
        raise FinetuneError(f"'{path.parent.name}/{path.name}' ({what}) is not a JSON object", node=node,
                            input=input, fix="re-download the model folder; the file is damaged")
    return doc


def _folder_weights(folder: Path, *, node: str | None, input: str | None) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", weight files) of a transformers folder (sharded or not)."""
    for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                               ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return fmt, [folder / single]
        if (folder / index).is_file():
            doc = _read_json(folder / index, "weights index", node=node, input=input)
            weight_map = doc.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise FinetuneError(f"'{folder.name}/{index}' has no weight_map", node=node, input=input,
                                    fix="re-download the model folder; the index is damaged")
            shards = []
            for shard in dict.fromkeys(str(v) for v in weight_map.values()):
                p = (folder / shard).resolve()
                if p.parent != folder.resolve() or not p.is_file():
                    raise FinetuneError(f"'{folder.name}/{index}' names a shard '{shard[:80]}' that is not in the "
                                        "folder", node=node, input=input,
                                        fix="re-download the model folder; a shard is missing")
                shards.append(p)
            return fmt, shards
    raise FinetuneError(f"'{folder.name}' has config.json but no weights (model.safetensors or pytorch_model.bin)",
                        node=node, input=input, fix="download the model's weights into the folder too")


def _weight_names(files: list[Path], *, node: str | None, input: str | None) -> set[str]:
    names: set[str] = set()
    for f in files:
        names.update(read_safetensors_header(f, node=node, input=input).tensors)
    return names


def _load_bin_state_dict(files: list[Path], *, node: str | None, input: str | None) -> dict:
    sd: dict = {}
    for f in files:
        obj = load_pickle_weights_only(f, node=node, input=input)
        while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise FinetuneError(f"'{f.name}' holds a {type(obj).__name__}, not a dict of tensors", node=node,
                                input=input, fix="re-download the model folder")
        sd.update({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    return sd


def _tokenizer(folder: Path) -> tuple[Any, str]:
    """(CLIP tokenizer or None, why not) from the folder's tokenizer files, offline."""
    fast = (folder / "tokenizer.json").is_file()
    slow = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not fast and not slow:
        return None, "no tokenizer files"
    import transformers  # noqa: PLC0415 - heavy, only when a model loads

    cls = getattr(transformers, "CLIPTokenizerFast", None) if fast else None
    cls = cls or transformers.CLIPTokenizer
    try:
        return cls.from_pretrained(str(folder), local_files_only=True), ""
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer costs only CLIP-T; images still score
        log.warning("feature model %s: the tokenizer did not load (%s); prompt alignment is unavailable",
                    folder.name, exc)
        return None, f"its tokenizer did not load: {type(exc).__name__}"


def _load_folder(folder: Path, device: torch.device, *, node: str | None, input: str | None) -> FeatureModel:
    import transformers  # noqa: PLC0415 - heavy, only when a model loads

    if not (folder / "config.json").is_file():
        raise FinetuneError(f"'{folder.name}' is a folder without config.json, so not a transformers model folder",
                            node=node, input=input,
                            fix="pick the folder that holds config.json and model.safetensors (a download of e.g. "
                                "openai/clip-vit-base-patch32 or facebook/dinov2-small), or a single CLIP vision "
                                ".safetensors file from models/clip_vision")
    cfg = _read_json(folder / "config.json", "config", node=node, input=input)
    model_type = cfg.get("model_type")
    kind = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if kind is None:
        raise FinetuneError(f"'{folder.name}' is a transformers model of type '{str(model_type)[:60]}', not a "
                            "feature model; supported: CLIP ('clip'), CLIP vision ('clip_vision_model'), "
                            "DINO ViT ('vit') and DINOv2 ('dinov2')", node=node, input=input, fix=FIX_LAYOUT)
    fmt, files = _folder_weights(folder, node=node, input=input)
    sd = _load_bin_state_dict(files, node=node, input=input) if fmt == "bin" else None
    extra: dict[str, Any] = {}
    if kind == "clip":
        cls = transformers.CLIPModel
    elif kind == "clip_vision":
        names = set(sd) if sd is not None else _weight_names(files, node=node, input=input)
        with_projection = "visual_projection.weight" in names
        cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
    elif kind == "dinov2":
        cls = transformers.Dinov2Model
    else:
        cls = transformers.ViTModel
        extra["add_pooling_layer"] = False
    try:
        if sd is None:
            model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                              output_loading_info=True, ignore_mismatched_sizes=True, **extra)
        else:
            config = cls.config_class.from_pretrained(str(folder), local_files_only=True)
            model, info = cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True,
                                              ignore_mismatched_sizes=True, **extra)
    except FinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' own errors (bad config values, unreadable shards)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FinetuneError(f"'{folder.name}' did not load as a {cls.__name__}: {first}", node=node, input=input,
                            fix="re-download the model folder, or use another CLIP/DINOv2 model") from exc
    _check_loading(info, folder.name, cls.__name__, strict=False, node=node, input=input)
    tokenizer, note = _tokenizer(folder) if kind == "clip" else (None, "")
    pre = folder / "preprocessor_config.json"
    preprocessor = _read_preprocessor(pre) if pre.is_file() else None
    return _finish(model, kind, folder, device, preprocessor, tokenizer=tokenizer, text_note=note, node=node,
                   input=input)


def _read_preprocessor(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("ignoring %s (%s): using the standard preprocessing", path, exc)
        return None
    return doc if isinstance(doc, dict) else None


def _edge(value: Any) -> int | None:
    """A size from a preprocessor config: an int, or a dict with shortest_edge/height/width."""
    if isinstance(value, dict):
        value = value.get("shortest_edge", value.get("height", value.get("width")))
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _triple(value: Any) -> tuple[float, float, float] | None:
    if isinstance(value, (list, tuple)) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    return None


def _finish(model: Any, kind: str, path: Path, device: torch.device, preprocessor: dict | None, *,
            tokenizer: Any = None, text_note: str = "", node: str | None, input: str | None) -> FeatureModel:
    model = model.float().to(device).eval().requires_grad_(False)
    config = model.config
    vision = config.vision_config if kind == "clip" else config
    image_size = getattr(vision, "image_size", None)
    image_size = image_size if isinstance(image_size, int) and image_size > 0 else DEFAULT_SIZE
    clip_like = kind in ("clip", "clip_vision")
    mean, std = (CLIP_MEAN, CLIP_STD) if clip_like else (IMAGENET_MEAN, IMAGENET_STD)
    crop = min(image_size, DEFAULT_SIZE) if kind == "dinov2" else image_size
    resize = crop
    if preprocessor is not None:
        crop_size = _edge(preprocessor.get("crop_size")) if preprocessor.get("do_center_crop", True) else None
        if kind == "dinov2" and crop_size:
            crop = crop_size
        resize = _edge(preprocessor.get("size")) or crop
        mean = _triple(preprocessor.get("image_mean")) or mean
        std = _triple(preprocessor.get("image_std")) or std
    resize = max(resize, crop)
    if kind == "clip":
        dim = config.projection_dim
    elif kind == "clip_vision" and hasattr(model, "visual_projection"):
        dim = model.visual_projection.out_features
    else:
        dim = vision.hidden_size
    return FeatureModel(kind=kind, name=path.name, path=path, model=model, dim=dim, resize=resize, crop=crop,
                        mean=mean, std=std, device=device, tokenizer=tokenizer, text_note=text_note, node=node,
                        input=input)


def _first(keys: Iterable[Any], n: int = 3) -> str:
    names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)
    shown = ", ".join(f"'{k[:80]}'" for k in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_loading(info: Mapping[str, Any], name: str, what: str, *, strict: bool, node: str | None,
                   input: str | None, fix: str = FIX_LAYOUT) -> None:
    """Refuse a model whose weights did not all load (``from_pretrained`` would silently initialise them)."""
    mismatched = info.get("mismatched_keys") or ()
    missing = info.get("missing_keys") or ()
    unexpected = (info.get("unexpected_keys") or ()) if strict else ()
    if not (mismatched or missing or unexpected):
        return
    parts = []
    if mismatched:
        shown = []
        for entry in sorted(mismatched, key=lambda e: str(e))[:3]:
            if isinstance(entry, tuple) and len(entry) == 3:
                shown.append(f"'{entry[0]}' is {list(entry[1])}, the model needs {list(entry[2])}")
            else:
                shown.append(f"'{entry}'")
        parts.append("wrong shapes: " + "; ".join(shown))
    if missing:
        parts.append(f"missing {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {_first(unexpected)}")
    raise FinetuneError(f"'{name}' is not a {what} in transformers layout: " + "; ".join(parts), node=node,
                        input=input, fix=fix)


# ---------------------------------------------------------------------------------------------- single files
_CLIP_PATCH = "vision_model.embeddings.patch_embedding.weight"
_DINO_CLS = "embeddings.cls_token"
_DINO_PATCH = "embeddings.patch_embeddings.projection.weight"


def _looks_like(first: str) -> str:
    k = first.lower()
    if k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")):
        return "a Stable Diffusion checkpoint"
    if "lora" in k or k.startswith(("lycoris_", "hada_")) or ".alpha" in k:
        return "a LoRA"
    if k.startswith(("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "time_embedding.", "encoder.down.",
                     "decoder.up.", "input_blocks.", "output_blocks.", "middle_block.")):
        return "a UNet or VAE"
    if k in ("string_to_param", "emb_params", "clip_l", "clip_g") or k.startswith("string_to_"):
        return "a Textual Inversion embedding"
    if k.startswith(("visual.", "transformer.resblocks", "positional_embedding")):
        return "an OpenCLIP/OpenAI CLIP checkpoint in its original layout (not transformers)"
    if k.startswith("text_model."):
        return "a CLIP text encoder"
    return "some other model"


def _layer_count(sd: Mapping[str, Any], pattern: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _grid(rows: int, name: str, *, node: str | None, input: str | None) -> int:
    grid = math.isqrt(max(rows - 1, 0))
    if rows < 2 or grid * grid != rows - 1:
        raise FinetuneError(f"'{name}': the position embeddings have {rows} rows, not 1 + a square number of "
                            "patches", node=node, input=input, fix=FIX_LAYOUT)
    return grid


def _clip_vision_state(sd: dict) -> dict | None:
    """The state dict in CLIPVisionModel(WithProjection) naming, or None when it is not a CLIP vision tower."""
    if _CLIP_PATCH not in sd and "embeddings.patch_embedding.weight" in sd:
        sd = {(k if k == "visual_projection.weight" else f"vision_model.{k}"): v for k, v in sd.items()}
    if _CLIP_PATCH not in sd:
        return None
    return {k: v for k, v in sd.items()
            if not (k.startswith(("text_model.", "text_projection.")) or k == "logit_scale"
                    or k.endswith(".position_ids"))}


def _dinov2_state(sd: dict) -> dict | None:
    if "dinov2." + _DINO_CLS in sd:
        sd = {k[len("dinov2."):]: v for k, v in sd.items() if k.startswith("dinov2.")}
    if _DINO_CLS not in sd or _DINO_PATCH not in sd:
        return None
    return sd


def _clip_vision_config(sd: dict, name: str, *, node: str | None, input: str | None):
    from transformers import CLIPVisionConfig  # noqa: PLC0415 - heavy, only when a model loads

    try:
        patch = sd[_CLIP_PATCH]
        rows = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as exc:
        raise FinetuneError(f"'{name}' is not a CLIP vision model in transformers layout: tensor "
                            f"'{exc.args[0]}' is missing", node=node, input=input, fix=FIX_LAYOUT) from None
    if patch.ndim != 4:
        raise FinetuneError(f"'{name}': {_CLIP_PATCH} has shape {list(patch.shape)}, not [hidden, channels, patch, "
                            "patch]", node=node, input=input, fix=FIX_LAYOUT)
    hidden, channels, size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[-1])
    heads = CLIP_HEADS.get(hidden, max(1, hidden // 64))
    proj = sd.get("visual_projection.weight")
    return CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=int(intermediate),
        projection_dim=int(proj.shape[0]) if proj is not None else hidden,
        num_hidden_layers=_layer_count(sd, r"vision_model\.encoder\.layers\.(\d+)\."), num_attention_heads=heads,
        num_channels=channels, patch_size=size, image_size=size * _grid(int(rows), name, node=node, input=input),
        hidden_act="quick_gelu" if hidden in QUICK_GELU_WIDTHS else "gelu", layer_norm_eps=1e-5,
    )


def _swiglu_ratio(hidden: int, fused_rows: int) -> int | None:
    """The (whole) mlp_ratio for which transformers' SwiGLU FFN has ``fused_rows`` / 2 hidden features."""
    want = fused_rows // 2
    for ratio in (4, *range(1, 17)):
        if (int(hidden * ratio * 2 / 3) + 7) // 8 * 8 == want:
            return ratio
    return None


def _dinov2_config(sd: dict, name: str, *, node: str | None, input: str | None):
    from transformers import Dinov2Config  # noqa: PLC0415 - heavy, only when a model loads

    cls, patch = sd[_DINO_CLS], sd[_DINO_PATCH]
    pos = sd.get("embeddings.position_embeddings")
    if patch.ndim != 4 or pos is None or pos.ndim != 3:
        raise FinetuneError(f"'{name}' is not a DINOv2 model in transformers layout: the patch or position "
                            "embeddings are missing or misshapen", node=node, input=input, fix=FIX_LAYOUT)
    hidden, channels, size = int(cls.shape[-1]), int(patch.shape[1]), int(patch.shape[-1])
    fc1 = sd.get("encoder.layer.0.mlp.fc1.weight")
    fused = sd.get("encoder.layer.0.mlp.weights_in.weight")
    if fc1 is not None:
        swiglu, ratio = False, int(fc1.shape[0]) // hidden
        if ratio < 1 or ratio * hidden != fc1.shape[0]:
            raise FinetuneError(f"'{name}': the MLP is {fc1.shape[0]} wide, not a whole multiple of the width "
                                f"{hidden}", node=node, input=input, fix=FIX_LAYOUT)
    elif fused is not None:
        swiglu, ratio = True, _swiglu_ratio(hidden, int(fused.shape[0]))
        if ratio is None:
            raise FinetuneError(f"'{name}': the SwiGLU MLP has {fused.shape[0]} fused rows, which no mlp_ratio "
                                "gives", node=node, input=input, fix=FIX_LAYOUT)
    else:
        raise FinetuneError(f"'{name}' is not a DINOv2 model in transformers layout: tensor "
                            "'encoder.layer.0.mlp.fc1.weight' (or mlp.weights_in) is missing", node=node,
                            input=input, fix=FIX_LAYOUT)
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=_layer_count(sd, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=max(1, hidden // 64), mlp_ratio=ratio, use_swiglu_ffn=swiglu, num_channels=channels,
        patch_size=size, image_size=size * _grid(int(pos.shape[1]), name, node=node, input=input),
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in sd, layer_norm_eps=1e-6,
    )


def _load_file(path: Path, device: torch.device, *, node: str | None, input: str | None) -> FeatureModel:
    import transformers  # noqa: PLC0415 - heavy, only when a model loads

    if path.suffix.lower() not in _LOADABLE_SUFFIXES:
        raise FinetuneError(f"'{path.name}' is not a weights file (.safetensors, .bin, .pt or .pth)", node=node,
                            input=input, fix=FIX_PLACE)
    raw, _ = load_weights(path, node=node, input=input)
    sd = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise FinetuneError(f"'{path.name}' holds no tensors", node=node, input=input, fix=FIX_LAYOUT)
    clip_sd = _clip_vision_state(sd)
    dino_sd = _dinov2_state(sd) if clip_sd is None else None
    if clip_sd is not None:
        kind, sd = "clip_vision", clip_sd
        config = _clip_vision_config(sd, path.name, node=node, input=input)
        with_projection = "visual_projection.weight" in sd
        cls = transformers.CLIPVisionModelWithProjection if with_projection else transformers.CLIPVisionModel
        what = "CLIP vision model"
    elif dino_sd is not None and any(".layernorm_before." in k for k in dino_sd):
        raise FinetuneError(f"'{path.name}' looks like a ViT (DINO v1) in a single file; only its transformers "
                            "folder loads", node=node, input=input,
                            fix="put the model's folder (config.json + model.safetensors, e.g. facebook/dino-vits16) "
                                "in models/feature_models/<name>/")
    elif dino_sd is not None and "embeddings.register_tokens" in dino_sd:
        raise FinetuneError(f"'{path.name}' is a DINOv2 with registers, which is not supported", node=node,
                            input=input, fix="use a plain DINOv2 model, e.g. facebook/dinov2-small")
    elif dino_sd is not None:
        kind, sd, what = "dinov2", dino_sd, "DINOv2 model"
        sd.pop("classifier.weight", None)
        sd.pop("classifier.bias", None)
        config = _dinov2_config(sd, path.name, node=node, input=input)
        if "embeddings.mask_token" not in sd:  # only used for masked pretraining, never for features
            sd["embeddings.mask_token"] = torch.zeros(1, config.hidden_size, dtype=sd[_DINO_CLS].dtype)
        cls = transformers.Dinov2Model
    else:
        first = sorted(sd)[0]
        raise FinetuneError(f"'{path.name}' is not a CLIP vision or DINOv2 model in transformers layout: it has none "
                            f"of their keys (its first key is '{first[:80]}'; it looks like {_looks_like(first)})",
                            node=node, input=input, fix=FIX_LAYOUT)
    try:
        model, info = cls.from_pretrained(None, config=config, state_dict=sd, output_loading_info=True,
                                          ignore_mismatched_sizes=True)
    except FinetuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - a config transformers refuses (e.g. odd head counts)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FinetuneError(f"'{path.name}' did not load as a {what}: {first_line}", node=node, input=input,
                            fix=FIX_LAYOUT) from exc
    _check_loading(info, path.name, what, strict=True, node=node, input=input)
    return _finish(model, kind, path, device, None, node=node, input=input)


# ---------------------------------------------------------------------------------------------- where they live
def _roots(key: str) -> list[Path]:
    """The folders for ``key``; ``feature_models`` is no ComfyUI folder key, so inside ComfyUI it is the
    ``feature_models`` folder beside ``clip_vision`` (and under the pack's models folder)."""
    try:
        return host.folder_paths_for(key)
    except KeyError:
        roots: list[Path] = []
        try:
            roots += [p.parent / key for p in host.folder_paths_for("clip_vision")]
        except KeyError:  # pragma: no cover - every ComfyUI registers clip_vision
            pass
        roots.append(host.models_dir() / key)
        return list(dict.fromkeys(roots))


def _model_folders(roots: list[Path]) -> set[str]:
    """Sub-folders holding a config.json (not nested in another such folder, not leading out of the root)."""
    names: set[str] = set()
    for root in roots:
        if not root.is_dir():
            continue
        real_root = root.resolve()
        for cfg in root.rglob("config.json"):
            folder = cfg.parent
            if folder == root or not cfg.is_file():
                continue
            rel = folder.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if any((root.joinpath(*rel.parts[:i]) / "config.json").is_file() for i in range(1, len(rel.parts))):
                continue
            try:
                folder.resolve().relative_to(real_root)
            except (ValueError, OSError):
                continue
            names.add(rel.as_posix())
    return names


def _in_model_folder(roots: list[Path], name: str) -> bool:
    parts = name.split("/")[:-1]
    return any((root.joinpath(*parts[:i]) / "config.json").is_file()
               for root in roots for i in range(1, len(parts) + 1))


def list_feature_models() -> list[str]:
    """What the node's combo offers: weights files in models/clip_vision and transformers folders (holding
    config.json) in models/clip_vision and models/feature_models; relative, ``/``-separated names."""
    cv_roots = _roots("clip_vision")
    names = {n for n in host.list_files("clip_vision", FILE_EXTENSIONS) if not _in_model_folder(cv_roots, n)}
    for key in FOLDER_KEYS:
        names |= _model_folders(_roots(key))
    return sorted(names)


def _resolve_under(roots: list[Path], name: str) -> Path | None:
    """host.resolve_model's rules for folders host does not know: the name never leaves its folder."""
    if not host.usable_name(name) or os.path.isabs(name) or name.startswith(("/", "\\")):
        return None
    parts = Path(name.replace("\\", "/")).parts
    if ".." in parts:
        return None
    for root in roots:
        try:
            candidate = (root / Path(*parts)).resolve()
            candidate.relative_to(root.resolve())
            if candidate.exists():
                return candidate
        except (ValueError, OSError):
            continue
    return None


def resolve_feature_model(name: str, *, node: str | None = None, input: str | None = None) -> Path:
    """The path of a listed name (models/clip_vision first, then models/feature_models), or of an absolute path
    to an existing file or folder (headless use)."""
    if not host.usable_name(name):
        raise FinetuneError("no usable feature model name given", node=node, input=input, fix=FIX_PLACE)
    if os.path.isabs(name):
        path = Path(name)
        if path.exists():
            return path.resolve()
        raise FinetuneError(f"feature model not found: {name}", node=node, input=input, fix=FIX_PLACE)
    for key in FOLDER_KEYS:
        try:
            found = host.resolve_model(key, name)
        except KeyError:  # inside ComfyUI, feature_models is not a registered folder key
            found = _resolve_under(_roots(key), name)
        if found is not None:
            return found
    raise FinetuneError(f"feature model '{name[:200]}' was not found in models/clip_vision or models/feature_models",
                        node=node, input=input, fix=FIX_PLACE)


signature = _signature  # what changes when the model on disk changes (a folder: each of its files)
roots = _roots  # the folders searched for a folder key (feature_models works inside ComfyUI too)
resolve_under = _resolve_under
