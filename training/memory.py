"""Will this training run fit in memory? An estimate of the peak before the first step, and the cheapest changes
that make it fit.

:func:`check` runs at the start of every trainer (``frame.run_training``, after the trainables are attached and
before the optimizer exists). When the estimated peak does not fit in the free memory of the training device, it
raises a :class:`FinetuneError` naming the node and the settings that would fit, e.g.::

    [FinetuneTrainLoRA] not enough GPU memory for this run: estimated 9.1 GB more, 5.8 GB free (resolution 1024,
    batch_size 4, fp32, gradient checkpointing off). Fix: gradient_checkpointing on, precision bf16:
    estimated 3.9 GB of 5.8 GB free

so a run never starts just to die at step 1 (or, on Windows, to spill into shared memory at 1/50 of the speed).

The peak is ``weights + trainable + grads + optimizer + activations + workspace`` (bytes):

* **weights**: every parameter on the training device of the models the run holds (base UNet, VAE, text encoders,
  a full fine-tune's trained copy; not what ``offload_frozen`` moved to the CPU), at their dtypes. They are
  already loaded when the check runs, so they count on both sides: available = free memory + these weights.
* **trainable / grads**: the trainable tensors not already in the weights (LoRA A/B, new embedding vectors) and
  one gradient per trainable value, at the trainables' dtype (fp32). With the fused optimizer step
  (``fused_step``, :class:`.loop.FusedStep`; grad_accum 1) only one tensor's gradient exists at a time: twice the
  largest trainable tensor (its gradient and the optimizer's temporary of that size).
* **frozen layers** (:func:`frozen_layers`): the denoiser's frozen Linear/Conv weights are part of the weights at
  their dtype; ``fp8_base`` (:mod:`.fp8`) stores them in 1 byte a value on the device (the originals wait on the
  CPU; on a CPU device they stay and the float8 copies come on top) plus the upcast layer twice in the workspace;
  ``offload_unet`` keeps them on the CPU with ``STREAM_WINDOW`` layers on the device.
* **optimizer**: AdamW 2 fp32 states per trainable value (8 B), 8-bit AdamW 2 one-byte states (~2 B with its
  block scales), Prodigy 4 fp32 states (16 B).
* **activations**: what autograd keeps for the backward pass, per sample, measured on the architecture itself:
  a copy of the UNet is built on the ``meta`` device (no memory, no compute) from the model's config, the layers
  that train are marked as they are in the real run (LoRA targets, the whole UNet for full fine-tuning, or the
  conditioning for textual inversion / text-encoder training), and one forward pass at the training resolution is
  run under ``torch.autograd.graph.saved_tensors_hooks``, adding up the bytes of every saved tensor that is not a
  weight. Attention is counted as fused (q, k, v, output and log-sum-exp; no n^2 matrix), as PyTorch's SDPA
  kernels run it. With gradient checkpointing, the tensors saved inside each call diffusers checkpoints (the
  probe passes its own ``gradient_checkpointing_func``, which runs the call plainly and accounts for it) are
  replaced by the call's inputs, plus the largest call's tensors once (its recomputation during backward).
  Autocast (bf16/fp16 over fp32 weights) scales activations by
  ``AUTOCAST_FACTOR`` = 0.55 (matmul/conv outputs in half precision, norms and softmax statistics in fp32). The
  sum is multiplied by ``ACTIVATION_FACTOR`` = 1.6 (``CHECKPOINT_FACTOR`` = 2.5 with checkpointing): backward's
  gradient buffers, recomputed blocks and allocator slack, calibrated as the measured per-sample slope of peak
  memory over the saved bytes on the tiny models (1.67 and 2.6). Text encoders that train add
  ``layers x tokens x width x 24`` values per sample (their blocks' saved tensors; 77 tokens for CLIP, 256 for
  Kolors' ChatGLM3), and a second UNet pass (DreamBooth prior preservation with class images) doubles the
  activations.
* **workspace**: the UNet's largest single saved tensor twice (the gradient of the layer being differentiated).
* **encode**: the VAE encoding of the first batches (latents not cached yet), about 6 tensors of the encoder's
  first level (``6 x 128 ch x H x W`` for the real VAE) per image (per batch with random crop). It happens before
  the UNet's forward pass, so the peak has the larger of ``activations + workspace`` and ``encode``.

The saved-bytes probe matches the real model's saved tensors within 7 % (tiny SD 1.x, also with checkpointing:
8.3 MB probed vs 4.1 MB kept + 1.6 MB inputs + the largest block recomputed). Against the measured peak RSS
growth of a one-step CPU run over the loaded model (tiny models, glibc ``malloc_trim`` before, ``VmHWM`` reset),
estimate / measured was 0.77-1.0 (sd1 256 px batch 1/4/8, 512 px batch 2, sd2 and sdxl 256 px batch 4, with and
without checkpointing, fp32 and bf16); ``tests/test_memory_estimate.py`` prints it and holds it within 2x. On
CUDA the figure to compare is ``torch.cuda.max_memory_allocated``; that calibration needs a GPU session.

The free memory is ``torch.cuda.mem_get_info`` (plus memory PyTorch holds cached but unused) on CUDA, and
available RAM (psutil, else ``/proc/meminfo``) on the CPU. ``COMFY_FINETUNE_FREE_MEMORY`` (bytes, or with a unit:
``4GB``, ``512MiB``) overrides it, for tests and for users who want a margin. 95 % of the free memory is usable.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..core.errors import FinetuneError
from ..core.realsize import load_configs
from . import distributed, fp8
from .loop import fused_step_plan  # the loop's own rule
from .settings import UNET_TARGETS, TrainSettings

log = logging.getLogger("comfy_finetune")

FREE_MEMORY_ENV = "COMFY_FINETUNE_FREE_MEMORY"
CHECK_ENV = "COMFY_FINETUNE_MEMORY_CHECK"  # "off": no check (an escape hatch if the estimate is wrong)
USABLE = 0.95               # of the free memory: room for fragmentation and the host's own allocations
ACTIVATION_FACTOR = 1.6     # saved tensors -> peak per sample (backward buffers, allocator slack); measured 1.67
CHECKPOINT_FACTOR = 2.5     # the same with gradient checkpointing (blocks re-allocated in backward); measured 2.6
AUTOCAST_FACTOR = 0.55      # bf16/fp16 autocast over fp32 weights: most saved tensors in half precision
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "prodigy": 16.0}  # per trainable value
GB = 1e9
KOLORS_TOKENS = 256         # Kolors' prompts are always left-padded to 256 ChatGLM3 positions


@dataclass
class Workload:
    """What the estimate needs to know about a run (gathered by :func:`describe`)."""

    unet: torch.nn.Module
    weight_bytes: int                 # all resident parameters (frozen and trained)
    frozen_half_saving: int           # bytes loading the frozen models in 16 bit would save (0 if already 16 bit)
    extra_trainable_values: int       # trainable values not counted in weight_bytes (LoRA, embedding vectors)
    trainable_values: int             # all trainable values (each gets a gradient and optimizer state)
    trainable_bytes_per_value: int    # 4 (fp32 trainables)
    mode: str                         # "lora" | "full" | "none": which UNet weights train
    trained_names: frozenset[str]     # UNet module names with LoRA layers that train ("lora")
    context_grad: bool                # the conditioning needs a gradient (text encoder or embedding trains)
    text_encoder_values: int          # layers x tokens x width summed over the text encoders that train (0 if none)
    unet_passes: int                  # 2 with class-image prior preservation, else 1
    vae_channels: int                 # channels of the VAE encoder's first level
    encode_batches: bool              # random crop: latents are encoded per batch, not once per image
    width: int                        # largest training size (pixels)
    height: int
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    largest_trainable_values: int = 0  # the largest trainable tensor (the fused step's one live gradient)
    # the denoiser's frozen Linear/Conv weights (what fp8_base stores in float8 and offload_unet streams), counted
    # in weight_bytes at their own dtype: values, bytes, the largest layer's values
    frozen_layer_values: int = 0
    frozen_layer_bytes: int = 0
    largest_frozen_layer: int = 0


@dataclass(frozen=True)
class Choice:
    """One point of the settings space."""

    batch_size: int                   # per process
    gradient_checkpointing: bool
    precision: str                    # "fp32" | "bf16" | "fp16" (autocast)
    optimizer: str
    width: int
    height: int
    half_weights: bool = False        # frozen models loaded in 16 bit (a loader change)
    grad_accum: int = 1
    fused_step: bool = False          # the optimizer steps each tensor in backward (loop.FusedStep)
    fp8_base: bool = False            # frozen UNet layer weights stored in float8 (training/fp8.py)
    offload_unet: bool = False        # frozen UNet layer weights streamed from the CPU per layer (training/offload.py)


@dataclass
class Estimate:
    weights: int
    trainable: int
    grads: int
    optimizer: int
    activations: int
    workspace: int
    encode: int = 0   # VAE encoding, before the UNet's forward pass (not at the same time as the activations)

    @property
    def total(self) -> int:
        return (self.weights + self.trainable + self.grads + self.optimizer
                + max(self.activations + self.workspace, self.encode))

    def parts(self) -> str:
        return ", ".join(f"{k} {_gb(getattr(self, k))}" for k in ("weights", "trainable", "grads", "optimizer",
                                                                   "activations", "workspace", "encode"))


def _gb(n: float) -> str:
    n = max(0.0, float(n))  # a change can free more than the run needs ("0 MB" more)
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------------- free memory
def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise FinetuneError(f"{FREE_MEMORY_ENV}={text!r} is not a size", input=FREE_MEMORY_ENV,
                            fix="use bytes or a size such as 4GB or 512MiB")
    value, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    scale = (1024 if binary else 1000) ** " KMGT".index(unit or " ")
    return int(value * scale)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` (see the module doc); None if unknown."""
    override = os.environ.get(FREE_MEMORY_ENV, "").strip()
    if override:
        return parse_bytes(override)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "cpu":
        try:
            import psutil  # noqa: PLC0415

            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001 - psutil is optional
            pass
        try:
            with open("/proc/meminfo", encoding="ascii") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# ---------------------------------------------------------------------------------------------- the workload
