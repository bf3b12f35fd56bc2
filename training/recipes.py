"""Recipes: named sets of trainer inputs that work for a kind of model, shown in the README and in the run's log.

A trainer node's ``recipe`` input picks one: ``auto`` (the default) takes the recipe of the model it trains
(:func:`recipe_for`), ``custom`` takes none, and a name takes that one. A recipe sets only the inputs that are still
at the node's default: an input you changed always wins. The values that applied are logged.

Why recipes differ: a small model trained from scratch on a few thousand images (shapes-tiny) has a flat loss
landscape and learns from few steps at learning rates a hundred times those that keep a billion-parameter model
pretrained on billions of images from forgetting (SD 1.x, SDXL). The sd15 and sdxl values are the ones the common
trainers ship for those models (diffusers' DreamBooth and textual-inversion examples, kohya's LoRA guides): LoRA at
1e-4, full DreamBooth at 5e-6 (SD 1.x) or 2e-6 (SDXL), prior-loss weight 1.0, textual inversion at 5e-3.

shapes-tiny's DreamBooth LoRA also wraps the convolutions (LoCon): its subjects include outlines the base never drew
(heart, moon), and outlines come from the convolutions: with attention and feed-forward only, the crescent was drawn
in 38 % of samples, with the convolutions in 67 % (one seed, 6 samples a prompt; over two seeds the benchmark
measures 44 %, still short of full DreamBooth's 88 %).

shapes-tiny's textual inversion trains only at timesteps 800 and up: a colour is decided at high noise, while the
low-noise steps carry most of the loss (three quarters of it below t=300 on the teal images) and pulled the token to
a colour the UNet already drew (teal came out green in every sample; from 800 up, 77 %, one seed; over two seeds
the benchmark measures 48 %).

Validation samples (and a scorer's samples) are drawn at the model's native size: 64 px for shapes-tiny, 1024 for
SDXL (the node's default, 512, is SD 1.x's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RECIPES = ("auto", "custom", "shapes-tiny", "sd15", "sdxl", "kolors")
#: The trainers a recipe has values for; DreamBooth's depend on its method.
TRAINERS = ("lora", "embedding", "dreambooth_lora", "dreambooth_full", "dreambooth_pivotal")

TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "shapes-tiny": {
        "lora": {"steps": 600, "learning_rate": 2e-3, "batch_size": 4, "rank": 8, "alpha": 8.0,
                 "validation_size": 64},
        "embedding": {"steps": 300, "learning_rate": 2e-2, "batch_size": 4, "num_vectors": 1,
                      "initializer": "shape", "templates": "captions", "min_timestep": 800, "validation_size": 64},
        "dreambooth_lora": {"steps": 250, "learning_rate": 2e-3, "batch_size": 4, "rank": 8, "alpha": 8.0,
                            "targets": "attention+feedforward+conv", "num_class_images": 24, "class_cfg": 5.0,
                            "validation_size": 64},
        "dreambooth_full": {"steps": 250, "learning_rate": 1e-3, "batch_size": 4, "num_class_images": 24,
                            "class_cfg": 5.0, "validation_size": 64},
    },
    "sd15": {
        "lora": {"steps": 500, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0},
        "embedding": {"steps": 1000, "learning_rate": 5e-3, "num_vectors": 4},
        "dreambooth_lora": {"steps": 400, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0, "num_class_images": 50},
        "dreambooth_full": {"steps": 400, "learning_rate": 5e-6, "num_class_images": 100},
    },
    "sdxl": {
        "lora": {"steps": 500, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0, "validation_size": 1024},
        "embedding": {"steps": 1000, "learning_rate": 5e-3, "num_vectors": 4, "validation_size": 1024},
        "dreambooth_lora": {"steps": 500, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0, "num_class_images": 50,
                            "validation_size": 1024},
        "dreambooth_full": {"steps": 400, "learning_rate": 2e-6, "num_class_images": 100, "validation_size": 1024},
    },
    # Kolors' own DreamBooth-LoRA script (diffusers-derived): rank 4, learning rate 2e-5, prior-loss weight 0.7,
    # 100 class images at 1024 px; the other trainers take the SDXL values (same UNet).
    "kolors": {
        "lora": {"steps": 500, "learning_rate": 1e-4, "rank": 16, "alpha": 16.0, "validation_size": 1024},
        "embedding": {"steps": 1000, "learning_rate": 5e-3, "num_vectors": 4, "validation_size": 1024},
        "dreambooth_lora": {"steps": 500, "learning_rate": 2e-5, "rank": 4, "alpha": 4.0, "prior_loss_weight": 0.7,
                            "num_class_images": 100, "validation_size": 1024},
        "dreambooth_full": {"steps": 400, "learning_rate": 2e-6, "prior_loss_weight": 0.7, "num_class_images": 100,
                            "validation_size": 1024},
    },
}

# Pivotal tuning is DreamBooth LoRA plus a new word's vectors: the LoRA values of dreambooth_lora, the vectors at
# textual inversion's learning rate on the pretrained models. On shapes-tiny the word starts from an unused token (as
# "sks" does for DreamBooth; started from "shape" it was the class prompt's word and drew the class) and trains at
# the LoRA's rate: at textual inversion's 2e-2 it drifted while the LoRA learned around it (red heart, 8 samples:
# subject 75 % at 2e-2, 88 % at 2e-3; prompt fidelity 59 % vs 69 %).
_PIVOTAL = {"shapes-tiny": {"embedding_learning_rate": 2e-3, "num_vectors": 1},
            "sd15": {"embedding_learning_rate": 5e-3}, "sdxl": {"embedding_learning_rate": 5e-3},
            "kolors": {}}
for _recipe, _values in _PIVOTAL.items():
    TABLE[_recipe]["dreambooth_pivotal"] = {**TABLE[_recipe]["dreambooth_lora"], **_values}

_FAMILY_RECIPE = {"sd1": "sd15", "sd2": "sd15", "sdxl": "sdxl", "kolors": "kolors"}


def recipe_for(handle: Any) -> str:
    """The recipe ``auto`` means for ``handle``: ``shapes-tiny`` for the built-in model, else by family
    (SD 1.x and 2.x: ``sd15``; SDXL: ``sdxl``; Kolors: ``kolors``); ``custom`` for a family without one."""
    base = handle.base
    if base.label == "shapes-tiny":
        return "shapes-tiny"
    return _FAMILY_RECIPE.get(base.family.value, "custom")


def resolve(recipe: str, handle: Any) -> str:
    """``recipe`` with ``auto`` resolved; a name not in :data:`RECIPES` raises ``ValueError``."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; one of {', '.join(RECIPES)}")
    return recipe_for(handle) if recipe == "auto" else recipe


