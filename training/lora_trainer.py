"""LoRA training (LoRA, DoRA, LoHa, LoKr) with peft on a shared base model, without changing it.

peft's adapter layers are injected into the base UNet (and text encoders) for the duration of the
run, the trained factors are read out as :class:`~..core.lora.LoraWeights`, and the original
modules are put back in ``finally``: the base weights are frozen throughout, so every other
handle on the same base sees exactly what it saw before.

What each algorithm trains (peft's layers) and the module it is read out as, with the delta peft adds to a layer's
weight ``W`` (``s = alpha / rank``):

* ``lora`` (``LoraConfig``): ``dW = s * B @ A`` -> ``LoraModule(down=A, up=B, alpha)``, the same formula.
* ``dora`` (``LoraConfig(use_dora=True)``): ``W' = m / ||W + s * B @ A|| * (W + s * B @ A)``, the norm per output
  channel (over the input and kernel axes), ``m`` the trained magnitude (``lora_magnitude_vector``: ``[out]`` for a
  Linear, ``[1, out, 1, 1]`` for a conv) -> a ``LoraModule`` with ``dora_scale`` ``[out, 1]`` / ``[out, 1, 1, 1]``
  converted to ComfyUI's formula (:func:`dora_scale`).
* ``loha`` (``LoHaConfig``): ``dW = s * (w1_a @ w1_b) * (w2_a @ w2_b)`` -> ``LohaModule``, the same formula (its
  rank is ``w1_b.shape[0]``). Convolutions train flattened ``[out, in * k * k]`` factors (no CP/Tucker core).
* ``lokr`` (``LoKrConfig``): ``dW = s * kron(w1, w2)``, ``w1`` full ``[a, c]``, ``w2`` full ``[b, d]`` (conv
  ``[b, d, k, k]``) or ``w2_a @ w2_b`` when ``rank < max(b, d) / 2`` (``(a, b)``, ``(c, d)`` peft's factorisations of
  the output and input widths) -> ``LokrModule``. LyCORIS and ComfyUI scale by ``alpha / rank`` only when a factor
  is decomposed (scale 1 with both full), peft always: with both factors full, ``s`` is folded into ``w1`` and the
  module carries no alpha, so every reader applies peft's delta.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..core.adapters import LohaModule, LokrModule
from ..core.errors import FinetuneError
from ..core.families import Family
from ..core.fields import node_input
from ..core.handle import ModelHandle
from ..core.lora import Adapter, LoraModule, LoraWeights
from ..scoring.scorers import Scorer
from .data import TrainingSet
from .diffusion import Cache, LatentCache, NoiseSchedule, TextCache, caption_losses, dataset_captions
from .frame import run_training, scored
from .memory import RunShape
from .settings import TEXT_TARGETS, UNET_TARGETS, TrainSettings

log = logging.getLogger("comfy_finetune")
ADAPTER = "ft_train"
ALGORITHMS = ("lora", "dora", "loha", "lokr")
ALGORITHM_TOOLTIP = (
    "lora: plain LoRA. dora: LoRA plus a trained magnitude per output channel (DoRA). loha: LyCORIS LoHa "
    "(Hadamard product of two rank-r pairs; rank r acts like r squared). lokr: LyCORIS LoKr (Kronecker product; a "
    "rank of at least half the larger factor trains full factors). All save in the kohya layout ComfyUI's "
    "LoraLoader reads. The diffusers layout takes lora, and a UNet-only lokr for diffusers' "
    "unet.load_lora_adapter; it refuses loha (diffusers has no LoHa loader) and dora (saved as ComfyUI applies it).")


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
    algorithm: str = node_input("lora", choices=ALGORITHMS, tooltip=ALGORITHM_TOOLTIP)


class FrozenModel(NamedTuple):
    """The model as it was before training, for targets that must not move with it (DreamBooth's prior)."""

    unet: torch.nn.Module
    handle: ModelHandle
    text: TextCache


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The peft layers (LoRA/DoRA, LoHa, LoKr) holding the training adapter, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "r", {}):
            yield name, module


#: Short names of peft's adapter tensors in trainable-state keys (LoRA's A/B as they always were: old checkpoints
#: resume); the LyCORIS tensors keep their own names.
_SHORT = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}


