"""The model handle (``FT_PIPE``): shared base weights plus an ordered list of patches.

ComfyUI caches every node output and hands the same object to every consumer, so a node
must never change what it receives. A :class:`ModelHandle` therefore never owns weights:
it points at a :class:`BaseModel` (loaded once, shared by every handle made from it) and
carries an immutable tuple of patches. ``AddLoRA`` returns ``handle.with_patch(...)``, a new
handle over the same base. Patches touch the base weights only inside
:meth:`ModelHandle.patched`, which merges every LoRA delta (in fp32, rounded back to the
weight dtype) and puts the original tensors back, bit for bit, when the block exits - also on
errors and cancel. A lock per base keeps two patched sections from overlapping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .families import Family, FamilyInfo, info

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .embeddings import Embedding
    from .lora import LoraWeights


@dataclass(frozen=True, eq=False)
class BaseModel:
    """Loaded components of one checkpoint, shared by every handle made from it and read-only: its fields never
    change after loading (a trained model is a new ``BaseModel``). Only :meth:`ModelHandle.patched` changes
    weights, and the training frame changes module settings (adapters, attention processors, checkpointing),
    both temporarily and restored after."""

    family: Family
    prediction_type: str  # "epsilon" or "v_prediction"
    unet: Any
    vae: Any
    text_encoders: tuple  # (CLIPTextModel,) or (CLIPTextModel, CLIPTextModelWithProjection) for SDXL
    tokenizers: tuple
    scheduler_config: dict
    dtype: torch.dtype
    device: torch.device
    source: str  # file or folder it came from, or a built-in name
    label: str = ""  # short name for messages and metadata
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        object.__setattr__(self, "tokenizers", tuple(self.tokenizers))

    @cached_property
    def module_shapes(self) -> tuple[dict[str, tuple[int, ...]], list[dict[str, tuple[int, ...]]]]:
        """``({UNet module path: weight shape}, [{text-encoder module path: weight shape}, ...])``: the modules a
        LoRA can target, computed once per base (the architecture never changes)."""
        return module_shapes(self.unet), [module_shapes(te) for te in self.text_encoders]

    @property
    def info(self) -> FamilyInfo:
        return info(self.family)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 8 for every released SD model, 4 for the three-block shapes-tiny VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def component(self, name: str):
        """``unet``, ``te1`` or ``te2``."""
        if name == "unet":
            return self.unet
        index = {"te1": 0, "te2": 1}[name]
        if index >= len(self.text_encoders):
            raise KeyError(name)
        return self.text_encoders[index]

    @property
    def component_names(self) -> tuple[str, ...]:
        return ("unet",) + tuple(f"te{i + 1}" for i in range(len(self.text_encoders)))


def module_shapes(model) -> dict[str, tuple[int, ...]]:
    """``{module path: weight shape}`` for every module with a weight (the LoRA targets of a component)."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if getattr(m, "weight", None) is not None and hasattr(m.weight, "shape")}


@dataclass(frozen=True)
class LoraPatch:
    lora: LoraWeights
    strength_unet: float = 1.0
    strength_text: float = 1.0


@dataclass(frozen=True)
class EmbeddingPatch:
    embedding: Embedding


Patch = LoraPatch | EmbeddingPatch


