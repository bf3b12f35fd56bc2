"""LoRA training with peft on a shared base model, without changing it.

peft's LoRA layers are injected into the base UNet (and text encoders) for the duration of the
run, the trained A/B matrices are read out as :class:`~..core.lora.LoraWeights`, and the original
modules are put back in ``finally``: the base weights are frozen throughout, so every other
handle on the same base sees exactly what it saw before.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from ..core.errors import FinetuneError
from ..core.fields import node_input
from ..core.lora import LoraModule, LoraWeights
from .diffusion import (LatentCache, NoiseSchedule, Offload, TextCache, channels_last, conditioning_for,
                        dataset_captions, denoise_loss, ensure_sdpa, maybe_compile)

if TYPE_CHECKING:  # pragma: no cover
    from ..core.handle import ModelHandle
    from .data import TrainingSet
    from .settings import TrainSettings

log = logging.getLogger("comfy_finetune")
ADAPTER = "ft_train"

UNET_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+feedforward": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                              "ff.net.2"),
    "attention+feedforward+conv": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                   "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


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
    """peft LoRA on the UNet (and optionally the text encoders) of ``handle``'s base."""

    def __init__(self, handle: "ModelHandle", dataset: "TrainingSet", settings: "TrainSettings", spec: LoraSpec,
                 *, node: str) -> None:
        self.handle, self.dataset, self.settings, self.spec, self.node = handle, dataset, settings, spec, node
        base = handle.base
        self.components: dict[str, torch.nn.Module] = {"unet": base.unet}
        if spec.train_text_encoder:
            for i, te in enumerate(base.text_encoders):
                self.components[f"te{i + 1}"] = te
        self.schedule = NoiseSchedule(base.scheduler_config, base.prediction_type)
        frozen = [base.vae] + ([] if spec.train_text_encoder else list(base.text_encoders))
        self.offload = Offload(frozen, base.device) if settings.offload_frozen else None
        self.latents = LatentCache(handle, dataset, disk=settings.cache_to_disk, offload=self.offload)
        self.text = TextCache(handle, node, cache=not spec.train_text_encoder, disk=settings.cache_to_disk,
                              offload=self.offload)
        self.unet_fn = base.unet  # the UNet as the loss calls it (compiled with settings.compile)

    # ------------------------------------------------------------------ adapters
    def check(self) -> None:
        if self.spec.rank < 1:
            raise FinetuneError(f"rank must be at least 1 (got {self.spec.rank})", node=self.node, input="rank",
                                fix="use 4-64")
        if self.spec.train_text_encoder and not self.spec.text_learning_rate > 0:
            raise FinetuneError(f"text_learning_rate must be positive when the text encoder trains (got "
                                f"{self.spec.text_learning_rate})", node=self.node, input="text_learning_rate",
                                fix="use e.g. 5e-5, or turn train_text_encoder off")
        missing = getattr(self.dataset, "missing_captions", 0)
        if missing:
            log.warning("[%s] %d of %d images have no caption; they train with %s", self.node, missing,
                        len(self.dataset), f"the caption prefix '{self.dataset.caption_prefix}'"
                        if getattr(self.dataset, "caption_prefix", "") else "an empty caption (add .txt captions "
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

    def attach(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

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

    def detach(self) -> None:
        for model in self.components.values():
            remove_lora_layers(model)

    def named_trainables(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for comp, model in self.components.items():
            for name, layer in _lora_layers(model):
                yield f"{comp}:{name}:A", layer.lora_A[ADAPTER].weight
                yield f"{comp}:{name}:B", layer.lora_B[ADAPTER].weight

    # ------------------------------------------------------------------ Objective protocol
    def param_groups(self) -> list[dict]:
        unet = [p for n, p in self.named_trainables() if n.startswith("unet:")]
        text = [p for n, p in self.named_trainables() if not n.startswith("unet:")]
        groups = [{"params": unet, "lr": self.settings.learning_rate}]
        if text:
            groups.append({"params": text, "lr": self.spec.text_learning_rate})
        return groups

    def loss(self, step: int, batch, generator: torch.Generator) -> torch.Tensor:
        latents = self.latents.latents(batch)
        h, w = batch.pixels.shape[-2:]
        context, added = conditioning_for(self.handle, self.text, list(batch.captions), int(h), int(w))
        return denoise_loss(self.unet_fn, latents, context, self.schedule, generator=generator, added=added,
                            noise_offset=self.settings.noise_offset,
                            min_snr_gamma=self.settings.min_snr_gamma).mean()

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

    @contextlib.contextmanager
    def attached(self) -> Iterator["LoraObjective"]:
        """Adapters, speed and memory options (SDPA, checkpointing, channels-last, compile, offload) on for the
        block; the base restored after."""
        self.check()
        checkpointing = []
        unet = self.handle.base.unet
        try:
            with contextlib.ExitStack() as stack:
                self.attach()
                ensure_sdpa(unet)
                if self.settings.gradient_checkpointing:
                    checkpointing = [m for m in self.components.values() if enable_checkpointing(m)]
                stack.enter_context(channels_last(unet, self.settings.use_channels_last(self.handle.base.device)))
                self.unet_fn = maybe_compile(unet, self.settings.compile)
                if self.offload is not None:
                    stack.enter_context(prepare_offload(self, self.offload))
                yield self
        finally:
            self.unet_fn = unet
            for model in checkpointing:
                disable_checkpointing(model)
            self.detach()
            for model in self.components.values():
                model.requires_grad_(False)

    def frozen_on_device(self):
        """The offloaded frozen modules back on the device for the block (validation samples)."""
        return self.offload.on_device() if self.offload is not None else contextlib.nullcontext()


def prepare_offload(objective, offload: Offload):
    """Encode every latent (and caption, when cached) now, then ``offload.offloaded()``. A VAE that random crops
    still need stays on the device."""
    vae = objective.handle.base.vae
    if not objective.latents.fill():
        log.warning("[%s] offload_frozen: random crops are encoded every step, so the VAE stays on the device",
                    objective.node)
        offload.modules = [m for m in offload.modules if m is not vae]
    text = getattr(objective, "text", None)
    if text is not None and text.cache:
        text.fill(dataset_captions(objective.dataset))
    return offload.offloaded()


def train_lora(handle: "ModelHandle", dataset: "TrainingSet", settings: "TrainSettings", spec: LoraSpec, *,
               node: str = "TrainLoRA", validation=None):
    """Train a LoRA on ``handle`` (its own patches applied) and return ``(LoraWeights, TrainResult)``."""
    from .runs import run_training  # noqa: PLC0415

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
                        validation=validation, finish=lambda: objective.extract(metadata))
