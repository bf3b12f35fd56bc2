"""Node-input facts on settings dataclasses: a field that a node offers as a widget declares the widget too.

The trainers' settings (``TrainSettings``, ``LoraSpec``, ``TISpec``, ``DreamBoothSpec``) and the training-data
options (``DataOptions``) are plain dataclasses. A field that is a node input is declared with :func:`node_input`:
its default is the dataclass default, and ``dataclasses.field(metadata=...)`` carries, under :data:`INPUT`, the
widget's tooltip, limits (``min``, ``max``, ``step``, ``round``), combo ``choices``, other widget options, and the
node input's name where it differs from the field's (``nan_policy`` is the input ``on_nan``). The node classes
build their ``INPUT_TYPES`` from these facts and the dataclasses from the values they are given
(``nodes/base.py``: ``widgets`` and ``from_inputs``), so each default and each limit is written once.

Plain data: nothing here knows ComfyUI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import MISSING, Field, field, fields
from typing import Any

INPUT = "node_input"  # the metadata key
WIDGET_TYPES = {"int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "str": "STRING"}  # field type -> widget type


def node_input(default: Any = MISSING, *, tooltip: str, choices: Iterable[str] | None = None,
               input: str | None = None, **options: Any) -> Any:
    """A dataclass field that is a node input: ``default`` (none: the field is required) plus the widget facts.

    ``choices`` makes the widget a combo; ``input`` is the node input's name if it is not the field's; ``options``
    are further widget options in ComfyUI's words (min, max, step, round, multiline, control_after_generate).
    """
    facts: dict[str, Any] = dict(options)
    if choices is not None:
        facts["choices"] = tuple(choices)
    if input is not None:
        facts["input"] = input
    facts["tooltip"] = tooltip
    return field(default=default, metadata={INPUT: facts})


def input_fields(cls: type) -> dict[str, Field]:
    """``{node input name: field}`` for the fields of dataclass ``cls`` declared with :func:`node_input`."""
    return {f.metadata[INPUT].get("input", f.name): f for f in fields(cls) if INPUT in f.metadata}


def widget_type(f: Field) -> str:
    """The ComfyUI widget type of a :func:`node_input` field without choices (INT, FLOAT, BOOLEAN, STRING)."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    if name not in WIDGET_TYPES:
        raise TypeError(f"field '{f.name}' has type {f.type!r}; node inputs are int, float, bool or str")
    return WIDGET_TYPES[name]


def input_value(f: Field, value: Any) -> Any:
    """``value`` as the field's type: int(), float(), bool(), or str() (None -> "")."""
    kind = widget_type(f)
    if kind == "INT":
        return int(value)
    if kind == "FLOAT":
        return float(value)
    if kind == "BOOLEAN":
        return bool(value)
    return "" if value is None else str(value)
