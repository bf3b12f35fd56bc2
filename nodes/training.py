"""Training nodes: TrainLoRA (LearnEmbedding and DreamBoothTrain live beside it)."""

from __future__ import annotations

from ..core.handle import LoraPatch
from ..core.sampling import SAMPLER_NAMES, SCHEDULER_NAMES
from ..training.settings import LR_SCHEDULES, NAN_POLICIES, OPTIMIZERS, PRECISIONS, TrainSettings
from .base import CATEGORY, LORA, NEGATIVE, PIPE, FTNode

DATASET = "FT_DATASET"
TRAIN_CATEGORY = f"{CATEGORY}/training"


def common_inputs(steps: int, lr: float) -> dict:
    """Inputs every trainer shares, in one place so their order (widgets_values!) stays stable."""
    return {
        "steps": ("INT", {"default": steps, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps."}),
        "learning_rate": ("FLOAT", {"default": lr, "min": 0.0, "max": 10.0, "step": 1e-6, "round": False,
                                    "tooltip": "Peak learning rate."}),
        "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Images per step."}),
        "grad_accum": ("INT", {"default": 1, "min": 1, "max": 1024,
                               "tooltip": "Batches accumulated per optimizer step (effective batch = batch_size x "
                                          "grad_accum)."}),
        "lr_schedule": (list(LR_SCHEDULES), {"default": "constant", "tooltip": "Learning-rate schedule after warmup."}),
        "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "Linear warmup steps."}),
        "optimizer": (list(OPTIMIZERS), {"default": "adamw", "tooltip": "adamw; adamw8bit needs bitsandbytes, "
                                                                         "prodigy needs prodigyopt (lr ~1.0)."}),
        "precision": (list(PRECISIONS), {"default": "auto", "tooltip": "Mixed precision for the forward pass; "
                                                                        "trained weights stay fp32. auto: bf16 on "
                                                                        "GPUs that have it (else fp16), fp32 on the "
                                                                        "CPU. fp16 uses loss scaling."}),
        "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Trade compute for memory."}),
        "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                    "tooltip": "Min-SNR loss weighting; 0 = off, 5 = the paper's value."}),
        "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "Offset noise (helps very dark/bright images); 0.05-0.1 typical."}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                         "tooltip": "Seed for adapter init, noise, timesteps and data order."}),
    }


def validation_inputs() -> dict:
    return {
        "validation_prompt": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "If set, sample this prompt during training (with the sampling "
                                                    "settings below) to watch progress."}),
        "validate_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                                   "tooltip": "Sample every N steps; 0 = only at the end."}),
        "negative": (NEGATIVE, {"tooltip": "Negative prompt for the validation samples."}),
        "validation_size": ("INT", {"default": 512, "min": 8, "max": 4096, "step": 8,
                                    "tooltip": "Width and height of validation samples."}),
        "validation_steps": ("INT", {"default": 20, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
        "validation_sampler": (list(SAMPLER_NAMES), {"default": "euler", "tooltip": "Sampler for validation."}),
        "validation_scheduler": (list(SCHEDULER_NAMES), {"default": "normal", "tooltip": "Schedule."}),
        "validation_cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG."}),
        "save_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000,
                               "tooltip": "Write a resumable checkpoint every N steps (always on cancel)."}),
        "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue from this run's last checkpoint (same base, "
                                                            "data and settings) if there is one."}),
        "on_nan": (list(NAN_POLICIES), {"default": "stop",
                                        "tooltip": "If the loss becomes NaN/inf: stop with an error naming the step, "
                                                   "or roll back to the last good state (kept every save_every "
                                                   "steps, or every steps/10), halve the learning rate and go on "
                                                   "(at most 3 times)."}),
        **speed_inputs(),
    }


def speed_inputs() -> dict:
    """Speed and memory options (last, so older workflows' widget values keep their positions)."""
    from ..training.settings import CHANNELS_LAST  # noqa: PLC0415

    return {
        "cache_to_disk": ("BOOLEAN", {"default": True,
                                      "tooltip": "Keep encoded latents and captions on disk (in the pack's cache "
                                                 "folder), keyed by image content, model and settings, so a re-run "
                                                 "skips the VAE and text encoders."}),
        "compile": ("BOOLEAN", {"default": False,
                                "tooltip": "torch.compile the UNet: the first steps take longer (compiling), later "
                                           "ones are faster. Needs a C++ compiler (and Triton on GPU)."}),
        "channels_last": (list(CHANNELS_LAST), {"default": "auto",
                                                "tooltip": "Channels-last memory format for the UNet's "
                                                           "convolutions; auto = on for CUDA GPUs."}),
        "offload_frozen": ("BOOLEAN", {"default": False,
                                       "tooltip": "For small GPUs: encode every image and caption first, then move "
                                                  "the VAE and text encoders to the CPU while the UNet trains."}),
    }