@dataclass(frozen=True)
class RunShape:
    """What an objective tells the memory check about its run (``Objective.workload()``, while attached)."""

    denoiser: torch.nn.Module                    # the UNet the loss calls (with its adapters, or a trained copy)
    modules: tuple[torch.nn.Module, ...]         # every model module the run holds (base and trained copies)
    grad_text_encoders: tuple[torch.nn.Module, ...]  # text encoders backprop runs through (trained, or carrying
    #                                               an embedding's gradient)
    sizes: tuple[tuple[int, int], ...]           # training sizes (w, h) in pixels
    encode_batches: bool                         # random crop: latents are encoded per batch
    vae: torch.nn.Module | None = None
    unet_passes: int = 1                         # 2 with class-image prior preservation


def describe(shape: RunShape, param_groups: list[dict], device: torch.device) -> Workload:
    """Gather the :class:`Workload` of a run from its objective's :class:`RunShape` and trainables."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415 - heavy at start-up

    unet = shape.denoiser
    trainables = {id(p): p for g in param_groups for p in g["params"]}
    seen: dict[int, torch.nn.Parameter] = {}
    for m in (*shape.modules, unet):
        for p in m.parameters():  # what waits elsewhere (offload_frozen moved it off the device) takes no room;
            # a layer weight that fp8_base / offload_unet took off the device counts where it came from (the
            # estimate models those options from the layers' own bytes)
            if p.device.type in (device.type, "meta") or fp8.moved_from(p) is not None:
                seen.setdefault(id(p), p)
    weight_bytes = sum(p.numel() * p.element_size() for p in seen.values())
    frozen_half = sum(p.numel() * p.element_size() // 2 for i, p in seen.items()
                      if i not in trainables and p.dtype == torch.float32)
    extra = sum(p.numel() for i, p in trainables.items() if i not in seen)
    values = sum(p.numel() for p in trainables.values())
    lora_names = frozenset(n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer)
                           and any(p.requires_grad for p in m.parameters()))
    injected = extra_ids(unet)
    if any(p.requires_grad for p in unet.parameters() if id(p) not in injected):
        mode = "full"
    elif lora_names:
        mode = "lora"
    else:
        mode = "none"
    te_values = 0
    for te in shape.grad_text_encoders:
        # their blocks' saved tensors scale with layers x tokens x width: CLIP (transformers) reads 77 tokens,
        # ChatGLM3 (Kolors; num_layers in its config) 256
        cfg = te.config
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", 0)
        tokens = 77 if hasattr(cfg, "num_hidden_layers") else KOLORS_TOKENS
        te_values += int(layers) * tokens * int(cfg.hidden_size)
    width, height = max(shape.sizes, key=lambda s: s[0] * s[1])
    vae_ch = int(shape.vae.config.block_out_channels[0]) if shape.vae is not None else 128
    layers = [p for p in frozen_layer_weights(unet) if id(p) in seen]
    return Workload(largest_trainable_values=max((p.numel() for p in trainables.values()), default=0),
                    frozen_layer_values=sum(p.numel() for p in layers),
                    frozen_layer_bytes=sum(p.numel() * p.element_size() for p in layers),
                    largest_frozen_layer=max((p.numel() for p in layers), default=0),
                    unet=unet, weight_bytes=weight_bytes, frozen_half_saving=frozen_half,
                    extra_trainable_values=extra, trainable_values=values, trainable_bytes_per_value=4,
                    mode=mode, trained_names=lora_names if mode == "lora" else frozenset(),
                    context_grad=bool(shape.grad_text_encoders), text_encoder_values=te_values,
                    unet_passes=shape.unet_passes, vae_channels=vae_ch, encode_batches=shape.encode_batches,
                    width=int(width), height=int(height), world_size=distributed.world_size(), device=device)


def frozen_layer_weights(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The frozen Linear/Conv weights of ``unet`` (those fp8_base and offload_unet apply to; adapters' own layers
    train, so they are not among them)."""
    return [m.weight for m in unet.modules() if isinstance(m, fp8.LAYER_TYPES)
            and isinstance(m.weight, torch.nn.Parameter) and not m.weight.requires_grad]


