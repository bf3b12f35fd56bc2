"""The training frame: one lifecycle for every trainer.

A trainer builds an :class:`Objective` (what trains and its loss) and calls :func:`run_training`, which owns the
whole sequence in one ``ExitStack``, in this order, and undoes it in reverse when the run ends, fails or is
cancelled:

1. ComfyUI's inference mode left (nodes run under ``torch.inference_mode()``);
2. the input handle's patches merged into the base weights (:meth:`ModelHandle.patched`);
3. every base weight frozen (``requires_grad`` flags and train/eval modes put back after);
4. the objective attached (adapters injected, trained copies made, trainable tensors created);
5. the speed and memory options applied once, to what the objective declares: SDPA attention, channels-last,
   ``fp8_base`` (:mod:`.fp8`: its frozen layers' weights in float8), ``offload_unet`` (:mod:`.offload`: those
   weights streamed from the CPU; auto from the memory estimate) and ``torch.compile`` on its
   :meth:`~Objective.denoiser`, gradient checkpointing on its
   :meth:`~Objective.trained_modules`, the disk cache and the offload of its :meth:`~Objective.frozen_modules`
   on its :meth:`~Objective.caches` (filled first; an encoder a cache still needs every step, the VAE with random
   crops, stays on the device, and a cache miss brings back only its own encoder);
6. the memory check (:func:`.memory.check`) from the objective's :meth:`~Objective.workload`;
7. the loop (:func:`.loop.train`) over a :class:`Run`, which binds the prepared (maybe compiled) denoiser to
   the objective's loss; validation samples through the training handle with the offloaded encoders back;
8. the result built by the trainer's ``finish()`` while everything is still attached: with a scorer, from the
   best-scoring state (the loop loads it back at the end).

In-loop scoring (:class:`Scored`, made by :func:`scored` before the objective so held-out images never train):
the scorer is bound first (feature models loaded, reference features computed, bad inputs refused before any
training); at every evaluation its prompts are sampled with fixed seeds through the validation settings (the same
sampler, negative prompt, size, steps and cfg as the Sample node) with the offloaded encoders back, and the held-out
loss is measured at fixed noise and timesteps, all without gradients.

Nothing here probes an objective for optional attributes: :class:`Objective` is the whole contract.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch

from .. import host
from ..core.errors import FinetuneError
from ..core.families import Family
from ..core.handle import ModelHandle
from ..core.image_prompt import ImagePromptPatch
from ..core.sampling import SampleSettings, make_scheduler, sample_patched, sample_prompts_patched
from ..scoring.scorers import Evaluation, Scorer, images_from
from . import fp8, speed
from .data import TrainingSet, subset
from .diffusion import Cache, LatentCache, evaluation_loss
from .loop import Scoring, TrainResult, checkpoint_path, run_key, train, training_mode
from .memory import RunShape, wants_offload
from .memory import check as check_memory
from .settings import TrainSettings

log = logging.getLogger("comfy_finetune")

# Validation samples during training use exactly the Sample settings (same sampling path and negative as after
# training), one image per validation step.
Validation = SampleSettings


class Dataset(Protocol):
    """What the frame needs of a training set (:class:`~.data.TrainingSet`, DreamBooth's paired set)."""

    repeats: int

    def __len__(self) -> int: ...

    def signature(self) -> list: ...

    def batches(self, batch_size: int, seed: int, start_step: int = 0) -> Iterator[Any]: ...


class Objective(Protocol):
    """Everything the frame and the memory check use of a trainer's objective.

    ``train_handle``, ``trained_modules``, ``frozen_modules``, ``denoiser``, ``caches`` and ``workload`` are read
    while attached (after :meth:`attached` has entered).
    """

    def attached(self) -> ContextManager[Any]:
        """Make the trainables (inject adapters, copy weights, fresh parameters) for the block; undo after."""

    @property
    def train_handle(self) -> ModelHandle:
        """The model being trained, as validation samples it."""

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """Every module backprop runs through, by component (``unet``, ``te1``, ``te2``): checkpointing goes here."""

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Modules used only without gradients (the VAE, text encoders whose encodings are cached): offloadable."""

    def denoiser(self) -> torch.nn.Module:
        """The UNet the loss calls: SDPA, channels-last and compile apply to it."""

    def caches(self) -> list[Cache]:
        """The encoding caches the loss reads: disk caching and offload apply to them."""

    def workload(self) -> RunShape:
        """What the memory check needs to know about the run."""

    def param_groups(self) -> list[dict]: ...

    def loss(self, step: int, batch: Any, generator: torch.Generator, denoiser: Callable) -> torch.Tensor:
        """The scalar loss of one batch, calling ``denoiser`` (the prepared UNet) for every prediction."""

    def trainable_state(self) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Run:
    """An attached objective with the frame's prepared denoiser: what the loop trains (:class:`.loop.Trainable`)."""

    objective: Objective
    denoiser: Callable
    offload: speed.Offload | None = None
    streams: bool = False  # offload_unet: the frozen UNet layers stream from the CPU (.offload)

    def param_groups(self) -> list[dict]:
        return self.objective.param_groups()

    def loss(self, step: int, batch: Any, generator: torch.Generator) -> torch.Tensor:
        return self.objective.loss(step, batch, generator, self.denoiser)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.objective.trainable_state()

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.objective.load_trainable_state(state)

    def on_device(self) -> ContextManager[None]:
        """The offloaded frozen modules back on the device for the block (validation samples)."""
        return speed.on_device(self.offload)


@contextlib.contextmanager
def frozen(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Every parameter of ``modules`` frozen for the block; ``requires_grad`` and train/eval modes put back after."""
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for m in modules:
            m.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for sub, mode in modes:
            sub.training = mode


# options added after checkpoints were keyed: left out of a run's key while off, so older runs keep their key (their
# checkpoints resume) and a run with the option on gets its own
NEW_OFF_BY_DEFAULT = ("fp8_base",)
# options that change where weights wait, not what is computed: not in a run's key (a run resumes with them changed)
PLACEMENT = ("fused_step", "offload_unet")


def offloads_frozen(settings: TrainSettings, family: Family, device: torch.device | str) -> bool:
    """Whether the frozen modules wait on the CPU during training: ``offload_frozen``, and always for Kolors on a GPU
    (ChatGLM3 is 6.2 B parameters, 12.5 GB in 16 bit, more than the UNet it conditions)."""
    return settings.offload_frozen or (family is Family.KOLORS and torch.device(device).type == "cuda")


@contextlib.contextmanager
def prepared(objective: Objective, handle: ModelHandle, settings: TrainSettings, *, node: str) -> Iterator[Run]:
    """Steps 1-5 of the module doc for the block; everything undone after, in reverse order."""
    base = handle.base
    device = base.device
    with contextlib.ExitStack() as stack:
        stack.enter_context(training_mode())
        stack.enter_context(handle.patched())
        stack.enter_context(frozen([m for m in (base.unet, base.vae, *base.text_encoders)
                                    if isinstance(m, torch.nn.Module)]))
        stack.enter_context(objective.attached())
        unet = objective.denoiser()
        stack.enter_context(speed.sdpa(unet))
        if settings.gradient_checkpointing:
            stack.enter_context(speed.checkpointing(objective.trained_modules().values()))
        stack.enter_context(speed.channels_last(unet, settings.use_channels_last(device)))
        offload = None
        if offloads_frozen(settings, base.family, device):
            if not settings.offload_frozen:
                log.info("[%s] Kolors on a GPU: the text encoder and VAE wait on the CPU once their encodings are "
                         "cached (offload_frozen)", node)
            offload = speed.Offload(objective.frozen_modules(), device)
        # before the caches fill (the first encoding then runs beside the float8 / streamed UNet); offload_unet
        # auto judges the run as it will train, with the frozen encoders already gone
        shape = objective.workload()
        if offload is not None:
            away = {id(m) for m in offload.modules}
            shape = replace(shape, modules=tuple(m for m in shape.modules if id(m) not in away))
        stream = wants_offload(shape, objective.param_groups(), settings, device)
        if settings.fp8_base or stream:
            layers = fp8.frozen_layers(unet)
            if layers:
                stack.enter_context(fp8.layers_outside(layers, device, fp8=settings.fp8_base, offload=stream))
                log.info("[%s] %d frozen UNet layers%s%s", node, len(layers),
                         " in float8 e4m3 (fp8_base)" if settings.fp8_base else "",
                         " streamed from the CPU (offload_unet" + (" auto: the estimate did not fit)"
                                                                  if settings.offload_unet == "auto" else ")")
                         if stream else "")
            else:
                log.warning("[%s] fp8_base / offload_unet: the UNet trains itself (full fine-tuning), so no frozen "
                            "layer is stored in float8 or streamed", node)
                stream = False
        caches = list({id(c): c for c in objective.caches()}.values())
        for cache in caches:
            cache.configure(disk=settings.cache_to_disk, offload=offload)
        if offload is not None:
            for cache in caches:
                if not cache.fill():  # it encodes every step (random crops, trained text encoders)
                    offload.keep(cache.modules)
                    if isinstance(cache, LatentCache):
                        log.warning("[%s] offload_frozen: random crops are encoded every step, so the VAE stays on "
                                    "the device", node)
            stack.enter_context(offload.offloaded())
        yield Run(objective, speed.maybe_compile(unet, settings.compile), offload, stream)


@dataclass(frozen=True)
class Scored:
    """A trainer's scorer with what it scores against: the instance images and the held-out set (or None)."""

    scorer: Scorer
    references: Sequence[Any]
    heldout: TrainingSet | None = None


def scored(dataset: TrainingSet, scorer: Scorer | None, node: str) -> tuple[TrainingSet, Scored | None]:
    """``(training set, Scored)`` for ``scorer``: the images a held-out loss asks for are taken out of the training
    set (the last ``holdout`` ones), or come from the scorer's own set. References are the training images."""
    if scorer is None:
        return dataset, None
    heldout, n = scorer.heldout_set, scorer.holdout
    if heldout is None and n:
        if n >= len(dataset):
            raise FinetuneError(f"the scorer holds out {n} of the {len(dataset)} training images, which leaves none "
                                "to train on", node=node, input="scorer",
                                fix=f"hold out fewer than {len(dataset)} images, or give the scorer a validation "
                                    "dataset of its own")
        keep = len(dataset) - n
        dataset, heldout = subset(dataset, range(keep)), subset(dataset, range(keep, len(dataset)))
        log.info("[%s] %d image(s) held out of training for the held-out loss: %s", node, n,
                 ", ".join(ex.name for ex in heldout.examples))
    return dataset, Scored(scorer, images_from([ex.pixels for ex in dataset.examples]), heldout)


#: Pixels sampled in one batch at an evaluation (4 Mpx: 4 images of 1024^2, 16 of 512^2, a thousand of 64^2).
PROBE_BATCH_PIXELS = 4 * 1024 * 1024


def probe_batches(probes: Sequence[Any], validation: Validation) -> list[list[Any]]:
    """The scorer's prompts grouped into batches of at most :data:`PROBE_BATCH_PIXELS` (a prompt whose samples
    alone exceed it gets a batch of its own): one UNet call a step for many small images, bounded memory for big
    ones."""
    per_image = validation.width * validation.height
    groups: list[list[Any]] = []
    size = 0
    for probe in probes:
        pixels = probe.samples * per_image
        if groups and size + pixels <= PROBE_BATCH_PIXELS:
            groups[-1].append(probe)
            size += pixels
        else:
            groups.append([probe])
            size = pixels
    return groups


def check_validation(validation: Validation, handle: ModelHandle, node: str) -> None:
    """Refuse bad validation settings before training starts, naming the trainer's validation_* input."""
    inputs = {"sampler_name": "validation_sampler", "scheduler": "validation_scheduler", "width": "validation_size",
              "height": "validation_size", "steps": "validation_steps", "batch_size": "validation_size",
              "cfg": "validation_cfg"}
    try:
        validation.validate(node)
        make_scheduler(handle.base.scheduler_config, validation.sampler, validation.scheduler, node=node)
    except FinetuneError as exc:
        raise FinetuneError(exc.detail, node=node, input=inputs.get(exc.input or "", exc.input),
                            fix=exc.fix) from exc


def check_dataset(dataset: Dataset, settings: TrainSettings, node: str) -> None:
    if dataset is None or len(dataset) == 0:
        raise FinetuneError("the training set is empty", node=node, input="dataset",
                            fix="connect a Training Data node with at least one image")
    available = len(dataset) * max(1, int(dataset.repeats))
    if available < settings.batch_size:
        raise FinetuneError(f"batch_size {settings.batch_size} is larger than the {len(dataset)} training images "
                            f"(x{dataset.repeats} repeats)", node=node, input="batch_size",
                            fix=f"use batch_size {available} or less, or add images/repeats")


def run_training(kind: str, handle: ModelHandle, dataset: Dataset, settings: TrainSettings, objective: Objective,
                 *, node: str, config: dict, validation: Validation | None = None,
                 finish: Callable[[], Any], score: Scored | None = None,
                 metadata: dict[str, str] | None = None) -> tuple[Any, TrainResult]:
    """Train ``objective`` on ``handle`` over ``dataset`` (the module doc's sequence) and return
    ``(finish(), TrainResult)``; ``finish`` builds the trainer's result while the objective is still attached.
    With ``score`` (:func:`scored`) the result is built from the best-scoring state, and ``metadata`` (the dict
    ``finish`` writes into the file) names the kept step and score (its ``ss_steps`` / ``steps`` become that step)."""
    settings.validate(node)
    check_dataset(dataset, settings, node)
    if any(isinstance(p, ImagePromptPatch) for p in handle.patches):
        # the trainers' losses condition on text alone; an image prompt would only steer the in-loop samples
        raise FinetuneError("the model handle carries an image prompt (IP-Adapter / InstantID)", node=node,
                            input="pipe", fix="train on the handle before the Image Prompt / InstantID node and add "
                            "the image prompt after the trainer")
    bound = None
    if score is not None:
        validation = validation or Validation(prompt="")
        check_validation(validation, handle, node)  # the scorer samples with the validation settings
        bound = score.scorer.bind(score.references, node=node)
        every = score.scorer.interval(settings.steps)
        log.info("[%s] scoring: %s, %s%s", node, score.scorer.describe(),
                 f"every {every} steps" if every else "at an automatic interval",
                 f", stopping after {score.scorer.patience} evaluations without a better score"
                 if score.scorer.patience else "")
    key = run_key(kind, handle.signature(), dataset.signature(), config,
                  {k: v for k, v in asdict(settings).items()
                   if k not in ("steps", "save_every", "validate_every", "resume", "nan_policy", *PLACEMENT)
                   and not (k in NEW_OFF_BY_DEFAULT and not v)})
    ckpt = checkpoint_path(kind, key)
    host.free_host_models()
    device = handle.base.device
    validating = validation is not None and bool(validation.prompt)
    if validating:
        check_validation(validation, handle, node)
    try:
        with prepared(objective, handle, settings, node=node) as run:
            def validate(step: int) -> torch.Tensor:
                # cancellable between sampling steps, like everything else in the loop
                with run.on_device():
                    return sample_patched(objective.train_handle, validation, node=node,
                                          progress=lambda i, n: host.check_interrupt())

            scoring = None
            if bound is not None:
                probes = score.scorer.probes()

                def evaluate(step: int, first: dict | None) -> tuple[Any, Any]:
                    images = {}
                    with run.on_device():
                        for group in probe_batches(probes, validation):  # several prompts a batch
                            drawn = sample_prompts_patched(objective.train_handle, validation,
                                                           [(p.prompt, p.samples, p.seed) for p in group], node=node,
                                                           progress=lambda i, n: host.check_interrupt())
                            images.update({p.prompt: x for p, x in zip(group, drawn)})
                        loss = (evaluation_loss(objective.train_handle, score.heldout, apply_patches=False)
                                if score.heldout is not None else None)
                    return (bound(Evaluation(step, images, first, loss)),
                            images[probes[0].prompt] if probes else None)

                scoring = Scoring(evaluate, score.scorer.interval(settings.steps), score.scorer.patience,
                                  score.scorer.describe())
            check_memory(objective.workload(), objective.param_groups(), settings, node=node, device=device,
                         offload_unet=run.streams)
            result = train(run, lambda first: dataset.batches(settings.batch_size, settings.seed, first), settings,
                           node=node, device=device, checkpoint=ckpt, validate=validate if validating else None,
                           scoring=scoring)
            final = result.best_step if result.best_step is not None else result.steps_done  # what the result holds
            if validating and final not in [s for s, _ in result.validation]:
                result.validation.append((final, validate(final)))
                result.validation.sort(key=lambda sv: sv[0])
            if metadata is not None and result.best_step is not None:
                metadata.update({k: str(result.best_step) for k in ("ss_steps", "steps") if k in metadata})
                metadata.update({"ft_kept_step": str(result.best_step), "ft_kept_score": f"{result.best_score:.6g}",
                                 "ft_scorer": score.scorer.describe(), "ft_steps_run": str(result.steps_done)})
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
