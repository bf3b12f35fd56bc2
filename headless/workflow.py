"""Workflow files: read them, turn UI-format JSON into API format, apply ``--set`` overrides.

The server never converts UI JSON; only the frontend does (``FE:src/utils/executionUtil.ts::graphToPrompt``).
This module follows the frontend's rules so that a headless run of an example workflow builds the same
prompt the browser would queue:

* widgets are read positionally from ``widgets_values`` in ``input_order`` (required, then optional), skipping inputs
  without a widget type and ``forceInput`` ones;
* a control widget value (``fixed``/``increment``/...) follows INT inputs named ``seed``/``noise_seed`` and inputs with
  ``control_after_generate``; it is saved but never sent (``FE:src/scripts/widgets.ts::addValueControlWidgets``);
* an ``image_upload`` input gets an extra upload widget value (``"image"``) after the required inputs;
* linked widget inputs take the link; ``Reroute`` is followed, ``Note``/``MarkdownNote`` are dropped,
  ``PrimitiveNode`` copies its value into its targets (``applyToGraph``);
* muted (mode 2) nodes are dropped; a consumer of a bypassed (mode 4) node is rewired to the bypassed node's input
  chosen like ``FE:.../ExecutableNodeDTO.ts::#getBypassSlotIndex``;
* array constants are wrapped as ``{"__value__": [...]}`` (``graphToPrompt``).

Malformed JSON (a node that is not an object, a non-string ``type``/``class_type``, ``inputs``/``widgets_values``/
``links``/``_meta``/``properties`` of the wrong kind, link slots that are not numbers, ...) is refused up front by
:func:`check_api_prompt` and the UI checks in :func:`ui_to_api` with a :class:`WorkflowError` naming the node and the
field. Reroute chains are followed iteratively, so their length is not limited by Python's recursion limit.

Plain Python, stdlib only.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import WorkflowError

CONTROL_VALUES = frozenset({"fixed", "increment", "decrement", "randomize", "increment-wrap"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
VIRTUAL_NODES = frozenset({"Reroute", "Note", "MarkdownNote", "PrimitiveNode"})
MODE_MUTED = 2
MODE_BYPASS = 4
_UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


# ---------------------------------------------------------------------------------------------- reading
def is_ui_workflow(data: Any) -> bool:
    """True for a UI-format workflow (``{"nodes": [...], "links": [...], ...}``)."""
    return isinstance(data, Mapping) and isinstance(data.get("nodes"), list) and "class_type" not in data


def read_workflow_json(path_or_dict: str | os.PathLike | Mapping) -> dict:
    """The raw JSON of a workflow (a file path or an already-parsed dict, returned as a deep copy)."""
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict))
    path = Path(path_or_dict)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkflowError(f"cannot read workflow file '{path}': {exc.strerror or exc}",
                            fix="check the path and that the file is readable") from exc
    except UnicodeDecodeError as exc:
        raise WorkflowError(f"workflow file '{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})",
                            fix="use a workflow file saved by ComfyUI (Save or Export (API))") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"workflow file '{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                            f"{exc.msg})", fix="save the workflow again from ComfyUI (Save or Export (API))") from exc
    except ValueError as exc:  # e.g. an integer beyond Python's 4300-digit limit
        raise WorkflowError(f"workflow file '{path}' cannot be read as JSON: {exc}",
                            fix="save the workflow again from ComfyUI (Save or Export (API))") from exc
    except RecursionError as exc:
        raise WorkflowError(f"workflow file '{path}' nests its JSON too deeply to be a workflow",
                            fix="use a workflow file saved by ComfyUI (Save or Export (API))") from exc
    if not isinstance(data, dict):
        raise WorkflowError(f"workflow file '{path}' holds a {type(data).__name__}, not a workflow object",
                            fix="use a file saved by ComfyUI (Save or Export (API))")
    return data


def load_workflow(path_or_dict: str | os.PathLike | Mapping, node_defs: Mapping[str, Any] | None = None) -> dict:
    """Load a workflow as an API-format prompt, converting UI format with :func:`ui_to_api`.

    ``node_defs`` maps class_type to the ``INPUT_TYPES()`` dict (or to the node class); it is only needed for UI
    files. A ``{"prompt": {...}}`` request body (``POST /prompt``) is unwrapped.
    """
    data = read_workflow_json(path_or_dict)
    if is_ui_workflow(data):
        if node_defs is None:
            raise WorkflowError("this is a UI-format workflow and no node definitions were given to convert it",
                                fix="pass node_defs (class_type -> INPUT_TYPES) or export the workflow with "
                                    "'Export (API)'")
        return ui_to_api(data, node_defs)
    nodes = data.get("nodes")
    if "nodes" in data and "class_type" not in data and not (isinstance(nodes, Mapping) and "class_type" in nodes):
        raise WorkflowError(f"'nodes' is the {_kind(nodes)} {_short(nodes)}, not a list of nodes, so this is neither "
                            f"a UI-format nor an API-format workflow", fix=_RESAVE)
    if isinstance(data.get("prompt"), Mapping) and "class_type" not in data.get("prompt", {}):
        data = dict(data["prompt"])
    check_api_prompt(data)
    return {str(k): v for k, v in data.items()}


# ---------------------------------------------------------------------------------------------- shape checks
_RESAVE = "save the workflow again from ComfyUI (Save or Export (API)), or correct the JSON by hand"


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_id(value: Any) -> bool:
    """Node and link ids are integers or strings (``"5:3"`` inside subgraphs)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def check_api_prompt(api: Any) -> None:
    """Check the shape of an API-format prompt: ``{id: {"class_type": str, "inputs": {...}, "_meta": {...}}}``.

    Raises :class:`WorkflowError` naming the node and the field; the values of inputs are left to the executor.
    """
    if not isinstance(api, Mapping):
        raise WorkflowError(f"the prompt is a {_kind(api)}, not an object mapping node ids to nodes", fix=_RESAVE)
    for nid, node in api.items():
        if not isinstance(node, Mapping) or "class_type" not in node:
            raise WorkflowError(f"entry '{nid}' is not an API-format node (no 'class_type')",
                                fix="use a workflow saved by ComfyUI (Save or Export (API))")
        class_type = node["class_type"]
        if not isinstance(class_type, str):
            raise WorkflowError(f"'class_type' is the {_kind(class_type)} {_short(class_type)}, not a node type name",
                                node=str(nid), fix=_RESAVE)
        label = f"{nid} ({class_type})"
        inputs = node.get("inputs")
        if inputs is not None and not isinstance(inputs, Mapping):
            raise WorkflowError(f"'inputs' is the {_kind(inputs)} {_short(inputs)}, not an object of input values",
                                node=label, fix=_RESAVE)
        meta = node.get("_meta")
        if meta is not None and not isinstance(meta, Mapping):
            raise WorkflowError(f"'_meta' is the {_kind(meta)} {_short(meta)}, not an object", node=label,
                                fix="remove '_meta' or make it an object such as {\"title\": \"My node\"}")