def _layer_tensors(layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the training adapter's tensors in one peft layer (``adapter_layer_names`` order)."""
    for attr in dict.fromkeys(layer.adapter_layer_names):  # peft's DoRA layers may list the magnitude twice
        holder = getattr(layer, attr, None)
        if holder is None or ADAPTER not in holder:
            continue
        item = holder[ADAPTER]  # a Parameter (LoHa/LoKr), or a module holding .weight (LoRA A/B, DoRA magnitude)
        yield _SHORT.get(attr, attr), item if isinstance(item, torch.nn.Parameter) else item.weight


def peft_config(spec: LoraSpec, targets: Sequence[str]):
    """The peft config of ``spec.algorithm`` on modules named ``targets`` (peft's suffix match)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig  # noqa: PLC0415 - heavy at start-up

    common = {"r": spec.rank, "target_modules": list(targets)}
    if spec.algorithm == "loha":
        return LoHaConfig(alpha=spec.alpha, init_weights=True, use_effective_conv2d=False, **common)
    if spec.algorithm == "lokr":
        return LoKrConfig(alpha=spec.alpha, init_weights=True, use_effective_conv2d=False, decompose_both=False,
                          decompose_factor=-1, **common)
    return LoraConfig(lora_alpha=spec.alpha, init_lora_weights=True, use_dora=spec.algorithm == "dora", **common)


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
        if self.spec.algorithm not in ALGORITHMS:
            raise FinetuneError(f"unknown algorithm '{self.spec.algorithm}'", node=self.node, input="algorithm",
                                fix=f"use one of {', '.join(ALGORITHMS)}")
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
        if self.spec.algorithm == "lokr":
            return  # LoKr's rank only decides whether w2 is decomposed: any rank fits any layer
        for comp, model in self.components.items():
            targets = UNET_TARGETS[self.spec.targets] if comp == "unet" else TEXT_TARGETS
            width, where = _min_width(model, targets)
            if self.spec.rank > width:
                raise FinetuneError(f"rank {self.spec.rank} is larger than the layer {where} ({width} wide)",
                                    node=self.node, input="rank", fix=f"use a rank of at most {width}")

    @contextlib.contextmanager
    def attached(self) -> Iterator[LoraObjective]:
        """peft adapter layers (``spec.algorithm``) on the components for the block (fp32, seeded); the original
        layers put back after."""
        from peft import inject_adapter_in_model  # noqa: PLC0415 - heavy at start-up

        self.check()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.settings.seed)
                for comp, model in self.components.items():
                    targets = UNET_TARGETS[self.spec.targets] if comp == "unet" else TEXT_TARGETS
                    inject_adapter_in_model(peft_config(self.spec, targets), model, adapter_name=ADAPTER)
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
                for part, param in _layer_tensors(layer):
                    yield f"{comp}:{name}:{part}", param

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
        """The trained adapters as the pack's modules (see the module docstring for each algorithm's formula)."""
        modules = {}
        for comp, model in self.components.items():
            for path, layer in _lora_layers(model):
                modules[(comp, path)] = extract_module(layer, float(self.spec.alpha), self.spec.rank)
        return LoraWeights(self.handle.family, modules, dict(metadata or {}), name)


def _tensor(item) -> torch.Tensor:
    t = item if isinstance(item, torch.Tensor) else item.weight
    return t.detach().float().cpu().clone()


def extract_module(layer: torch.nn.Module, alpha: float, rank: int) -> Adapter:
    """One peft layer's training adapter as a :class:`LoraModule` / :class:`LohaModule` / :class:`LokrModule` whose
    delta equals the one peft adds (scale ``alpha / rank``)."""
    parts = {attr: _tensor(getattr(layer, attr)[ADAPTER]) for attr in layer.adapter_layer_names
             if ADAPTER in getattr(layer, attr, {})}
    if "hada_w1_a" in parts:  # LoHa: peft and LyCORIS both scale (w1_a @ w1_b) * (w2_a @ w2_b) by alpha / rank
        return LohaModule(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
                          parts.get("hada_t1"), parts.get("hada_t2"))
    if any(k.startswith("lokr_") for k in parts):
        factors = {k.removeprefix("lokr_"): v for k, v in parts.items()}
        if "w1" in factors and "w2" in factors:  # both full: LyCORIS/ComfyUI apply no alpha, peft alpha / rank
            factors["w1"] = factors["w1"] * (alpha / rank)
            return LokrModule(None, **factors)
        return LokrModule(alpha, **factors)
    module = LoraModule(down=parts["lora_A"], up=parts["lora_B"], alpha=alpha)
    if "lora_magnitude_vector" in parts:
        module.dora_scale = dora_scale(layer, module, parts["lora_magnitude_vector"])
    return module


def dora_scale(layer: torch.nn.Module, module: LoraModule, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA magnitudes as the ``dora_scale`` that makes ComfyUI give peft's weight (``[out, 1]``, ``[out, 1, 1, 1]``).

    peft (``lora/dora.py``): ``W' = m / |V| * V`` with ``V = W + s * B @ A`` and ``|V|`` the norm of each output row
    (over the input and kernel axes), ``m`` the trained magnitude (``[out]`` Linear, ``[1, out, 1, 1]`` conv).
    ComfyUI 0.3.x (``weight_adapter/base.py::weight_decompose``, output axis, as the pack applies it) divides by the
    row norm of ``W`` before the delta instead: ``W' = dora_scale / (|W| + eps) * V``, ``eps`` fp32's. So
    ``dora_scale = m * (|W| + eps) / |V|``, with ``W`` the weight the layer trained on (base plus the handle's earlier
    patches, which are applied before this LoRA again).
    """
    weight = layer.get_base_layer().weight.detach().float().cpu()
    merged = weight + module.delta(1.0).reshape(weight.shape)
    rows = (weight.shape[0], *[1] * (weight.dim() - 1))
    base_norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(rows) + torch.finfo(torch.float32).eps
    merged_norm = merged.reshape(weight.shape[0], -1).norm(dim=1).reshape(rows)
    return magnitude.reshape(rows) * base_norm / merged_norm


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
                "ft_targets": spec.targets, "ft_algorithm": spec.algorithm, "ss_network_dim": str(spec.rank),
                "ss_network_alpha": str(spec.alpha)}
    config = {"rank": spec.rank, "alpha": spec.alpha, "targets": spec.targets, "te": spec.train_text_encoder,
              "te_lr": spec.text_learning_rate}
    if spec.algorithm != "lora":  # a plain LoRA run keeps its old key (its checkpoints resume)
        config["algorithm"] = spec.algorithm
    return run_training("lora", handle, dataset, settings, objective, node=node, config=config,
                        validation=validation, finish=lambda: objective.extract(metadata), score=score,
                        metadata=metadata)
