"""Zero-shot personalization from a face: InstantID (a face-embedding IP-Adapter plus its keypoint ControlNet)."""

from __future__ import annotations

from pathlib import Path

from .. import host
from ..core.controlnet import load_controlnet
from ..core.errors import FinetuneError
from ..core.face import detect_face, draw_kps, face_analysis, hint_to_image
from ..core.image_prompt import (
    FACE_EMBED_DIM,
    ControlHint,
    ImageAdapter,
    ImagePromptPatch,
    build_projection,
    check_adapter_fits,
    load_adapter,
    project,
)
from .base import CATEGORY, PIPE, FTNode, file_signature

NONE = "None"
#: InstantID's pipeline defaults (ip_adapter_scale, controlnet_conditioning_scale).
DEFAULT_IP_STRENGTH = 0.8
DEFAULT_CONTROLNET_STRENGTH = 0.8
_FIX_ADAPTER = ("put InstantID's ip-adapter.bin (InstantX/InstantID) in models/instantid, refresh and pick it in "
                "instantid_name")


def insightface_root() -> Path:
    """The folder FaceAnalysis reads ``models/antelopev2`` from: the first models/insightface folder."""
    return host.folder_paths_for("insightface")[0]


class InstantID(FTNode):
    NODE_ID = "FinetuneInstantID"
    DISPLAY_NAME = "InstantID (Finetune)"
    CATEGORY = f"{CATEGORY}/models"
    DESCRIPTION = ("Zero-shot personalization from one face photo, no training: InstantID's adapter turns the face's "
                   "identity embedding (insightface antelopev2) into image-prompt tokens, and its IdentityNet "
                   "ControlNet places the face by its keypoints. For SDXL: put ip-adapter.bin in models/instantid, "
                   "the ControlNet's diffusion_pytorch_model.safetensors (renamed) in models/controlnet and the "
                   "antelopev2 models in models/insightface/models/antelopev2; needs pip install insightface "
                   "onnxruntime. The input handle is not changed; ip_strength 0 with no ControlNet is exactly no "
                   "adapter.")
    RETURN_TYPES = (PIPE, "IMAGE")
    RETURN_NAMES = ("pipe", "keypoints")
    OUTPUT_TOOLTIPS = ("A new handle: the input's base and patches plus the face prompt (used by Sample).",
                       "The face keypoint image the ControlNet is given (a preview; drawn at the keypoint image's "
                       "size, resized to the sampled size when sampling).")

    @classmethod
    def INPUT_TYPES(cls):
        adapters = host.list_files("instantid")
        return {
            "required": {
                "pipe": (PIPE, {"tooltip": "The model handle to add the face prompt to (SDXL for the published "
                                           "InstantID)."}),
                "image": ("IMAGE", {"tooltip": "The face reference: the largest face in the first image gives the "
                                               "identity (and the keypoints unless kps_image is connected)."}),
                "instantid_name": (adapters or [NONE], {
                    "tooltip": "InstantID adapter from models/instantid (ip-adapter.bin, read weights-only, or a "
                               ".safetensors with image_proj.* / ip_adapter.* keys)."}),
                "controlnet_name": ([NONE] + host.list_files("controlnet"), {
                    "default": NONE,
                    "tooltip": "InstantID's IdentityNet ControlNet from models/controlnet (diffusers layout: its "
                               "diffusion_pytorch_model.safetensors, renamed, or a sub-folder with config.json). "
                               "'None': the adapter alone."}),
                "ip_strength": ("FLOAT", {"default": DEFAULT_IP_STRENGTH, "min": 0.0, "max": 5.0, "step": 0.05,
                                          "tooltip": "How strongly the face identity steers (InstantID's "
                                                     "ip_adapter_scale). Lower it when the prompt is not followed."}),
                "controlnet_strength": ("FLOAT", {
                    "default": DEFAULT_CONTROLNET_STRENGTH, "min": 0.0, "max": 5.0, "step": 0.05,
                    "tooltip": "How strongly the ControlNet holds the face's keypoints and identity "
                               "(controlnet_conditioning_scale). 0 = no ControlNet."}),
            },
            "optional": {
                "kps_image": ("IMAGE", {"tooltip": "Take the face keypoints (the pose) from this image instead of "
                                                   "the reference; its largest face is used."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, instantid_name="", controlnet_name=NONE, **_):
        parts = [str(instantid_name), str(controlnet_name),
                 file_signature(host.resolve_model("instantid", instantid_name))]
        if controlnet_name != NONE:
            parts.append(file_signature(host.resolve_model("controlnet", controlnet_name)))
        return "|".join(parts)

    def __init__(self) -> None:
        self._cache: dict[str, tuple] = {}  # "adapter"/"controlnet" -> (key, loaded): the last file of each

    def _cached(self, what: str, key, load):
        hit = self._cache.get(what)
        if hit is None or hit[0] != key:
            self._cache.pop(what, None)  # let the old one go before loading the next
            hit = (key, load())
            self._cache[what] = hit
        return hit[1]

    def adapter(self, instantid_name: str) -> ImageAdapter:
        path = host.resolve_model("instantid", instantid_name) if instantid_name != NONE else None
        if path is None or not path.is_file():
            raise FinetuneError(f"InstantID adapter '{instantid_name}' was not found in models/instantid",
                                input="instantid_name", fix=_FIX_ADAPTER)
        return self._cached("adapter", (str(path), file_signature(path)),
                            lambda: load_adapter(path, node=self.NODE_ID, input="instantid_name"))

    def controlnet(self, controlnet_name: str, unet):
        path = host.resolve_model("controlnet", controlnet_name)
        if path is None:
            raise FinetuneError(f"ControlNet '{controlnet_name}' was not found in models/controlnet",
                                input="controlnet_name", fix="put InstantID's ControlNet in models/controlnet and "
                                "refresh, or pick 'None'")
        key = (str(path), file_signature(path), id(unet), str(unet.dtype))
        return self._cached("controlnet", key,
                            lambda: load_controlnet(path, unet, node=self.NODE_ID, input="controlnet_name"))

    def run(self, pipe, image, instantid_name="", controlnet_name=NONE, ip_strength=DEFAULT_IP_STRENGTH,
            controlnet_strength=DEFAULT_CONTROLNET_STRENGTH, kps_image=None):
        import torch  # noqa: PLC0415

        adapter = self.adapter(instantid_name)
        if adapter.input != "face":
            raise FinetuneError(f"'{adapter.name}' is an ordinary {adapter.label} file (it reads a CLIP image "
                                f"encoding, not a {FACE_EMBED_DIM}-wide face embedding)", input="instantid_name",
                                fix="use it with the Image Prompt (IP-Adapter) node; here pick InstantID's "
                                "ip-adapter.bin")
        unet = pipe.base.unet
        if getattr(unet.config, "encoder_hid_dim_type", None) is not None:
            raise FinetuneError(f"{pipe.family.label} projects its text context inside the UNet, which InstantID's "
                                "image tokens cannot join", input="pipe", fix="use InstantID with an SDXL model")
        check_adapter_fits(adapter, unet, family_label=pipe.family.label, node=self.NODE_ID,
                           input="instantid_name")
        use_control = controlnet_name not in (None, "", NONE) and controlnet_strength != 0
        controlnet = self.controlnet(controlnet_name, unet) if use_control else None

        app = face_analysis(insightface_root(), node=self.NODE_ID, input="image")
        embedding, kps = detect_face(image, app, node=self.NODE_ID, input="image")
        size = (int(image.shape[2]), int(image.shape[1]))
        if kps_image is not None:
            _, kps = detect_face(kps_image, app, node=self.NODE_ID, input="kps_image")
            size = (int(kps_image.shape[2]), int(kps_image.shape[1]))
        hint = draw_kps(*size, kps)
        preview = hint_to_image(hint)
        if ip_strength == 0 and controlnet is None:  # exactly no adapter
            return (pipe, preview)

        module = build_projection(adapter)
        cond = project(adapter, embedding.float().reshape(1, FACE_EMBED_DIM), module=module)
        uncond = project(adapter, torch.zeros(1, FACE_EMBED_DIM), module=module)  # "no face": a zero embedding
        control = ControlHint(controlnet, hint, float(controlnet_strength)) if controlnet is not None else None
        patch = ImagePromptPatch(adapter, cond, uncond, float(ip_strength), control)
        return (pipe.with_patch(patch), preview)


NODES = [InstantID]
