"""Speed and memory options as context managers, each undone when its block exits.

The training frame (:mod:`.frame`) applies them once, to the modules an objective declares: SDPA attention,
gradient checkpointing, channels-last and ``torch.compile`` on its denoiser (and checkpointing on every module
backprop runs through), and :class:`Offload` of its frozen modules. Every one of them changes a shared module
only for the block and puts back what was there before, so other handles on the same base never see a
training run's settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch


# ---------------------------------------------------------------------------------------------- attention
def ensure_sdpa(unet: torch.nn.Module) -> int:
    """Put PyTorch's fused scaled-dot-product attention (diffusers ``AttnProcessor2_0``) on every attention layer
    still using the plain processor; returns how many were changed (0 when SDPA is already used everywhere)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0  # noqa: PLC0415 - heavy

    procs = getattr(unet, "attn_processors", None)  # diffusers models only
    if not procs:
        return 0
    plain = [k for k, p in procs.items() if type(p) is AttnProcessor]
    if plain:
        unet.set_attn_processor({k: (AttnProcessor2_0() if type(p) is AttnProcessor else p) for k, p in procs.items()})
    return len(plain)


@contextlib.contextmanager
def sdpa(unet: torch.nn.Module) -> Iterator[int]:
    """:func:`ensure_sdpa` for the block; the processors that were there before are put back after."""
    before = dict(getattr(unet, "attn_processors", None) or {})
    changed = ensure_sdpa(unet)
    try:
        yield changed
    finally:
        if changed:
            unet.set_attn_processor(before)


# ---------------------------------------------------------------------------------------------- checkpointing
def checkpointing_enabled(model: torch.nn.Module) -> bool:
    """Whether diffusers' or transformers' gradient checkpointing is on anywhere in ``model``."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def enable_checkpointing(model: torch.nn.Module) -> bool:
    """Gradient checkpointing on a diffusers or transformers model (non-reentrant); False if it has none."""
    if hasattr(model, "enable_gradient_checkpointing"):
        model.enable_gradient_checkpointing()
        return True
    if hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Undo gradient checkpointing completely, including the input-embedding hook transformers adds for it."""
    if hasattr(model, "disable_gradient_checkpointing"):
        model.disable_gradient_checkpointing()
    else:
        model.gradient_checkpointing_disable()
    if getattr(model, "_require_grads_hook", None) is not None and hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


@contextlib.contextmanager
def checkpointing(models: Iterable[torch.nn.Module]) -> Iterator[list[torch.nn.Module]]:
    """Gradient checkpointing on ``models`` for the block (those that had it already keep it after)."""
    enabled: list[torch.nn.Module] = []
    try:
        for model in models:
            if not checkpointing_enabled(model) and enable_checkpointing(model):
                enabled.append(model)
        yield enabled
    finally:
        for model in enabled:
            disable_checkpointing(model)


# ---------------------------------------------------------------------------------------------- memory format
@contextlib.contextmanager
def channels_last(module: torch.nn.Module, on: bool) -> Iterator[None]:
    """``module``'s 4-D weights in channels-last memory format for the block (faster convolutions on CUDA),
    contiguous again after. Parameters keep their identity (an optimizer built before still holds them)."""
    if not on:
        yield
        return
    try:
        module.to(memory_format=torch.channels_last)
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


def is_channels_last(module) -> bool:
    """Whether a UNet's first convolution is in channels-last memory format (so its inputs should be too)."""
    conv = getattr(module, "conv_in", None)
    w = getattr(conv, "weight", None)
    return w is not None and w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and \
        not w.is_contiguous()


# ---------------------------------------------------------------------------------------------- compile
def maybe_compile(module: torch.nn.Module, on: bool):
    """``torch.compile(module)`` when ``on`` (backend from ``COMFY_FINETUNE_COMPILE_BACKEND``, default inductor),
    else ``module``. The compiled wrapper shares the module's parameters and leaves the module itself as it was."""
    if not on:
        return module
    backend = os.environ.get("COMFY_FINETUNE_COMPILE_BACKEND", "inductor")
    return torch.compile(module, backend=backend)


# ---------------------------------------------------------------------------------------------- offload
class Offload:
    """Frozen modules moved to the CPU for a block (``offloaded``), and back on the device when needed."""

    def __init__(self, modules: Iterable[torch.nn.Module | None], device: torch.device) -> None:
        self.modules = [m for m in modules if m is not None]
        self.device = device
        self.active = False

    def keep(self, modules: Iterable[torch.nn.Module]) -> None:
        """Leave ``modules`` on the device (something still needs them every step)."""
        keep = {id(m) for m in modules}
        self.modules = [m for m in self.modules if id(m) not in keep]

    def _move(self, device, modules: list[torch.nn.Module] | None = None) -> None:
        for m in self.modules if modules is None else modules:
            torch.nn.Module.to(m, device=device)  # nn.Module.to: diffusers' override refuses some moves

    @contextlib.contextmanager
    def offloaded(self) -> Iterator[Offload]:
        try:
            self._move("cpu")  # (a no-op when training on the CPU)
            self.active = True
            yield self
        finally:
            self.active = False
            self._move(self.device)

    @contextlib.contextmanager
    def on_device(self, modules: Iterable[torch.nn.Module] | None = None) -> Iterator[None]:
        """The offloaded ``modules`` (default: all) on the training device for the block: a cache miss brings
        back only its own encoder, validation samples everything."""
        wanted = None if modules is None else {id(m) for m in modules}
        back = [m for m in self.modules if wanted is None or id(m) in wanted] if self.active else []
        if not back:
            yield
            return
        try:
            self._move(self.device, back)
            yield
        finally:
            self._move("cpu", back)


def on_device(offload: Offload | None, modules: Iterable[torch.nn.Module] | None = None):
    """``offload.on_device(modules)``, or nothing to do without an offload."""
    return offload.on_device(modules) if offload is not None else contextlib.nullcontext()
