"""Zero-shot personalization: an image prompt (IP-Adapter) on the model handle."""

from __future__ import annotations

from pathlib import Path

from .. import host
from ..core.errors import FinetuneError
from ..core.image_encoder import ImageEncoder, load_image_encoder
from ..core.image_prompt import (
    ImageAdapter,
    ImagePromptPatch,
    build_projection,
    check_adapter_fits,
    load_adapter,
    project,
)
from ..core.lora import parse_lora
from ..core.lora_handle import with_lora
from ..core.safeio import read_safetensors_header
from .base import CATEGORY, PIPE, FTNode, file_signature

BUILTIN = "[built-in] shapes-tiny"
AUTO = "auto"
#: The adapter and image encoder trained for shapes-tiny that ship with the pack (shapes/train_ip_adapter.py).
BUILTIN_FOLDER = Path(__file__).resolve().parent.parent / "shapes" / "ip-adapter"
BUILTIN_ADAPTER = BUILTIN_FOLDER / "ip-adapter_shapes-tiny.safetensors"
BUILTIN_ENCODER = BUILTIN_FOLDER / "image_encoder"
_FIX_ENCODER = ("put the CLIP vision model the adapter was trained with in models/clip_vision (for h94's SD 1.5 and "
                "SDXL adapters other than *vit-g*: CLIP-ViT-H-14, h94's models/image_encoder/model.safetensors) and "
                "pick it in clip_vision_name")


def encoder_names() -> list[str]:
    """What clip_vision_name lists: 'auto', then the files and transformers folders in models/clip_vision."""
    names = set(host.list_files("clip_vision", (".safetensors", ".sft")))
    for root in host.folder_paths_for("clip_vision"):
        if root.is_dir():
            names |= {c.parent.relative_to(root).as_posix() for c in root.rglob("config.json")
                      if (c.parent / "model.safetensors").is_file()}
    names = {n for n in names if not any(n.startswith(f"{folder}/") for folder in names)}  # a folder's own file
    return [AUTO, *sorted(names)]


def encoder_width_fits(adapter: ImageAdapter, encoder: ImageEncoder) -> str | None:
    """Why ``encoder`` cannot feed ``adapter`` (None when it can)."""
    if adapter.input == "image_embeds":
        if encoder.projection_dim is None:
            return "it has no projection (image_embeds)"
        if encoder.projection_dim != adapter.embed_dim:
            return f"its image_embeds are {encoder.projection_dim} wide, the adapter reads {adapter.embed_dim}"
    elif adapter.input == "hidden" and encoder.hidden_size != adapter.embed_dim:
        return f"its hidden states are {encoder.hidden_size} wide, the adapter reads {adapter.embed_dim}"
    return None


