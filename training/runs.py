"""Orchestration shared by the training nodes: memory, inference mode, patches, validation, results."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable

import torch

from .. import host
from ..core.errors import FinetuneError
from ..core.sampling import SampleSettings, sample_patched
from .loop import TrainResult, checkpoint_path, run_key, train, training_mode
from .memory import check as check_memory
from .settings import TrainSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..core.handle import ModelHandle
    from .data import TrainingSet

log = logging.getLogger("comfy_finetune")


# Validation samples during training use exactly the Sample settings (same sampling path and negative as after
# training), one image per validation step.
Validation = SampleSettings


_VALIDATION_INPUTS = {"sampler_name": "validation_sampler", "scheduler": "validation_scheduler",
                      "width": "validation_size", "height": "validation_size", "steps": "validation_steps",
                      "batch_size": "validation_size", "cfg": "validation_cfg"}


def check_validation(validation: Validation, handle: "ModelHandle", node: str) -> None:
    """Refuse bad validation settings before training starts, naming the trainer's validation_* input."""
    from ..core.sampling import make_scheduler  # noqa: PLC0415

    try:
        validation.validate(node)
        make_scheduler(handle.base.scheduler_config, validation.sampler, validation.scheduler, node=node)
    except FinetuneError as exc:
        raise FinetuneError(exc.detail, node=node, input=_VALIDATION_INPUTS.get(exc.input or "", exc.input),
                            fix=exc.fix) from exc


def check_dataset(dataset: "TrainingSet", settings: TrainSettings, node: str) -> None:
    if dataset is None or len(dataset) == 0:
        raise FinetuneError("the training set is empty", node=node, input="dataset",
                            fix="connect a Training Data node with at least one image")
    available = len(dataset) * max(1, int(getattr(dataset, "repeats", 1)))
    if available < settings.batch_size:
        raise FinetuneError(f"batch_size {settings.batch_size} is larger than the {len(dataset)} training images "
                            f"(x{getattr(dataset, 'repeats', 1)} repeats)", node=node, input="batch_size",
                            fix=f"use batch_size {available} or less, or add images/repeats")


def dataset_signature(dataset: "TrainingSet") -> list:
    """What identifies a training set for checkpoint keys: names, captions and pixel checksums."""
    sig = getattr(dataset, "signature", None)
    if callable(sig):
        return [sig()]
    return [[ex.name, ex.caption, float(ex.pixels.double().sum())] for ex in dataset.examples]


def patch_signature(handle: "ModelHandle") -> list:
    """The handle's patches by name, strength and a cheap content fingerprint (two LoRAs named 'trained' differ)."""
    from ..core.handle import EmbeddingPatch, LoraPatch  # noqa: PLC0415

    out = []
    for p in handle.patches:
        if isinstance(p, LoraPatch):
            fp = sum(float(m.down.double().sum()) + 3.0 * float(m.up.double().sum()) for m in p.lora.modules.values())
            out.append(["lora", p.lora.name, p.strength_unet, p.strength_text, len(p.lora.modules), repr(fp)])
        elif isinstance(p, EmbeddingPatch):
            fp = sum(float(v.double().sum()) for v in p.embedding.vectors.values())
            out.append(["embedding", p.embedding.name, repr(fp)])
    return out


def base_signature(handle: "ModelHandle") -> list:
    """What identifies the model a run trains on: its source (with the file's size and mtime), dtype, patches."""
    from pathlib import Path  # noqa: PLC0415

    base = handle.base
    try:
        st = Path(base.source).stat()
        stamp = [st.st_size, st.st_mtime_ns]
    except OSError:
        stamp = []
    return [base.source, stamp, base.label, str(base.dtype), patch_signature(handle)]


def run_training(kind: str, handle: "ModelHandle", dataset: "TrainingSet", settings: TrainSettings, objective,
                 *, node: str, config: dict, validation: Validation | None = None,
                 finish: Callable[[], object]) -> tuple[object, TrainResult]:
    """Common frame of every trainer: free the host's models, leave inference mode, apply the handle's
    patches, attach the objective, run the loop, build the result with ``finish()`` while still attached."""
    settings.validate(node)
    check_dataset(dataset, settings, node)
    key = run_key(kind, base_signature(handle), dataset_signature(dataset), config,
                  {k: v for k, v in asdict(settings).items()
                   if k not in ("steps", "save_every", "validate_every", "resume", "nan_policy")})
    ckpt = checkpoint_path(kind, key)
    host.free_host_models()
    device = handle.base.device

    if validation is not None and validation.prompt:
        check_validation(validation, handle, node)

    def validate(step: int) -> torch.Tensor:
        # cancellable between sampling steps, like everything else in the loop; offloaded frozen parts come back
        with getattr(objective, "frozen_on_device", contextlib.nullcontext)():
            return sample_patched(handle, validation, node=node, progress=lambda i, n: host.check_interrupt())

    try:
        with training_mode(), handle.patched(), objective.attached():
            check_memory(handle, dataset, settings, objective, node=node, device=device)  # before any step
            result = train(objective, lambda first: dataset.batches(settings.batch_size, settings.seed, first), settings,
                           node=node, device=device, checkpoint=ckpt,
                           validate=validate if validation is not None and validation.prompt else None)
            if validation is not None and validation.prompt and (not result.validation
                                                                 or result.validation[-1][0] != settings.steps):
                result.validation.append((settings.steps, validate(settings.steps)))
            output = finish()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return_freed_memory()
    return output, result


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (Linux/glibc ``malloc_trim``). glibc keeps freed memory in its arenas,
    so without this a run's peak (activations, optimizer state) stays in the process's resident memory after the
    run ends, is cancelled or fails, although nothing uses it; measured in ComfyUI: 400 of 520 MB kept."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