@dataclass(frozen=True, eq=False)
class ModelHandle:
    """What flows along ``FT_PIPE`` links: a base model and the patches to apply on top of it."""

    base: BaseModel
    patches: tuple[Patch, ...] = ()

    @property
    def family(self) -> Family:
        return self.base.family

    def with_patch(self, patch: Patch) -> ModelHandle:
        """A new handle with ``patch`` appended; this one is unchanged."""
        return replace(self, patches=self.patches + (patch,))

    @property
    def loras(self) -> tuple[LoraPatch, ...]:
        return tuple(p for p in self.patches if isinstance(p, LoraPatch))

    @property
    def embeddings(self) -> dict[str, Embedding]:
        """Embeddings carried by this handle, by name (later patches win)."""
        return {p.embedding.name: p.embedding for p in self.patches if isinstance(p, EmbeddingPatch)}

    def signature(self) -> list:
        """What identifies the model this handle gives (for run keys and cache keys): its source with the file's
        size and modification time, label, dtype, and each patch by name, strength and a cheap content
        fingerprint (two LoRAs both named 'trained' differ)."""
        base = self.base
        try:
            st = Path(base.source).stat()
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = []
        return [base.source, stamp, base.label, str(base.dtype), self._patch_signature()]

    def _patch_signature(self) -> list:
        out = []
        for p in self.patches:
            if isinstance(p, LoraPatch):
                fp = sum(m.fingerprint() for m in p.lora.modules.values())
                out.append(["lora", p.lora.name, p.strength_unet, p.strength_text, len(p.lora.modules), repr(fp)])
            elif isinstance(p, EmbeddingPatch):
                fp = sum(float(v.detach().double().sum()) for v in p.embedding.vectors.values())
                out.append(["embedding", p.embedding.name, repr(fp)])
            else:  # other kinds (image prompts) describe themselves
                out.append(p.signature())
        return out

    def describe(self) -> str:
        parts = [self.base.label or self.base.source]
        for p in self.loras:
            parts.append(f"+ LoRA {p.lora.name} ({p.strength_unet:g}/{p.strength_text:g})")
        for name in self.embeddings:
            parts.append(f"+ embedding {name}")
        parts += [p.describe() for p in self.patches if not isinstance(p, (LoraPatch, EmbeddingPatch))]
        return " ".join(parts)

    @contextmanager
    def patched(self) -> Iterator[ModelHandle]:
        """Merge this handle's LoRAs into the base weights for the duration of the block."""
        import torch  # noqa: PLC0415

        with self.base.lock:
            saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
            try:
                with torch.no_grad():
                    for param, merged in self._merged_weights():
                        saved.append((param, param.data))
                        param.data = merged
                yield self
            finally:
                for param, original in reversed(saved):
                    param.data = original

    def _steps(self) -> dict[tuple[str, str, str], tuple[Any, list[tuple[Any, float]]]]:
        """Per target ``(component, path, "weight"|"bias")``: the parameter and its ``(module, strength)`` steps in
        patch order (strength 0 has exactly no effect and is left out)."""
        plan: dict[tuple[str, str, str], tuple[Any, list[tuple[Any, float]]]] = {}
        for patch in self.loras:
            for (component, path), module in patch.lora.modules.items():
                strength = patch.strength_unet if component == "unet" else patch.strength_text
                if strength == 0:
                    continue  # exactly no effect
                try:
                    model = self.base.component(component)
                except KeyError:
                    continue
                layer = model.get_submodule(path)
                for name in ("weight", "bias"):
                    param = getattr(layer, name, None)
                    if param is None:  # a bias difference for a layer built without a bias: nothing to change
                        continue
                    plan.setdefault((component, path, name), (param, []))[1].append((module, strength))
        return plan

    @staticmethod
    def _additive(name: str, module) -> bool:
        return name == "bias" or module.additive

    @staticmethod
    def _delta(name: str, module, strength: float, param):
        """An additive step's delta shaped like ``param`` (fp32), or None when it leaves this tensor alone."""
        d = module.delta(strength) if name == "weight" else module.bias_delta(strength)
        return None if d is None else d.reshape(param.shape)

    def _lora_deltas(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Sum every additive LoRA delta per target weight (fp32) and yield ``(parameter, delta)``. A target with a
        weight-dependent step (DoRA, OFT, BOFT, set_weight) yields its merged weight minus the base (fp32)."""
        for param, merged, total in self._merge():
            yield param, total if total is not None else merged - param.data.float()

    def _merged_weights(self) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor]]:
        """``(parameter, merged tensor in the parameter's dtype)`` per patched target; the base tensor is untouched."""
        for param, merged, total in self._merge():
            original = param.data
            if total is not None:  # additive only: one sum, one add (no other copy)
                merged = original.float() + total.to(device=original.device)
            yield param, merged.to(original.dtype)

    def _merge(self):
        """``(parameter, merged fp32 weight or None, summed delta or None)``: targets whose steps are all additive
        give their summed delta (order does not matter); the others are walked in patch order, as ComfyUI's
        ``calculate_weight`` does, each weight-dependent step seeing the weight the earlier ones left (out of place:
        the base tensor is never written)."""
        for (_, _, name), (param, steps) in self._steps().items():
            if all(self._additive(name, m) for m, _ in steps):
                total = None
                for module, strength in steps:
                    d = self._delta(name, module, strength, param)
                    if d is None:  # a LoRA changes no bias; a bias difference may leave the weight alone
                        continue
                    total = d if total is None else total + d
                if total is not None:
                    yield param, None, total
                continue
            weight = param.data.float()
            for module, strength in steps:
                if self._additive(name, module):
                    d = self._delta(name, module, strength, param)
                    if d is not None:
                        weight = weight + d.to(device=weight.device)
                else:
                    weight = module.apply(weight, strength)
            yield param, weight, None
