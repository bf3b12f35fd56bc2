"""Property tests of the workflow loader and the executor's validation (issue 7, item 5).

Random JSON-ish structures in UI shape (nodes/links with random types, ids and widgets), in API shape (random class
types, links and values), random mutations of the example workflows, and random (mis)typed prompts built from the
real node classes: ``load_workflow`` and ``Executor.execute`` may only raise :class:`FinetuneError` subclasses
(WorkflowError, PromptValidationError, ...) and must not hang. The executor runs node classes whose functions are
no-ops, so nothing heavy ever runs; validation, IS_CHANGED and VALIDATE_INPUTS are the real ones.

The prompt-weighting parser has its own fuzz tests (test_prompt_syntax.py).
"""

from __future__ import annotations

import copy
import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import comfy_finetune
from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.headless.executor import Executor
from comfy_finetune.headless.runner import node_classes
from comfy_finetune.headless.workflow import apply_overrides, load_workflow, read_workflow_json

CLASSES = node_classes()
EXAMPLES = {p.stem: json.loads(p.read_text())
            for p in sorted((Path(comfy_finetune.__file__).parent / "example_workflows").glob("*.json"))}
EXAMPLE_TIMEOUT_S = 10

# Deterministic (derandomize) so a run is reproducible; no example database written into the checkout. Shrinking is
# off by default (a failing property is reported at once); FT_FUZZ_SHRINK=1 shrinks to a minimal example.
# FT_FUZZ_EXAMPLES raises the number of examples, FT_FUZZ_RANDOM=1 draws new ones on every run (for a longer search).
SHRINK = os.environ.get("FT_FUZZ_SHRINK") == "1"
FUZZ = settings(max_examples=int(os.environ.get("FT_FUZZ_EXAMPLES", "300")), deadline=2000,
                derandomize=os.environ.get("FT_FUZZ_RANDOM") != "1", database=None, print_blob=True,
                report_multiple_bugs=False,
                phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if SHRINK else [])],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])



class Hang(Exception):
    """An example ran longer than EXAMPLE_TIMEOUT_S."""


@contextmanager
def no_hang(seconds: int = EXAMPLE_TIMEOUT_S):
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ============================================================================================== no-op node classes
def _noop_class(cls: type) -> type:
    """``cls`` with its FUNCTION replaced by a no-op returning one ``None`` per output (validation stays real)."""
    returns = tuple(getattr(cls, "RETURN_TYPES", ()) or ())

    def noop(self, *args, **kwargs):
        return tuple(None for _ in returns) if returns else {"ui": {}}

    sub = type(cls.__name__, (cls,), {"__module__": __name__})
    setattr(sub, cls.FUNCTION, noop)  # set after creation: FTNode.__init_subclass__ would wrap it (link checks)
    return sub


NOOP_CLASSES = {name: _noop_class(cls) for name, cls in CLASSES.items()}


def _execute(api) -> None:
    """Validate (and no-op run) an API prompt: only FinetuneError may leave."""
    Executor(NOOP_CLASSES, inference_mode=False).execute(api)


def _load_and_execute(data) -> None:
    """What ``python -m comfy_finetune run`` does with a parsed file, with no-op nodes."""
    with no_hang():
        try:
            api = load_workflow(data, CLASSES)
        except FinetuneError:
            return
        assert isinstance(api, dict)
        try:
            _execute(api)
        except FinetuneError:
            return


# ============================================================================================== strategies
SCALARS = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                         max_size=4),
                    max_leaves=12)
TYPES = st.sampled_from([*CLASSES, "Reroute", "PrimitiveNode", "Note", "MarkdownNote", "NoSuchNode", ""])
IDS = st.one_of(st.integers(min_value=-1, max_value=8), st.sampled_from(["1", "2", "x", ""]), JSON)
SOCKET_TYPES = st.sampled_from(["FT_PIPE", "FT_LORA", "FT_DATASET", "FT_NEGATIVE", "FT_EMBEDDING", "IMAGE", "INT",
                                "STRING", "*", "", "COMBO"]) | JSON


def _maybe(strategy):
    """Mostly well-formed, sometimes any JSON."""
    return st.one_of(strategy, strategy, strategy, JSON)