def extra_ids(unet: torch.nn.Module) -> set[int]:
    """ids of the adapter tensors peft injected into ``unet`` (LoRA/DoRA, LoHa, LoKr: not the UNet's own weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415 - heavy at start-up

    out: set[int] = set()
    for m in unet.modules():
        if isinstance(m, BaseTunerLayer):
            for sub in (getattr(m, name, {}) for name in m.adapter_layer_names):
                for v in (sub.values() if hasattr(sub, "values") else []):
                    for p in (v.parameters() if isinstance(v, torch.nn.Module) else [v]):
                        out.add(id(p))
    return out


# ---------------------------------------------------------------------------------------------- activations
class _FusedAttention(torch.autograd.Function):
    """Stand-in for SDPA during the probe: keeps what the fused kernels keep (q, k, v, output, log-sum-exp)."""

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: ANN001
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out.detach().clone(), lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001 - never called (meta probe)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _fused_sdpa() -> Iterator[None]:
    import torch.nn.functional as F  # noqa: N812, PLC0415

    real = F.scaled_dot_product_attention

    def probe(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # noqa: ANN001, ARG001
        if q.device.type != "meta":
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return _FusedAttention.apply(q, k, v)

    F.scaled_dot_product_attention = probe
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


@dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one sample through the UNet (weights' dtype, no autocast)."""

    plain: int          # without gradient checkpointing
    checkpointed: int   # with it
    largest: int        # the largest single saved tensor