def apply(recipe: str, trainer: str, inputs: Mapping[str, Any], defaults: Mapping[str, Any]
          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(inputs with the recipe's values, the values that applied)``: each value of ``TABLE[recipe][trainer]``
    replaces an input that equals its node default (``defaults``); inputs the user changed stay."""
    values = TABLE.get(recipe, {}).get(trainer, {})
    out, applied = dict(inputs), {}
    for name, value in values.items():
        if name in defaults and out.get(name, defaults[name]) == defaults[name] and value != defaults[name]:
            out[name] = value
            applied[name] = value
    return out, applied


def describe(recipe: str, applied: Mapping[str, Any]) -> str:
    """One line for the log: ``recipe shapes-tiny: steps 300, learning_rate 0.002``."""
    if not applied:
        return f"recipe {recipe}: node inputs as set"
    return f"recipe {recipe}: " + ", ".join(f"{k} {v}" for k, v in applied.items())


def markdown_table() -> str:
    """The README's recipe table: one row per (recipe, trainer), the inputs it sets."""
    lines = ["| recipe | trainer | inputs it sets (where left at the node's default) |", "|---|---|---|"]
    for recipe, trainers in TABLE.items():
        for trainer, values in trainers.items():
            lines.append(f"| {recipe} | {trainer} | " + ", ".join(f"`{k}` {v}" for k, v in values.items()) + " |")
    return "\n".join(lines)