def _check_ui_nodes(ui: Mapping) -> None:
    """Check the shape of a UI workflow's nodes (ids, types, sockets, widget values) before converting it."""
    for k, node in enumerate(ui["nodes"]):
        if not isinstance(node, Mapping):
            raise WorkflowError(f"nodes[{k}] is the {_kind(node)} {_short(node)}, not a node object", fix=_RESAVE)
        if not _is_id(node.get("id")):
            what = "has no 'id'" if "id" not in node else f"has the id {_short(node.get('id'))}"
            raise WorkflowError(f"nodes[{k}] {what}; node ids are integers or strings", fix=_RESAVE)
        label = _node_label(node)
        if not isinstance(node.get("type"), str):
            what = "has no 'type'" if "type" not in node else \
                f"has the type {_short(node.get('type'))} ({_kind(node.get('type'))})"
            raise WorkflowError(f"node {what}; a node type is a class name such as 'KSampler'", node=label,
                                fix=_RESAVE)
        for field, types, want in (("inputs", (list, tuple), "a list of input sockets"),
                                   ("outputs", (list, tuple), "a list of output sockets"),
                                   ("widgets_values", (list, tuple, Mapping), "a list (or object) of widget values"),
                                   ("properties", Mapping, "an object")):
            value = node.get(field)
            if value is not None and not isinstance(value, types):
                raise WorkflowError(f"'{field}' is the {_kind(value)} {_short(value)}, not {want}", node=label,
                                    fix=_RESAVE)
        for j, socket in enumerate(node.get("inputs") or []):
            if not isinstance(socket, Mapping):
                raise WorkflowError(f"inputs[{j}] is the {_kind(socket)} {_short(socket)}, not an input socket object",
                                    node=label, fix=_RESAVE)
            widget = socket.get("widget")
            if widget is not None and not isinstance(widget, Mapping):
                raise WorkflowError(f"inputs[{j}].widget is the {_kind(widget)} {_short(widget)}, not an object",
                                    node=label, fix=_RESAVE)
            for key, value in (("name", socket.get("name")), ("widget.name", (widget or {}).get("name"))):
                if value is not None and not isinstance(value, str):
                    raise WorkflowError(f"inputs[{j}].{key} is the {_kind(value)} {_short(value)}, not a name",
                                        node=label, fix=_RESAVE)
            link = socket.get("link")
            if link is not None and not _is_id(link):
                raise WorkflowError(f"input '{socket.get('name')}' has the link {_short(link)}; a link is the id "
                                    f"(an integer) of an entry in 'links'", node=label,
                                    fix="reconnect the input in ComfyUI and save the workflow again")
        for j, socket in enumerate(node.get("outputs") or []):
            if not isinstance(socket, Mapping):
                raise WorkflowError(f"outputs[{j}] is the {_kind(socket)} {_short(socket)}, not an output socket "
                                    f"object", node=label, fix=_RESAVE)


