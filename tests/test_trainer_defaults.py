"""A trainer node's widget defaults are its settings dataclasses' defaults (or the node's declared DEFAULTS), and
the node turns its default widget values back into exactly those dataclasses, so the two cannot drift apart."""

from __future__ import annotations

import inspect
import sys
from dataclasses import MISSING, fields, replace

import pytest

from comfy_finetune.core.fields import INPUT, input_fields
from comfy_finetune.core.sampling import SampleSettings
from comfy_finetune.nodes import base as nodes_base
from comfy_finetune.nodes.dreambooth import DreamBoothTrain
from comfy_finetune.nodes.embedding_training import LearnEmbedding
from comfy_finetune.nodes.training import VALIDATION_WIDGETS, TrainLoRA, settings_from, validation_from
from comfy_finetune.training.dreambooth import DreamBoothSpec
from comfy_finetune.training.lora_trainer import LoraSpec
from comfy_finetune.training.settings import TrainSettings
from comfy_finetune.training.ti_trainer import TISpec

# node, its spec dataclass, the node module and the name of the trainer function its run() calls there
TRAINERS = [(TrainLoRA, LoraSpec, sys.modules[TrainLoRA.__module__], "train_lora"),
            (LearnEmbedding, TISpec, sys.modules[LearnEmbedding.__module__], "train_embedding"),
            (DreamBoothTrain, DreamBoothSpec, sys.modules[DreamBoothTrain.__module__], "train_dreambooth")]
IDS = [t[0].NODE_ID for t in TRAINERS]
# the validation widgets that are not TrainSettings fields: their defaults are the Sample settings'
VALIDATION_DEFAULTS = {"validation_prompt": "", "validation_size": SampleSettings.width,
                       "validation_steps": SampleSettings.steps, "validation_sampler": SampleSettings.sampler,
                       "validation_scheduler": SampleSettings.scheduler, "validation_cfg": SampleSettings.cfg,
                       "recipe": "auto"}


def _widgets(node) -> dict:
    types = node.INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}


def _default_values(node) -> dict:
    """What a freshly dropped node holds: every widget's default."""
    return {name: spec[1]["default"] for name, spec in _widgets(node).items() if "default" in spec[1]}


def _expected(node, spec_cls) -> dict:
    """``{input: default}`` for every dataclass field the node offers: the node's DEFAULTS, else the field's."""
    out = {}
    for cls in (spec_cls, TrainSettings):
        for name, f in input_fields(cls).items():
            out.setdefault(name, node.DEFAULTS.get(name, f.default))
    return out


@pytest.mark.parametrize("node,spec_cls,module,fn", TRAINERS, ids=IDS)
def test_widget_defaults_are_the_dataclass_defaults(node, spec_cls, module, fn):
    widgets = _widgets(node)
    expected = _expected(node, spec_cls)
    assert set(expected) <= set(widgets), f"fields the node does not offer: {set(expected) - set(widgets)}"
    assert set(node.DEFAULTS) <= set(expected), "DEFAULTS names an input that is no dataclass field"
    for name, value in node.DEFAULTS.items():
        f = input_fields(spec_cls).get(name) or input_fields(TrainSettings)[name]
        assert value != f.default, f"{node.NODE_ID}.DEFAULTS['{name}'] repeats the dataclass default"
    for name, (_, opts) in widgets.items():
        if name in expected:
            assert expected[name] is not MISSING, f"{node.NODE_ID}.{name}: a required field needs a node default"
            assert opts["default"] == expected[name] and type(opts["default"]) is type(expected[name]), name
        elif name in VALIDATION_DEFAULTS:
            assert opts["default"] == VALIDATION_DEFAULTS[name], name
        else:
            assert "default" not in opts and name in ("pipe", "dataset", "class_dataset", "negative", "scorer"), name
    # run()'s own keyword defaults (for direct Python callers) are the widget defaults too
    for name, param in inspect.signature(node.run).parameters.items():
        if param.default is not inspect.Parameter.empty and param.default is not None:
            assert param.default == widgets[name][1]["default"], name


@pytest.mark.parametrize("node,spec_cls,module,fn", TRAINERS, ids=IDS)
def test_default_widget_values_give_the_dataclass_defaults(node, spec_cls, module, fn, monkeypatch):
    values = _default_values(node)
    settings_overrides = {f.name: node.DEFAULTS[name] for name, f in input_fields(TrainSettings).items()
                          if name in node.DEFAULTS}
    assert settings_from(values) == replace(TrainSettings(), **settings_overrides)
    assert settings_from({}, node.DEFAULTS) == settings_from(values)  # missing inputs take the node's defaults
    spec_values = {f.name: node.DEFAULTS[name] for name, f in input_fields(spec_cls).items() if name in node.DEFAULTS}
    expected_spec = spec_cls(**spec_values)
    assert nodes_base.from_inputs(spec_cls, values) == expected_spec
    assert validation_from(values) is None  # no validation prompt by default
    sampled = validation_from({**values, "validation_prompt": "a test"})
    assert sampled == SampleSettings(prompt="a test", seed=TrainSettings.seed)

    # The node's own run() builds exactly these from its default widget values (recipe custom: the widgets as
    # set; tests/test_recipes.py covers what a recipe changes).
    seen = {}

    class Stop(Exception):
        pass

    def capture(pipe, dataset, settings, spec, **kwargs):
        seen.update(settings=settings, spec=spec, validation=kwargs.get("validation"))
        raise Stop

    monkeypatch.setattr(module, fn, capture)
    monkeypatch.setattr(nodes_base, "check_link_values", lambda *a, **k: None)
    with pytest.raises(Stop):
        node().run(pipe=None, dataset=None, **{**values, "recipe": "custom"})
    assert seen == {"settings": settings_from(values), "spec": expected_spec, "validation": None}


def test_the_on_nan_rename_is_declared_once():
    renamed = {f.name: f.metadata[INPUT]["input"] for cls in (TrainSettings, LoraSpec, TISpec, DreamBoothSpec)
               for f in fields(cls) if "input" in f.metadata.get(INPUT, {})}
    assert renamed == {"nan_policy": "on_nan"}
    assert settings_from({"on_nan": "rollback"}).nan_policy == "rollback"


def test_validation_widgets_are_not_settings_fields():
    assert not set(VALIDATION_WIDGETS) & set(input_fields(TrainSettings))
    assert set(VALIDATION_WIDGETS) == set(VALIDATION_DEFAULTS) | {"negative"}
