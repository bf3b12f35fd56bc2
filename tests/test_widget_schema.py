"""The widget schema of every node stays as saved: ``INPUT_TYPES()`` equals the snapshot in fixtures/.

Saved UI workflows store widget values by position (``widgets_values``), so a node's inputs must keep their names,
order, types, defaults, limits and section. ``tests/fixtures/input_types.json`` is the schema every node produced;
a deliberate change to it is made by regenerating the file and saying why in the commit:

    python tests/test_widget_schema.py --write

Combo lists that list files in the user's model folders depend on the machine and are compared as a placeholder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "input_types.json"
# (node id, input): combo choices read from the host's model folders at call time
FOLDER_LISTINGS = {("LoadBase", "ckpt_name"), ("AddLoRA", "lora_name"), ("FinetuneImagePrompt", "adapter_name"),
                   ("FinetuneImagePrompt", "clip_vision_name"), ("FinetuneInstantID", "instantid_name"),
                   ("FinetuneInstantID", "controlnet_name")}
FOLDER_PLACEHOLDER = "<files in the model folder>"


def snapshot() -> dict:
    """``{node id: INPUT_TYPES()}`` as JSON values, folder listings replaced by a placeholder."""
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS

    out = {}
    for node_id in sorted(NODE_CLASS_MAPPINGS):
        types = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        node = {}
        for section, inputs in types.items():
            node[section] = {}
            for name, spec in inputs.items():
                spec = list(spec)
                if (node_id, name) in FOLDER_LISTINGS:
                    spec[0] = FOLDER_PLACEHOLDER
                node[section][name] = spec
        out[node_id] = node
    return json.loads(json.dumps(out))


def _order(schema: dict) -> dict:
    return {node: {section: list(inputs) for section, inputs in sections.items()}
            for node, sections in schema.items()}


def test_input_types_match_the_snapshot():
    saved = json.loads(FIXTURE.read_text(encoding="utf-8"))
    now = snapshot()
    assert sorted(now) == sorted(saved), "nodes added or removed"
    assert _order(now) == _order(saved), "input names, order or sections changed"
    for node_id in saved:
        for section, inputs in saved[node_id].items():
            for name, spec in inputs.items():
                assert now[node_id][section][name] == spec, f"{node_id}.{name} changed"
    # value types too (JSON equality would let 1 == 1.0 and True == 1 pass)
    assert json.dumps(now, sort_keys=True) == json.dumps(saved, sort_keys=True)


@pytest.mark.parametrize("node_id,name", sorted(FOLDER_LISTINGS))
def test_folder_listings_are_combos(node_id, name):
    from comfy_finetune.nodes import NODE_CLASS_MAPPINGS

    choices = NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"][name][0]
    assert isinstance(choices, list) and choices


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_widget_schema.py --write   (rewrites " + str(FIXTURE) + ")")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(snapshot(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