def _subgraph_ids(ui: Mapping) -> set[str]:
    definitions = ui.get("definitions")
    if definitions is None:
        return set()
    if not isinstance(definitions, Mapping):
        raise WorkflowError(f"'definitions' is the {_kind(definitions)} {_short(definitions)}, not an object",
                            fix=_RESAVE)
    subgraphs = definitions.get("subgraphs")
    if subgraphs is None:
        return set()
    if not isinstance(subgraphs, (list, tuple)):
        raise WorkflowError(f"'definitions.subgraphs' is the {_kind(subgraphs)} {_short(subgraphs)}, not a list",
                            fix=_RESAVE)
    return {str(s.get("id")) for s in subgraphs if isinstance(s, Mapping)}


# ---------------------------------------------------------------------------------------------- widgets
def _input_types(node_defs: Mapping[str, Any], class_type: str) -> dict:
    spec = node_defs[class_type]
    if hasattr(spec, "INPUT_TYPES"):
        spec = spec.INPUT_TYPES()
    return dict(spec or {})


def _split_spec(spec: Any) -> tuple[Any, dict]:
    if isinstance(spec, (tuple, list)) and spec:
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        return spec[0], dict(opts)
    return spec, {}


def _is_widget(type_: Any, opts: Mapping) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(type_, (list, tuple)) or (isinstance(type_, str) and type_ in WIDGET_TYPES)