SOCKET = _maybe(st.fixed_dictionaries(
    {"name": _maybe(st.sampled_from(["pipe", "dataset", "lora", "negative", "images", "seed", "prompt", "x"])),
     "type": SOCKET_TYPES, "link": st.one_of(st.none(), IDS)},
    optional={"widget": _maybe(st.fixed_dictionaries({"name": _maybe(st.text(max_size=8))}))}))
OUTPUT = _maybe(st.fixed_dictionaries({"name": _maybe(st.text(max_size=8)), "type": SOCKET_TYPES,
                                       "links": _maybe(st.lists(IDS, max_size=3))}))
UI_NODE = _maybe(st.fixed_dictionaries(
    {"id": IDS, "type": _maybe(TYPES)},
    optional={"mode": _maybe(st.sampled_from([0, 2, 4])), "order": _maybe(st.integers(0, 9)),
              "title": JSON, "inputs": _maybe(st.lists(SOCKET, max_size=4)),
              "outputs": _maybe(st.lists(OUTPUT, max_size=3)),
              "widgets_values": _maybe(st.lists(JSON, max_size=12)), "properties": JSON}))
UI_LINK = st.one_of(
    st.tuples(IDS, IDS, _maybe(st.integers(-1, 4)), IDS, _maybe(st.integers(-1, 4)), SOCKET_TYPES).map(list),
    st.lists(JSON, max_size=7),
    _maybe(st.fixed_dictionaries({"id": IDS, "origin_id": IDS, "origin_slot": _maybe(st.integers(-1, 4)),
                                  "target_id": IDS, "target_slot": _maybe(st.integers(-1, 4)),
                                  "type": SOCKET_TYPES})),
)
UI = st.fixed_dictionaries(
    {"nodes": st.lists(UI_NODE, max_size=6), "links": _maybe(st.lists(UI_LINK, max_size=6))},
    optional={"definitions": _maybe(st.fixed_dictionaries({"subgraphs": _maybe(st.lists(JSON, max_size=2))})),
              "version": JSON, "extra": JSON})

API_LINK = st.tuples(_maybe(st.sampled_from(["1", "2", "3", "4", "9"]) | st.integers(0, 5)),
                     _maybe(st.integers(-1, 5))).map(list)
API_VALUE = st.one_of(JSON, API_LINK, st.fixed_dictionaries({"__value__": JSON}))
API_NODE = _maybe(st.fixed_dictionaries(
    {"class_type": _maybe(TYPES)},
    optional={"inputs": _maybe(st.dictionaries(st.text(max_size=10), API_VALUE, max_size=6)),
              "_meta": _maybe(st.fixed_dictionaries({"title": JSON}))}))
API = st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5"]) | st.text(max_size=4), API_NODE, max_size=6)


# ============================================================================================== loader properties
@FUZZ
@given(UI)
def test_ui_shaped_json_only_raises_documented_errors(data):
    _load_and_execute(data)


@FUZZ
@given(API)
def test_api_shaped_json_only_raises_documented_errors(data):
    _load_and_execute(data)


@FUZZ
@given(API)
def test_wrapped_api_prompt_only_raises_documented_errors(data):
    _load_and_execute({"prompt": data, "client_id": "x"})


