"""The optimisation loop every trainer shares.

The training frame (:mod:`.frame`) hands it a :class:`Trainable` (trainable parameters and a loss for one
batch); this module owns the optimisation: optimizer and learning-rate schedule, mixed precision, gradient
accumulation, progress with the loss, cancel, NaN checks, periodic validation, in-loop scoring with the best
checkpoint kept (:class:`Scoring`, :mod:`.selection`) and resumable checkpoints.

Checkpoints hold the trainable tensors, the optimizer state, the step and the loss history. They
are written atomically (:func:`~..core.atomic.atomic_write`: temp file + rename) on cancel, every ``save_every``
steps and at the end when ``save_every`` is set, and are loaded with ``torch.load(weights_only=True)``.
Randomness is derived from (seed, step), so a resumed run follows the same trajectory as an uninterrupted
one - also after the process was killed: the last checkpoint is always whole, and temp files a killed
process left beside it are removed by the next run.

Faults end in a :class:`FinetuneError` naming the node, the step and the fix:

* a NaN/inf loss stops the run (``nan_policy="stop"``), or (``"rollback"``) restores the last good state
  kept in memory, halves the learning rate and goes on, at most ``MAX_ROLLBACKS`` times;
* a full disk while writing a checkpoint keeps the previous checkpoint;
* out of memory releases the optimizer, gradients and graph before the error leaves :func:`train`,
  and the error lists the settings that lower memory use.

``fused_step`` (:func:`fused_step_plan`, :class:`FusedStep`): the optimizer steps each trained tensor inside the
backward pass as soon as its gradient is complete and frees it, so a full fine-tune never holds all its gradients.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import re
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import host
from ..core.atomic import atomic_write, temp_prefix
from ..core.errors import FinetuneError
from ..scoring.scorers import Score
from . import distributed
from .selection import Selection, best_path
from .settings import MAX_ROLLBACKS, TrainSettings

log = logging.getLogger("comfy_finetune")


class Trainable(Protocol):
    """What the loop optimises (the frame's view of an objective, with its denoiser bound)."""

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
    # nan_policy "rollback": (step whose loss was not finite, step restored, learning-rate factor from then on)
    rollbacks: list[tuple[int, int, float]] = field(default_factory=list)
    # in-loop scoring (None without a scorer): the scores, the best step (whose state the result holds) and why
    # the run ended before its last step
    selection: Selection | None = None
    stopped_early_at: int | None = None
    training_seconds: float = 0.0
    fused_step: bool = False  # the optimizer stepped inside the backward pass (FusedStep)

    @property
    def best_step(self) -> int | None:
        return self.selection.best_step if self.selection is not None else None

    @property
    def best_score(self) -> float | None:
        sel = self.selection
        return sel.best.value if sel is not None and sel.best is not None else None

    def score_summary(self) -> str:
        """One line naming the kept step and its score, the last score, and what scoring cost."""
        sel = self.selection
        if sel is None or sel.best is None:
            return ""
        last_step, last = sel.history[-1]
        se = f" ± {sel.best.stderr:.2g}" if sel.best.stderr > 0 else ""
        text = f"kept step {sel.best_step} (score {sel.best.value:.4g}{se})"
        if sel.best.shortfall > 0:
            text += f", below a floor by {sel.best.shortfall:.3g}"
        if sel.peak is not None and sel.peak_step != sel.best_step:
            text += f", within noise of the highest: step {sel.peak_step} (score {sel.peak.value:.4g})"
        if last_step != sel.best_step:
            text += f"; last: step {last_step} (score {last.value:.4g})"
        if self.stopped_early_at is not None:
            text += f"; stopped early at step {self.stopped_early_at}"
        text += f"; scoring {sel.seconds:.1f} s, training {self.training_seconds:.1f} s"
        return text


@dataclass
class Scoring:
    """In-loop scoring for :func:`train`: ``evaluate(step, first)`` scores the current trainables (``first``: the
    first evaluation's metrics, None at the first) and returns the score and the images to preview (or None);
    evaluated before the first step, every ``interval`` steps and at the last; ``patience`` evaluations without a
    better score stop the run (0: never).

    ``interval`` 0 is automatic: as often as keeps the time spent scoring within ``budget`` of the training time.
    The loop times the first evaluation (E) and the first :data:`AUTO_PROBE_STEPS` training steps (t: the median,
    the first step left out as warm-up), then scores every ``ceil(E * steps / (m * budget * steps * t - 2 E))`` steps
    (the 2 E: the evaluations before the first step and at the last one; m = :data:`AUTO_MARGIN`, as step and
    evaluation times drift over a run), or only before the first step and at the last when even those exceed it.
    The chosen interval rides in the checkpoint, so a resumed run scores at the same steps."""

    evaluate: Callable[[int, dict | None], tuple[Score, Any]]
    interval: int
    patience: int = 0
    name: str = ""  # what scores, as the checkpoint records it
    budget: float = 0.15


AUTO_PROBE_STEPS = 10  # training steps timed before an automatic scoring interval is chosen
# Aim below the budget: in the example workflow the first steps took 0.156 s and the run's average 0.132 s, and
# scoring came to 17 % aiming at 15 %.
AUTO_MARGIN = 0.85


def auto_interval(evaluation_seconds: float, step_seconds: float, steps: int, budget: float) -> int:
    """The scoring interval that keeps scoring within ``budget`` of the training time (see :class:`Scoring`)."""
    room = AUTO_MARGIN * budget * steps * step_seconds - 2.0 * evaluation_seconds
    if room <= 0:
        return max(1, steps)
    return max(1, min(steps, math.ceil(evaluation_seconds * steps / room)))


def run_key(*parts: Any) -> str:
    """A stable hash of what defines a run (base, data, settings), naming its checkpoint file."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_path(kind: str, key: str) -> Path:
    return host.output_dir() / "finetune_checkpoints" / f"{kind}-{key}.pt"


_STARTED_AT = time.time()  # about when this process started (this module is imported before any training)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; a file in use cannot be removed anyway
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists (another user's)
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove temp files that a killed process left beside ``path`` (``.<name>.tmp-<pid>-<random>``).

    Only those of processes no longer running are touched (on Windows, those not held open), so a run writing
    the same checkpoint in another process is never disturbed. Returns what was removed."""
    removed = []
    prefix = temp_prefix(path)
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for tmp in candidates:
        pid = tmp.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():  # not our naming
            continue
        if int(pid) == os.getpid():
            # ours: a write in progress, unless older than this process (a container restarted with the same pid)
            try:
                if tmp.stat().st_mtime >= _STARTED_AT - 1.0:
                    continue
            except OSError:
                continue
        elif _pid_alive(int(pid)):  # another process that may be writing it now
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            continue
    if removed:
        log.info("removed %d temp file(s) left by an interrupted write beside %s", len(removed), path)
    return removed


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through :func:`~..core.atomic.atomic_write` (a full disk: FinetuneError, old file
    kept)."""
    remove_stale_temps(path)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: the OSError (errno) of a failed write stays reachable, as
            torch.save(obj, f)      # the error itself or as the context of torch's RuntimeError

    atomic_write(path, write)


def load_checkpoint(path: Path) -> dict:
    remove_stale_temps(path)
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


# fused_step "auto": fused when the gradients would take at least this many bytes (full fine-tuning: SD 1.5's UNet
# has 860 M values, 3.4 GB of fp32 gradients; a rank-16 SDXL LoRA 46 M, 0.2 GB)
FUSED_AUTO_BYTES = 512_000_000
# optimizers whose step of one tensor depends only on that tensor's gradient and state (so stepping each tensor on
# its own, in any order, is the same update); Prodigy estimates its step size from all the tensors together
PER_TENSOR_OPTIMIZERS = ("adamw", "adamw8bit")


def fused_step_plan(settings: TrainSettings, grad_bytes: int, device: torch.device, node: str) -> tuple[bool, str]:
    """``(fused, why)``: whether the optimizer steps inside the backward pass (:class:`FusedStep`), for trainables
    whose gradients take ``grad_bytes``.

    It is exact (the same update as ``optimizer.step()`` after backward) when the optimizer is per-tensor, no fp16
    loss scaling must first see every gradient for inf/NaN, and one process trains (data-parallel ranks average the
    gradients before the step). The NaN policies need nothing more: the loop checks the loss before backward, and
    with ``rollback`` keeps the good state before the last backward of a step. There is no global gradient-norm
    clipping. With ``grad_accum`` > 1 the hooks step at the last micro-batch (the earlier ones accumulate as usual),
    which is exact but saves nothing, so ``auto`` leaves it off then. ``on`` where it would not be exact raises
    a FinetuneError naming the input in the way."""
    mode = settings.fused_step
    if mode == "off":
        return False, "fused_step off"
    blockers = []
    if settings.optimizer not in PER_TENSOR_OPTIMIZERS:
        blockers.append(("optimizer", f"optimizer {settings.optimizer} computes its step from all the weights "
                                      "together", "use adamw or adamw8bit"))
    if settings.resolved_precision(device) == "fp16":
        blockers.append(("precision", "fp16 loss scaling must see every gradient (for inf/NaN) before any step",
                         "use precision bf16 or fp32"))
    if distributed.world_size() > 1:
        blockers.append(("fused_step", "data-parallel training averages the gradients across processes before the "
                                       "step", "set fused_step auto or off"))
    if blockers:
        if mode == "on":
            input, why, fix = blockers[0]
            raise FinetuneError(f"fused_step on cannot be exact here: {why}", node=node, input=input,
                                fix=f"{fix}, or set fused_step auto")
        return False, blockers[0][1]
    if mode == "on":
        return True, "fused_step on"
    if settings.grad_accum > 1:
        return False, "grad_accum > 1 keeps every gradient between micro-batches anyway"
    if grad_bytes < FUSED_AUTO_BYTES:
        return False, f"gradients of {grad_bytes / 1e6:.0f} MB (fused from {FUSED_AUTO_BYTES / 1e6:.0f} MB)"
    return True, f"gradients of {grad_bytes / 1e9:.1f} GB never all exist at once"


class FusedStep:
    """The optimizer step fused into the backward pass: one optimizer per trained tensor, stepped in that tensor's
    ``register_post_accumulate_grad_hook`` as soon as its gradient is complete, which then frees the gradient. So at
    most one tensor's gradient exists at a time (plus what autograd is still propagating), instead of a gradient
    for every trained value (3.4 GB for SD 1.5's UNet in fp32).

    The update is the one ``optimizer.step()`` after backward makes: AdamW's (and 8-bit AdamW's) step of a tensor
    reads only that tensor's gradient and state. A tensor used twice in a step (a second UNet pass) gets one hook
    call with the summed gradient (autograd accumulates into a leaf once per backward; gradient checkpointing is
    non-reentrant). ``armed`` False lets gradients accumulate (the earlier micro-batches of ``grad_accum``).

    It looks like a ``torch.optim.Optimizer`` to the loop: ``param_groups`` (the loop sets each step's learning
    rate there; the hooks copy it before stepping), ``zero_grad``, a no-op ``step`` (the steps happened in
    backward), and ``state_dict`` / ``load_state_dict`` in the standard format (state by tensor index over the
    groups), so a checkpoint written fused resumes unfused and the other way round."""

    def __init__(self, groups: list[dict], settings: TrainSettings, node: str) -> None:
        self.param_groups: list[dict] = []
        self._opts: list[tuple[torch.optim.Optimizer, int, torch.Tensor]] = []
        for gi, g in enumerate(groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            opts = [make_optimizer([{**hyper, "params": [p]}], settings, node) for p in g["params"]]
            self._opts += [(o, gi, p) for o, p in zip(opts, g["params"])]
            template = opts[0].param_groups[0] if opts else {**hyper}
            self.param_groups.append({**{k: v for k, v in template.items() if k != "params"},
                                      "params": list(g["params"])})
        self.armed = True
        self.steps_in_backward = 0  # hook steps so far (tests: the fused step is in effect)
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, (_, _, p) in
                         enumerate(self._opts)]

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def step(p: torch.Tensor) -> None:
            if not self.armed:
                return
            opt, gi, _ = self._opts[i]
            group = opt.param_groups[0]
            group["lr"] = self.param_groups[gi]["lr"]
            opt.step()
            p.grad = None
            self.steps_in_backward += 1
        return step

    def step(self) -> None:
        """Nothing to do: every tensor was stepped in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for _, _, p in self._opts:
            p.grad = None

    def state_dict(self) -> dict:
        state: dict[int, dict] = {}
        groups, index = [], 0
        for g in self.param_groups:
            ids = []
            for _ in g["params"]:
                own = self._opts[index][0].state_dict()["state"]
                if 0 in own:
                    state[index] = own[0]
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups = state_dict["param_groups"]
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the optimizer state does not fit the trained tensors")
        index = 0
        for gi, g in enumerate(groups):
            hyper = {k: v for k, v in g.items() if k != "params"}
            self.param_groups[gi].update(hyper)
            for old in g["params"]:
                own = state_dict["state"].get(old, state_dict["state"].get(str(old)))
                self._opts[index][0].load_state_dict({"state": {0: own} if own is not None else {},
                                                      "param_groups": [{**hyper, "params": [0]}]})
                index += 1

    def close(self) -> None:
        """Remove the hooks and drop the state and gradients (the trained tensors stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for opt, _, p in self._opts:
            opt.state.clear()
            p.grad = None


def autocast_for(settings: TrainSettings, device: torch.device):
    precision = settings.resolved_precision(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """Randomness for one micro-step, a pure function of (seed, step) so resume is exact."""
    return torch.Generator("cpu").manual_seed((int(seed) * 1_000_003 + step * 101 + micro) & 0x7FFF_FFFF_FFFF_FFFF)


_OOM_TYPES = tuple({t for t in (getattr(torch, "OutOfMemoryError", None),
                               getattr(torch.cuda, "OutOfMemoryError", None), MemoryError) if t is not None})
_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|not enough memory", re.IGNORECASE)


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA; exists on CPU builds too), MemoryError, or an 'out of memory' RuntimeError."""
    return isinstance(exc, _OOM_TYPES) or (isinstance(exc, RuntimeError) and bool(_OOM_TEXT.search(str(exc))))


def out_of_memory_error(exc: BaseException, settings: TrainSettings, *, node: str, step: int,
                        device: torch.device) -> FinetuneError:
    """The user-facing error for running out of memory at ``step``: what to lower, given the current settings."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    accelerator = isinstance(exc, tuple(t for t in _OOM_TYPES if t is not MemoryError)) or device.type != "cpu"
    what = "memory (RAM)" if isinstance(exc, MemoryError) or not accelerator else "GPU memory"
    lower = [f"lower batch_size (now {settings.batch_size}; raise grad_accum to keep the effective batch)"
             if settings.batch_size > 1 else "keep batch_size at 1 (raise grad_accum for a larger effective batch)",
             "lower the resolution of the Training Data node",
             "enable gradient_checkpointing" if not settings.gradient_checkpointing
             else "keep gradient_checkpointing on",
             f"use precision bf16 or fp16 (now {settings.precision})" if settings.resolved_precision(device) == "fp32"
             else f"keep precision {settings.precision}",
             "lower rank (LoRA)", "or close other programs using the memory"]
    return FinetuneError(f"out of {what} at step {step} of {settings.steps} ({first[:200]}); the optimizer, "
                         "gradients and activations were released", node=node, fix=", ".join(lower))


def _clone_to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor copied to the CPU (never aliasing the live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _clone_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_to_cpu(v) for v in obj)
    return obj


@contextlib.contextmanager
def training_mode() -> Iterator[None]:
    """Leave ComfyUI's inference mode and enable autograd for the duration: ComfyUI runs
    every node under ``torch.inference_mode()``, where no tensor can take part in autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def train(objective: Trainable, batches: Callable[[int], Iterator[Any]], settings: TrainSettings, *, node: str,
          device: torch.device, checkpoint: Path | None = None,
          validate: Callable[[int], torch.Tensor] | None = None,
          extra_state: Callable[[], dict] | None = None, scoring: Scoring | None = None) -> TrainResult:
    """Run ``settings.steps`` optimizer steps of ``objective`` over ``batches(first)``, an endless iterator
    starting at micro-batch ``first`` (so a resumed run sees the same data as an uninterrupted one).

    On cancel the state reached is written to ``checkpoint`` (if given) and the interrupt re-raised.
    With ``scoring`` the trainables end as the best-scoring state (:mod:`.selection`); cancel also writes the best
    state beside the checkpoint.
    Out of memory: the optimizer (and its state), the gradients and the autograd graph are released before a
    :class:`FinetuneError` (with no reference to the failed frames) is raised.
    """
    settings.validate(node)
    distributed.local_batch_size(settings.batch_size, node=node)  # data-parallel: the global batch splits evenly
    loop = _Loop(objective, batches, settings, node=node, device=device, checkpoint=checkpoint, validate=validate,
                 extra_state=extra_state, scoring=scoring)
    failure: FinetuneError | None = None
    try:
        return loop.run()
    except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
        if not is_out_of_memory(exc):
            raise
        failure = out_of_memory_error(exc, settings, node=node, step=loop.done + 1, device=device)
        log.warning("%s", str(failure))  # strings only: a log record must not keep the failed frames alive
        log.debug("out of memory in %s:\n%s", node, "".join(traceback.format_exception(exc)))
        traceback.clear_frames(exc.__traceback__)  # the frames hold the graph and the optimizer
        del exc
    finally:
        loop.release()
    del loop
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    raise failure  # outside the except block: no __context__ keeping the failed frames alive


def _send_event(event: str, data: dict) -> None:
    if distributed.is_main():  # data-parallel: rank 0 reports for all
        host.send_event(event, data)


class _NoProgress:
    """Data-parallel ranks other than 0 show no progress (cancel is still checked)."""

    def update(self, n: int = 1, **postfix: Any) -> None:
        host.check_interrupt()

    def preview(self, images: Any, **info: Any) -> None:
        pass


class _Loop:
    """One run of :func:`train`: optimizer, schedule, checkpoints, NaN policy; ``release()`` drops it all."""

    def __init__(self, objective: Trainable, batches: Callable[[int], Iterator[Any]], settings: TrainSettings, *,
                 node: str, device: torch.device, checkpoint: Path | None,
                 validate: Callable[[int], torch.Tensor] | None, extra_state: Callable[[], dict] | None,
                 scoring: Scoring | None = None) -> None:
        self.objective, self.batches, self.settings, self.node = objective, batches, settings, node
        self.device, self.checkpoint, self.validate, self.extra_state = device, checkpoint, validate, extra_state
        self.scoring = scoring
        self.result = TrainResult(steps_done=0, selection=Selection(scorer=scoring.name) if scoring is not None
                                  else None)
        self.done = 0  # optimizer steps reflected in the trainables
        self.saved_step: int | None = None  # step of the checkpoint on disk
        self.lr_scale = 1.0  # halved by every rollback
        self.good: dict | None = None  # nan_policy rollback: the last good state (CPU copies)
        self.params: list[torch.Tensor] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None

    # ------------------------------------------------------------------ setup and state
    def setup(self) -> int:
        settings, node = self.settings, self.node
        groups = self.objective.param_groups()
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise FinetuneError("nothing to train", node=node, fix="check the training targets")
        grad_bytes = sum(p.numel() * p.element_size() for p in self.params)
        fused, why = fused_step_plan(settings, grad_bytes, self.device, node)
        self.optimizer = FusedStep(groups, settings, node) if fused else make_optimizer(groups, settings, node)
        self.result.fused_step = fused
        log.info("[%s] fused optimizer step %s (%s)", node, "on" if fused else "off", why)
        self.factor = lr_lambda(settings)
        self.base_lrs = [g.get("lr", settings.learning_rate) for g in self.optimizer.param_groups]
        fp16 = settings.resolved_precision(self.device) == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.keep_every = settings.save_every or max(1, settings.steps // 10)
        start = 0
        if self.checkpoint is not None and settings.resume and self.checkpoint.exists():
            try:
                state = load_checkpoint(self.checkpoint)
            except Exception as exc:  # noqa: BLE001
                raise FinetuneError(f"the checkpoint {self.checkpoint} cannot be read ({exc})".split("\n")[0],
                                    node=node, input="resume",
                                    fix="turn resume off to start again (the file is then replaced), or delete "
                                        "it") from exc
            self.objective.load_trainable_state(state["trainable"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            start = min(int(state["step"]), settings.steps)
            result = self.result
            result.losses, result.lrs = list(state.get("losses", [])), list(state.get("lrs", []))
            result.rollbacks = [tuple(r) for r in state.get("rollbacks", [])]
            self.lr_scale = float(state.get("lr_scale", 1.0))
            result.resumed_from = self.saved_step = start
            if result.selection is not None:
                warning = result.selection.load_state(state, best_path(self.checkpoint), load_checkpoint)
                if warning:
                    log.warning("[%s] %s", node, warning)
            log.info("[%s] resumed from %s at step %d", node, self.checkpoint, start)
        self.done = self.result.steps_done = start
        distributed.broadcast_(self.params)  # data-parallel: every rank starts from rank 0's trainables
        return start

    def save(self, step: int) -> None:
        if self.checkpoint is None:
            return
        if not distributed.writes_allowed():  # data-parallel: rank 0 writes, the others record the same result
            self.saved_step, self.result.checkpoint = step, self.checkpoint
            return
        state = {"step": step,
                 "trainable": {k: v.detach().cpu() for k, v in self.objective.trainable_state().items()},
                 "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                 "losses": self.result.losses, "lrs": self.result.lrs, "settings": self.settings.as_metadata(),
                 "lr_scale": self.lr_scale, "rollbacks": [list(r) for r in self.result.rollbacks]}
        if self.extra_state is not None:
            state.update(self.extra_state())
        selection = self.result.selection
        if selection is not None:
            state.update(selection.to_state())
        folder = self.checkpoint.parent
        kept = (f"the checkpoint of step {self.saved_step} is kept; after that, run again with resume on to go on "
                "from there" if self.saved_step is not None else "no checkpoint of this run was written before")
        try:
            if selection is not None and selection.needs_write():  # the best first: the latest names its step
                atomic_torch_save(selection.file_state(), best_path(self.checkpoint))
                selection.written_step = selection.best_step
            atomic_torch_save(state, self.checkpoint)
        except FinetuneError as exc:  # the disk is full (atomic_write removed the partial file)
            raise FinetuneError(f"{exc.detail}; {kept}", node=self.node, input="save_every",
                                fix=f"free space on the disk that holds {folder}, or start ComfyUI with "
                                    "--output-directory on another disk; save_every 0 writes checkpoints only "
                                    "on cancel and at the end") from exc
        except OSError as exc:
            raise FinetuneError(f"the checkpoint could not be written in {folder} ({exc.strerror or exc}); {kept}",
                                node=self.node, input="save_every",
                                fix="make the output folder writable, or set save_every 0") from exc
        self.saved_step = step
        self.result.checkpoint = self.checkpoint

    def keep_good_state(self, step: int) -> None:
        """Remember the state at ``step`` (its loss was finite) for a rollback: CPU copies, nothing shared."""
        self.good = {"step": step, "trainable": _clone_to_cpu(self.objective.trainable_state()),
                     "optimizer": _clone_to_cpu(self.optimizer.state_dict()),
                     "scaler": _clone_to_cpu(self.scaler.state_dict()) if self.scaler.is_enabled() else {}}

    def nan_error(self, step: int, value: float, why: str = "") -> FinetuneError:
        settings = self.settings
        cause = ("fp16 overflow: use precision bf16 or fp32" if settings.precision == "fp16"
                 else f"learning rate {settings.learning_rate:g} may be too high")
        retry = "" if settings.nan_policy == "rollback" else ", set on_nan to rollback"
        return FinetuneError(f"the loss became {value} at step {step}{why}", node=self.node, input="learning_rate",
                             fix=f"{cause}; lower learning_rate{retry} or resume from the last checkpoint")

    def rollback(self, step: int, value: float) -> int:
        """Handle a non-finite loss at (1-based) ``step``: restore the last good state and halve the learning rate,
        or raise. Returns the step to go on from."""
        result = self.result
        if self.settings.nan_policy != "rollback":
            raise self.nan_error(step, value)
        if self.good is None:
            raise self.nan_error(step, value, " (there was no good state to roll back to)")
        if len(result.rollbacks) >= MAX_ROLLBACKS:
            raise self.nan_error(step, value, f" again after {len(result.rollbacks)} rollbacks (learning rate now "
                                              f"x{self.lr_scale:g})")
        good = self.good
        self.objective.load_trainable_state(good["trainable"])
        self.optimizer.load_state_dict(_clone_to_cpu(good["optimizer"]))  # a fresh copy: the live state is updated
        if good["scaler"]:                                                # in place and must not alias the saved one
            self.scaler.load_state_dict(_clone_to_cpu(good["scaler"]))
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scale *= 0.5
        to = good["step"]
        result.rollbacks.append((step, to, self.lr_scale))
        del result.losses[to:], result.lrs[to:]
        result.validation = [(s, img) for s, img in result.validation if s <= to]
        if result.selection is not None:
            result.selection.truncate(to)
        self.done = result.steps_done = to
        log.warning("[%s] the loss became %s at step %d: rolled back to step %d and halved the learning rate (x%g "
                    "now), rollback %d of %d", self.node, value, step, to, self.lr_scale, len(result.rollbacks),
                    MAX_ROLLBACKS)
        _send_event("comfy_finetune.train_rollback", {"node": self.node, "step": step, "to_step": to,
                                                      "lr_scale": self.lr_scale,
                                                      "rollbacks": len(result.rollbacks),
                                                      "max_rollbacks": MAX_ROLLBACKS})
        return to

    def release(self) -> None:
        """Drop the optimizer state, the gradients and the kept state (the objective's tensors stay)."""
        for p in self.params:
            p.grad = None
        if isinstance(self.optimizer, FusedStep):
            self.optimizer.close()
        elif self.optimizer is not None:
            self.optimizer.state.clear()
        self.optimizer = self.scaler = self.good = None
        self.params = []

    # ------------------------------------------------------------------ scoring
    def score(self, step: int, bar: Any) -> bool:
        """Evaluate at ``step``, keep the state if it is the best so far, report; True: stop early."""
        sel, scoring, node = self.result.selection, self.scoring, self.node
        t0 = time.perf_counter()
        score, images = scoring.evaluate(step, sel.first)
        improved = sel.offer(step, score, self.objective.trainable_state)
        spent = time.perf_counter() - t0
        sel.seconds += spent
        sel.evaluation_seconds = spent
        self.scoring_seconds += spent
        best = sel.best
        log.info("[%s] step %d: score %.4g (%s)%s; kept %.4g at step %d", node, step, score.value,
                 ", ".join(f"{k} {v:.4g}" for k, v in score.metrics.items()), " (new best)" if improved else "",
                 best.value, sel.best_step)
        _send_event("comfy_finetune.train_score", {
            "node": node, "step": step, "steps": self.settings.steps, "score": score.value,
            "metrics": dict(score.metrics), "shortfall": score.shortfall, "best_step": sel.best_step,
            "best_score": best.value, "scoring_seconds": sel.seconds,
            "training_seconds": self.elapsed() - self.scoring_seconds})
        if images is not None and self.validate is None:  # the scorer's samples are the preview
            bar.preview(images, node=node, step=step, steps=self.settings.steps)
        return sel.should_stop(scoring.patience)

    def due(self, done: int) -> bool:
        """Whether to score after step ``done``: every interval (once chosen) and at the last step."""
        return done == self.settings.steps or bool(self.interval and done % self.interval == 0)

    def choose_interval(self, step_seconds: float) -> None:
        """Automatic interval (:class:`Scoring`): from the first evaluation's and a training step's seconds."""
        sel, settings = self.result.selection, self.settings
        first = sel.evaluation_seconds or 0.0
        self.interval = sel.interval = auto_interval(first, step_seconds, settings.steps, self.scoring.budget)
        log.info("[%s] scoring every %d steps (automatic: an evaluation takes %.2f s, a training step %.3f s; "
                 "scoring stays within about %d %% of the training time%s)", self.node, self.interval, first,
                 step_seconds, round(100 * self.scoring.budget),
                 "; set the scorer's every to score more often" if self.interval >= settings.steps else "")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def keep_best(self) -> None:
        """End of the run: the trainables become the best-scoring state (if it is not the last one)."""
        sel = self.result.selection
        if sel is None or sel.best_state is None:
            return
        if sel.best_step != self.done:
            self.objective.load_trainable_state(sel.best_state)
        log.info("[%s] %s", self.node, self.result.score_summary())

    # ------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        settings, node, result, objective = self.settings, self.node, self.result, self.objective
        start = self.setup()
        optimizer, scaler = self.optimizer, self.scaler
        rollback = settings.nan_policy == "rollback"
        fused = isinstance(optimizer, FusedStep)
        it = self.batches(start * settings.grad_accum)
        shown = start
        t0 = self.t0 = time.perf_counter()
        self.scoring_seconds = 0.0
        scoring, selection = self.scoring, result.selection
        with host.Progress(settings.steps, desc=node) if distributed.is_main() else contextlib.nullcontext(
                _NoProgress()) as bar:
            if start:
                bar.update(start)
            try:
                self.interval = scoring.interval if scoring is not None and scoring.interval > 0 else None
                if scoring is not None and selection.interval and self.interval is None:
                    self.interval = selection.interval  # chosen automatically before the cancel
                if scoring is not None and (not selection.history or (  # before training: the baseline
                        self.interval and start % self.interval == 0 and selection.history[-1][0] != start)):
                    self.score(start, bar)  # (or an evaluation a cancel interrupted)
                step_seconds = []
                step = start
                while step < settings.steps:
                    t_step = time.perf_counter()
                    for g, lr0 in zip(optimizer.param_groups, self.base_lrs):
                        # a group may train for the first steps only ("until": pivotal tuning's word); at lr 0
                        # AdamW leaves a parameter exactly as it is
                        g["lr"] = lr0 * self.factor(step) * self.lr_scale if step < g.get("until", step + 1) else 0.0
                    optimizer.zero_grad(set_to_none=True)
                    total, bad = 0.0, None
                    for micro in range(settings.grad_accum):
                        batch = distributed.shard_batch(next(it), settings.batch_size)
                        with autocast_for(settings, self.device), distributed.sharded_draws():
                            loss = objective.loss(step, batch, step_generator(settings.seed, step, micro))
                        value = float(loss.detach())  # one device sync per micro-step, for the check and the log
                        value = distributed.mean(value, self.device)  # data-parallel: the same on every rank
                        if not math.isfinite(value):
                            bad = value
                            break
                        if fused:  # the hooks step at the last micro-batch's backward: keep the good state before
                            optimizer.armed = micro == settings.grad_accum - 1
                            if optimizer.armed and rollback and (step == start or step % self.keep_every == 0) and (
                                    self.good is None or self.good["step"] != step):
                                self.keep_good_state(step)
                        scaler.scale(loss / settings.grad_accum).backward()
                        total += value / settings.grad_accum
                    loss = None
                    if bad is not None:
                        step = self.rollback(step + 1, bad)
                        it = self.batches(step * settings.grad_accum)
                        continue
                    if rollback and (step == start or step % self.keep_every == 0) and (
                            self.good is None or self.good["step"] != step):
                        self.keep_good_state(step)  # before the update: these weights gave a finite loss
                    distributed.all_reduce_grads(self.params)  # data-parallel: once per step, after accumulation
                    scaler.step(optimizer)
                    scaler.update()
                    result.losses.append(total)
                    result.lrs.append(optimizer.param_groups[0]["lr"])
                    step += 1
                    done = self.done = result.steps_done = step
                    step_seconds.append(time.perf_counter() - t_step)
                    if scoring is not None and self.interval is None and (
                            len(step_seconds) >= AUTO_PROBE_STEPS or done == settings.steps):
                        timed = sorted(step_seconds[1:] or step_seconds)  # the first step warms up
                        self.choose_interval(timed[len(timed) // 2])
                    elapsed = time.perf_counter() - t0
                    rate = (done - start) / elapsed if elapsed > 0 else 0.0
                    eta = (settings.steps - done) / rate if rate > 0 else 0.0
                    _send_event("comfy_finetune.train", {"node": node, "step": done, "steps": settings.steps,
                                                         "loss": total, "lr": result.lrs[-1],
                                                         "images_per_second": rate * settings.batch_size
                                                         * settings.grad_accum, "eta_seconds": eta})
                    if scoring is not None and self.due(done) and self.score(done, bar):
                        result.stopped_early_at = done
                        log.info("[%s] stopped early at step %d: no better score for %d evaluations", node, done,
                                 scoring.patience)
                    if settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                        self.save(done)
                    if self.validate is not None and settings.validate_every and done % settings.validate_every == 0:
                        result.validation.append((done, self.validate(done)))
                        bar.preview(result.validation[-1][1], node=node, step=done, steps=settings.steps)
                    bar.update(1 if done > shown else 0, loss=total, lr=result.lrs[-1])
                    shown = max(shown, done)
                    if result.stopped_early_at is not None:
                        break
            except host.interrupt_exception_types():
                self.save(self.done)
                if self.checkpoint is not None:
                    log.warning("[%s] cancelled at step %d; resumable checkpoint: %s", node, self.done,
                                self.checkpoint)
                raise
        result.steps_done = self.done
        result.training_seconds = self.elapsed() - self.scoring_seconds
        if settings.save_every:
            self.save(self.done)
        self.keep_best()
        return result