def widget_slots(class_type: str, input_types: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The frontend's widget order for a node: ``(kind, input_name)`` with kind ``widget``/``control``/``upload``.

    Controls follow their widget; an upload widget is appended after the section (required/optional) holding its
    target, like the frontend's ``IMAGEUPLOAD`` input added to ``input.required``.
    """
    slots: list[tuple[str, str]] = []
    for section in ("required", "optional"):
        uploads: list[tuple[str, str]] = []
        for name, spec in dict(input_types.get(section) or {}).items():
            type_, opts = _split_spec(spec)
            if not _is_widget(type_, opts):
                continue
            slots.append(("widget", name))
            # The frontend's rule (useIntWidget.ts): `control_after_generate ?? name in (seed, noise_seed)`, so an
            # explicit False means no control widget even for an input named seed.
            control = opts.get("control_after_generate")
            if control is None:
                control = type_ == "INT" and name in ("seed", "noise_seed")
            if control:
                slots.append(("control", name))
            if any(opts.get(f) for f in _UPLOAD_FLAGS) or (class_type == "LoadImage" and name == "image"):
                uploads.append(("upload", name))
        slots.extend(uploads)
    return slots


def _widget_values(class_type: str, input_types: Mapping[str, Any], values: Any) -> dict[str, Any]:
    """Map ``widgets_values`` to input names, skipping control and upload values (tolerating their absence)."""
    if isinstance(values, Mapping):  # some packs save widgets_values as {name: value}
        return dict(values)
    values = list(values or [])
    slots = widget_slots(class_type, input_types)
    out: dict[str, Any] = {}
    i = 0
    for k, (kind, name) in enumerate(slots):
        if i >= len(values):
            break
        value = values[i]
        if kind == "widget":
            out[name] = value
            i += 1
            continue
        widgets_left = sum(1 for kd, _ in slots[k + 1:] if kd == "widget")
        surplus = len(values) - i > widgets_left
        if kind == "control":
            # Old files stored true/false for the control widget: only skip a bool when it is surplus.
            if (isinstance(value, str) and value in CONTROL_VALUES) or (isinstance(value, bool) and surplus):
                i += 1
        elif value in ("image", "upload", None) or surplus:
            i += 1
    return out


def _wrap(value: Any) -> Any:
    return {"__value__": value} if isinstance(value, list) else value


# ---------------------------------------------------------------------------------------------- links
def _slot(value: Any, what: str, k: int, link: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise WorkflowError(f"links[{k}] {_short(link)} has the {what} {_short(value)}, not a slot number",
                            fix=_RESAVE) from None


def _parse_links(ui: Mapping) -> dict[int | str, tuple[Any, int, Any, int, str]]:
    """``link_id -> (origin_id, origin_slot, target_id, target_slot, type)``; 0.4 arrays or version-1 objects."""
    raw = ui.get("links")
    if raw is None:
        return {}
    if not isinstance(raw, (list, tuple)):
        raise WorkflowError(f"'links' is the {_kind(raw)} {_short(raw)}, not a list of links", fix=_RESAVE)
    links: dict[int | str, tuple[Any, int, Any, int, str]] = {}
    for k, link in enumerate(raw):
        if link is None:
            continue
        if isinstance(link, Mapping):
            absent = [key for key in ("id", "origin_id", "origin_slot", "target_id", "target_slot") if key not in link]
            if absent:
                raise WorkflowError(f"links[{k}] {_short(link)} has no {', '.join(repr(a) for a in absent)}",
                                    fix=_RESAVE)
            fields = (link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                      link.get("type", "*"))
        elif isinstance(link, (list, tuple)) and len(link) >= 5:
            fields = (*link[:5], link[5] if len(link) > 5 else "*")
        else:
            raise WorkflowError(f"links[{k}] is the {_kind(link)} {_short(link)}, not a link "
                                f"[id, origin_id, origin_slot, target_id, target_slot, type]", fix=_RESAVE)
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = fields
        for what, value in (("id", link_id), ("origin_id", origin_id), ("target_id", target_id)):
            if not _is_id(value):
                raise WorkflowError(f"links[{k}] {_short(link)} has the {what} {_short(value)}, not an integer or "
                                    f"string id", fix=_RESAVE)
        links[link_id] = (origin_id, _slot(origin_slot, "origin_slot", k, link), target_id,
                          _slot(target_slot, "target_slot", k, link), str(link_type))
    return links


def _types_fit(a: str, b: str) -> bool:
    """LiteGraph's loose connection rule: ``*``/empty matches anything, comma unions overlap (case-insensitive)."""
    if a in ("*", "") or b in ("*", ""):
        return True
    return bool({t.strip().lower() for t in a.split(",")} & {t.strip().lower() for t in b.split(",")})


def _node_label(node: Mapping) -> str:
    title = node.get("title")
    return f"{node.get('id')} ({node.get('type')}{'/' + str(title) if title else ''})"


class _Resolver:
    """Follows a link from a consumer back to a real source, through reroutes, primitives and bypassed nodes."""

    def __init__(self, nodes: Mapping[str, Mapping], links: Mapping[Any, tuple]) -> None:
        self.nodes = nodes
        self.links = links

    def resolve(self, link_id: Any, consumer: Mapping, input_name: str) -> Any:
        """Return ``("link", [src_id, slot])``, ``("value", v)`` or ``None`` (input dropped).

        Iterative, so a chain of thousands of reroutes is no problem; a link seen twice is a loop.
        """
        seen: set[Any] = set()
        while True:
            if link_id in seen:
                raise WorkflowError(f"link {link_id} loops through reroutes/bypassed nodes",
                                    node=_node_label(consumer), input=input_name,
                                    fix="remove the cycle in the workflow")
            seen.add(link_id)
            if link_id not in self.links:
                raise WorkflowError(f"refers to link {link_id}, which is not in the workflow's links",
                                    node=_node_label(consumer), input=input_name,
                                    fix="reconnect the input in ComfyUI and save the workflow again")
            origin_id, origin_slot, target_id, _, link_type = self.links[link_id]
            origin = self.nodes.get(str(origin_id))
            if origin is None:
                raise WorkflowError(f"link {link_id} comes from node {origin_id}, which is not in the workflow "
                                    f"(it goes to node {target_id})", node=_node_label(consumer), input=input_name,
                                    fix="reconnect the input in ComfyUI and save the workflow again")
            kind = origin.get("type")
            mode = origin.get("mode", 0)
            if kind == "PrimitiveNode":
                values = origin.get("widgets_values") or []
                if isinstance(values, Mapping):
                    values = list(values.values())
                return ("value", _wrap(values[0])) if values else None
            if kind == "Reroute" or mode == MODE_BYPASS:
                link_id = self._pass_through_link(origin, origin_slot, link_type)
                if link_id is None:
                    return None
                continue
            if kind in ("Note", "MarkdownNote") or mode == MODE_MUTED:
                return None  # graphToPrompt drops inputs that point at removed nodes
            return ("link", [str(origin_id), origin_slot])

    def _pass_through_link(self, node: Mapping, slot: int, link_type: str) -> Any:
        inputs = [i for i in node.get("inputs") or [] if isinstance(i, Mapping)]
        if node.get("type") == "Reroute":
            return inputs[0].get("link") if inputs else None
        outputs = node.get("outputs") or []
        out_type = str(outputs[slot].get("type", link_type)) if 0 <= slot < len(outputs) else link_type
        index = None
        if 0 <= slot < len(inputs) and str(inputs[slot].get("type")) == out_type:
            index = slot
        if index is None:
            index = next((k for k, i in enumerate(inputs) if str(i.get("type")) == out_type), None)
        if index is None:
            index = next((k for k, i in enumerate(inputs) if _types_fit(str(i.get("type")), out_type)), None)
        return None if index is None else inputs[index].get("link")


# ---------------------------------------------------------------------------------------------- conversion
def _order(node: Mapping) -> int | float:
    """The node's execution ``order`` as a sort key (missing or not a finite number: 0)."""
    order = node.get("order", 0)
    if isinstance(order, int):
        return order
    if isinstance(order, float) and math.isfinite(order):
        return order
    return 0


def ui_to_api(ui: Mapping, node_defs: Mapping[str, Any]) -> dict:
    """Convert a UI-format workflow into an API-format prompt, as the frontend's ``graphToPrompt`` does.

    ``node_defs[class_type]`` is the node's ``INPUT_TYPES()`` dict (a node class is accepted too). Raises
    :class:`WorkflowError` for node types missing from ``node_defs`` and for links to nodes that do not exist.
    """
    if not is_ui_workflow(ui):
        raise WorkflowError("not a UI-format workflow (no 'nodes' list)", fix="pass the JSON saved by ComfyUI")
    _check_ui_nodes(ui)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    subgraph_ids = _subgraph_ids(ui)
    links = _parse_links(ui)
    active = [n for n in nodes.values()
              if n.get("type") not in VIRTUAL_NODES and n.get("mode", 0) not in (MODE_MUTED, MODE_BYPASS)]
    missing = [n for n in active if n.get("type") not in node_defs]
    if missing:
        lines = []
        for n in missing:
            props = n.get("properties") or {}
            pack = props.get("cnr_id") or props.get("aux_id")
            if str(n.get("type")) in subgraph_ids:
                lines.append(f"node {_node_label(n)} is a subgraph, which headless runs do not support")
            else:
                lines.append(f"node {_node_label(n)} has type '{n.get('type')}', provided by "
                             f"{'pack ' + repr(pack) if pack else 'a node pack'} that is not installed")
        raise WorkflowError("; ".join(lines),
                            fix="install the missing node pack(s) (or unpack subgraphs/group nodes in ComfyUI), "
                                "or remove those nodes from the workflow")
    resolver = _Resolver(nodes, links)
    api: dict[str, dict] = {}
    for node in sorted(active, key=lambda n: (_order(n), str(n["id"]))):
        class_type = str(node["type"])
        input_types = _input_types(node_defs, class_type)
        inputs: dict[str, Any] = {k: _wrap(v) for k, v in
                                  _widget_values(class_type, input_types, node.get("widgets_values")).items()}
        for socket in node.get("inputs") or []:
            name = str((socket.get("widget") or {}).get("name") or socket.get("name"))
            if socket.get("link") is None:
                continue
            resolved = resolver.resolve(socket["link"], node, name)
            if resolved is None:
                inputs.pop(name, None)
            else:
                inputs[name] = resolved[1]
        api[str(node["id"])] = {"class_type": class_type, "inputs": inputs,
                                "_meta": {"title": str(node.get("title") or class_type)}}
    return api


# ---------------------------------------------------------------------------------------------- renamed node ids
def current_node_types(api: Mapping[str, Mapping], renamed: Mapping[str, str]) -> tuple[dict, dict[str, str]]:
    """A copy of ``api`` whose nodes of an old class_type (a key of ``renamed``) have the current one instead.

    Returns ``(prompt, {node id: old class_type})`` for the nodes it changed. Inputs, titles and everything else
    stay as they are: an old id and its current id name node classes with the same inputs.
    """
    check_api_prompt(api)
    out: dict = {}
    changed: dict[str, str] = {}
    for nid, node in api.items():
        class_type = node["class_type"]
        if class_type in renamed:
            node = {**node, "class_type": renamed[class_type]}
            changed[str(nid)] = class_type
        out[nid] = node
    return out, changed


# ---------------------------------------------------------------------------------------------- overrides
def _find_node(api: Mapping[str, Mapping], ref: str, override: str, renamed: Mapping[str, str]) -> str:
    if ref in api:
        return ref
    for key in ("title", "class_type"):
        if key == "title":
            hits = [nid for nid, n in api.items() if (n.get("_meta") or {}).get("title") == ref]
        else:
            types = {ref, renamed.get(ref, ref)}  # an old node id also finds the nodes of its current id
            hits = [nid for nid, n in api.items() if n.get("class_type") in types]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise WorkflowError(f"--set {override}: '{ref}' matches several nodes by {key.replace('_', ' ')} "
                                f"(ids {', '.join(hits)})", fix="use the node id instead, e.g. "
                                f"--set {hits[0]}.{override.split('=', 1)[0].rsplit('.', 1)[-1]}=...")
    known = ", ".join(f"{nid} ({n.get('class_type')}/{(n.get('_meta') or {}).get('title', n.get('class_type'))})"
                      for nid, n in api.items())
    raise WorkflowError(f"--set {override}: no node with id, title or type '{ref}'",
                        fix=f"use one of the nodes in the workflow: {known}")


def parse_override_value(text: str) -> Any:
    """JSON if it parses (``3``, ``1.5``, ``true``, ``"x"``, ``[..]``), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(api: Mapping[str, Mapping], overrides: list[str],
                    node_defs: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None) -> dict:
    """Apply ``NODE.INPUT=VALUE`` overrides (the CLI's ``--set``) to a copy of ``api``.

    NODE is a node id, a unique ``_meta.title`` or a unique class_type; with ``renamed`` (old class_type -> current
    class_type, see :func:`current_node_types`) an old class_type finds the nodes of its current one. INPUT must
    already be in the node's inputs,
    or (when ``node_defs`` is given) be declared by the node's ``INPUT_TYPES``. VALUE is parsed as JSON when it
    parses, otherwise kept as a string; a JSON list ``["<node id>", slot]`` naming an existing node is a link, other
    lists are wrapped as ``{"__value__": [...]}`` like the frontend does.
    """
    check_api_prompt(api)
    out = copy.deepcopy(dict(api))
    for override in overrides:
        if not isinstance(override, str):
            raise WorkflowError(f"--set {_short(override)} is not text of the form NODE.INPUT=VALUE",
                                fix="write e.g. --set 3.seed=42 or --set \"My Sampler.steps=20\"")
        lhs, sep, raw = override.partition("=")
        ref, dot, input_name = lhs.strip().rpartition(".")
        if not sep or not dot or not ref or not input_name:
            raise WorkflowError(f"--set {override!r} is not of the form NODE.INPUT=VALUE",
                                fix="write e.g. --set 3.seed=42 or --set \"My Sampler.steps=20\"")
        nid = _find_node(out, ref, override, renamed or {})
        node = out[nid] = dict(out[nid])
        inputs = node["inputs"] = dict(node.get("inputs") or {})
        declared: set[str] = set()
        if node_defs is not None and node.get("class_type") in node_defs:
            types = _input_types(node_defs, node["class_type"])
            declared = {k for s in ("required", "optional") for k in (types.get(s) or {})}
        if input_name not in inputs and input_name not in declared:
            names = ", ".join(sorted(set(inputs) | declared)) or "(none)"
            raise WorkflowError(f"--set {override}: node {nid} ({node.get('class_type')}) has no input "
                                f"'{input_name}'", fix=f"use one of its inputs: {names}")
        value = parse_override_value(raw)
        if isinstance(value, list):
            is_link = (len(value) == 2 and isinstance(value[0], str) and value[0] in out
                       and isinstance(value[1], int) and not isinstance(value[1], bool))
            value = value if is_link else {"__value__": value}
        inputs[input_name] = value
    return out
