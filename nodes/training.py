"""Training nodes: TrainLoRA (LearnEmbedding and DreamBoothTrain live beside it)."""

from __future__ import annotations

from .. import host
from ..core.errors import FinetuneError
from ..core.handle import LoraPatch
from ..core.sampling import SAMPLER_NAMES, SCHEDULER_NAMES, SampleSettings
from ..training import recipes
from ..training.frame import Validation
from ..training.lora_trainer import LoraSpec, train_lora
from ..training.plots import image_grid, loss_plot
from ..training.settings import TrainSettings
from .base import CATEGORY, LORA, NEGATIVE, PIPE, SCORER, FTNode, from_inputs, input_defaults, log, widgets

DATASET = "FT_DATASET"
TRAIN_CATEGORY = f"{CATEGORY}/training"


# Input names in widget order. Saved UI workflows store widget values by position: append, never reorder.
SETTINGS_INPUTS = ("steps", "learning_rate", "batch_size", "grad_accum", "lr_schedule", "warmup_steps", "optimizer",
                   "precision", "gradient_checkpointing", "min_snr_gamma", "noise_offset", "seed")
# Optional inputs of every trainer. The speed and memory options came last (after on_nan), so older workflows'
# widget values keep their positions.
VALIDATION_INPUTS = ("validation_prompt", "validate_every", "negative", "validation_size", "validation_steps",
                     "validation_sampler", "validation_scheduler", "validation_cfg", "save_every", "resume", "on_nan",
                     "cache_to_disk", "compile", "channels_last", "offload_frozen", "recipe")

_SAMPLE = SampleSettings(prompt="")  # validation samples default to the Sample settings' defaults
# The validation inputs that are not TrainSettings fields: they make a Validation (validation_from).
VALIDATION_WIDGETS = {
    "validation_prompt": ("STRING", {"default": "", "multiline": True,
                                     "tooltip": "If set, sample this prompt during training (with the sampling "
                                                "settings below) to watch progress."}),
    "negative": (NEGATIVE, {"tooltip": "Negative prompt for the validation samples."}),
    "validation_size": ("INT", {"default": _SAMPLE.width, "min": 8, "max": 4096, "step": 8,
                                "tooltip": "Width and height of validation samples."}),
    "validation_steps": ("INT", {"default": _SAMPLE.steps, "min": 1, "max": 1000, "tooltip": "Sampling steps."}),
    "validation_sampler": (list(SAMPLER_NAMES), {"default": _SAMPLE.sampler, "tooltip": "Sampler for validation."}),
    "validation_scheduler": (list(SCHEDULER_NAMES), {"default": _SAMPLE.scheduler, "tooltip": "Schedule."}),
    "validation_cfg": ("FLOAT", {"default": _SAMPLE.cfg, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "CFG."}),
    "recipe": (list(recipes.RECIPES), {
        "default": "auto",
        "tooltip": "Values that work for a kind of model, for the inputs you left at their defaults (an input you "
                   "changed always wins). auto: the model's own (shapes-tiny for the built-in model, sd15 for SD "
                   "1.x/2.x, sdxl for SDXL); custom: the inputs as set. The values used are in the log and the "
                   "README's recipe table."}),
}


def settings_inputs(defaults: dict | None = None) -> dict:
    """The required TrainSettings inputs every trainer shares; ``defaults`` = the node's own (steps, rate)."""
    return widgets(SETTINGS_INPUTS, TrainSettings, defaults=defaults)


def validation_inputs() -> dict:
    """The optional inputs every trainer shares: validation sampling, checkpoints, NaN policy, speed and memory."""
    return widgets(VALIDATION_INPUTS, VALIDATION_WIDGETS, TrainSettings)


# Speed and memory options added after every trainer's own late inputs (TrainLoRA's algorithm, DreamBoothTrain's
# targets, LearnEmbedding's min_timestep, which follow VALIDATION_INPUTS): every trainer ends its optional inputs
# with SCORER_INPUT, so they ride at its front and take the widget positions after all the older ones. Append only.
LATE_SETTINGS_INPUTS = ("fused_step", "fp8_base", "offload_unet")
# The scorer link: optional, after every widget (a link takes no widget position).
SCORER_INPUT = {**widgets(LATE_SETTINGS_INPUTS, TrainSettings),
                "scorer": (SCORER, {"tooltip": "Score the model every N steps (a Scorer node) and keep the best "
                                               "checkpoint: the outputs are then the best-scoring step's, named on "
                                               "the node and in the loss plot. The validation_* settings are the "
                                               "sampling settings it scores with."})}


def settings_from(kwargs: dict, defaults: dict | None = None) -> TrainSettings:
    """TrainSettings from a trainer's inputs (by input name; a missing one takes the node's or the field's default)."""
    return from_inputs(TrainSettings, kwargs, defaults)