_PROBES: dict[tuple, Activations] = {}


def probe_activations(unet: torch.nn.Module, mode: str, trained: frozenset[str], context_grad: bool, width: int,
                      height: int) -> Activations:
    """Measure one sample's saved tensors on a meta-device copy of ``unet`` (see the module doc). Cached."""
    cfg = dict(unet.config)
    dtype = next(unet.parameters()).dtype
    key = (repr(sorted(cfg.items())), mode, hash(trained), context_grad, width, height, dtype)
    if key in _PROBES:
        return _PROBES[key]
    with _default_dtype(dtype), torch.device("meta"):
        meta = type(unet).from_config(cfg)
    meta.requires_grad_(False)
    meta.train()
    if mode == "full":
        meta.requires_grad_(True)
    elif mode == "lora":
        for name in trained:
            try:
                sub = meta.get_submodule(name)
            except AttributeError:
                continue
            w = getattr(sub, "weight", None)
            if isinstance(w, torch.nn.Parameter):
                w.requires_grad_(True)
    params = {id(p) for p in meta.parameters()}
    lat_h, lat_w = max(1, height // 8), max(1, width // 8)
    sample = torch.empty((1, int(cfg.get("in_channels", 4)), lat_h, lat_w), device="meta", dtype=dtype)
    ctx_dim = cfg.get("cross_attention_dim", 768)
    ctx_dim = ctx_dim[0] if isinstance(ctx_dim, (list, tuple)) else ctx_dim
    tokens = 77
    if cfg.get("encoder_hid_dim_type") == "text_proj":  # Kolors: 256 ChatGLM3 states, projected inside the UNet
        ctx_dim, tokens = cfg["encoder_hid_dim"], KOLORS_TOKENS
    context = torch.empty((1, tokens, int(ctx_dim)), device="meta", dtype=dtype, requires_grad=context_grad)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
        added = {"text_embeds": torch.empty((1, pooled), device="meta", dtype=dtype),
                 "time_ids": torch.empty((1, 6), device="meta", dtype=dtype)}
    timesteps = torch.zeros((1,), device="meta", dtype=torch.long)

    saved: dict[int, int] = {}
    largest = [0]
    stack: list[list[int]] = []      # per open checkpointed call: [bytes saved inside]
    units: list[int] = []            # bytes saved inside each outermost checkpointed call
    unit_inputs: dict[int, int] = {}  # the tensors a checkpointed call keeps (its inputs), each counted once

    def pack(t: torch.Tensor):
        if id(t) in params or (t._base is not None and id(t._base) in params) or id(t) in saved:
            return t
        n = t.numel() * t.element_size()
        saved[id(t)] = n
        largest[0] = max(largest[0], n)
        if stack:
            stack[0][0] += n
        return t

    def checkpointed_call(module, *args):  # noqa: ANN001 - what diffusers checkpoints, run plainly and accounted
        if not stack:
            for x in args:
                if isinstance(x, torch.Tensor):
                    unit_inputs.setdefault(id(x), x.numel() * x.element_size())
        stack.append([0])
        try:
            return module(*args)
        finally:
            inside = stack.pop()[0]
            if not stack:
                units.append(inside)

    if hasattr(meta, "enable_gradient_checkpointing"):
        meta.enable_gradient_checkpointing(checkpointed_call)
    with _fused_sdpa(), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta(sample, timesteps, encoder_hidden_states=context, added_cond_kwargs=added)
    total = sum(saved.values())
    checkpointed = total - sum(units) + sum(unit_inputs.values()) + max(units, default=0)
    result = Activations(plain=total, checkpointed=min(total, checkpointed), largest=largest[0])
    _PROBES[key] = result
    return result


# ---------------------------------------------------------------------------------------------- the estimate
def estimate(work: Workload, choice: Choice) -> Estimate:
    """Peak bytes of a training step for ``work`` under ``choice`` (see the module doc for each term)."""
    unet_dtype = next(work.unet.parameters()).dtype
    acts = probe_activations(work.unet, work.mode, work.trained_names, work.context_grad, choice.width,
                             choice.height)
    per_sample = acts.checkpointed if choice.gradient_checkpointing else acts.plain
    half = choice.precision in ("bf16", "fp16") and unet_dtype == torch.float32
    scale = AUTOCAST_FACTOR if half else 1.0
    value_bytes = 2 if (half or unet_dtype in (torch.float16, torch.bfloat16)) else 4
    te = work.text_encoder_values * 24 * value_bytes
    factor = CHECKPOINT_FACTOR if choice.gradient_checkpointing else ACTIVATION_FACTOR
    activations = int((per_sample * scale + te) * choice.batch_size * work.unet_passes * factor)
    largest = int(acts.largest * scale * choice.batch_size)
    vae_bytes = 2 if half or unet_dtype != torch.float32 else 4
    encode = 6 * work.vae_channels * choice.width * choice.height * vae_bytes * (
        choice.batch_size if work.encode_batches else 1)
    layers, transient = frozen_layers(work, choice)
    weights = work.weight_bytes - (work.frozen_half_saving if choice.half_weights else 0) \
        - work.frozen_layer_bytes + layers
    grads = work.trainable_values * work.trainable_bytes_per_value
    if choice.fused_step and choice.grad_accum == 1:  # one tensor's gradient and the step's temporary of its size
        grads = min(grads, 2 * work.largest_trainable_values * work.trainable_bytes_per_value)
    return Estimate(weights=weights,
                    trainable=work.extra_trainable_values * work.trainable_bytes_per_value,
                    grads=grads,
                    optimizer=int(work.trainable_values * OPTIMIZER_BYTES.get(choice.optimizer, 8.0)),
                    activations=activations, workspace=2 * largest + transient, encode=encode)


STREAM_WINDOW = 2  # offload_unet: layers on the device at once, the one running and the next (prefetched)


def frozen_layers(work: Workload, choice: Choice) -> tuple[int, int]:
    """``(resident, transient)`` bytes of the denoiser's frozen Linear/Conv weights under ``choice``.

    Plain: their own bytes. ``fp8_base``: 1 byte a value (the per-tensor scale is one float), the originals moved
    to the CPU (on a CPU device they stay, so the float8 copies come on top), and while a layer runs its weight
    upcast to the original dtype, twice at most (the forward's and the backward's, which upcasts again instead of
    keeping it). ``offload_unet``: the weights (float8 or not) wait on the CPU and :data:`STREAM_WINDOW` layers
    are on the device at once (on a CPU device nothing moves)."""
    values, nominal, largest = work.frozen_layer_values, work.frozen_layer_bytes, work.largest_frozen_layer
    if not values or not (choice.fp8_base or choice.offload_unet):
        return nominal, 0
    each = nominal / values
    stored_each = 1.0 if choice.fp8_base else each
    transient = int(2 * largest * each) if choice.fp8_base else 0
    if work.device.type == "cpu":
        return nominal + (values if choice.fp8_base else 0), transient
    if choice.offload_unet:
        return int(STREAM_WINDOW * largest * stored_each), transient
    return values, transient


def current_choice(work: Workload, settings: TrainSettings, offload_unet: bool = False) -> Choice:
    """The settings as a :class:`Choice`; ``offload_unet``: the frame streams the frozen layers (its decision for
    ``offload_unet`` auto)."""
    grad_bytes = work.trainable_values * work.trainable_bytes_per_value
    try:
        fused = fused_step_plan(settings, grad_bytes, work.device, "")[0]
    except FinetuneError:  # fused_step on where it cannot be exact: the loop refuses it, with its own error
        fused = False
    return Choice(batch_size=max(1, int(settings.batch_size) // max(1, work.world_size)),
                  gradient_checkpointing=bool(settings.gradient_checkpointing),
                  precision=settings.resolved_precision(work.device), optimizer=str(settings.optimizer),
                  width=work.width, height=work.height, grad_accum=int(settings.grad_accum), fused_step=fused,
                  fp8_base=bool(settings.fp8_base) and work.frozen_layer_values > 0,
                  offload_unet=offload_unet and work.frozen_layer_values > 0)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401, PLC0415
    except Exception:  # noqa: BLE001
        return False
    return True


def alternatives(work: Workload, now: Choice) -> Iterator[tuple[int, Choice, list[str]]]:
    """(cost, choice, changes) for every combination of cheaper settings; cost ranks how much a change costs
    the user (speed < precision < batch and optimizer < model dtype < resolution)."""
    cuda = work.device.type == "cuda"
    ckpt = [(now.gradient_checkpointing, 0, None)]
    if not now.gradient_checkpointing:
        ckpt.append((True, 1, "gradient_checkpointing on"))
    prec = [(now.precision, 0, None)]
    if now.precision == "fp32":
        half = "bf16" if not cuda or torch.cuda.is_bf16_supported() else "fp16"
        prec.append((half, 1, f"precision {half}"))
    opt = [(now.optimizer, 0, None)]
    if now.optimizer != "adamw8bit" and cuda and _bnb_available():
        opt.append(("adamw8bit", 2, "optimizer adamw8bit"))
    batches = [(now.batch_size, 0, None)]
    b, k = now.batch_size, 0
    while b > 1:
        b, k = max(1, b // 2), k + 1
        batches.append((b, 2 * k, b))
    fused = [(now.fused_step, 0, None)]
    if not now.fused_step and now.grad_accum == 1 and work.world_size == 1:
        fused.append((True, 1, "fused_step on"))
    fp8s = [(now.fp8_base, 0, None)]
    if not now.fp8_base and work.frozen_layer_values and work.device.type != "cpu":
        fp8s.append((True, 3, "fp8_base on"))
    streams = [(now.offload_unet, 0, None)]
    if not now.offload_unet and work.frozen_layer_values and work.device.type != "cpu":
        streams.append((True, 2, "offload_unet on"))
    weights = [(False, 0, None)]
    if work.frozen_half_saving:
        weights.append((True, 3, "load the model with dtype bf16" if not cuda or torch.cuda.is_bf16_supported()
                        else "load the model with dtype fp16"))
    side = max(now.width, now.height)
    sizes = [(now.width, now.height, 0, None)]
    for k, target in enumerate(s for s in (1024, 768, 512, 384, 256) if s < side):
        f = target / side
        sizes.append((max(64, int(now.width * f) // 64 * 64), max(64, int(now.height * f) // 64 * 64), 4 + 2 * k,
                      f"resolution {target} in the Training Data node"))
    for (c, cc, cn), (p, pc, pn), (o, oc, on), (bs, bc, bn), (hw, wc, wn), (w, h, sc, sn), (fu, fc, fn), \
            (f8, f8c, f8n), (st, stc, stn) in itertools.product(ckpt, prec, opt, batches, weights, sizes, fused, fp8s,
                                                                streams):
        cost = cc + pc + oc + bc + wc + sc + fc + f8c + stc
        if cost == 0 or (fu and fn and (p == "fp16" or o not in ("adamw", "adamw8bit"))):
            continue  # (the fused step is exact only with a per-tensor optimizer and no fp16 loss scaling)
        changes = [x for x in (cn, pn, on, fn, f8n, stn) if x]
        if bn is not None:
            accum = now.grad_accum * (now.batch_size // bs)
            changes.append(f"batch_size {bs * work.world_size} with grad_accum {accum} (the same effective batch)")
        changes += [x for x in (wn, sn) if x]
        yield cost, Choice(bs, c, p, o, w, h, hw, now.grad_accum, fu, f8, st), changes


def suggest(work: Workload, now: Choice, budget: float) -> tuple[list[str], Choice, int] | None:
    """The cheapest (by :func:`alternatives`' cost, then by memory) changes whose estimate fits in ``budget``
    bytes beyond the loaded weights: (changes, choice, bytes needed); None if nothing fits."""
    best: tuple[int, int, list[str], Choice] | None = None
    loaded = estimate(work, now).weights
    for cost, choice, changes in alternatives(work, now):
        need = estimate(work, choice).total - loaded
        if need <= budget and (best is None or (cost, need) < best[:2]):
            best = (cost, need, changes, choice)
    return None if best is None else (best[2], best[3], best[1])


def wants_offload(shape: RunShape, param_groups: list[dict], settings: TrainSettings, device: torch.device,
                  free_bytes: int | None = None) -> bool:
    """``offload_unet`` auto: stream the frozen UNet layers when the run, as set, would not fit in the free memory
    of a non-CPU device (by the estimate) and there are frozen layers to stream."""
    device = torch.device(device)
    if settings.offload_unet != "auto":
        return settings.offload_unet == "on"
    if device.type == "cpu" or os.environ.get(CHECK_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return False
    free = free_bytes if free_bytes is not None else free_memory(device)
    if free is None:
        return False
    try:
        work = describe(shape, param_groups, device)
        est = estimate(work, current_choice(work, settings))
    except Exception as exc:  # noqa: BLE001 - an architecture the probe cannot run: as set
        log.debug("offload_unet auto: no estimate (%s)", exc)
        return False
    return bool(work.frozen_layer_values) and est.total - est.weights > free * USABLE


def check(shape: RunShape, param_groups: list[dict], settings: TrainSettings, *, node: str, device: torch.device,
          free_bytes: int | None = None, offload_unet: bool = False) -> Estimate | None:
    """Raise a :class:`FinetuneError` naming the settings that fit when the run will not fit; returns the
    estimate (None when the check is off, the free memory is unknown, or the model cannot be probed)."""
    if os.environ.get(CHECK_ENV, "").strip().lower() in ("0", "off", "false", "no"):
        return None
    free = free_bytes if free_bytes is not None else free_memory(torch.device(device))
    if free is None:
        return None
    try:
        work = describe(shape, param_groups, torch.device(device))
        now = current_choice(work, settings, offload_unet)
        est = estimate(work, now)
    except Exception as exc:  # noqa: BLE001 - an architecture the probe cannot run: train without the check
        log.warning("[%s] memory estimate skipped (%s: %s)", node, type(exc).__name__, str(exc)[:200])
        return None
    budget = free * USABLE
    need = est.total - est.weights  # the weights are loaded already (as the options put them): free excludes them
    log.info("[%s] memory estimate: peak %s (%s); %s more needed, %s free", node, _gb(est.total), est.parts(),
             _gb(need), _gb(free))
    if need <= budget:
        return est
    where = "GPU memory" if torch.device(device).type == "cuda" else "memory (RAM)"
    what = (f"resolution {now.width}x{now.height}, batch_size {settings.batch_size}, precision {now.precision}, "
            f"gradient_checkpointing {'on' if now.gradient_checkpointing else 'off'}, optimizer {now.optimizer}")
    best = suggest(work, now, budget)
    detail = (f"not enough {where} for this run: estimated {_gb(need)} more at the peak ({est.parts()}), "
              f"{_gb(free)} free ({what})")
    if best is None:
        fix = ("even the leanest settings (gradient_checkpointing on, bf16, batch_size 1, resolution 256) do not "
               f"fit; close other programs using the memory, or train on a larger device (or set {CHECK_ENV}=off "
               "to try anyway)")
        raise FinetuneError(detail, node=node, input="batch_size", fix=fix)
    changes, _, alt_need = best
    raise FinetuneError(detail, node=node, input=_input_of(changes[0]),
                        fix=f"{', '.join(changes)}: estimated {_gb(alt_need)} of {_gb(free)} free")


def _input_of(change: str) -> str:
    """The node input a suggested change is made in."""
    for name in ("gradient_checkpointing", "precision", "optimizer", "batch_size", "dtype", "resolution", "fused_step",
                 "fp8_base", "offload_unet"):
        if name in change:
            return name
    return "batch_size"


# ---------------------------------------------------------------------------------------------- real-size table
def _meta_counts(name: str, dtype: torch.dtype) -> tuple[torch.nn.Module, int, int]:
    """(meta UNet in ``dtype``, UNet parameter count, VAE + text encoder parameter count) of a real architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    cfgs = load_configs(name)
    with _default_dtype(dtype), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfgs["unet"])
        others = [AutoencoderKL.from_config(cfgs["vae"])]
        others += [CLIPTextModel(CLIPTextConfig(**{k: v for k, v in c.items() if k != "architectures"}))
                   for k, c in cfgs.items() if k.startswith("text_encoder")]
    return unet, sum(p.numel() for p in unet.parameters()), sum(p.numel() for m in others for p in m.parameters())


# Kolors (from its diffusers folder's configs): the SDXL UNet with a 4096 -> 2048 text projection and 4096 + 6 x 256
# wide added conditioning; the SDXL VAE; ChatGLM3-6B (28 layers, hidden 4096, FFN 13696, 32 heads of 128, multi-query
# attention with 2 groups, vocabulary 65024).
KOLORS_UNET = {"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 4096,
               "projection_class_embeddings_input_dim": 5632}
KOLORS_CHATGLM = {"num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "num_attention_heads": 32,
                  "kv_channels": 128, "padded_vocab_size": 65024, "multi_query_attention": True,
                  "multi_query_group_num": 2, "add_qkv_bias": True, "seq_length": KOLORS_TOKENS,
                  "original_rope": True}


def _meta_kolors(dtype: torch.dtype) -> tuple[torch.nn.Module, int, int, int]:
    """(meta Kolors UNet, UNet, VAE and ChatGLM3 parameter counts)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: PLC0415
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel  # noqa: PLC0415

    cfgs = load_configs("sdxl")
    with _default_dtype(dtype), torch.device("meta"):
        unet = UNet2DConditionModel.from_config({**cfgs["unet"], **KOLORS_UNET})
        vae = AutoencoderKL.from_config(cfgs["vae"])
        te = ChatGLMModel(ChatGLMConfig(**KOLORS_CHATGLM), empty_init=False)

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return unet, count(unet), count(vae), count(te)


def _lora_names(unet: torch.nn.Module) -> tuple[frozenset[str], int]:
    """The UNet layers a rank-16 LoRA on the default targets trains, and its value count."""
    targets = UNET_TARGETS["attention+feedforward"]
    names = frozenset(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
                      and any(n == t or n.endswith("." + t) for t in targets))
    rank = 16
    return names, sum(rank * (m.in_features + m.out_features) for n, m in unet.named_modules() if n in names)


def kolors_estimates() -> list[dict]:
    """Kolors LoRA at 1024 px (bf16, rank 16, batch 1, AdamW): ChatGLM3 (12.5 GB in bf16) resident on the GPU
    beside the UNet, against the trainer's default for Kolors on a GPU (``offload_frozen``: the captions and images
    are encoded and cached first, then ChatGLM3 and the VAE wait on the CPU)."""
    unet, n_unet, n_vae, n_te = _meta_kolors(torch.bfloat16)
    names, lora = _lora_names(unet)
    rows = []
    for ckpt in (True, False):
        for where, resident in (("text encoder on the GPU", n_unet + n_vae + n_te), ("offload_frozen", n_unet)):
            work = Workload(unet=unet, weight_bytes=resident * 2, frozen_half_saving=0, extra_trainable_values=lora,
                            trainable_values=lora, trainable_bytes_per_value=4, mode="lora", trained_names=names,
                            context_grad=False, text_encoder_values=0, unet_passes=1, vae_channels=128,
                            encode_batches=False, width=1024, height=1024, device=torch.device("cuda"))
            est = estimate(work, Choice(1, ckpt, "bf16", "adamw", 1024, 1024))
            rows.append({"model": "kolors", "kind": "lora", "resolution": 1024, "batch": 1, "checkpointing": ckpt,
                         "precision": "bf16", "optimizer": "adamw", "peak_gb": est.total / GB, "parts": est.parts(),
                         "where": where, "text_encoder_params": n_te})
    return rows


def _layer_stats(unet: torch.nn.Module) -> dict:
    """The Workload fields of a meta UNet's Linear/Conv weights, as frozen layers (LoRA-type runs)."""
    ws = [m.weight for m in unet.modules() if isinstance(m, fp8.LAYER_TYPES)]
    return {"frozen_layer_values": sum(w.numel() for w in ws),
            "frozen_layer_bytes": sum(w.numel() * w.element_size() for w in ws),
            "largest_frozen_layer": max(w.numel() for w in ws)}


# (architecture, kind, resolution, batch, checkpointing, precision, optimizer, options): the README's rows.
# options: fused (fused_step), fp8 (fp8_base), stream (offload_unet), offload (offload_frozen: VAE and text
# encoders, and for full fine-tuning the input UNet, on the CPU once the latents and captions are cached)
REAL_SIZE_CASES = [
    ("sd15", "lora", 512, 1, True, "bf16", "adamw", ()), ("sd15", "lora", 512, 1, True, "bf16", "adamw", ("fp8",)),
    ("sd15", "lora", 512, 1, False, "bf16", "adamw", ()),
    ("sd15", "lora", 512, 8, False, "bf16", "adamw", ()), ("sd15", "lora", 512, 8, True, "bf16", "adamw", ()),
    ("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ()), ("sdxl", "lora", 1024, 1, False, "bf16", "adamw", ()),
    ("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ("fp8",)),
    ("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ("stream", "offload")),
    ("sdxl", "lora", 1024, 1, True, "bf16", "adamw", ("fp8", "stream", "offload")),
    ("sd15", "full", 512, 1, True, "bf16", "adamw8bit", ()), ("sd15", "full", 512, 1, True, "bf16", "adamw", ()),
    ("sd15", "full", 512, 1, True, "bf16", "adamw8bit", ("fused",)),
    ("sd15", "full", 512, 1, True, "bf16", "adamw8bit", ("fused", "offload")),
    ("sd15", "full", 512, 1, True, "bf16", "adamw", ("fused", "offload")),
]
OPTION_NAMES = {"fused": "fused_step", "fp8": "fp8_base", "stream": "offload_unet", "offload": "offload_frozen"}


def real_size_estimates(cases: list[tuple] | None = None, kolors: bool = True) -> list[dict]:
    """Estimated peaks of the target settings (README "Performance") on the real SD 1.5 / SDXL architectures
    (``configs/``, built on the meta device: nothing is allocated or downloaded). Weights in bf16; a full
    fine-tune's trained copy in fp32 (FullObjective's master weights). With ``offload_frozen`` the peak is the
    training step's: the encoders (and a full fine-tune's input UNet) are on the GPU only while the latents and
    captions are first encoded (``encoders_gb``; a re-run with the disk cache skips that)."""
    rows = []
    for name, kind, res, batch, ckpt, precision, optimizer, options in (REAL_SIZE_CASES if cases is None else cases):
        unet, n_unet, n_other = _meta_counts(name, torch.bfloat16)
        names, lora = _lora_names(unet)
        offload = "offload" in options
        if kind == "lora":
            resident = n_unet * 2 if offload else (n_unet + n_other) * 2
            weights, extra, values, largest = resident, lora, lora, 0
            layers = _layer_stats(unet)
        else:  # full: a fp32 trained copy of the UNet beside the bf16 input model (FullObjective)
            resident = 0 if offload else (n_unet + n_other) * 2
            weights, extra, values = resident + n_unet * 4, 0, n_unet
            largest = max(p.numel() for p in unet.parameters())
            layers = {}
        work = Workload(unet=unet, weight_bytes=weights, frozen_half_saving=0, extra_trainable_values=extra,
                        trainable_values=values, trainable_bytes_per_value=4, mode=kind,
                        trained_names=names if kind == "lora" else frozenset(), context_grad=False,
                        text_encoder_values=0, unet_passes=1, vae_channels=128, encode_batches=False,
                        width=res, height=res, device=torch.device("cuda"), largest_trainable_values=largest,
                        **layers)
        if kind == "full":  # the trained copy is fp32 (autocast bf16): probe it as such
            work.unet = _meta_counts(name, torch.float32)[0]
        est = estimate(work, Choice(batch, ckpt, precision, optimizer, res, res, fused_step="fused" in options,
                                    fp8_base="fp8" in options, offload_unet="stream" in options))
        encoders = (n_other + (n_unet if kind == "full" else 0)) * 2 if offload else 0
        rows.append({"model": name, "kind": kind, "resolution": res, "batch": batch, "checkpointing": ckpt,
                     "precision": precision, "optimizer": optimizer, "peak_gb": est.total / GB,
                     "parts": est.parts(), "options": [OPTION_NAMES[o] for o in options],
                     "encoders_gb": encoders / GB,
                     # the first run's encoding, before those go: weights and trainables, the encoders, the VAE's work
                     "encode_peak_gb": (est.weights + est.trainable + encoders + est.encode) / GB})
    return rows + (kolors_estimates() if kolors else [])


if __name__ == "__main__":  # python -m comfy_finetune.training.memory: the real-size table
    for row in real_size_estimates():
        where = f"  [{row['where']}]" if "where" in row else ""
        if row.get("options"):
            where += f"  [{', '.join(row['options'])}]"
        if row.get("encoders_gb"):
            where += (f" (first encoding, {row['encoders_gb']:.1f} GB of encoders still on the device: peak "
                      f"{row['encode_peak_gb']:.1f} GB)")
        print(f"{row['model']:6} {row['kind']:4} {row['resolution']:5} px  batch {row['batch']}  "
              f"ckpt {'on ' if row['checkpointing'] else 'off'}  {row['precision']}  {row['optimizer']:9}  "
              f"peak {row['peak_gb']:5.1f} GB  ({row['parts']}){where}")
