"""The optimisation loop every trainer shares.

A trainer supplies an :class:`Objective` (its trainable parameters and a loss for one batch);
this module owns everything else: leaving ComfyUI's inference mode, optimizer and learning-rate
schedule, mixed precision, gradient accumulation, progress with the loss, cancel, NaN checks,
periodic validation and resumable checkpoints.

Checkpoints hold the trainable tensors, the optimizer state, the step and the loss history. They
are written atomically (temp file + rename) on cancel, every ``save_every`` steps and at the end
when ``save_every`` is set, and are loaded with ``torch.load(weights_only=True)``. Randomness is
derived from (seed, step), so a resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from .. import host
from ..core.errors import FinetuneError
from .settings import TrainSettings

log = logging.getLogger("comfy_finetune")


class Objective(Protocol):
    def param_groups(self) -> list[dict]: ...

    def loss(self, step: int, batch: Any, generator: torch.Generator) -> torch.Tensor: ...

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainResult:
    steps_done: int
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    validation: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    checkpoint: Path | None = None
    resumed_from: int = 0


def run_key(*parts: Any) -> str:
    """A stable hash of what defines a run (base, data, settings), naming its checkpoint file."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_path(kind: str, key: str) -> Path:
    return host.output_dir() / "finetune_checkpoints" / f"{kind}-{key}.pt"


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path) -> dict:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def lr_lambda(settings: TrainSettings) -> Callable[[int], float]:
    warm, total, kind = settings.warmup_steps, settings.steps, settings.lr_schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def make_optimizer(groups: list[dict], settings: TrainSettings, node: str) -> torch.optim.Optimizer:
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=1e-2)
    if settings.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415
        except Exception as exc:  # noqa: BLE001
            raise FinetuneError("8-bit AdamW needs the bitsandbytes package, which is not installed", node=node,
                                input="optimizer", fix="pip install bitsandbytes, or choose adamw") from exc
        return bnb.optim.AdamW8bit(groups, lr=settings.learning_rate, weight_decay=1e-2)
    try:
        from prodigyopt import Prodigy  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        raise FinetuneError("Prodigy needs the prodigyopt package, which is not installed", node=node,
                            input="optimizer", fix="pip install prodigyopt, or choose adamw") from exc
    return Prodigy(groups, lr=settings.learning_rate, weight_decay=1e-2)


def autocast_for(settings: TrainSettings, device: torch.device):
    if settings.precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """Randomness for one micro-step, a pure function of (seed, step) so resume is exact."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + step * 101 + micro) & 0x7FFF_FFFF_FFFF_FFFF)


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Leave ComfyUI's inference mode and enable autograd for the duration (host doc 3.5)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def train(objective: Objective, batches: Callable[[int], Iterator[Any]], settings: TrainSettings, *, node: str,
          device: torch.device, checkpoint: Path | None = None,
          validate: Callable[[int], torch.Tensor] | None = None,
          extra_state: Callable[[], dict] | None = None) -> TrainResult:
    """Run ``settings.steps`` optimizer steps of ``objective`` over ``batches(first)``, an endless iterator
    starting at micro-batch ``first`` (so a resumed run sees the same data as an uninterrupted one).

    On cancel the state reached is written to ``checkpoint`` (if given) and the interrupt re-raised.
    """
    settings.validate(node)
    groups = objective.param_groups()
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise FinetuneError("nothing to train", node=node, fix="check the training targets")
    optimizer = make_optimizer(groups, settings, node)
    factor = lr_lambda(settings)
    base_lrs = [g.get("lr", settings.learning_rate) for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    result = TrainResult(steps_done=0)

    start = 0
    if checkpoint is not None and settings.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        objective.load_trainable_state(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = min(int(state["step"]), settings.steps)
        result.losses, result.lrs = list(state.get("losses", [])), list(state.get("lrs", []))
        result.resumed_from = start
        log.info("[%s] resumed from %s at step %d", node, checkpoint, start)

    def save(step: int) -> None:
        if checkpoint is None:
            return
        state = {"step": step, "trainable": {k: v.detach().cpu() for k, v in objective.trainable_state().items()},
                 "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                 "losses": result.losses, "lrs": result.lrs, "settings": settings.as_metadata()}
        if extra_state is not None:
            state.update(extra_state())
        atomic_torch_save(state, checkpoint)
        result.checkpoint = checkpoint

    it = batches(start * settings.grad_accum)
    step = start
    t0 = time.perf_counter()
    with host.Progress(settings.steps, desc=node) as bar:
        if start:
            bar.update(start)
        try:
            for step in range(start, settings.steps):
                for g, lr0 in zip(optimizer.param_groups, base_lrs):
                    g["lr"] = lr0 * factor(step)
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for micro in range(settings.grad_accum):
                    batch = next(it)
                    with autocast_for(settings, device):
                        loss = objective.loss(step, batch, step_generator(settings.seed, step, micro))
                    if not torch.isfinite(loss):
                        cause = ("fp16 overflow: use precision bf16 or fp32" if settings.precision == "fp16"
                                 else f"learning rate {settings.learning_rate:g} may be too high")
                        raise FinetuneError(f"the loss became {float(loss.detach())} at step {step + 1}", node=node,
                                            input="learning_rate", fix=f"{cause}; lower learning_rate or resume "
                                            "from the last checkpoint")
                    scaler.scale(loss / settings.grad_accum).backward()
                    total += float(loss.detach()) / settings.grad_accum
                scaler.step(optimizer)
                scaler.update()
                result.losses.append(total)
                result.lrs.append(optimizer.param_groups[0]["lr"])
                done = step + 1
                result.steps_done = done
                elapsed = time.perf_counter() - t0
                rate = (done - start) / elapsed if elapsed > 0 else 0.0
                eta = (settings.steps - done) / rate if rate > 0 else 0.0
                host.send_event("comfy_finetune.train", {"node": node, "step": done, "steps": settings.steps,
                                                         "loss": total, "lr": result.lrs[-1],
                                                         "images_per_second": rate * settings.batch_size
                                                         * settings.grad_accum, "eta_seconds": eta})
                if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                    save(done)
                if validate is not None and settings.validate_every and done % settings.validate_every == 0:
                    result.validation.append((done, validate(done)))
                bar.update(1, loss=total, lr=result.lrs[-1])
        except host.interrupt_exception_types():
            save(result.steps_done or start)
            if checkpoint is not None:
                log.warning("[%s] cancelled at step %d; resumable checkpoint: %s", node,
                            result.steps_done or start, checkpoint)
            raise
    result.steps_done = settings.steps
    if settings.save_every:
        save(settings.steps)
    return result
