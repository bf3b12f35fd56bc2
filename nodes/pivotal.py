"""Pivotal Tuning: a new word for the subject and a LoRA, learned together (DreamBooth with prior preservation)."""

from __future__ import annotations

from ..training.dreambooth import DreamBoothSpec, train_dreambooth
from ..training.pivotal import PivotalSpec
from .base import EMBEDDING, LORA, PIPE, FTNode, from_inputs, widgets
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


class PivotalTuning(FTNode):
    NODE_ID = "FinetunePivotalTuning"
    DISPLAY_NAME = "Pivotal Tuning (Finetune)"
    CATEGORY = TRAIN_CATEGORY
    DESCRIPTION = ("DreamBooth with a new word: learns the vectors of a new prompt word for the subject (as textual "
                   "inversion does) and a LoRA together, with prior preservation. The word carries what a token "
                   "can say, the LoRA the detail, so the subject comes out truer than with a LoRA alone. The LoRA "
                   "output bundles the word (Save LoRA writes it as bundle_emb keys, which A1111 reads; Add LoRA "
                   "applies it); the embedding output is the word alone, for Save Embedding or ComfyUI's own "
                   "prompts. The input handle is never changed; cancel keeps a resumable checkpoint.")
    RETURN_TYPES = (PIPE, LORA, EMBEDDING, "IMAGE", "IMAGE")
    RETURN_NAMES = ("pipe", "lora", "embedding", "loss_plot", "validation")
    OUTPUT_TOOLTIPS = (
        "The input handle with the trained LoRA and the new word: prompt it with the instance prompt.",
        "The trained LoRA with the word's vectors bundled (for Save LoRA / Add LoRA).",
        "The new word alone (for Save Embedding, or Embedding → Prompt Word with the LoRA applied natively).",
        "Training loss curve (raw and smoothed; instance + weighted prior term).",
        "Validation samples (one per validation step), if a validation prompt is set.",
    )

    DEFAULTS = {"instance_prompt": "a photo of <sks> dog", "class_prompt": "a photo of a dog", "steps": 400}
    SPEC_INPUTS = ("instance_prompt", "class_prompt", "token", "initializer", "num_vectors",
                   "embedding_learning_rate", "embedding_fraction", "prior_preservation", "prior_loss_weight",
                   "prior_mode", "num_class_images", "train_text_encoder", "text_learning_rate", "rank", "alpha")
    OPTIONAL_SPEC_INPUTS = ("class_sample_steps", "class_cfg", "targets")

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The base model handle (SD 1.x, SD 2.x or SDXL). LoRAs on it are kept; it is "
                                       "never changed."}),
            "dataset": (DATASET, {"tooltip": "Instance images: 3-20 photos of the subject, from a Training Data node. "
                                             "Every image is trained with the instance prompt."}),
            **widgets(cls.SPEC_INPUTS, PivotalSpec, DreamBoothSpec, defaults=cls.DEFAULTS),
            **settings_inputs(cls.DEFAULTS),
        }
        optional = {
            "class_dataset": (DATASET, {"tooltip": "Your own class images instead of generated ones. Their captions "
                                                   "are replaced by the class prompt."}),
            **widgets(cls.OPTIONAL_SPEC_INPUTS, DreamBoothSpec, defaults=cls.DEFAULTS),
            **validation_inputs(),
            **SCORER_INPUT,
        }
        return {"required": required, "optional": optional}

    def run(self, pipe, dataset, class_dataset=None, **kwargs):
        inputs = with_recipe(type(self), "dreambooth_pivotal", pipe, node_inputs(kwargs))
        spec = from_inputs(DreamBoothSpec, inputs, self.DEFAULTS, method="lora")
        pivotal = from_inputs(PivotalSpec, inputs, self.DEFAULTS)
        settings = settings_from(inputs, self.DEFAULTS)
        out, lora, result = train_dreambooth(pipe, dataset, settings, spec, node=self.NODE_ID,
                                             class_dataset=class_dataset, validation=validation_from(inputs),
                                             scorer=inputs.get("scorer"), pivotal=pivotal)
        plot, grid = outputs_for(result)
        (embedding,) = lora.embeddings.values()
        return (out, lora, embedding, plot, grid)


NODES = [PivotalTuning]