def settings_from(kwargs: dict) -> TrainSettings:
    return TrainSettings(
        steps=int(kwargs["steps"]), learning_rate=float(kwargs["learning_rate"]),
        batch_size=int(kwargs["batch_size"]), grad_accum=int(kwargs["grad_accum"]),
        lr_schedule=kwargs["lr_schedule"], warmup_steps=int(kwargs["warmup_steps"]), optimizer=kwargs["optimizer"],
        precision=kwargs["precision"], gradient_checkpointing=bool(kwargs["gradient_checkpointing"]),
        min_snr_gamma=float(kwargs["min_snr_gamma"]), noise_offset=float(kwargs["noise_offset"]),
        seed=int(kwargs["seed"]), save_every=int(kwargs.get("save_every", 0)),
        validate_every=int(kwargs.get("validate_every", 0)), resume=bool(kwargs.get("resume", False)),
        nan_policy=str(kwargs.get("on_nan", "stop")), cache_to_disk=bool(kwargs.get("cache_to_disk", True)),
        compile=bool(kwargs.get("compile", False)), channels_last=str(kwargs.get("channels_last", "auto")),
        offload_frozen=bool(kwargs.get("offload_frozen", False)))


def validation_from(kwargs: dict):
    from ..training.runs import Validation  # noqa: PLC0415

    prompt = str(kwargs.get("validation_prompt") or "")
    if not prompt.strip():
        return None
    negative = kwargs.get("negative")
    size = int(kwargs.get("validation_size", 512))
    return Validation(prompt=prompt, negative=negative.text if negative is not None else "",
                      seed=int(kwargs.get("seed", 0)), steps=int(kwargs.get("validation_steps", 20)),
                      cfg=float(kwargs.get("validation_cfg", 7.0)),
                      sampler=kwargs.get("validation_sampler", "euler"),
                      scheduler=kwargs.get("validation_scheduler", "normal"), width=size, height=size)


def outputs_for(result) -> tuple:
    """(loss plot, validation grid) IMAGEs from a TrainResult."""
    import torch  # noqa: PLC0415

    from ..training.plots import image_grid, loss_plot  # noqa: PLC0415

    plot = loss_plot(result.losses, lrs=result.lrs)
    if result.validation:
        grid = image_grid([img for _, img in result.validation], labels=[f"step {s}" for s, _ in result.validation])
    else:
        grid = torch.zeros(1, 64, 64, 3)
    return plot, grid


class TrainLoRA(FTNode):
    NODE_ID = "FinetuneTrainLoRA"
    DISPLAY_NAME = "Train LoRA (Finetune)"
    CATEGORY = TRAIN_CATEGORY
    DESCRIPTION = ("Trains a LoRA on the model handle from a training set. The result chains straight into AddLoRA "
                   "or Sample (pipe output) and saves with Save LoRA (Finetune). The input handle is not changed; cancel keeps a "
                   "resumable checkpoint.")
    RETURN_TYPES = (LORA, PIPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora", "pipe", "loss_plot", "validation")
    OUTPUT_TOOLTIPS = ("The trained LoRA (for AddLoRA / SaveLoRA).", "The input handle with the trained LoRA added.",
                       "Training loss curve (raw and smoothed).",
                       "Validation samples (one row per validation step), if a validation prompt is set.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..training.lora_trainer import UNET_TARGETS  # noqa: PLC0415

        required = {
            "pipe": (PIPE, {"tooltip": "The base model handle (LoRAs already on it are kept, the new one trains on "
                                       "top)."}),
            "dataset": (DATASET, {"tooltip": "Images and captions from a Training Data node."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "LoRA rank (dimension)."}),
            "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 4096.0, "step": 0.5,
                                "tooltip": "LoRA alpha; the update is scaled by alpha/rank."}),
            "targets": (list(UNET_TARGETS), {"default": "attention+feedforward",
                                             "tooltip": "Which UNet layers get LoRA: attention only, + feed-forward "
                                                        "and projections (kohya default), + convolutions (LoCon)."}),
            "train_text_encoder": ("BOOLEAN", {"default": False, "tooltip": "Also train LoRA on the text "
                                                                            "encoder(s)."}),
            "text_learning_rate": ("FLOAT", {"default": 5e-5, "min": 0.0, "max": 10.0, "step": 1e-6, "round": False,
                                             "tooltip": "Learning rate for the text-encoder LoRA."}),
            **common_inputs(500, 1e-4),
        }
        return {"required": required, "optional": validation_inputs()}

    def run(self, pipe, dataset, rank, alpha, targets, train_text_encoder, text_learning_rate, **kwargs):
        from ..training.lora_trainer import LoraSpec, train_lora  # noqa: PLC0415

        settings = settings_from(kwargs)
        spec = LoraSpec(rank=int(rank), alpha=float(alpha), targets=targets,
                        train_text_encoder=bool(train_text_encoder), text_learning_rate=float(text_learning_rate))
        lora, result = train_lora(pipe, dataset, settings, spec, node=self.NODE_ID,
                                  validation=validation_from(kwargs))
        plot, grid = outputs_for(result)
        return (lora, pipe.with_patch(LoraPatch(lora)), plot, grid)


NODES = [TrainLoRA]