@FUZZ
@given(JSON)
def test_any_json_file_only_raises_documented_errors(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_workflow.json"
    path.write_text(json.dumps(data))
    with no_hang():
        try:
            raw = read_workflow_json(path)
        except FinetuneError:
            return
    _load_and_execute(raw)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_examples(draw):
    """An example workflow (UI or its API form) with a few values replaced, deleted or duplicated."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    data = copy.deepcopy(EXAMPLES[name])
    if draw(st.booleans()):
        data = load_workflow(data, CLASSES)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "delete", "duplicate"]))
        if action == "replace":
            parent[path[-1]] = draw(JSON | IDS | TYPES | API_LINK)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
    return data


@FUZZ
@given(mutated_examples())
def test_mutated_example_workflows_only_raise_documented_errors(data):
    _load_and_execute(data)


@FUZZ
@given(mutated_examples(), st.lists(st.text(max_size=30), max_size=3))
def test_overrides_only_raise_documented_errors(data, overrides):
    with no_hang():
        try:
            api = load_workflow(data, CLASSES)
            api = apply_overrides(api, overrides, CLASSES)
        except FinetuneError:
            return
    _load_and_execute(api)


# ============================================================================================== executor validation
def _declared_inputs(class_type: str) -> list[tuple[str, object, dict]]:
    types = CLASSES[class_type].INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in dict(types.get(section) or {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], opts))
    return out


def _value_for(draw, declared, opts, ids):
    """A value for an input: mostly plausible, often mistyped, sometimes a (bad) link."""
    choice = draw(st.integers(0, 9))
    if choice <= 2 and ids:
        return [draw(st.sampled_from(ids)), draw(st.integers(-1, 4))]
    if choice == 3:
        return draw(API_LINK)
    if choice == 4:
        return draw(JSON)
    if isinstance(declared, (list, tuple)) and declared:
        return draw(st.sampled_from(list(declared)) | st.text(max_size=6))
    if declared == "INT":
        lo, hi = opts.get("min", -2 ** 64), opts.get("max", 2 ** 64)
        return draw(st.integers(min_value=int(lo) - 2, max_value=int(hi) + 2) | st.floats() | st.text(max_size=4))
    if declared == "FLOAT":
        return draw(st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=4))
    if declared == "BOOLEAN":
        return draw(st.booleans() | st.sampled_from(["false", "true", 0, 1, None]))
    if declared == "STRING":
        return draw(st.text(max_size=20) | st.sampled_from(["[example] red-circle", "../x", "/etc/passwd", ""]))
    return draw(JSON)


@st.composite
def real_prompts(draw):
    """API prompts made of the real node classes, with random (mis)typed values and links."""
    count = draw(st.integers(1, 6))
    ids = [str(i) for i in range(1, count + 1)]
    api = {}
    for nid in ids:
        class_type = draw(st.sampled_from(sorted(CLASSES)))
        inputs = {}
        for name, declared, opts in _declared_inputs(class_type):
            if draw(st.integers(0, 9)) == 0:
                continue  # a missing input
            inputs[name] = _value_for(draw, declared, opts, ids)
        if draw(st.integers(0, 9)) == 0:
            inputs[draw(st.text(max_size=6))] = draw(JSON)  # an unknown input
        api[nid] = {"class_type": class_type, "inputs": inputs}
    return api


@FUZZ
@given(real_prompts())
def test_executor_validation_of_real_nodes_only_raises_documented_errors(api):
    with no_hang():
        try:
            _execute(api)
        except FinetuneError:
            pass


@FUZZ
@given(real_prompts(), st.lists(st.sampled_from(["1", "2", "3", "9", 1, "x"]), max_size=3))
def test_executor_with_output_targets_only_raises_documented_errors(api, outputs):
    with no_hang():
        try:
            Executor(NOOP_CLASSES, inference_mode=False).execute(api, outputs=outputs)
        except FinetuneError:
            pass


def test_noop_classes_really_are_noops():
    """The fuzzed executor never runs a real node function."""
    for name, cls in NOOP_CLASSES.items():
        assert cls.__module__ == __name__ and issubclass(cls, CLASSES[name])
    api = {"1": {"class_type": "LoadBase", "inputs": {"ckpt_name": "diffusers/none", "dtype": "fp32",
                                                       "device": "cpu"}},
           "2": {"class_type": "Sample", "inputs": {"pipe": ["1", 0], "prompt": "x", "seed": 0, "steps": 1,
                                                    "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                                                    "width": 64, "height": 64, "batch_size": 1}},
           "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    api["1"]["inputs"]["ckpt_name"] = CLASSES["LoadBase"].INPUT_TYPES()["required"]["ckpt_name"][0][0]
    result = Executor(NOOP_CLASSES).execute(api)
    assert result.outputs["2"] == (None,)


# ============================================================================================== found by the fuzzing
def _np(**kw):
    """A NegativePrompt node in UI format (an ordinary node to hang bad values on)."""
    return {"id": 3, "type": "NegativePrompt", "mode": 0, "inputs": [], "widgets_values": ["x"], **kw}


def _reroute_chain(n: int) -> dict:
    nodes = [{"id": 1, "type": "NegativePrompt", "widgets_values": ["x"],
              "outputs": [{"name": "negative", "type": "FT_NEGATIVE", "links": [1]}]}]
    links = []
    for i in range(2, n + 2):
        nodes.append({"id": i, "type": "Reroute", "inputs": [{"name": "", "type": "*", "link": i - 1}],
                      "outputs": [{"name": "", "type": "*", "links": [i]}]})
        links.append([i - 1, i - 1, 0, i, 0, "*"])
    links.append([n + 1, n + 1, 0, 9999, 0, "*"])
    nodes.append({"id": 9999, "type": "Sample", "inputs": [{"name": "negative", "type": "FT_NEGATIVE",
                                                             "link": n + 1}], "widgets_values": []})
    return {"nodes": nodes, "links": links}


def _api_chain(n: int) -> dict:
    model = CLASSES["LoadBase"].INPUT_TYPES()["required"]["ckpt_name"][0][0]
    api = {"0": {"class_type": "LoadBase", "inputs": {"ckpt_name": model, "dtype": "fp32", "device": "cpu"}}}
    for i in range(1, n):
        api[str(i)] = {"class_type": "AddLoRA", "inputs": {"pipe": [str(i - 1), 0], "lora_name": "None",
                                                           "strength_unet": 1.0, "strength_text": 1.0}}
    api["s"] = {"class_type": "Sample", "inputs": {"pipe": [str(n - 1), 0], "prompt": "x", "seed": 0, "steps": 1,
                                                   "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                                                   "width": 64, "height": 64, "batch_size": 1}}
    api["p"] = {"class_type": "PreviewImage", "inputs": {"images": ["s", 0]}}
    return api


W, E = "headless/workflow.py", "headless/executor.py"
REGRESSIONS = [
    # (id, workflow data, --set overrides, what it crashed with when the fuzzing found it, or None).
    # One minimal case per crash site; all must now end in a WorkflowError (or load and validate).
    ("ui-node-type-list", {"nodes": [{"id": 1, "type": []}], "links": []}, [],
     f"{W} ui_to_api: `n.get('type') not in VIRTUAL_NODES` -> TypeError unhashable type: 'list'"),
    ("ui-node-properties-not-object", {"nodes": [{"id": 1, "type": "Nope", "properties": 1.5}], "links": []}, [],
     f"{W} ui_to_api (missing-node message): props.get -> AttributeError 'float' object has no attribute 'get'"),
    ("ui-socket-widget-not-object", {"nodes": [_np(inputs=[{"name": "text", "widget": 1.5, "link": None}])],
                                     "links": []}, [],
     f"{W} ui_to_api: (socket.get('widget') or {{}}).get -> AttributeError 'float' object has no attribute 'get'"),
    ("ui-widgets_values-number", {"nodes": [_np(widgets_values=1.5)], "links": []}, [],
     f"{W} _widget_values: list(values) -> TypeError 'float' object is not iterable"),
    ("ui-widgets_values-true", {"nodes": [_np(widgets_values=True)], "links": []}, [],
     f"{W} _widget_values: list(values) -> TypeError 'bool' object is not iterable"),
    ("ui-node-inputs-not-list", {"nodes": [_np(inputs=5)], "links": []}, [],
     f"{W} ui_to_api: for socket in node.get('inputs') -> TypeError 'int' object is not iterable"),
    ("ui-node-order-mixed-types", {"nodes": [_np(id=1, order=None), _np(id=2, order=1)], "links": []}, [],
     f"{W} ui_to_api: sorted(key=(order, id)) -> TypeError '<' not supported between 'int' and 'NoneType'"),
    ("ui-definitions-list", {"nodes": [{"id": 1, "type": "Nope"}], "links": [], "definitions": [0]}, [],
     f"{W} ui_to_api: (ui.get('definitions') or {{}}).get -> AttributeError 'list' object has no attribute 'get'"),
    ("ui-definitions-subgraphs-number", {"nodes": [{"id": 1, "type": "Nope"}], "links": [],
                                         "definitions": {"subgraphs": 5}}, [],
     f"{W} ui_to_api: iterating definitions.subgraphs -> TypeError 'int' object is not iterable"),
    ("ui-links-not-list", {"nodes": [], "links": 5}, [],
     f"{W} _parse_links: for link in ui.get('links') -> TypeError 'int' object is not iterable"),
    ("ui-link-slot-empty-string", {"nodes": [], "links": [[1, 1, "", 2, 0, "X"]]}, [],
     f"{W} _parse_links: int(link[2]) -> ValueError invalid literal for int() with base 10: ''"),
    ("ui-link-slot-null", {"nodes": [], "links": [[1, 1, None, 2, 0, "X"]]}, [],
     f"{W} _parse_links: int(None) -> TypeError"),
    ("ui-link-slot-infinity", {"nodes": [], "links": [[1, 1, float("inf"), 2, 0, "X"]]}, [],
     f"{W} _parse_links: int(inf) -> OverflowError cannot convert float infinity to integer"),
    ("ui-link-object-missing-key", {"nodes": [], "links": [{"id": 1}]}, [],
     f"{W} _parse_links: link['origin_id'] -> KeyError 'origin_id'"),
    ("ui-link-id-list", {"nodes": [], "links": [[[1], 1, 0, 2, 0, "X"]]}, [],
     f"{W} _parse_links: links[link[0]] -> TypeError unhashable type: 'list'"),
    ("ui-socket-link-list", {"nodes": [_np(inputs=[{"name": "text", "link": [1]}])], "links": []}, [],
     f"{W} _Resolver.resolve: `link_id not in self.links` -> TypeError unhashable type: 'list'"),
    ("ui-reroute-chain-3000", _reroute_chain(3000), [],
     f"{W} _Resolver.resolve recurses once per reroute (its depth guard is len(nodes)+1, above Python's recursion "
     "limit): 3000 chained reroutes -> RecursionError"),
    ("api-class_type-list", {"1": {"class_type": []}}, [],
     f"load_workflow accepts a non-string class_type; {E} execute: `n.get('class_type') not in self.node_classes` "
     "-> TypeError unhashable type: 'list'"),
    ("api-inputs-number", {"1": {"class_type": "PreviewImage", "inputs": 5}}, [],
     f"{E} _reachable: (api[nid].get('inputs') or {{}}).items() -> AttributeError 'int' object has no attribute "
     "'items'"),
    ("api-inputs-list", {"1": {"class_type": "PreviewImage", "inputs": [1, 2]}}, [],
     f"{E} _reachable: .items() on a list -> AttributeError 'list' object has no attribute 'items'"),
    ("api-meta-number-unknown-node", {"1": {"class_type": "NoSuch", "_meta": 5}}, [],
     f"{E} execute (unknown-node problem): (n.get('_meta') or {{}}).get -> AttributeError 'int' object has no "
     "attribute 'get'"),
    ("api-meta-number-known-node", {"1": {"class_type": "PreviewImage", "inputs": {}, "_meta": 5}}, [],
     f"{E} _label: (node.get('_meta') or {{}}).get -> AttributeError 'int' object has no attribute 'get'"),
    ("api-meta-number-override-by-title", {"1": {"class_type": "NegativePrompt", "inputs": {"text": "x"},
                                                 "_meta": 5}}, ["Title.text=y"],
     f"{W} apply_overrides/_find_node: (n.get('_meta') or {{}}).get -> AttributeError 'int' object has no "
     "attribute 'get'"),
    ("api-chain-3000", _api_chain(3000), [],
     f"{E} _reachable visits links recursively: a chain of 3000 linked nodes -> RecursionError instead of a "
     "WorkflowError (or an iterative walk)"),
    ("api-cycle", {"1": {"class_type": "AddLoRA", "inputs": {"pipe": ["2", 0]}},
                   "2": {"class_type": "AddLoRA", "inputs": {"pipe": ["1", 0]}},
                   "3": {"class_type": "Sample", "inputs": {"pipe": ["2", 0]}},
                   "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}, [], None),
    ("ui-not-a-workflow", {"nodes": "x"}, [], None),
]


def _regression_params():
    return [pytest.param(d, o, id=i) for i, d, o, _ in REGRESSIONS]


@pytest.mark.parametrize("data,overrides", _regression_params())
def test_found_by_fuzzing(data, overrides):
    with no_hang():
        try:
            api = load_workflow(data, CLASSES)
            api = apply_overrides(api, overrides, CLASSES) if overrides else api
        except FinetuneError:
            return
    _load_and_execute(api)
