"""LoRAs against a loaded model handle: parse a file for the handle's modules, check families."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FinetuneError
from .families import check_family
from .handle import EmbeddingPatch, LoraPatch, module_shapes
from .lora import LoraWeights, lora_from_file, module_misfit

if TYPE_CHECKING:  # pragma: no cover
    from .handle import ModelHandle


__all__ = ["module_shapes", "lora_for_handle", "check_family", "check_fits", "with_lora"]


def _targets(handle: ModelHandle):
    return handle.base.module_shapes


def lora_for_handle(path: str | Path, handle: ModelHandle, *, node: str | None = None, input: str = "lora_name"
                    ) -> tuple[LoraWeights, list[str]]:
    """Load ``path`` as a LoRA for ``handle``'s model; returns the weights and the keys that matched nothing."""
    unet_modules, te_modules = _targets(handle)
    weights, unmatched = lora_from_file(path, family=handle.family, unet_config=dict(handle.base.unet.config),
                                        unet_modules=unet_modules, te_modules=te_modules, input=input)
    if not weights.modules:
        raise FinetuneError(f"no key of '{Path(path).name}' matches a module of this {handle.family.label} model "
                            f"({len(unmatched)} keys, e.g. {', '.join(unmatched[:3])})", node=node, input=input,
                            fix="check that the file is a LoRA for this model family")
    return weights, unmatched


def check_fits(lora: LoraWeights, handle: ModelHandle, *, node: str | None = None, input: str = "lora") -> None:
    """Refuse a LoRA (e.g. one trained in the graph) made for another family, or whose modules are not in this model
    or have other shapes (trained on another model)."""
    check_family("LoRA", lora.family, handle.family, node=node, input=input)
    unet_modules, te_modules = _targets(handle)
    shapes = {"unet": unet_modules, **{f"te{i + 1}": m for i, m in enumerate(te_modules)}}
    bad = []
    for (comp, path), module in lora.modules.items():
        target = shapes.get(comp, {}).get(path)
        if target is None:
            bad.append(f"{comp}:{path} (no such layer)")
            continue
        why = module_misfit(module, target) or module.dora_misfit(target)
        if why is not None:
            bad.append(f"{comp}:{path} ({why})")
    if bad:
        raise FinetuneError(f"this LoRA does not fit the model: {len(bad)} of {len(lora.modules)} layers differ, e.g. "
                            + "; ".join(bad[:3]), node=node, input=input,
                            fix="use the LoRA with the model it was trained on (same architecture and size)")


def with_lora(handle: ModelHandle, lora: LoraWeights, strength_unet: float = 1.0, strength_text: float = 1.0
              ) -> ModelHandle:
    """``handle`` with ``lora`` added, and the embeddings bundled with it (pivotal tuning's word): their prompt words
    work while the LoRA is on the handle, whatever its strengths, as in A1111."""
    out = handle.with_patch(LoraPatch(lora, float(strength_unet), float(strength_text)))
    for embedding in lora.embeddings.values():
        out = out.with_patch(EmbeddingPatch(embedding))
    return out
