"""DreamBoothTrain: teach the model a subject (instance prompt) while preserving its class (prior preservation)."""

from __future__ import annotations

from ..core.lora import LoraWeights
from ..training.dreambooth import DreamBoothSpec, train_dreambooth
from .base import LORA, PIPE, FTNode, from_inputs, widgets
from .training import (
    DATASET,
    SCORER_INPUT,
    TRAIN_CATEGORY,
    node_inputs,
    outputs_for,
    settings_from,
    settings_inputs,
    validation_from,
    validation_inputs,
    with_recipe,
)


class DreamBoothTrain(FTNode):
    NODE_ID = "DreamBoothTrain"
    DISPLAY_NAME = "DreamBooth Train (Finetune)"
    CATEGORY = TRAIN_CATEGORY
    DESCRIPTION = ("DreamBooth: trains the model on a few images of one subject, all captioned with the instance "
                   "prompt (e.g. 'a photo of sks dog'; the dataset's own captions are ignored), while prior "
                   "preservation keeps the class ('a photo of a dog') as it was, using class images generated once "
                   "by the model and cached (or a class dataset), or the frozen model's own predictions. Method lora "
                   "trains a LoRA (or DoRA, LoHa, LoKr: the algorithm input); method full trains a copy of the whole "
                   "UNet (and text encoder). The input handle is never changed; cancel keeps a resumable checkpoint.")
    RETURN_TYPES = (PIPE, LORA, "IMAGE", "IMAGE")
    RETURN_NAMES = ("pipe", "lora", "loss_plot", "validation")
    OUTPUT_TOOLTIPS = (
        "The trained model: for lora the input handle with the trained LoRA added; for full a new model (the input "
        "handle's LoRAs baked in). Prompt it with the instance prompt.",
        "The trained LoRA (for SaveLoRA / AddLoRA). For method full it is empty (no modules): save the pipe with a "
        "checkpoint save node instead.",
        "Training loss curve (raw and smoothed; instance + weighted prior term).",
        "Validation samples (one per validation step), if a validation prompt is set.",
    )

    # What this node shows where it differs from the DreamBoothSpec / TrainSettings defaults.
    DEFAULTS = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog", "steps": 400}
    SPEC_INPUTS = ("instance_prompt", "class_prompt", "method", "prior_preservation", "prior_loss_weight",
                   "prior_mode", "num_class_images", "train_text_encoder", "text_learning_rate", "rank", "alpha")
    CLASS_SAMPLING_INPUTS = ("class_sample_steps", "class_cfg")  # optional, before the validation inputs
    LATE_SPEC_INPUTS = ("targets", "algorithm")  # optional, after the shared ones (added later, in this order)

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The base model handle. LoRAs on it are kept (lora) or baked into the trained "
                                       "copy (full); it is never changed."}),
            "dataset": (DATASET, {"tooltip": "Instance images: 3-20 photos of the subject, from a Training Data node. "
                                             "Every image is trained with the instance prompt."}),
            **widgets(cls.SPEC_INPUTS, DreamBoothSpec, defaults=cls.DEFAULTS),
            **settings_inputs(cls.DEFAULTS),
        }
        optional = {
            "class_dataset": (DATASET, {"tooltip": "Your own class images (e.g. real dog photos) instead of "
                                                   "generated ones. Their captions are replaced by the class "
                                                   "prompt."}),
            **widgets(cls.CLASS_SAMPLING_INPUTS, DreamBoothSpec, defaults=cls.DEFAULTS),
            **validation_inputs(),
            # appended after the shared inputs so older workflows' widget values keep their positions
            **widgets(cls.LATE_SPEC_INPUTS, DreamBoothSpec, defaults=cls.DEFAULTS),
            **SCORER_INPUT,
        }
        return {"required": required, "optional": optional}

    def run(self, pipe, dataset, instance_prompt, class_prompt, method, prior_preservation, prior_loss_weight,
            prior_mode, num_class_images, train_text_encoder, text_learning_rate, rank, alpha, class_dataset=None,
            class_sample_steps=20, class_cfg=7.0, **kwargs):
        inputs = with_recipe(type(self), f"dreambooth_{method}", pipe, node_inputs(locals()))
        spec = from_inputs(DreamBoothSpec, inputs, self.DEFAULTS)
        settings = settings_from(inputs, self.DEFAULTS)
        out, lora, result = train_dreambooth(pipe, dataset, settings, spec, node=self.NODE_ID,
                                             class_dataset=class_dataset, validation=validation_from(inputs),
                                             scorer=inputs.get("scorer"))
        if lora is None:  # method full: links cannot carry None, so an empty LoRA (SaveLoRA refuses it clearly)
            lora = LoraWeights(pipe.family, {}, {"ft_note": "DreamBooth full fine-tuning: the weights are in the "
                                                            "pipe output"}, "none")
        plot, grid = outputs_for(result)
        return (out, lora, plot, grid)


NODES = [DreamBoothTrain]
