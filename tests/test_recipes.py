"""Recipes: a trainer node's ``recipe`` fills the inputs left at their defaults with values that work for the model,
never an input the user changed; ``auto`` picks by model; the values used are logged."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.families import Family
from comfy_finetune.nodes import base as nodes_base
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.nodes.pivotal import PivotalTuning
from comfy_finetune.nodes.training import TrainLoRA
from comfy_finetune.training import recipes

NODES = {"lora": TrainLoRA, "embedding": LearnEmbedding, "dreambooth_lora": DreamBoothTrain,
         "dreambooth_full": DreamBoothTrain, "dreambooth_pivotal": PivotalTuning}


def handle(label: str, family: Family):
    return SimpleNamespace(base=SimpleNamespace(label=label, family=family))


def test_auto_picks_the_models_recipe():
    assert recipes.resolve("auto", handle("shapes-tiny", Family.SD1)) == "shapes-tiny"
    assert recipes.resolve("auto", handle("my-model", Family.SD1)) == "sd15"
    assert recipes.resolve("auto", handle("my-model", Family.SD2)) == "sd15"
    assert recipes.resolve("auto", handle("my-model", Family.SDXL)) == "sdxl"
    assert recipes.resolve("sdxl", handle("shapes-tiny", Family.SD1)) == "sdxl"  # a name is taken as given
    assert recipes.resolve("custom", None) == "custom"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.resolve("fast", None)


@pytest.mark.parametrize("recipe", [r for r in recipes.TABLE])
def test_every_recipe_value_is_an_input_of_its_node(recipe):
    assert set(recipes.TABLE[recipe]) == set(recipes.TRAINERS)
    for trainer, values in recipes.TABLE[recipe].items():
        defaults = nodes_base.input_defaults(NODES[trainer])
        assert set(values) <= set(defaults), (recipe, trainer, set(values) - set(defaults))
        for name, value in values.items():
            assert type(value) is type(defaults[name]), (recipe, trainer, name)


def test_a_recipe_fills_only_inputs_left_at_their_defaults():
    defaults = nodes_base.input_defaults(TrainLoRA)
    values = recipes.TABLE["shapes-tiny"]["lora"]
    out, applied = recipes.apply("shapes-tiny", "lora", {**defaults, "rank": 32}, defaults)
    assert out["rank"] == 32 and "rank" not in applied  # changed by the user: kept
    assert out["steps"] == values["steps"] != defaults["steps"] and applied["steps"] == values["steps"]
    assert recipes.apply("custom", "lora", defaults, defaults) == (defaults, {})
    assert f"steps {values['steps']}" in recipes.describe("shapes-tiny", applied)


@pytest.mark.parametrize("trainer", ["lora", "embedding", "dreambooth_full"])
def test_the_node_trains_with_the_recipe_and_logs_it(trainer, monkeypatch, caplog):
    node = NODES[trainer]
    module = sys.modules[node.__module__]
    fn = {"lora": "train_lora", "embedding": "train_embedding", "dreambooth_full": "train_dreambooth"}[trainer]
    seen = {}

    class Stop(Exception):
        pass

    def capture(pipe, dataset, settings, spec, **kwargs):
        seen.update(settings=settings, spec=spec)
        raise Stop

    monkeypatch.setattr(module, fn, capture)
    monkeypatch.setattr(nodes_base, "check_link_values", lambda *a, **k: None)
    values = nodes_base.input_defaults(node)
    if trainer == "dreambooth_full":
        values["method"] = "full"
    values["learning_rate"] = 0.5  # changed by the user
    with caplog.at_level(logging.INFO, logger="comfy_finetune"), pytest.raises(Stop):
        node().run(pipe=handle("shapes-tiny", Family.SD1), dataset=None, **values)
    recipe = recipes.TABLE["shapes-tiny"][trainer]
    assert seen["settings"].steps == recipe["steps"] and seen["settings"].learning_rate == 0.5
    assert seen["settings"].batch_size == recipe["batch_size"]
    assert f"recipe shapes-tiny: steps {recipe['steps']}" in caplog.text and "learning_rate" not in caplog.text


def test_an_unknown_recipe_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(nodes_base, "check_link_values", lambda *a, **k: None)
    values = {**nodes_base.input_defaults(TrainLoRA), "recipe": "turbo"}
    with pytest.raises(FinetuneError) as err:
        TrainLoRA().run(pipe=handle("x", Family.SD1), dataset=None, **values)
    assert err.value.node == "FinetuneTrainLoRA" and err.value.input == "recipe" and "auto" in err.value.fix


def test_the_readme_shows_every_recipe_value():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert recipes.markdown_table() in readme, "the README recipe table is stale: paste recipes.markdown_table()"
