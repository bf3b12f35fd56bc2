"""Key grammar of LoRA files: which tensor a key holds and which model module it adapts.

A LoRA key is ``<module key><part suffix>``. The part is ``down``/``up``/``mid``/``alpha`` or one of the other
adapter kinds' parts (:data:`PART_SUFFIXES`); the module key names one module in one of several spellings (kohya
``lora_unet_<path with _>``, diffusers/PEFT dotted paths with ``unet.``/``text_encoder(_2).`` prefixes, ComfyUI's
generic ``diffusion_model.<LDM path>``). :class:`ModuleResolver` turns any of them into ``(component, path)`` where
``path`` is a name from the loaded model's ``named_modules()``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

from torch import Tensor

from .families import Family
from .ldm_names import invert, unet_name_map

COMPONENTS = ("unet", "te1", "te2")

#: Part suffixes, most specific first: (suffix, part).
PART_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_down", "down"), (".lora_up", "up"), (".lora_mid", "mid"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),  # old attention processors: to_q_lora.down.weight
    (".alpha", "alpha"),
    # LyCORIS LoHa / LoKr / OFT / BOFT, DoRA magnitudes, full differences and replacement weights
    # (core/adapters.py); each name ends differently from the others
    *((f".{p}", p) for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "lokr_w1",
                            "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "diff",
                            "diff_b", "dora_scale", "oft_blocks", "rescale", "w_norm", "b_norm", "set_weight")),
    # ComfyUI pads a layer's weight to this shape before a LoRA; a loaded model's layers keep their shapes here, so
    # it is read only to be reported with its module as not applied
    (".reshape_weight", "reshape_weight"),
)

#: kohya prefix -> component index (lora_te_ is the only/first text encoder).
KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
#: diffusers/PEFT dotted prefixes -> component.
DOTTED_PREFIXES = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"))
#: ComfyUI generic text-encoder prefixes (its internal CLIP names) -> component.
COMFY_TE_PREFIXES = (("text_encoders.clip_l.transformer.", "te1"), ("text_encoders.clip_h.transformer.", "te1"),
                     ("text_encoders.clip_g.transformer.", "te2"))
_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def split_part(key: str) -> tuple[str, str] | None:
    """``(module key, part)`` for a LoRA tensor key, or None if the key is not a LoRA part we read."""
    for suffix, part in PART_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def canonical_te_path(path: str) -> str:
    """HF CLIP module path with ``text_model.`` (what kohya and diffusers files spell), whatever transformers does.

    transformers 5.x ``CLIPTextModel`` has no ``text_model`` submodule (``encoder.layers.0...``), while
    ``CLIPTextModelWithProjection`` has (``text_model.encoder.layers.0...`` and a top-level ``text_projection``).
    """
    if path.startswith("text_model.") or path == "text_projection":
        return path
    return "text_model." + path


def te_target_name(path: str) -> str:
    """A text-encoder module name that suffix-matches both transformers layouts (for PEFT target_modules)."""
    return path.removeprefix("text_model.")


def _names_and_shapes(modules: Collection[str] | Mapping[str, Any] | None) -> tuple[set[str], dict[str, tuple]]:
    if modules is None:
        return set(), {}
    if isinstance(modules, Mapping):
        return set(modules), {k: tuple(v) for k, v in modules.items() if v is not None}
    return set(modules), {}


class ModuleResolver:
    """Resolves module keys of any supported spelling to ``(component, model module path)``.

    Args:
        unet_config: the UNet's config; needed for LDM/SGM names (kohya SDXL, ComfyUI ``diffusion_model.``).
        unet_modules: module names of the UNet (``named_modules()``), or a mapping name -> weight shape; None
            means every weighted module of ``unet_config``.
        te_modules: per text encoder (te1, te2), the same as ``unet_modules``.
    """

    def __init__(self, unet_config: Mapping[str, Any] | None, unet_modules: Collection[str] | Mapping[str, Any] | None,
                 te_modules: list[Collection[str] | Mapping[str, Any]] | None):
        ldm = unet_name_map(unet_config) if unet_config is not None else {}
        names, self.unet_shapes = _names_and_shapes(unet_modules)
        self.unet = {n for n in names if n} or set(ldm)
        self.ldm_to_unet = {l_name: d for l_name, d in invert(ldm).items() if d in self.unet}
        self.unet_underscore = {p.replace(".", "_"): p for p in self.unet}
        self.unet_underscore.update({l_name.replace(".", "_"): d for l_name, d in self.ldm_to_unet.items()})
        self.te: list[dict[str, str]] = []  # canonical path -> model path
        self.te_underscore: list[dict[str, str]] = []
        self.te_shapes: list[dict[str, tuple]] = []
        for mods in te_modules or []:
            te_names, shapes = _names_and_shapes(mods)
            canon = {canonical_te_path(p): p for p in te_names if p}
            self.te.append(canon)
            self.te_underscore.append({c.replace(".", "_"): p for c, p in canon.items()})
            self.te_shapes.append(shapes)

    def _te(self, comp: str) -> int | None:
        idx = 0 if comp == "te1" else 1
        return idx if idx < len(self.te) else None

    def shape(self, comp: str, path: str) -> tuple | None:
        """The target weight shape if the caller gave shapes, else None."""
        if comp == "unet":
            return self.unet_shapes.get(path)
        idx = self._te(comp)
        return self.te_shapes[idx].get(path) if idx is not None else None

    def resolve(self, module_key: str) -> tuple[str, str] | None:
        """``(component, path)`` for a module key, or None when it names nothing in these models."""
        for prefix, comp in KOHYA_PREFIXES:
            if module_key.startswith(prefix):
                name = module_key[len(prefix):]
                if comp == "unet":
                    path = self.unet_underscore.get(name)
                    return (comp, path) if path else None
                idx = self._te(comp)
                path = self.te_underscore[idx].get(name) if idx is not None else None
                return (comp, path) if path else None
        if module_key.startswith("diffusion_model."):
            path = self.ldm_to_unet.get(module_key[len("diffusion_model."):])
            return ("unet", path) if path else None
        for prefix, comp in COMFY_TE_PREFIXES:
            if module_key.startswith(prefix):
                return self._dotted_te(comp, module_key[len(prefix):])
        key = module_key.removeprefix("base_model.model.")
        for prefix, comp in DOTTED_PREFIXES:
            if key.startswith(prefix):
                rest = key[len(prefix):].removeprefix("base_model.model.")
                return self._dotted_unet(rest) if comp == "unet" else self._dotted_te(comp, rest)
        return self._dotted_unet(key)  # bare paths are UNet paths (PEFT get_peft_model_state_dict of a UNet)

    def _dotted_unet(self, path: str) -> tuple[str, str] | None:
        # Old attention-processor spelling: attn1.processor.to_q(_lora) / processor.to_out(_lora).
        path = path.replace(".processor.", ".")
        if path.endswith(".to_out"):
            path += ".0"
        return ("unet", path) if path in self.unet else None

    def _dotted_te(self, comp: str, path: str) -> tuple[str, str] | None:
        idx = self._te(comp)
        if idx is None:
            return None
        head, _, last = path.rpartition(".")
        if head.endswith("self_attn") and last in _OLD_TE_ATTN:  # old processor spelling self_attn.to_q_lora
            path = f"{head}.{_OLD_TE_ATTN[last]}"
        found = self.te[idx].get(canonical_te_path(path))
        return (comp, found) if found else None


# ------------------------------------------------------------------------------------------------- family signals

_WIDTH_FAMILY = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}


def family_from_metadata(metadata: Mapping[str, str]) -> Family | None:
    """kohya ``ss_base_model_version``/``ss_v2`` or ModelSpec ``modelspec.architecture``."""
    version = str(metadata.get("ss_base_model_version", "")).lower()
    arch = str(metadata.get("modelspec.architecture", "")).lower()
    if version.startswith("kolors") or arch.startswith("kolors"):
        return Family.KOLORS
    if version.startswith("sdxl"):
        return Family.SDXL
    if version.startswith("sd_v2"):
        return Family.SD2
    if version.startswith("sd_v1"):
        return Family.SD1
    if arch.startswith("stable-diffusion-xl"):
        return Family.SDXL
    if arch.startswith("stable-diffusion-v2"):
        return Family.SD2
    if arch.startswith("stable-diffusion-v1"):
        return Family.SD1
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return Family.SD2
    return None


def _input_width(parts: Mapping[str, tuple[int, ...]]) -> int | None:
    """A Linear module's input width from its LoRA / LoHa / LoKr factor shapes (None when they do not tell):
    ``down [r, in]``; ``hada_w1_b [r, in]``; LoKr ``in = i1 * i2`` from ``lokr_w1 [o1, i1]`` or
    ``lokr_w1_b [r, i1]`` and ``lokr_w2 [o2, i2]`` or ``lokr_w2_b [r, i2]``."""
    for part in ("down", "hada_w1_b"):
        shape = parts.get(part)
        if shape is not None and len(shape) >= 2:
            return shape[1] if len(shape) == 2 or all(s == 1 for s in shape[2:]) else None
    i1 = parts.get("lokr_w1", parts.get("lokr_w1_b"))
    i2 = parts.get("lokr_w2", parts.get("lokr_w2_b"))
    if i1 is not None and i2 is not None and len(i1) == 2 and len(i2) == 2 and "lokr_t2" not in parts:
        return i1[1] * i2[1]
    return None


def detect_lora_family(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str]) -> tuple[Family | None, str]:
    """Guess the family a LoRA was trained for: ``(family or None, the evidence in words)``.

    Evidence, strongest first: cross-attention ``to_k`` input width of a UNet module (768 SD1, 1024 SD2,
    2048 SDXL); a second text encoder (SDXL); a 1024-wide text encoder (SD2); the file's metadata.
    """
    te2 = False
    te_width: int | None = None
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        split = split_part(key)
        if split is not None and hasattr(tensor, "shape"):
            groups.setdefault(split[0], {})[split[1]] = tuple(int(s) for s in tensor.shape)
    for module, parts in groups.items():
        if module.startswith(("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")):
            te2 = True
        width = _input_width(parts)
        if width is None:
            continue
        if re.search(r"attn2[._]to_k$", module) or re.search(r"attn2[._]processor[._]to_k$", module):
            family = _WIDTH_FAMILY.get(width)
            if family is Family.SDXL and family_from_metadata(metadata) is Family.KOLORS:
                return Family.KOLORS, "its metadata says Kolors (whose cross-attention is SDXL's 2048)"
            if family is not None:
                return family, f"its cross-attention input width is {width}"
        elif module.startswith(("lora_te_", "lora_te1_", "text_encoder.")) and re.search(r"q_proj$", module):
            te_width = width
    if te2:
        return Family.SDXL, "it adapts a second text encoder"
    if te_width == 1024:
        return Family.SD2, "its text encoder is 1024 wide"
    family = family_from_metadata(metadata)
    if family is not None:
        return family, "its metadata says so"
    return None, ""
