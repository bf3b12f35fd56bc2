"""LoRA training with peft on a shared base model, without changing it.

peft's LoRA layers are injected into the base UNet (and text encoders) for the duration of the
run, the trained A/B matrices are read out as :class:`~..core.lora.LoraWeights`, and the original
modules are put back in ``finally``: the base weights are frozen throughout, so every other
handle on the same base sees exactly what it saw before.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core.errors import FinetuneError
from ..core.families import Family
from ..core.fields import node_input
from ..core.handle import ModelHandle
from ..core.lora import LoraModule, LoraWeights
from ..scoring.scorers import Scorer
from .data import TrainingSet
from .diffusion import Cache, LatentCache, NoiseSchedule, TextCache, caption_losses, dataset_captions
from .frame import run_training, scored
from .memory import RunShape
from .settings import TEXT_TARGETS, UNET_TARGETS, TrainSettings

log = logging.getLogger("comfy_finetune")
ADAPTER = "ft_train"


@dataclass(frozen=True)
class LoraSpec:
    """What makes a run LoRA training; each field is also the TrainLoRA widget of that name."""

    rank: int = node_input(16, min=1, max=1024, tooltip="LoRA rank (dimension).")
    alpha: float = node_input(16.0, min=0.01, max=4096.0, step=0.5,
                              tooltip="LoRA alpha; the update is scaled by alpha/rank.")
    targets: str = node_input("attention+feedforward", choices=UNET_TARGETS,
                              tooltip="Which UNet layers get LoRA: attention only, + feed-forward and projections "
                                      "(kohya default), + convolutions (LoCon).")
    train_text_encoder: bool = node_input(False, tooltip="Also train LoRA on the text encoder(s).")
    text_learning_rate: float = node_input(5e-5, min=0.0, max=10.0, step=1e-6, round=False,
                                           tooltip="Learning rate for the text-encoder LoRA.")


class FrozenModel(NamedTuple):
    """The model as it was before training, for targets that must not move with it (DreamBooth's prior)."""

    unet: torch.nn.Module
    handle: ModelHandle
    text: TextCache


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            yield name, module


def _min_width(model: torch.nn.Module, targets: tuple[str, ...]) -> tuple[int, str]:
    smallest, where = 1 << 30, ""
    for name, m in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in targets):
            w = getattr(m, "weight", None)
            if w is None or w.dim() < 2:
                continue
            width = min(w.shape[0], w.shape[1])
            if width < smallest:
                smallest, where = width, name
    return smallest, where


def remove_lora_layers(model: torch.nn.Module) -> None:
    """Put every peft-wrapped module back as its original base layer (exact: the base tensors never changed)."""
    for name, module in list(_lora_layers(model)):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.get_base_layer())
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):  # inject_adapter_in_model records its config on the model: forget it too
        config.pop(ADAPTER, None)
        if not config:
            del model.peft_config


