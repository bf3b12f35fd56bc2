"""LearnEmbedding: textual inversion (new token vectors for a frozen model)."""

from __future__ import annotations

from ..core.handle import EmbeddingPatch
from .base import EMBEDDING, PIPE, FTNode
from .training import DATASET, TRAIN_CATEGORY, common_inputs, outputs_for, settings_from, validation_from, \
    validation_inputs

TEMPLATE_CHOICES = ("object", "style", "captions")


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

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The model handle (its LoRAs and embeddings are kept, frozen)."}),
            "dataset": (DATASET, {"tooltip": "Images (and captions) of the concept from a Training Data node."}),
            "token": ("STRING", {"default": "<my-concept>",
                                 "tooltip": "The new prompt word, e.g. <my-dog>. Must not be an existing word; no "
                                            "spaces. The embedding's name is the token without <> (my-dog)."}),
            "initializer": ("STRING", {"default": "object",
                                       "tooltip": "A word describing the concept (dog, style, ...); the vectors "
                                                  "start from its embedding. Empty: start from '*'."}),
            "num_vectors": ("INT", {"default": 4, "min": 1, "max": 64,
                                    "tooltip": "Vectors (prompt tokens) the embedding uses: more learn more detail "
                                               "but take more steps and prompt space."}),
            "templates": (list(TEMPLATE_CHOICES), {"default": "object",
                                                   "tooltip": "Training prompts: object ('a photo of a <token>', "
                                                              "...), style ('a painting in the style of <token>', "
                                                              "...) or the dataset captions (the token is "
                                                              "prepended where a caption lacks it)."}),
            **common_inputs(1000, 5e-3),
        }
        return {"required": required, "optional": validation_inputs()}

    def run(self, pipe, dataset, token, initializer, num_vectors, templates, **kwargs):
        from ..training.ti_trainer import TISpec, train_embedding  # noqa: PLC0415

        settings = settings_from(kwargs)
        spec = TISpec(token=str(token).strip(), initializer=str(initializer or ""), num_vectors=int(num_vectors),
                      templates=templates)
        embedding, result = train_embedding(pipe, dataset, settings, spec, node=self.NODE_ID,
                                            validation=validation_from(kwargs))
        plot, grid = outputs_for(result)
        return (embedding, pipe.with_patch(EmbeddingPatch(embedding)), plot, grid)


NODES = [LearnEmbedding]