class ImagePrompt(FTNode):
    NODE_ID = "FinetuneImagePrompt"
    DISPLAY_NAME = "Image Prompt (IP-Adapter) (Finetune)"
    CATEGORY = f"{CATEGORY}/models"
    DESCRIPTION = ("Zero-shot personalization: the reference image steers sampling through an IP-Adapter (decoupled "
                   "image cross-attention), no training. The built-in shapes-tiny adapter works out of the box; for "
                   "SD 1.5 / SDXL put h94's IP-Adapter files in models/ipadapter and the CLIP vision model in "
                   "models/clip_vision. Describe the subject in the prompt as 'a shape' / 'a person' and say the rest "
                   "(background, style) in words. The input handle is not changed; strength 0 is exactly no adapter.")
    RETURN_TYPES = (PIPE,)
    RETURN_NAMES = ("pipe",)
    OUTPUT_TOOLTIPS = ("A new handle: the input's base and patches plus this image prompt (used by Sample).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model handle to add the image prompt to."}),
                "image": ("IMAGE", {"tooltip": "The reference: one image of the subject (several are averaged). RGB; "
                                               "center-cropped to a square as CLIP does."}),
                "adapter_name": ([BUILTIN] + host.list_files("ipadapter"), {
                    "default": BUILTIN, "tooltip": "IP-Adapter file from models/ipadapter (h94's .safetensors, or "
                                                   ".bin read weights-only), or the built-in shapes-tiny one."}),
                "clip_vision_name": (encoder_names(), {
                    "default": AUTO, "tooltip": "The adapter's image encoder from models/clip_vision. 'auto': the "
                                                "built-in one for the built-in adapter, else the only file whose "
                                                "width fits."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 5.0, "step": 0.05,
                                       "tooltip": "How strongly the image steers: 0 = no adapter (bit-identical), "
                                                  "0.5-1 usual; lower it when the prompt is not followed."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, adapter_name=BUILTIN, clip_vision_name=AUTO, **_):
        paths = [cls._adapter_path(adapter_name, check=False)]
        if clip_vision_name != AUTO:
            paths.append(host.resolve_model("clip_vision", clip_vision_name))
        return "|".join([str(adapter_name), str(clip_vision_name)] + [file_signature(p) for p in paths])

    def __init__(self) -> None:
        self._cache: dict[str, tuple] = {}  # "adapter"/"encoder" -> (key, loaded), like LoraLoader's last file

    @staticmethod
    def _adapter_path(name: str, check: bool = True) -> Path | None:
        if name == BUILTIN:
            path = BUILTIN_ADAPTER
            if check and not path.is_file():
                raise FinetuneError("the built-in shapes-tiny image adapter is missing from the installed pack",
                                    input="adapter_name", fix="reinstall the pack, or rebuild it with python -m "
                                    "comfy_finetune.shapes.train_ip_adapter")
            return path
        path = host.resolve_model("ipadapter", name)
        if path is None and check:
            raise FinetuneError(f"adapter '{name}' was not found in models/ipadapter", input="adapter_name",
                                fix="put the IP-Adapter file in models/ipadapter and refresh, or pick another")
        return path

    def _cached(self, what: str, key, load):
        hit = self._cache.get(what)
        if hit is None or hit[0] != key:
            hit = (key, load())
            self._cache[what] = hit
        return hit[1]

    def adapter(self, adapter_name: str) -> ImageAdapter:
        path = self._adapter_path(adapter_name)
        return self._cached("adapter", (str(path), file_signature(path)),
                            lambda: load_adapter(path, node=self.NODE_ID, input="adapter_name"))

    def encoder(self, adapter: ImageAdapter, adapter_name: str, clip_vision_name: str) -> ImageEncoder:
        if clip_vision_name == AUTO:
            if adapter_name == BUILTIN:
                path = BUILTIN_ENCODER
            else:
                return self._auto_encoder(adapter)
        else:
            path = host.resolve_model("clip_vision", clip_vision_name)
            if path is None:
                raise FinetuneError(f"'{clip_vision_name}' was not found in models/clip_vision",
                                    input="clip_vision_name", fix=_FIX_ENCODER)
        sig = "|".join(file_signature(p) for p in ([path] + (sorted(path.iterdir()) if path.is_dir() else [])))
        encoder = self._cached("encoder", (str(path), sig),
                               lambda: load_image_encoder(path, node=self.NODE_ID, input="clip_vision_name"))
        why = encoder_width_fits(adapter, encoder)
        if why is not None:
            raise FinetuneError(f"'{encoder.name}' cannot feed '{adapter.name}': {why}", input="clip_vision_name",
                                fix=_FIX_ENCODER)
        return encoder

    def _auto_encoder(self, adapter: ImageAdapter) -> ImageEncoder:
        fits = []
        for name in encoder_names()[1:]:
            path = host.resolve_model("clip_vision", name)
            if path is None:
                continue
            weights = path / "model.safetensors" if path.is_dir() else path
            try:
                tensors = read_safetensors_header(weights).tensors
            except Exception:  # noqa: BLE001 - not readable: not a candidate
                continue
            if adapter.input == "image_embeds":
                info = tensors.get("visual_projection.weight")
            else:  # the hidden width; a transformers 5 CLIPVisionModel file has no vision_model. prefix
                info = tensors.get("vision_model.post_layernorm.weight", tensors.get("post_layernorm.weight"))
            if info is not None and info.shape[0] == adapter.embed_dim:
                fits.append(name)
        if len(fits) != 1:
            found = "none fits" if not fits else f"several fit ({', '.join(fits[:4])})"
            raise FinetuneError(f"'auto' needs exactly one image encoder in models/clip_vision of the width "
                                f"'{adapter.name}' reads ({adapter.embed_dim}); {found}", input="clip_vision_name",
                                fix=_FIX_ENCODER if not fits else "pick the encoder in clip_vision_name")
        return self.encoder(adapter, "", fits[0])

    def run(self, pipe, image, adapter_name=BUILTIN, clip_vision_name=AUTO, strength=1.0):
        import torch  # noqa: PLC0415

        if getattr(pipe.base.unet.config, "encoder_hid_dim_type", None) is not None:
            raise FinetuneError(f"{pipe.family.label} projects its text context inside the UNet, which an image "
                                "prompt's tokens cannot join", input="pipe",
                                fix="use an SD 1.x, SD 2.x or SDXL model with its IP-Adapter")
        adapter = self.adapter(adapter_name)
        if adapter.input == "face":
            raise FinetuneError(f"'{adapter.name}' is an InstantID adapter (it reads a face embedding)",
                                input="adapter_name", fix="use it with the InstantID node")
        check_adapter_fits(adapter, pipe.base.unet, family_label=pipe.family.label, node=self.NODE_ID,
                           input="adapter_name")
        if strength == 0:  # exactly no adapter: nothing to encode
            return (pipe,)
        encoder = self.encoder(adapter, adapter_name, clip_vision_name)
        embeds, hidden = encoder.encode(image, node=self.NODE_ID, input="image")
        positions = adapter.config.get("pos", 0) if adapter.input == "hidden" else 0
        if positions and hidden.shape[1] > positions:  # the resampler's pos_emb has a row per input token
            raise FinetuneError(f"'{encoder.name}' gives {hidden.shape[1]} hidden states, more than the "
                                f"{positions} positions '{adapter.name}' was trained with", input="clip_vision_name",
                                fix=_FIX_ENCODER)
        if adapter.input == "image_embeds":  # "no image": zero image_embeds (the reference implementation's choice)
            features, zeros = embeds, torch.zeros_like(embeds[:1])
        else:  # hidden states: those of an all-zero normalised image
            features, zeros = hidden, encoder.zeros()[1]
        module = build_projection(adapter)
        cond = project(adapter, features, module=module).mean(0, keepdim=True)  # several references: tokens averaged
        uncond = project(adapter, zeros, module=module)
        out = pipe
        if adapter.extra:  # a LoRA shipped with the adapter (as IP-Adapter FaceID's): applied with it, same strength
            out = with_lora(out, self.adapter_lora(adapter, pipe), float(strength), float(strength))
        return (out.with_patch(ImagePromptPatch(adapter, cond, uncond, float(strength))),)

    def adapter_lora(self, adapter: ImageAdapter, pipe):
        """The LoRA in the adapter file's other tensors (kohya layout), for ``pipe``'s model."""
        def load():
            unet_modules, te_modules = pipe.base.module_shapes
            weights, unmatched = parse_lora(adapter.extra, adapter.metadata, family=pipe.family,
                                            unet_config=dict(pipe.base.unet.config), unet_modules=unet_modules,
                                            te_modules=te_modules, name=adapter.name, input="adapter_name")
            if unmatched or not weights.modules:
                raise FinetuneError(f"'{adapter.name}' carries tensors that are neither adapter nor a LoRA for this "
                                    f"model ({len(unmatched)} keys, e.g. {', '.join(unmatched[:3])})",
                                    input="adapter_name", fix="use the adapter made for this model")
            return weights
        return self._cached("lora", (id(adapter), id(pipe.base)), load)


NODES = [ImagePrompt]