class LoraObjective:
    """peft LoRA on the UNet (and optionally the text encoders) of ``handle``'s base.

    ``extra_prompts`` are captions the loss encodes besides the dataset's (DreamBooth's class captions) and
    ``frozen_prompts`` those the frozen model encodes (DreamBooth's prior target), so the text caches can encode
    them before the text encoders are offloaded.
    """

    def __init__(self, handle: ModelHandle, dataset: TrainingSet, settings: TrainSettings, spec: LoraSpec,
                 *, node: str, extra_prompts: Sequence[str] = (), frozen_prompts: Sequence[str] = ()) -> None:
        self.handle, self.dataset, self.settings, self.spec, self.node = handle, dataset, settings, spec, node
        base = handle.base
        self.components: dict[str, torch.nn.Module] = {"unet": base.unet}
        if spec.train_text_encoder:
            for i, te in enumerate(base.text_encoders):
                self.components[f"te{i + 1}"] = te
        self.schedule = NoiseSchedule(base.scheduler_config, base.prediction_type)
        self.latents = LatentCache(handle, dataset)
        self.text = TextCache(handle, node, cache=not spec.train_text_encoder,
                              prompts=[*dataset_captions(dataset), *extra_prompts])
        # The frozen model (adapters disabled) encodes captions as the base does: when the text encoders train,
        # it needs a cache of its own.
        self.frozen_text = self.text if not spec.train_text_encoder else TextCache(handle, node,
                                                                                   prompts=frozen_prompts)

    # ------------------------------------------------------------------ adapters
    def check(self) -> None:
        if self.spec.train_text_encoder and self.handle.family is Family.KOLORS:
            raise FinetuneError("training Kolors' ChatGLM3 text encoder is not supported yet (its layers are not "
                                "CLIP's, and no LoRA file layout for them is settled)", node=self.node,
                                input="train_text_encoder",
                                fix="turn train_text_encoder off: the UNet LoRA trains Kolors, with the text "
                                    "encoded once and cached")
        if self.spec.rank < 1:
            raise FinetuneError(f"rank must be at least 1 (got {self.spec.rank})", node=self.node, input="rank",
                                fix="use 4-64")
        if self.spec.train_text_encoder and not self.spec.text_learning_rate > 0:
            raise FinetuneError(f"text_learning_rate must be positive when the text encoder trains (got "
                                f"{self.spec.text_learning_rate})", node=self.node, input="text_learning_rate",
                                fix="use e.g. 5e-5, or turn train_text_encoder off")
        missing = self.dataset.missing_captions
        if missing:
            log.warning("[%s] %d of %d images have no caption; they train with %s", self.node, missing,
                        len(self.dataset), f"the caption prefix '{self.dataset.caption_prefix}'"
                        if self.dataset.caption_prefix else "an empty caption (add .txt captions "
                        "or a caption_prefix such as a trigger word)")
        if self.spec.targets not in UNET_TARGETS:
            raise FinetuneError(f"unknown target preset '{self.spec.targets}'", node=self.node, input="targets",
                                fix=f"use one of {', '.join(UNET_TARGETS)}")
        for comp, model in self.components.items():
            targets = UNET_TARGETS[self.spec.targets] if comp == "unet" else TEXT_TARGETS
            width, where = _min_width(model, targets)
            if self.spec.rank > width:
                raise FinetuneError(f"rank {self.spec.rank} is larger than the layer {where} ({width} wide)",
                                    node=self.node, input="rank", fix=f"use a rank of at most {width}")

    @contextlib.contextmanager
    def attached(self) -> Iterator[LoraObjective]:
        """peft LoRA layers on the components for the block (fp32, seeded); the original layers put back after."""
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - heavy at start-up

        self.check()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.seed)
                for comp, model in self.components.items():
                    targets = UNET_TARGETS[self.spec.targets] if comp == "unet" else TEXT_TARGETS
                    config = LoraConfig(r=self.spec.rank, lora_alpha=self.spec.alpha, target_modules=list(targets),
                                        init_lora_weights=True)
                    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
            for _, param in self.named_trainables():
                param.data = param.data.float()  # trainables stay fp32 whatever the base precision
                param.requires_grad_(True)
            yield self
        finally:
            for model in self.components.values():
                remove_lora_layers(model)

    def named_trainables(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for comp, model in self.components.items():
            for name, layer in _lora_layers(model):
                yield f"{comp}:{name}:A", layer.lora_A[ADAPTER].weight
                yield f"{comp}:{name}:B", layer.lora_B[ADAPTER].weight

    # ------------------------------------------------------------------ what the frame sets up
    @property
    def train_handle(self) -> ModelHandle:
        return self.handle

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.components)

    def frozen_modules(self) -> list[torch.nn.Module]:
        base = self.handle.base
        return [base.vae] + ([] if self.spec.train_text_encoder else list(base.text_encoders))

    def denoiser(self) -> torch.nn.Module:
        return self.handle.base.unet

    def caches(self) -> list[Cache]:
        return [self.latents, self.text]  # frozen_text: declared by DreamBooth's prior, the one user

    def workload(self) -> RunShape:
        base = self.handle.base
        return RunShape(denoiser=base.unet, modules=(base.unet, base.vae, *base.text_encoders),
                        grad_text_encoders=tuple(m for c, m in self.components.items() if c != "unet"),
                        sizes=tuple(self.dataset.buckets), encode_batches=self.dataset.random_crop, vae=base.vae)

    # ------------------------------------------------------------------ training
    def param_groups(self) -> list[dict]:
        unet = [p for n, p in self.named_trainables() if n.startswith("unet:")]
        text = [p for n, p in self.named_trainables() if not n.startswith("unet:")]
        groups = [{"params": unet, "lr": self.settings.learning_rate}]
        if text:
            groups.append({"params": text, "lr": self.spec.text_learning_rate})
        return groups

    def denoise(self, denoiser, latents: torch.Tensor, captions: list[str], h: int, w: int,
                generator: torch.Generator, target_fn=None) -> torch.Tensor:
        """Per-sample denoising losses ``[B]`` of the trained model for ``latents`` captioned ``captions``."""
        return caption_losses(denoiser, self.handle, self.text, self.schedule, self.settings, latents, captions, h, w,
                              generator, target_fn)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[FrozenModel]:
        """The model before training (adapters disabled) for the block."""
        layers = [layer for model in self.components.values() for _, layer in _lora_layers(model)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield FrozenModel(self.handle.base.unet, self.handle, self.frozen_text)
        finally:
            for layer in layers:
                layer.enable_adapters(True)  # also puts requires_grad back on the active (trained) adapter

    def loss(self, step: int, batch, generator: torch.Generator, denoiser) -> torch.Tensor:
        h, w = batch.pixels.shape[-2:]
        return self.denoise(denoiser, self.latents.latents(batch), batch.captions, h, w, generator).mean()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_trainables()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.named_trainables():
                p.copy_(state[n])

    # ------------------------------------------------------------------ result
    def extract(self, metadata: dict[str, str] | None = None, name: str = "trained") -> LoraWeights:
        modules = {}
        for comp, model in self.components.items():
            for path, layer in _lora_layers(model):
                modules[(comp, path)] = LoraModule(down=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                                                   up=layer.lora_B[ADAPTER].weight.detach().float().cpu().clone(),
                                                   alpha=float(self.spec.alpha))
        return LoraWeights(self.handle.family, modules, dict(metadata or {}), name)


def train_lora(handle: ModelHandle, dataset: TrainingSet, settings: TrainSettings, spec: LoraSpec, *,
               node: str = "train_lora", validation=None, scorer: Scorer | None = None):
    """Train a LoRA on ``handle`` (its own patches applied) and return ``(LoraWeights, TrainResult)``; with a
    ``scorer`` the LoRA is the best-scoring checkpoint's."""
    dataset, score = scored(dataset, scorer, node)
    objective = LoraObjective(handle, dataset, settings, spec, node=node)
    metadata = {"ss_training_comment": f"trained with comfyui-finetune {node}",
                "ss_steps": str(settings.steps), "ss_learning_rate": str(settings.learning_rate),
                "ss_text_encoder_lr": str(spec.text_learning_rate if spec.train_text_encoder else 0),
                "ss_seed": str(settings.seed), "ss_lr_scheduler": settings.lr_schedule,
                "ss_optimizer": settings.optimizer, "ss_mixed_precision": settings.precision,
                "ss_min_snr_gamma": str(settings.min_snr_gamma), "ss_noise_offset": str(settings.noise_offset),
                "ss_num_train_images": str(len(dataset)), "ss_sd_model_name": handle.base.label,
                "ft_targets": spec.targets}
    return run_training("lora", handle, dataset, settings, objective, node=node,
                        config={"rank": spec.rank, "alpha": spec.alpha, "targets": spec.targets,
                                "te": spec.train_text_encoder, "te_lr": spec.text_learning_rate},
                        validation=validation, finish=lambda: objective.extract(metadata), score=score,
                        metadata=metadata)
