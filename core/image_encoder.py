"""CLIP vision encoders for image prompts: load from models/clip_vision, preprocess, encode.

Facts relied on:

* The encoders IP-Adapter uses are transformers' ``CLIPVisionModelWithProjection`` (h94's ``image_encoder``
  folder: ``config.json`` + ``model.safetensors``; ComfyUI's models/clip_vision files are the same tensors,
  keys ``vision_model.*`` and ``visual_projection.weight``). Without a config the architecture follows from the
  tensors, except the head count (16 in every released ViT-L/H/bigG) and the activation (OpenAI's ViT-L/14,
  1024 wide, uses quick_gelu; the LAION ViT-H/14 and bigG/14 use gelu).
* transformers 5's ``CLIPVisionModel`` (no projection) is the vision transformer itself: its tensors have no
  ``vision_model.`` prefix (transformers converts the prefixed layout when it loads a checkpoint). Files come in
  both layouts; they are read as ``vision_model.*`` and given to the model in its own.
* CLIP's preprocessing: resize the shortest side to the input size (bicubic), center crop a square, normalise
  with mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711).
* The shapes-tiny adapter's encoder is no CLIP model but a small CNN of this pack (``model_type``
  ``comfy_finetune_shapes_cnn`` in its config.json; :func:`shapes_cnn`), read the same way: CLIP preprocessing,
  ``image_embeds`` from its projection, hidden states from its last feature map.
* IP-Adapter's inputs: ``image_embeds`` (the projected pooled embedding) for the base adapters, the penultimate
  hidden states (``hidden_states[-2]``) for the plus and full-face ones; "no image" is an all-zero pixel tensor
  *after* normalisation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FinetuneError
from .safeio import load_safetensors

__all__ = ["ImageEncoder", "load_image_encoder", "encoder_config", "preprocess", "CLIP_MEAN", "CLIP_STD",
           "SHAPES_CNN", "shapes_cnn"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: The smallest reference image side accepted, as a share of the encoder's input size (below it the image would be
#: blown up from too few pixels to mean anything), and the widest aspect ratio (the center crop would cut away
#: more than half the image).
MIN_SIDE_SHARE = 0.25
MAX_ASPECT = 2.0
#: ``model_type`` of the shapes-tiny image encoder (a small CNN; a ViT this small learns shapes too slowly).
SHAPES_CNN = "comfy_finetune_shapes_cnn"


def shapes_cnn(config: dict):
    """The shapes-tiny image encoder: four 3x3 convolutions (the first strided, the others max-pooled) down to a
    4x4 map (its 16 positions are the hidden states), a linear layer over the flattened map and the projection to
    ``image_embeds``. Called like transformers' CLIP vision models (``pixel_values``, ``output_hidden_states``)."""
    from types import SimpleNamespace  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    c = list(config["channels"])
    size = int(config["image_size"])
    side = size // 16

    class ShapesEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(**config)
            self.features = nn.Sequential(
                nn.Conv2d(3, c[0], 3, stride=2, padding=1), nn.ReLU(),
                nn.Conv2d(c[0], c[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
            self.pool = nn.Linear(c[3] * side * side, int(config["hidden_size"]))
            self.visual_projection = nn.Linear(int(config["hidden_size"]), int(config["projection_dim"]))

        def forward(self, pixel_values, output_hidden_states: bool = False):
            fmap = self.features(pixel_values)
            tokens = fmap.flatten(2).transpose(1, 2)
            pooled = torch.relu(self.pool(fmap.flatten(1)))
            return SimpleNamespace(image_embeds=self.visual_projection(pooled), hidden_states=(tokens, tokens))

    return ShapesEncoder()


@dataclass(frozen=True, eq=False)
class ImageEncoder:
    """A CLIP vision model (eval mode, float32) and its input size."""

    name: str
    model: Any
    image_size: int

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def projection_dim(self) -> int | None:
        return int(self.model.config.projection_dim) if hasattr(self.model, "visual_projection") else None

    def encode(self, images, *, node: str | None = None, input: str = "image") -> tuple[Any, Any]:
        """``(image_embeds [B, P] or None, penultimate hidden states [B, T, H])`` for ``images`` ([B, H, W, 3],
        0..1, ComfyUI's IMAGE)."""
        return self.encode_pixels(preprocess(images, self.image_size, node=node, input=input))

    def encode_pixels(self, pixels) -> tuple[Any, Any]:
        import torch  # noqa: PLC0415

        with torch.no_grad():
            out = self.model(pixel_values=pixels.float(), output_hidden_states=True)
        embeds = getattr(out, "image_embeds", None)
        return embeds, out.hidden_states[-2]

    def zeros(self) -> tuple[Any, Any]:
        """The encoding of "no image": an all-zero normalised pixel tensor."""
        import torch  # noqa: PLC0415

        return self.encode_pixels(torch.zeros(1, 3, self.image_size, self.image_size))


def preprocess(images, size: int, *, node: str | None = None, input: str = "image"):
    """CLIP's preprocessing of a ComfyUI IMAGE batch: ``[B, 3, size, size]`` normalised float32."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: N812, PLC0415

    if not hasattr(images, "shape") or images.dim() != 4:
        raise FinetuneError(f"expected an IMAGE batch [B, H, W, C], got {getattr(images, 'shape', type(images))}",
                            node=node, input=input, fix="connect a Load Image node (or any IMAGE output)")
    b, h, w, c = images.shape
    if c != 3:
        what = {1: "a grayscale (1-channel)", 2: "a 2-channel", 4: "an RGBA (4-channel)"}.get(int(c), f"a {c}-channel")
        raise FinetuneError(f"the reference is {what} image; the image encoder needs RGB", node=node, input=input,
                            fix="load the image as RGB (Load Image gives RGB; for a mask or alpha use Join Image "
                            "with Alpha / an RGB conversion first)")
    if b < 1:
        raise FinetuneError("the IMAGE batch is empty (0 images)", node=node, input=input,
                            fix="connect an image node that outputs at least one image (Load Image)")
    if min(h, w) < MIN_SIDE_SHARE * size:
        raise FinetuneError(f"the reference image is {w}x{h}, too small for an image encoder that reads {size}x{size}",
                            node=node, input=input, fix=f"use a reference at least {int(MIN_SIDE_SHARE * size)} px on "
                            f"its short side (ideally {size} px or more)")
    if max(h, w) > MAX_ASPECT * min(h, w):
        raise FinetuneError(f"the reference image is {w}x{h}: the encoder's square center crop would cut away more "
                            "than half of it", node=node, input=input,
                            fix="crop the reference around the subject (ImageCrop) so that it is closer to square")
    x = images.float().permute(0, 3, 1, 2).clamp(0, 1)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def prefixed(state: dict) -> dict:
    """``state`` in the ``vision_model.*`` layout (a bare transformers 5 ``CLIPVisionModel`` file gets the prefix)."""
    if "vision_model.embeddings.patch_embedding.weight" not in state and "embeddings.patch_embedding.weight" in state:
        return {f"vision_model.{k}": v for k, v in state.items()}
    return state


def encoder_config(state: dict, *, name: str = "", node: str | None = None, input: str = "clip_vision_name") -> dict:
    """A ``CLIPVisionConfig`` dict inferred from a transformers-layout state dict (see the module's facts)."""
    state = prefixed(state)
    key = "vision_model.embeddings.patch_embedding.weight"
    if key not in state:
        hint = ""
        if any(k.startswith(("visual.", "model.visual.")) for k in state):
            hint = " (it is in the open_clip layout)"
        raise FinetuneError(f"'{name}' is not a CLIP vision model in the transformers layout{hint}", node=node,
                            input=input, fix="use the image encoder the adapter names (e.g. h94's "
                            "models/image_encoder/model.safetensors, CLIP-ViT-H-14) in models/clip_vision")
    hidden, _, patch, _ = state[key].shape
    positions = state["vision_model.embeddings.position_embedding.weight"].shape[0]
    side = int(round((positions - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k)))
    config = {"hidden_size": int(hidden), "patch_size": int(patch), "image_size": int(side * patch),
              "num_hidden_layers": layers, "num_channels": 3,
              "intermediate_size": int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
              "num_attention_heads": 16, "hidden_act": "quick_gelu" if hidden == 1024 else "gelu",
              "layer_norm_eps": 1e-5}
    if "visual_projection.weight" in state:
        config["projection_dim"] = int(state["visual_projection.weight"].shape[0])
    if hidden % 16:
        raise FinetuneError(f"'{name}' is {hidden} wide, which is no released CLIP vision model; its head count "
                            "cannot be told from the weights", node=node, input=input,
                            fix="put its config.json beside it (a folder with config.json and model.safetensors)")
    return config


def load_image_encoder(path: str | Path, *, node: str | None = None, input: str = "clip_vision_name",
                       dtype=None) -> ImageEncoder:
    """A CLIP vision encoder from a ``.safetensors`` file or a folder holding ``config.json`` and
    ``model.safetensors`` (beside a file, a config named ``<file stem>.json`` is used too)."""
    import torch  # noqa: PLC0415
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection  # noqa: PLC0415

    path = Path(path)
    folder = path if path.is_dir() else None
    weights = (folder / "model.safetensors") if folder else path
    state, _ = load_safetensors(weights, node=node, input=input)
    state = prefixed(state)
    config_file = next((c for c in ((folder / "config.json") if folder else None, path.with_suffix(".json"))
                        if c is not None and c.is_file()), None)
    raw = json.loads(config_file.read_text()) if config_file is not None else {}
    if raw.get("model_type") == SHAPES_CNN:
        model = shapes_cnn(raw)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise FinetuneError(f"'{path.name}' does not match its config ({str(exc).splitlines()[0][:160]})",
                                node=node, input=input, fix="the encoder is damaged: reinstall the pack") from exc
        return ImageEncoder(path.name, model.float().eval().requires_grad_(False), int(raw["image_size"]))
    if config_file is not None:
        config = CLIPVisionConfig(**{k: v for k, v in raw.get("vision_config", raw).items()
                                     if not k.startswith("_") and k not in ("architectures", "model_type")})
    else:
        config = CLIPVisionConfig(**encoder_config(state, name=path.name, node=node, input=input))
    cls = CLIPVisionModelWithProjection if "visual_projection.weight" in state else CLIPVisionModel
    model = cls(config)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers 5's bare CLIPVisionModel
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FinetuneError(f"'{path.name}' does not match a CLIP vision model: {len(missing)} missing, "
                            f"{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[:3]})", node=node,
                            input=input, fix="use a CLIP vision model in the transformers layout (with its "
                            "config.json if it is not a released ViT-L/H/bigG)")
    model = model.to(dtype or torch.float32).eval().requires_grad_(False)
    return ImageEncoder(path.name, model, int(config.image_size))
