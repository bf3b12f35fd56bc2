"""Shared plumbing for node classes: error attribution and small schema helpers.

Nodes are thin: a schema (``INPUT_TYPES`` with a tooltip on everything) and one call into the
core. Every exception leaving a node names the node; cancel passes through untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, is_dataclass
from typing import Any

from .. import host
from ..core.errors import FinetuneError
from ..core.fields import INPUT, input_fields, input_value, widget_type

log = logging.getLogger("comfy_finetune")

CATEGORY = "finetune"

# Custom link types. Namespaced so they never clash with ComfyUI's MODEL/CLIP or another pack's.
PIPE = "FT_PIPE"
LORA = "FT_LORA"
NEGATIVE = "FT_NEGATIVE"
EMBEDDING = "FT_EMBEDDING"


DATASET = "FT_DATASET"
SCORER = "FT_SCORER"
FEATURES = "FT_FEATURES"

# What each link type must carry, and which nodes make it (for the error message).
_LINK_TYPES = {
    PIPE: ("..core.handle", "ModelHandle", "LoadBase, AddLoRA or a training node"),
    LORA: ("..core.lora", "LoraWeights", "FinetuneTrainLoRA or DreamBoothTrain"),
    NEGATIVE: ("..core.conditioning", "Negative", "NegativePrompt"),
    EMBEDDING: ("..core.embeddings", "Embedding", "LearnEmbedding"),
    DATASET: ("..training.data", "TrainingSet", "Training Data (Folder) or Training Data (Images)"),
    SCORER: ("..scoring.scorers", "Scorer", "a Scorer node (Shapes Judge, DINO / CLIP, Held-out Loss) or Combine "
                                            "Scorers"),
    FEATURES: ("..scoring.features", "FeatureModel", "Load Feature Model"),
    "IMAGE": ("torch", "Tensor", "an image node such as LoadImage or Sample"),
}


def _link_inputs(cls) -> dict[str, tuple[str, bool]]:
    """``{input name: (link type, required)}`` for the inputs whose values must be objects of our link types."""
    cached = cls.__dict__.get("_ft_link_inputs")
    if cached is None:
        cached = {}
        types = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in (types.get(section) or {}).items():
                if isinstance(spec[0], str) and spec[0] in _LINK_TYPES:
                    cached[name] = (spec[0], section == "required")
        cls._ft_link_inputs = cached
    return cached


def check_link_values(cls, node_id: str, kwargs: dict) -> None:
    """Refuse a wrong object on a link input (e.g. a string typed into an API prompt) with a clear error."""
    import importlib  # noqa: PLC0415

    for name, (type_name, required) in _link_inputs(cls).items():
        value = kwargs.get(name)
        module_name, attr, makers = _LINK_TYPES[type_name]
        if value is None:
            if required:
                raise FinetuneError(f"nothing is connected (it needs a {type_name})", node=node_id, input=name,
                                    fix=f"connect the output of {makers}")
            continue
        module = importlib.import_module(module_name, __package__) if module_name.startswith(".") else \
            importlib.import_module(module_name)
        expected = getattr(module, attr)
        if not isinstance(value, expected) or (type_name == "IMAGE" and value.dim() != 4):
            raise FinetuneError(f"expects a {type_name} but got {type(value).__name__} {str(value)[:40]!r}",
                                node=node_id, input=name, fix=f"connect the output of {makers}")


def _wrap(node_id: str, fn):
    @functools.wraps(fn)
    def run(self, *args: Any, **kwargs: Any):
        try:
            values = kwargs
            if args:  # ComfyUI passes keywords; direct callers may pass positions
                values = dict(inspect.signature(fn).bind_partial(self, *args, **kwargs).arguments)
            check_link_values(type(self), node_id, values)
            return fn(self, *args, **kwargs)
        except host.interrupt_exception_types():
            raise
        except FinetuneError as exc:
            if exc.node:
                raise
            raise exc.with_node(node_id) from exc
        except MemoryError as exc:
            raise FinetuneError("out of memory", node=node_id,
                                fix="use a smaller size or batch, fp16/bf16, or free other models") from exc
        except Exception as exc:
            if type(exc).__name__ == "OutOfMemoryError":
                import torch  # noqa: PLC0415

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise FinetuneError(f"out of GPU memory ({exc})".split("\n")[0], node=node_id,
                                    fix="use a smaller size or batch, fp16/bf16, or free other models") from exc
            raise

    return run


class FTNode:
    """Base class: sets FUNCTION and attributes errors raised by ``run`` to the node."""

    NODE_ID: str = ""
    DISPLAY_NAME: str = ""
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__ and cls.NODE_ID:
            cls.run = _wrap(cls.NODE_ID, cls.__dict__["run"])


def file_signature(path) -> str:
    """Cheap change marker for a file-backed input (mtime + size), for IS_CHANGED."""
    try:
        st = path.stat()
    except (OSError, AttributeError):
        return ""
    return f"{st.st_mtime_ns}:{st.st_size}"


# ---------------------------------------------------------------------------------------------- widgets
def widgets(names: Sequence[str], *sources: Any, defaults: Mapping[str, Any] | None = None) -> dict:
    """``{input: (type, options)}`` for the inputs ``names``, in that order (widget positions of saved workflows).

    Each input comes from the first of ``sources`` that has it: a hand-written ``{input: spec}`` dict, or a settings
    dataclass whose field is that node input (``core.fields.node_input``): its widget facts, and its default unless
    ``defaults`` (``{input: value}``, the node's own defaults) names the input.
    """
    defaults = defaults or {}
    out: dict[str, tuple] = {}
    for name in names:
        for source in sources:
            if is_dataclass(source):
                f = input_fields(source).get(name)
                if f is None:
                    continue
                facts = dict(f.metadata[INPUT])
                choices, _ = facts.pop("choices", None), facts.pop("input", None)
                default = defaults.get(name, f.default)
                options = {"default": default, **facts} if default is not MISSING else facts
                out[name] = (list(choices) if choices is not None else widget_type(f), options)
                break
            if name in source:
                out[name] = source[name]
                break
        else:
            raise KeyError(f"no widget definition for input '{name}'")
    return out


def input_defaults(node_cls: type) -> dict[str, Any]:
    """Each widget input's default from a node's INPUT_TYPES (what a freshly dropped node has; a combo's is its
    ``default`` or its first choice). Link inputs have none."""
    out: dict[str, Any] = {}
    for section in ("required", "optional"):
        for name, spec in node_cls.INPUT_TYPES().get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(spec[0], (list, tuple)) and spec[0]:
                out[name] = spec[0][0]
    return out


def from_inputs(cls: type, values: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *,
                coerce: bool = True, **fixed: Any) -> Any:
    """The settings dataclass ``cls`` from a node's input values, matched by input name.

    An input missing from ``values`` takes the node's default (``defaults``), else the field's; ``coerce`` converts
    each value to the field's type (``core.fields.input_value``); ``fixed`` sets fields directly.
    """
    defaults = defaults or {}
    kwargs: dict[str, Any] = {}
    for name, f in input_fields(cls).items():
        if name in values:
            value = values[name]
        elif name in defaults:
            value = defaults[name]
        else:
            continue
        kwargs[f.name] = input_value(f, value) if coerce else value
    return cls(**{**kwargs, **fixed})
