"""DreamBoothTrain: teach the model a subject (instance prompt) while preserving its class (prior preservation)."""

from __future__ import annotations

from .base import LORA, PIPE, FTNode
from .training import (DATASET, TRAIN_CATEGORY, common_inputs, outputs_for, settings_from, validation_from,
                       validation_inputs)

METHODS = ["lora", "full"]
PRIOR_MODES = ["class_images", "base_prediction"]


class DreamBoothTrain(FTNode):
    NODE_ID = "DreamBoothTrain"
    DISPLAY_NAME = "DreamBooth Train (Finetune)"
    CATEGORY = TRAIN_CATEGORY
    DESCRIPTION = ("DreamBooth: trains the model on a few images of one subject, all captioned with the instance "
                   "prompt (e.g. 'a photo of sks dog'; the dataset's own captions are ignored), while prior "
                   "preservation keeps the class ('a photo of a dog') as it was, using class images generated once "
                   "by the model and cached (or a class dataset), or the frozen model's own predictions. Method lora "
                   "trains a LoRA; method full trains a copy of the whole UNet (and text encoder). The input handle "
                   "is never changed; cancel keeps a resumable checkpoint.")
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

    @classmethod
    def INPUT_TYPES(cls):
        required = {
            "pipe": (PIPE, {"tooltip": "The base model handle. LoRAs on it are kept (lora) or baked into the trained "
                                       "copy (full); it is never changed."}),
            "dataset": (DATASET, {"tooltip": "Instance images: 3-20 photos of the subject, from a Training Data node. "
                                             "Every image is trained with the instance prompt."}),
            "instance_prompt": ("STRING", {"default": "a photo of sks dog",
                                           "tooltip": "Prompt for the subject: a rare token (sks, ohwx) plus its "
                                                      "class. Use it later to generate the subject."}),
            "class_prompt": ("STRING", {"default": "a photo of a dog",
                                        "tooltip": "Prompt for the subject's class, without the rare token. Class "
                                                   "images are generated from it for prior preservation."}),
            "method": (METHODS, {"default": "lora",
                                 "tooltip": "lora: train a LoRA (small, fast, stackable). full: fine-tune a copy of "
                                            "the whole UNet - needs far more memory and a learning rate around "
                                            "1e-6 to 5e-6."}),
            "prior_preservation": ("BOOLEAN", {"default": True,
                                               "tooltip": "Also train on the class so the model keeps knowing what a "
                                                          "'dog' looks like (prevents language drift and "
                                                          "overfitting)."}),
            "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                            "tooltip": "Weight of the prior term: loss = instance + weight x prior. "
                                                       "1.0 is the paper's value."}),
            "prior_mode": (PRIOR_MODES, {"default": "class_images",
                                         "tooltip": "class_images: generate class images with the model once "
                                                    "(cached) or use class_dataset. base_prediction: no images; match "
                                                    "the frozen model's own prediction for the class prompt on the "
                                                    "instance images."}),
            "num_class_images": ("INT", {"default": 50, "min": 0, "max": 10_000,
                                         "tooltip": "Class images to generate (cached on disk and reused; raising "
                                                    "the number only generates the new ones). 100-200 is typical. "
                                                    "Ignored when class_dataset is connected."}),
            "train_text_encoder": ("BOOLEAN", {"default": False,
                                               "tooltip": "Also train the text encoder(s): better subject fidelity, "
                                                          "more memory, easier to overfit."}),
            "text_learning_rate": ("FLOAT", {"default": 5e-6, "min": 0.0, "max": 10.0, "step": 1e-7, "round": False,
                                             "tooltip": "Learning rate for the text encoder(s)."}),
            "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "LoRA rank (method lora only)."}),
            "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 4096.0, "step": 0.5,
                                "tooltip": "LoRA alpha; the update is scaled by alpha/rank (method lora only)."}),
            **common_inputs(400, 1e-4),
        }
        optional = {
            "class_dataset": (DATASET, {"tooltip": "Your own class images (e.g. real dog photos) instead of "
                                                   "generated ones. Their captions are replaced by the class "
                                                   "prompt."}),
            "class_sample_steps": ("INT", {"default": 20, "min": 1, "max": 1000,
                                           "tooltip": "Sampling steps for generated class images."}),
            "class_cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "CFG for generated class images."}),
            **validation_inputs(),
        }
        return {"required": required, "optional": optional}

    def run(self, pipe, dataset, instance_prompt, class_prompt, method, prior_preservation, prior_loss_weight,
            prior_mode, num_class_images, train_text_encoder, text_learning_rate, rank, alpha, class_dataset=None,
            class_sample_steps=20, class_cfg=7.0, **kwargs):
        from ..core.lora import LoraWeights  # noqa: PLC0415
        from ..training.dreambooth import DreamBoothSpec, train_dreambooth  # noqa: PLC0415

        settings = settings_from(kwargs)
        spec = DreamBoothSpec(instance_prompt=str(instance_prompt or ""), class_prompt=str(class_prompt or ""),
                              prior_preservation=bool(prior_preservation), prior_loss_weight=float(prior_loss_weight),
                              prior_mode=str(prior_mode), num_class_images=int(num_class_images), method=str(method),
                              train_text_encoder=bool(train_text_encoder),
                              text_learning_rate=float(text_learning_rate), rank=int(rank), alpha=float(alpha),
                              class_sample_steps=int(class_sample_steps), class_cfg=float(class_cfg))
        out, lora, result = train_dreambooth(pipe, dataset, settings, spec, node=self.NODE_ID,
                                             class_dataset=class_dataset, validation=validation_from(kwargs))
        if lora is None:  # method full: links cannot carry None, so an empty LoRA (SaveLoRA refuses it clearly)
            lora = LoraWeights(pipe.family, {}, {"ft_note": "DreamBooth full fine-tuning: the weights are in the "
                                                            "pipe output"}, "none")
        plot, grid = outputs_for(result)
        return (out, lora, plot, grid)


NODES = [DreamBoothTrain]
