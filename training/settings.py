"""Training settings shared by every trainer, validated with errors that name the input and the fix."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..core.errors import FinetuneError
from ..core.fields import node_input

LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 on GPUs that have it, else fp16 on CUDA, fp32 on CPU
NAN_POLICIES = ("stop", "rollback")
CHANNELS_LAST = ("auto", "on", "off")  # auto: on for CUDA (faster convolutions there), off on the CPU
# auto: the fused optimizer step (loop.FusedStep) wherever it is exact and the trainables are large (full
# fine-tuning: at least FUSED_AUTO_VALUES values), off for adapters (small gradients, many small tensors)
FUSED_STEPS = ("auto", "on", "off")
OFFLOAD_UNET = ("auto", "on", "off")  # auto: on where the memory estimate says the run does not fit otherwise (GPU)
# LoRA target presets: the module names (suffixes) a LoRA wraps in the UNet, and in the text encoders
UNET_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+feedforward": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                              "ff.net.2"),
    "attention+feedforward+conv": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                   "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"),
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
MAX_ROLLBACKS = 3  # with nan_policy "rollback": the NaN after this many rollbacks stops the run


@dataclass
class TrainSettings:
    """Optimiser and run settings every trainer shares; each field is also the trainer nodes' widget of that name."""

    steps: int = node_input(500, min=1, max=1_000_000, tooltip="Optimizer steps.")
    learning_rate: float = node_input(1e-4, min=0.0, max=10.0, step=1e-6, round=False,
                                      tooltip="Peak learning rate.")
    batch_size: int = node_input(1, min=1, max=256, tooltip="Images per step.")
    grad_accum: int = node_input(1, min=1, max=1024,
                                 tooltip="Batches accumulated per optimizer step (effective batch = batch_size x "
                                         "grad_accum).")
    lr_schedule: str = node_input("constant", choices=LR_SCHEDULES, tooltip="Learning-rate schedule after warmup.")
    warmup_steps: int = node_input(0, min=0, max=1_000_000, tooltip="Linear warmup steps.")
    optimizer: str = node_input("adamw", choices=OPTIMIZERS,
                                tooltip="adamw; adamw8bit needs bitsandbytes, prodigy needs prodigyopt (lr ~1.0).")
    precision: str = node_input("auto", choices=PRECISIONS,
                                tooltip="Mixed precision for the forward pass; trained weights stay fp32. auto: bf16 "
                                        "on GPUs that have it (else fp16), fp32 on the CPU. fp16 uses loss scaling.")
    gradient_checkpointing: bool = node_input(False, tooltip="Trade compute for memory.")
    min_snr_gamma: float = node_input(0.0, min=0.0, max=100.0, step=0.5,  # 0 = off; 5 is the paper's value
                                      tooltip="Min-SNR loss weighting; 0 = off, 5 = the paper's value.")
    noise_offset: float = node_input(0.0, min=0.0, max=1.0, step=0.01,
                                     tooltip="Offset noise (helps very dark/bright images); 0.05-0.1 typical.")
    seed: int = node_input(0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                           tooltip="Seed for adapter init, noise, timesteps and data order.")
    save_every: int = node_input(0, min=0, max=1_000_000,  # 0 = only at the end / on cancel
                                 tooltip="Write a resumable checkpoint every N steps (always on cancel).")
    validate_every: int = node_input(0, min=0, max=1_000_000,  # 0 = off
                                     tooltip="Sample every N steps; 0 = only at the end.")
    resume: bool = node_input(False, tooltip="Continue from this run's last checkpoint (same base, data and "
                                             "settings) if there is one.")
    # What a NaN/inf loss does: "stop" raises an error naming the step; "rollback" restores the last good state
    # (kept in memory every save_every steps, or every steps/10 when save_every is 0, and at the start), halves the
    # learning rate and continues, at most MAX_ROLLBACKS times. The node input is "on_nan".
    nan_policy: str = node_input("stop", choices=NAN_POLICIES, input="on_nan",
                                 tooltip="If the loss becomes NaN/inf: stop with an error naming the step, or roll "
                                         "back to the last good state (kept every save_every steps, or every "
                                         "steps/10), halve the learning rate and go on (at most 3 times).")
    # Speed and memory (README "Performance"): latents and text embeddings cached on disk under host.cache_dir()
    # (keyed by image content, model and settings) so re-runs skip encoding; torch.compile the UNet; channels-last
    # UNet; VAE and text encoders moved to the CPU while the UNet trains (after every latent/caption is cached).
    cache_to_disk: bool = node_input(True, tooltip="Keep encoded latents and captions on disk (in the pack's cache "
                                                   "folder), keyed by image content, model and settings, so a "
                                                   "re-run skips the VAE and text encoders.")
    compile: bool = node_input(False, tooltip="torch.compile the UNet: the first steps take longer (compiling), "
                                              "later ones are faster. Needs a C++ compiler (and Triton on GPU).")
    channels_last: str = node_input("auto", choices=CHANNELS_LAST,
                                    tooltip="Channels-last memory format for the UNet's convolutions; auto = on for "
                                            "CUDA GPUs.")
    offload_frozen: bool = node_input(False, tooltip="For small GPUs: encode every image and caption first, then "
                                                     "move the VAE and text encoders to the CPU while the UNet "
                                                     "trains.")
    # The optimizer steps each trained tensor in a post-accumulate-grad hook as soon as its gradient is complete and
    # frees that gradient (loop.FusedStep), so the gradients of a full fine-tune never all exist at once. Exact only
    # with a per-tensor optimizer (adamw, adamw8bit), without fp16 loss scaling and on one process.
    fused_step: str = node_input("auto", choices=FUSED_STEPS,
                                 tooltip="Step the optimizer for each weight as soon as its gradient is ready and "
                                         "free that gradient (full fine-tuning: saves the memory of all gradients). "
                                         "auto: on for full fine-tuning with adamw/adamw8bit, off for adapters "
                                         "and with fp16 or prodigy.")
    # LoRA-type training (the UNet's own weights frozen): its Linear/Conv weights stored in float8 e4m3 with a
    # per-tensor scale and upcast per layer in the forward (and again in the backward) pass (training/fp8.py); on a
    # GPU the originals wait on the CPU and come back unchanged after the run.
    fp8_base: bool = node_input(False, tooltip="LoRA / embeddings: keep the frozen UNet's weights in 8-bit float "
                                               "(e4m3, one scale per tensor) on the GPU and upcast each layer as it "
                                               "runs: about half the memory of a 16-bit UNet, slightly less exact "
                                               "forward passes. The model itself is put back unchanged.")
    # LoRA-type training: the frozen UNet's layer weights wait on the CPU and stream to the device one layer at a
    # time, the next one's copy overlapping the current one's compute (training/offload.py).
    offload_unet: str = node_input("auto", choices=OFFLOAD_UNET,
                                   tooltip="LoRA / embeddings on a small GPU: keep the frozen UNet's weights on the "
                                           "CPU and stream them to the GPU layer by layer while it computes (slower "
                                           "steps, a fraction of the memory). auto: on when the memory estimate "
                                           "says the run would not fit otherwise.")

    def validate(self, node: str) -> None:
        def bad(input: str, what: str, fix: str) -> FinetuneError:
            return FinetuneError(what, node=node, input=input, fix=fix)

        if self.steps < 1:
            raise bad("steps", f"steps must be at least 1 (got {self.steps})", "use a few hundred steps")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise bad("learning_rate", f"learning rate must be a positive number (got {self.learning_rate})",
                      "use e.g. 1e-4 for LoRA, 5e-3 for textual inversion, 2e-6 for full DreamBooth")
        if self.batch_size < 1:
            raise bad("batch_size", f"batch_size must be at least 1 (got {self.batch_size})", "use 1 or more")
        if self.grad_accum < 1:
            raise bad("grad_accum", f"grad_accum must be at least 1 (got {self.grad_accum})", "use 1 or more")
        if self.lr_schedule not in LR_SCHEDULES:
            raise bad("lr_schedule", f"unknown schedule '{self.lr_schedule}'", f"use one of {', '.join(LR_SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"unknown optimizer '{self.optimizer}'", f"use one of {', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"unknown precision '{self.precision}'", f"use one of {', '.join(PRECISIONS)}")
        if self.warmup_steps < 0 or self.warmup_steps >= max(self.steps, 1) and self.warmup_steps:
            raise bad("warmup_steps", f"warmup_steps {self.warmup_steps} must be in [0, steps)",
                      "use about 5-10 % of the steps, or 0")
        if self.nan_policy not in NAN_POLICIES:
            raise bad("on_nan", f"unknown NaN policy '{self.nan_policy}'", f"use one of {', '.join(NAN_POLICIES)}")
        if self.save_every < 0:
            raise bad("save_every", f"save_every must be 0 (off) or positive (got {self.save_every})", "use 0 or more")
        if self.channels_last not in CHANNELS_LAST:
            raise bad("channels_last", f"unknown channels_last '{self.channels_last}'",
                      f"use one of {', '.join(CHANNELS_LAST)}")
        if self.fused_step not in FUSED_STEPS:
            raise bad("fused_step", f"unknown fused_step '{self.fused_step}'", f"use one of {', '.join(FUSED_STEPS)}")
        if self.offload_unet not in OFFLOAD_UNET:
            raise bad("offload_unet", f"unknown offload_unet '{self.offload_unet}'",
                      f"use one of {', '.join(OFFLOAD_UNET)}")
        if self.min_snr_gamma < 0:
            raise bad("min_snr_gamma", "min_snr_gamma must be 0 (off) or positive", "use 0 or 5")

    def resolved_precision(self, device) -> str:
        """``precision`` with ``auto`` resolved for ``device``: the autocast dtype of the forward pass."""
        if self.precision != "auto":
            return self.precision
        if getattr(device, "type", "") != "cuda":
            return "fp32"
        import torch  # noqa: PLC0415

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"

    def use_channels_last(self, device) -> bool:
        """Whether the UNet trains in channels-last memory format on ``device``."""
        return self.channels_last == "on" or (self.channels_last == "auto" and getattr(device, "type", "") == "cuda")

    def as_metadata(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}
