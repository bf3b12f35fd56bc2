"""LearnEmbedding: textual inversion (new token vectors for a frozen model)."""

from __future__ import annotations

from ..core.handle import EmbeddingPatch
from ..training.ti_trainer import TISpec, train_embedding
from .base import EMBEDDING, PIPE, FTNode, from_inputs, widgets
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


class LearnEmbedding(FTNode):
    NODE_ID = "LearnEmbedding"
    DISPLAY_NAME = "Learn Embedding (Textual Inversion)"
    CATEGORY = TRAIN_CATEGORY
    DESCRIPTION = ("Textual inversion: learns new token vectors for a concept or style while the model, its "
                   "tokenizer and its text encoders stay frozen. The pipe output understands the token in prompts; "
                   "save the embedding with Save Embedding and use it anywhere as embedding:<name>.")
    RETURN_TYPES = (EMBEDDING, PIPE, "IMAGE", "IMAGE")
    RETURN_NAMES = ("embedding", "pipe", "loss_plot", "validation")
    OUTPUT_TOOLTIPS = ("The learned embedding (for Save Embedding).",
                       "The input handle with the embedding added: the token works in Sample prompts.",
                       "Training loss curve (raw and smoothed).",
                       "Validation samples (one row per validation step), if a validation prompt is set.")

    # What this node shows where it differs from the TISpec / TrainSettings defaults.
    DEFAULTS = {"token": "<my-concept>", "initializer": "object", "num_vectors": 4, "steps": 1000,
                "learning_rate": 5e-3}
    SPEC_INPUTS = ("token", "initializer", "num_vectors", "templates")
    LATE_SPEC_INPUTS = ("min_timestep",)  # optional, after the shared ones (added later)

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The model handle (its LoRAs and embeddings are kept, frozen)."}),
            "dataset": (DATASET, {"tooltip": "Images (and captions) of the concept from a Training Data node."}),
            **widgets(cls.SPEC_INPUTS, TISpec, defaults=cls.DEFAULTS),
            **settings_inputs(cls.DEFAULTS),
        }
        # appended after the shared inputs so older workflows' widget values keep their positions
        optional = {**validation_inputs(), **widgets(cls.LATE_SPEC_INPUTS, TISpec, defaults=cls.DEFAULTS),
                    **SCORER_INPUT}
        return {"required": required, "optional": optional}

    def run(self, pipe, dataset, token, initializer, num_vectors, templates, **kwargs):
        inputs = with_recipe(type(self), "embedding", pipe, node_inputs(locals()))
        spec = from_inputs(TISpec, inputs, self.DEFAULTS, token=str(token).strip())
        settings = settings_from(inputs, self.DEFAULTS)
        embedding, result = train_embedding(pipe, dataset, settings, spec, node=self.NODE_ID,
                                            validation=validation_from(inputs), scorer=inputs.get("scorer"))
        plot, grid = outputs_for(result)
        return (embedding, pipe.with_patch(EmbeddingPatch(embedding)), plot, grid)


NODES = [LearnEmbedding]