def with_recipe(node_cls: type, trainer: str, pipe, inputs: dict) -> dict:
    """``inputs`` with the node's recipe applied (see ``training.recipes``); logs what it set."""
    try:
        name = recipes.resolve(str(inputs.get("recipe", "auto")), pipe)
    except ValueError as e:
        raise FinetuneError(str(e), node=node_cls.NODE_ID, input="recipe",
                            fix=f"use one of {', '.join(recipes.RECIPES)}") from None
    out, applied = recipes.apply(name, trainer, inputs, input_defaults(node_cls))
    log.info("%s: %s", node_cls.NODE_ID, recipes.describe(name, applied))
    return out


def node_inputs(params: dict) -> dict:
    """A ``run`` method's ``locals()`` as ``{input: value}``: its named inputs and its ``**kwargs``."""
    return {**{k: v for k, v in params.items() if k not in ("self", "kwargs", "__class__")},
            **params.get("kwargs", {})}


def validation_from(kwargs: dict):
    """The validation sampling settings; None without a validation prompt, unless a scorer samples with them."""
    prompt = str(kwargs.get("validation_prompt") or "")
    if not prompt.strip() and kwargs.get("scorer") is None:
        return None
    negative = kwargs.get("negative")
    size = int(kwargs.get("validation_size", _SAMPLE.width))
    return Validation(prompt=prompt, negative=negative.text if negative is not None else "",
                      seed=int(kwargs.get("seed", TrainSettings.seed)),
                      steps=int(kwargs.get("validation_steps", _SAMPLE.steps)),
                      cfg=float(kwargs.get("validation_cfg", _SAMPLE.cfg)),
                      sampler=kwargs.get("validation_sampler", _SAMPLE.sampler),
                      scheduler=kwargs.get("validation_scheduler", _SAMPLE.scheduler), width=size, height=size)


def outputs_for(result) -> tuple:
    """(loss plot, validation grid) IMAGEs from a TrainResult; with scores, their curves under the loss and the
    kept step named on the node."""
    import torch  # noqa: PLC0415

    sel = result.selection
    if sel is not None and sel.history:
        host.show_text(result.score_summary())  # the loop logged it
        plot = loss_plot(result.losses, lrs=result.lrs, scores=sel.curves(), primary="score",
                         best=(sel.best_step, sel.best.value) if sel.best is not None else None)
    else:
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
    DESCRIPTION = ("Trains a LoRA (or DoRA, LoHa, LoKr: the algorithm input) on the model handle from a training "
                   "set. The result chains straight into AddLoRA or Sample (pipe output) and saves with Save LoRA "
                   "(Finetune). The input handle is not changed; cancel keeps a resumable checkpoint.")
    RETURN_TYPES = (LORA, PIPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora", "pipe", "loss_plot", "validation")
    OUTPUT_TOOLTIPS = ("The trained LoRA (for AddLoRA / SaveLoRA).", "The input handle with the trained LoRA added.",
                       "Training loss curve (raw and smoothed).",
                       "Validation samples (one row per validation step), if a validation prompt is set.")

    # What this node shows where it differs from the TrainSettings / LoraSpec defaults (none: those are LoRA's).
    DEFAULTS: dict = {}
    SPEC_INPUTS = ("rank", "alpha", "targets", "train_text_encoder", "text_learning_rate")
    LATE_SPEC_INPUTS = ("algorithm",)  # optional, after the shared ones (added later)

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The base model handle (LoRAs already on it are kept, the new one trains on "
                                       "top)."}),
            "dataset": (DATASET, {"tooltip": "Images and captions from a Training Data node."}),
            **widgets(cls.SPEC_INPUTS, LoraSpec, defaults=cls.DEFAULTS),
            **settings_inputs(cls.DEFAULTS),
        }
        optional = {
            **validation_inputs(),
            # appended after the shared inputs so older workflows' widget values keep their positions
            **widgets(cls.LATE_SPEC_INPUTS, LoraSpec, defaults=cls.DEFAULTS),
            **SCORER_INPUT,
        }
        return {"required": required, "optional": optional}

    def run(self, pipe, dataset, rank, alpha, targets, train_text_encoder, text_learning_rate, **kwargs):
        inputs = with_recipe(type(self), "lora", pipe, node_inputs(locals()))
        spec = from_inputs(LoraSpec, inputs, self.DEFAULTS)
        settings = settings_from(inputs, self.DEFAULTS)
        lora, result = train_lora(pipe, dataset, settings, spec, node=self.NODE_ID,
                                  validation=validation_from(inputs), scorer=inputs.get("scorer"))
        plot, grid = outputs_for(result)
        return (lora, pipe.with_patch(LoraPatch(lora)), plot, grid)


NODES = [TrainLoRA]
