"""Headless execution of API-format prompts with ComfyUI's semantics.

Mirrors ``execution.py`` / ``comfy_execution``:

* only nodes reachable from the output nodes (``OUTPUT_NODE = True``, or the ``outputs`` targets, like
  ``partial_execution_targets``) are validated and run, ancestors first (``graph.py::ExecutionList``);
* validation follows ``execution.py::validate_inputs``: required inputs, link types (``validation.py::
  validate_node_input``: equal strings or overlapping comma unions; a plain ``"*"`` is no wildcard), coercion of
  INT/FLOAT/STRING/BOOLEAN constants, ``min``/``max``, list-combo membership (skipped for inputs that
  ``VALIDATE_INPUTS`` takes), then ``VALIDATE_INPUTS`` itself with linked inputs as ``None``;
* stricter than ComfyUI: a constant given for an input of a link-only type (``FT_PIPE``, ``IMAGE``, ...) is a
  validation problem, and a failing ``VALIDATE_INPUTS`` is attributed to the input its message names (or to its only
  argument); a :class:`FinetuneError` it returns or raises keeps its own input and fix;
* the prompt's JSON shape is checked first (``workflow.check_api_prompt``) and the graph walks are iterative, so long
  chains of nodes need no recursion; a cycle is reported as a :class:`WorkflowError`;
* one instance per node id, kept across runs (``caches.objects``);
* outputs cached per node id under an input signature made of class_type, ``IS_CHANGED``, the node id (when
  ``NOT_IDEMPOTENT`` or a hidden ``UNIQUE_ID``), constant inputs and, recursively, the ancestors' signatures
  (``caching.py::CacheKeySetInputSignature``); entries for nodes absent from the new prompt are dropped
  (``clean_unused``);
* list fan-out, ``INPUT_IS_LIST``/``OUTPUT_IS_LIST`` and the tuple / ``{"ui", "result"}`` return shapes
  (``_async_map_node_over_list``, ``get_output_from_returns``, ``merge_result_data``);
* node functions run under ``torch.inference_mode()`` when torch is installed (``execution.py`` ~line 661).

Differences: a prompt with any invalid node raises instead of running the valid outputs; node expansion
(``"expand"``), lazy inputs and ``ExecutionBlocker`` are not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import host
from ..core.errors import FinetuneError, WorkflowError
from .workflow import check_api_prompt

log = logging.getLogger("comfy_finetune")

EventSink = Callable[[str, dict], None]


class NodeExecutionError(FinetuneError):
    """A node's function raised. The message is ``Node <id> (<class_type>/<title>) failed: <original>``."""

    def __init__(self, node_id: str, class_type: str, title: str, original: BaseException):
        self.node_id, self.class_type, self.title, self.original = node_id, class_type, title, original
        super().__init__(f"Node {node_id} ({class_type}/{title}) failed: {original}")
        self.node = f"{node_id} ({class_type}/{title})"
        if isinstance(original, FinetuneError):
            self.input, self.fix = original.input, original.fix

    def _format(self) -> str:
        return self.detail  # the original message already carries its own fix

    def with_node(self, node: str) -> NodeExecutionError:
        return self


@dataclass
class Problem:
    """One validation problem: which node and input, what is wrong, and how to fix it."""

    node_id: str
    label: str  # "<class_type>/<title>"
    input: str | None
    problem: str
    fix: str

    def __str__(self) -> str:
        where = f"Node {self.node_id} ({self.label})" + (f" input '{self.input}'" if self.input else "")
        return f"{where}: {self.problem}. Fix: {self.fix}"


class PromptValidationError(WorkflowError):
    """All validation problems of a prompt, one per line; ``.problems`` holds them as :class:`Problem`."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the workflow failed validation ({len(problems)} problem{'s' * (len(problems) != 1)}):\n"
                         f"{lines}")

    def _format(self) -> str:
        return self.detail


@dataclass
class ExecutionResult:
    """What a run produced.

    ``outputs[id]`` has one entry per output: the value itself when the node ran once and the output is not an
    ``OUTPUT_IS_LIST`` output, else the list of values. ``output_lists`` keeps ComfyUI's raw per-output lists.
    ``ui[id]`` is the merged UI dict (every value a list), replayed for cached nodes like ComfyUI does.
    """

    outputs: dict[str, tuple] = field(default_factory=dict)
    output_lists: dict[str, list[list]] = field(default_factory=dict)
    ui: dict[str, dict] = field(default_factory=dict)
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)


@dataclass
class _Cached:
    signature: str
    outputs: list[list]
    ui: dict
    calls: int


def is_link(value: Any) -> bool:
    """An API-format link: ``[source_id, output_index]``."""
    return (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], (str, int))
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def types_match(received: Any, declared: Any) -> bool:
    """``validation.py::validate_node_input``: equal, a custom ``__ne__`` saying equal, or overlapping unions."""
    received = "COMBO" if isinstance(received, (list, tuple)) else received
    declared = "COMBO" if isinstance(declared, (list, tuple)) else declared
    if received == declared or not (declared != received):  # IO.ANY-style str subclasses override __ne__
        return True
    if not isinstance(received, str) or not isinstance(declared, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in declared.split(",")})


def _call(fn: Callable, kwargs: dict) -> Any:
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _arg_names(fn: Callable) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    return ({p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind == p.VAR_KEYWORD for p in params))


def _inference_mode() -> contextlib.AbstractContextManager:
    try:
        import torch  # noqa: PLC0415 - optional, only to mirror ComfyUI's inference mode
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return torch.inference_mode()


class Executor:
    """Runs prompts; keeps node instances and cached outputs between runs like ComfyUI's ``PromptExecutor``."""

    def __init__(self, node_classes: Mapping[str, type], *, inference_mode: bool = True,
                 on_event: EventSink | None = None) -> None:
        self.node_classes = node_classes
        self.inference_mode = inference_mode
        self.on_event = on_event
        self._objects: dict[tuple[str, str], Any] = {}
        self._cache: dict[str, _Cached] = {}
        self._nonce = 0

    def reset(self) -> None:
        """Drop every cached output and node instance (``POST /free``)."""
        self._objects.clear()
        self._cache.clear()

    # ------------------------------------------------------------------------------------------ helpers
    def _emit(self, event: str, data: dict) -> None:
        if self.on_event is not None:
            self.on_event(event, data)

    @staticmethod
    def _label(api: Mapping, nid: str) -> str:
        node = api[nid]
        return f"{node['class_type']}/{(node.get('_meta') or {}).get('title') or node['class_type']}"

    @staticmethod
    def _links_of(api: Mapping, nid: str) -> Iterator[tuple[str, str]]:
        """``(input name, source node id)`` for every linked input of ``nid``, in input order."""
        for name, value in (api[nid].get("inputs") or {}).items():
            if is_link(value):
                yield name, str(value[0])

    def _reachable(self, api: Mapping, targets: list[str]) -> list[str]:
        """Nodes needed by ``targets``, ancestors first; raises on cycles or links to missing nodes.

        A depth-first walk with an explicit stack (no recursion), so long chains of nodes are fine.
        """
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done
        problems: list[Problem] = []
        for target in targets:
            if state.get(target) == 2:
                continue
            state[target] = 1
            stack: list[tuple[str, Iterator[tuple[str, str]]]] = [(target, self._links_of(api, target))]
            while stack:
                nid, links = stack[-1]
                for name, src in links:
                    if src not in api:
                        problems.append(Problem(nid, self._label(api, nid), name,
                                                f"linked to node {src}, which is not in the workflow",
                                                "reconnect the input to an existing node"))
                    elif state.get(src) == 1:
                        path = [n for n, _ in stack]
                        cycle = path[path.index(src):] + [src]
                        raise WorkflowError(f"the workflow has a cycle: {' -> '.join(cycle)}",
                                            fix="remove one of the links in the cycle")
                    elif state.get(src) != 2:
                        state[src] = 1
                        stack.append((src, self._links_of(api, src)))
                        break
                else:
                    stack.pop()
                    state[nid] = 2
                    order.append(nid)
        if problems:
            raise PromptValidationError(problems)
        return order

    # ------------------------------------------------------------------------------------------ validation
    def _validate(self, api: dict, order: list[str]) -> dict[str, dict]:
        """Validate every node in ``order``; return its inputs with constants coerced. Collects all problems."""
        problems: list[Problem] = []
        checked: dict[str, dict] = {}
        for nid in order:
            checked[nid], found = self._validate_node(api, nid)
            problems.extend(Problem(nid, self._label(api, nid), inp, problem, fix) for inp, problem, fix in found)
        if problems:
            raise PromptValidationError(problems)
        return checked

    def _validate_node(self, api: Mapping, nid: str) -> tuple[dict, list[tuple[str | None, str, str]]]:
        """``execution.py::validate_inputs`` for one node: ``(coerced inputs, [(input, problem, fix)])``."""
        cls = self.node_classes[api[nid]["class_type"]]
        types = cls.INPUT_TYPES()
        given = dict(api[nid].get("inputs") or {})
        validator = getattr(cls, "VALIDATE_INPUTS", None)
        v_args, v_kwargs = _arg_names(validator) if validator else (set(), False)
        inputs: dict[str, Any] = {}
        received_types: dict[str, Any] = {}
        found: list[tuple[str | None, str, str]] = []
        for section in ("required", "optional"):
            for name, spec in dict(types.get(section) or {}).items():
                declared = spec[0]
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
                if name not in given:
                    if section == "required":
                        found.append((name, "required input is missing", "connect it or give it a value"))
                    continue
                value = given[name]
                if isinstance(value, (list, tuple)) and not opts.get("rawLink"):
                    problem = self._check_link(api, value, declared, check_type="input_types" not in v_args)
                    if is_link(value) and (problem is None or problem[0] != "slot"):
                        received_types[name] = self._return_type(api, value)
                elif not _typeable(declared):
                    if value is None and section == "optional":
                        continue  # an explicit null on an optional link input: as if nothing were connected
                    problem = ("constant", f"must be connected to an output of type {declared}; got the constant "
                                           f"{_short(value)}",
                               f"connect an output of type {declared} (values of this type come from other nodes "
                               f"and cannot be typed in)")
                else:
                    exempt = name in v_args or v_kwargs  # VALIDATE_INPUTS owns min/max/combo for these
                    value, problem = _check_constant(value, declared, opts, exempt)
                if problem is None:
                    inputs[name] = value
                else:
                    found.append((name, problem[1], problem[2]))
        if validator is not None and not found:
            kwargs = {k: (None if is_link(v) and not _raw(types, k) else v) for k, v in inputs.items()
                      if v_kwargs or k in v_args}
            kwargs.update({k: v for k, v in self._hidden(types, nid, api, None).items() if v_kwargs or k in v_args})
            if "input_types" in v_args:
                kwargs["input_types"] = received_types
            try:
                verdict = _call(validator, kwargs)
            except host.interrupt_exception_types():
                raise
            except FinetuneError as exc:  # the node's own message, input and fix
                verdict = exc
            except Exception as exc:  # noqa: BLE001 - reported as a validation problem
                verdict = f"VALIDATE_INPUTS raised {type(exc).__name__}: {exc}"
            if verdict is not True:
                declared_names = [n for s in ("required", "optional") for n in dict(types.get(s) or {})]
                found.extend(_validation_failure(verdict, declared_names, v_args))
        return inputs, found

    def _return_type(self, api: Mapping, link: Any) -> Any:
        src_cls = self.node_classes.get(api[str(link[0])]["class_type"])
        rtypes = tuple(getattr(src_cls, "RETURN_TYPES", ()) or ())
        return rtypes[link[1]] if 0 <= link[1] < len(rtypes) else None

    def _check_link(self, api: Mapping, value: Any, declared: Any, check_type: bool) -> tuple[str, str, str] | None:
        """Shape, output slot and type of a linked input (``return_type_mismatch``, ``bad_linked_input``)."""
        if not is_link(value):
            return ("shape", f"value {value!r} is a list but not a link [node_id, output_index]",
                    'wrap constant lists as {"__value__": [...]} or fix the link')
        src_type = api[str(value[0])]["class_type"]
        rtypes = tuple(getattr(self.node_classes.get(src_type), "RETURN_TYPES", ()) or ())
        if not 0 <= value[1] < len(rtypes):
            return ("slot", f"linked to output {value[1]} of node {value[0]} ({src_type}), which has only "
                            f"{len(rtypes)} output(s)", "link an existing output")
        if check_type and not types_match(rtypes[value[1]], declared):
            return ("type", f"linked to output {value[1]} of node {value[0]} ({src_type}) of type "
                            f"{rtypes[value[1]]!r}, but the input takes {declared!r}",
                    f"connect an output of type {declared!r}")
        return None

    @staticmethod
    def _hidden(types: Mapping, nid: str, api: Mapping, extra_pnginfo: Any) -> dict[str, Any]:
        values = {"UNIQUE_ID": nid, "PROMPT": api, "EXTRA_PNGINFO": extra_pnginfo}
        return {name: values.get(spec[0] if isinstance(spec, (tuple, list)) else spec)
                for name, spec in dict(types.get("hidden") or {}).items()}

    # ------------------------------------------------------------------------------------------ caching
    def _signatures(self, api: Mapping, order: list[str], inputs: Mapping[str, dict]) -> dict[str, str]:
        sigs: dict[str, str] = {}
        for nid in order:
            cls = self.node_classes[api[nid]["class_type"]]
            types = cls.INPUT_TYPES()
            parts: list[Any] = [api[nid]["class_type"], self._is_changed(cls, types, nid, api, inputs[nid])]
            hidden = [s[0] if isinstance(s, (tuple, list)) else s for s in dict(types.get("hidden") or {}).values()]
            if getattr(cls, "NOT_IDEMPOTENT", False) or "UNIQUE_ID" in hidden:
                parts.append(("id", nid))
            for name in sorted(inputs[nid]):
                value = inputs[nid][name]
                parts.append((name, ("link", sigs[str(value[0])], value[1]) if is_link(value) else value))
            sigs[nid] = hashlib.sha256(repr(parts).encode()).hexdigest()
        return sigs

    def _is_changed(self, cls: type, types: Mapping, nid: str, api: Mapping, inputs: Mapping) -> Any:
        fn = getattr(cls, "IS_CHANGED", None)
        if fn is None:
            return None
        kwargs = {k: (None if is_link(v) else v) for k, v in inputs.items()}
        kwargs.update(self._hidden(types, nid, api, None))
        try:
            value = _to_hashable(_call(fn, kwargs))
        except host.interrupt_exception_types():
            raise
        except Exception as exc:  # noqa: BLE001 - ComfyUI warns and forces a re-run
            log.warning("IS_CHANGED of node %s (%s) failed: %s; it will run again", nid, cls.__name__, exc)
            value = float("nan")
        if _has_nan(value):  # NaN never equals itself: a re-run every time
            self._nonce += 1
            return ("rerun", self._nonce, id(self))
        return repr(value)

    # ------------------------------------------------------------------------------------------ running
    def execute(self, api: Mapping, *, outputs: list[str] | None = None, extra_pnginfo: Mapping | None = None,
                workflow: Mapping | None = None) -> ExecutionResult:
        """Validate and run ``api``. ``outputs`` limits the run to those node ids (default: all output nodes).

        ``workflow`` (the UI JSON) or ``extra_pnginfo`` fill the hidden ``EXTRA_PNGINFO`` input.
        """
        check_api_prompt(api)
        api = {str(k): v for k, v in api.items()}
        unknown = [Problem(nid, f"{n.get('class_type')}/{(n.get('_meta') or {}).get('title', n.get('class_type'))}",
                           None, f"node type {n.get('class_type')!r} is not available",
                           "install the node pack that provides it or remove the node")
                   for nid, n in api.items() if n.get("class_type") not in self.node_classes]
        if unknown:
            raise PromptValidationError(unknown)
        if outputs is None:
            targets = [nid for nid, n in api.items() if getattr(self.node_classes[n["class_type"]], "OUTPUT_NODE",
                                                               False)]
            if not targets:
                raise WorkflowError("the workflow has no output node, so nothing would run",
                                    fix="add an output node such as SaveImage or PreviewImage")
        else:
            targets = [str(t) for t in outputs]
            missing = [t for t in targets if t not in api]
            if missing:
                raise WorkflowError(f"requested output node(s) {', '.join(missing)} are not in the workflow",
                                    fix=f"use node ids from the workflow: {', '.join(api)}")
        order = self._reachable(api, targets)
        inputs = self._validate(api, order)
        if extra_pnginfo is None and workflow is not None:
            extra_pnginfo = {"workflow": workflow}
        sigs = self._signatures(api, order, inputs)
        # clean_unused: forget nodes that are not in this prompt.
        for key in [k for k in self._cache if k not in api]:
            del self._cache[key]
        for key in [k for k in self._objects if k[0] not in api or api[k[0]]["class_type"] != k[1]]:
            del self._objects[key]

        result = ExecutionResult()
        needed: set[str] = set()

        # Which nodes must run or be replayed from the cache: a pre-order walk from the targets that stops at cache
        # hits (an explicit stack, so long chains need no recursion).
        stack = list(reversed(targets))
        while stack:
            nid = stack.pop()
            if nid in needed:
                continue
            needed.add(nid)
            hit = self._cache.get(nid)
            if hit is not None and hit.signature == sigs[nid]:
                result.cached.append(nid)
                continue
            stack.extend(reversed([str(v[0]) for v in inputs[nid].values() if is_link(v)]))
        if result.cached:
            self._emit("execution_cached", {"nodes": list(result.cached)})
        ctx = _inference_mode() if self.inference_mode else contextlib.nullcontext()
        with ctx:
            for nid in order:
                if nid not in needed or nid in result.cached:
                    continue
                host.check_interrupt()  # nodes.before_node_execution
                self._emit("executing", {"node": nid})
                out_lists, ui, calls = self._run_node(api, nid, inputs[nid], extra_pnginfo)
                self._cache[nid] = _Cached(sigs[nid], out_lists, ui, calls)
                result.executed.append(nid)
                if ui:
                    self._emit("executed", {"node": nid, "output": ui})
        for nid in order:
            if nid in needed:
                self._collect(api, nid, result)
        return result

    def _collect(self, api: Mapping, nid: str, result: ExecutionResult) -> None:
        entry = self._cache[nid]
        is_list = tuple(getattr(self.node_classes[api[nid]["class_type"]], "OUTPUT_IS_LIST", ()) or ())
        result.output_lists[nid] = entry.outputs
        result.outputs[nid] = tuple(
            values if (k < len(is_list) and is_list[k]) or entry.calls != 1 or len(values) != 1 else values[0]
            for k, values in enumerate(entry.outputs))
        if entry.ui:
            result.ui[nid] = entry.ui

    def _run_node(self, api: Mapping, nid: str, inputs: Mapping, extra_pnginfo: Any) -> tuple[list[list], dict, int]:
        class_type = api[nid]["class_type"]
        cls = self.node_classes[class_type]
        title = (api[nid].get("_meta") or {}).get("title") or class_type
        types = cls.INPUT_TYPES()
        data: dict[str, list] = {}
        for name, value in inputs.items():
            if is_link(value) and not _raw(types, name):
                src = self._cache[str(value[0])].outputs
                if value[1] >= len(src):
                    raise NodeExecutionError(nid, class_type, title, RuntimeError(
                        f"input '{name}' reads output {value[1]} of node {value[0]}, which returned only "
                        f"{len(src)} output(s)"))
                data[name] = src[value[1]]
            else:
                data[name] = [value]
        data.update({k: [v] for k, v in self._hidden(types, nid, api, extra_pnginfo).items()})
        try:
            obj = self._objects.get((nid, class_type))
            if obj is None:
                obj = self._objects[(nid, class_type)] = cls()
            fn = getattr(obj, cls.FUNCTION)
            if getattr(cls, "INPUT_IS_LIST", False):
                returns = [_call(fn, data)]
            else:
                longest = max((len(v) for v in data.values()), default=0)
                returns = [_call(fn, {k: (v[i] if len(v) > i else (v[-1] if v else None)) for k, v in data.items()})
                           for i in range(max(longest, 1))]
            outputs, ui = self._merge(cls, returns)
        except host.interrupt_exception_types():
            raise
        except NodeExecutionError:
            raise
        except Exception as exc:
            raise NodeExecutionError(nid, class_type, title, exc) from exc
        return outputs, ui, len(returns)

    @staticmethod
    def _merge(cls: type, returns: list[Any]) -> tuple[list[list], dict]:
        """``get_output_from_returns`` + ``merge_result_data``."""
        results: list[tuple] = []
        uis: list[dict] = []
        for r in returns:
            if isinstance(r, dict):
                if "expand" in r:
                    raise WorkflowError("node expansion ('expand') is not supported in headless runs",
                                        fix="run this workflow inside ComfyUI")
                if "ui" in r:
                    uis.append(r["ui"])
                if "result" in r:
                    results.append(tuple(r["result"]))
            elif isinstance(r, (tuple, list)):
                results.append(tuple(r))
            elif r is None and not tuple(getattr(cls, "RETURN_TYPES", ()) or ()):
                continue
            else:
                raise TypeError(f"the function returned a {type(r).__name__}; it must return a tuple with one "
                                f"value per RETURN_TYPES entry or a dict with 'ui'/'result'")
        outputs: list[list] = []
        if results:
            is_list = tuple(getattr(cls, "OUTPUT_IS_LIST", ()) or ()) or (False,) * len(results[0])
            for k in range(len(results[0])):
                if k < len(is_list) and is_list[k]:
                    outputs.append([item for res in results for item in res[k]])
                else:
                    outputs.append([res[k] for res in results])
        ui = {key: [item for u in uis for item in u.get(key, [])] for key in uis[0]} if uis else {}
        return outputs, ui


_COERCE: dict[str, Callable[[Any], Any]] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}


def _check_constant(value: Any, declared: Any, opts: Mapping, exempt: bool) -> tuple[Any, tuple[str, str, str] | None]:
    """Coerce a constant by declared type, then check ``min``/``max`` and list-combo membership unless ``exempt``.

    Mirrors ComfyUI, including ``bool("false") is True`` and ``int(1.7) == 1``; ``COMBO`` (non-list) types are not
    checked, as in the 2025-10 snapshot.
    """
    if isinstance(value, Mapping) and set(value) == {"__value__"}:
        value = value["__value__"]
    if isinstance(declared, str) and declared in _COERCE:
        try:
            value = _COERCE[declared](value)
        except (TypeError, ValueError, OverflowError) as exc:
            return value, ("coerce", f"value {value!r} cannot be converted to {declared} ({exc})",
                           f"give a valid {declared} value")
    if exempt:
        return value, None
    low, high = opts.get("min"), opts.get("max")
    bounds = f"use a value between {low if low is not None else 'the minimum'} and " \
             f"{high if high is not None else 'the maximum'}"
    try:
        if low is not None and value < low:
            return value, ("min", f"value {value!r} is smaller than the minimum {low!r}", bounds)
        if high is not None and value > high:
            return value, ("max", f"value {value!r} is bigger than the maximum {high!r}", bounds)
    except TypeError:
        pass
    if isinstance(declared, (list, tuple)) and value not in declared:
        shown = ", ".join(repr(c) for c in list(declared)[:20])
        more = f" (and {len(declared) - 20} more)" if len(declared) > 20 else ""
        return value, ("combo", f"value {value!r} is not one of the choices", f"pick one of {shown}{more}")
    return value, None


_TYPEABLE = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


def _typeable(declared: Any) -> bool:
    """Whether a constant can stand for an input of this type: widget types, combos and ``IO.ANY``-style types.

    Other types (``FT_PIPE``, ``IMAGE``, ...) only come through links: ComfyUI has no widget to type them in.
    """
    if isinstance(declared, (list, tuple)) or not isinstance(declared, str) or declared in _TYPEABLE:
        return True
    return not (declared != "\x00 no such type")  # a str subclass whose __ne__ says equal to everything


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _named_inputs(text: str, names: list[str]) -> list[str]:
    """The input names a validation message mentions: quoted (``'width'``), as ``input width``, or bare when the
    name is an identifier no sentence would use by chance (``batch_size``)."""
    found = []
    for name in names:
        if not name:
            continue
        n = re.escape(name)
        patterns = [rf"['\"`]{n}['\"`]", rf"\binputs?\s+{n}(?!\w)"]
        if "_" in name or any(c.isdigit() for c in name):
            patterns.append(rf"(?<!\w){n}(?!\w)")
        if any(re.search(p, text) for p in patterns):
            found.append(name)
    return found


def _validation_failure(verdict: Any, names: list[str], v_args: set[str]) -> list[tuple[str | None, str, str]]:
    """``VALIDATE_INPUTS`` said no: ``[(input, problem, fix)]``, one per input it is about.

    A :class:`FinetuneError` (returned or raised) keeps its input and fix. Otherwise the problem goes to the inputs
    the message names, else to the only input ``VALIDATE_INPUTS`` takes, else to the node as a whole.
    """
    generic = "change the inputs named in the message"
    if isinstance(verdict, FinetuneError):
        text, fix = verdict.detail, verdict.fix
        targets = [verdict.input] if verdict.input else _named_inputs(text, names)
    else:
        text, fix = f"custom validation failed: {verdict}", None
        targets = _named_inputs(str(verdict), names)
    if not targets:
        args = [n for n in names if n in v_args]
        targets = args if len(args) == 1 else [None]
    return [(t, text, fix or (f"change input '{t}'" if t else generic)) for t in targets]


def _to_hashable(value: Any) -> Any:
    """``caching.py::to_hashable``: primitives and containers of them; any other object becomes NaN."""
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_to_hashable(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted((_to_hashable(v) for v in value), key=repr))
    if isinstance(value, Mapping):
        return tuple(sorted(((repr(k), _to_hashable(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    return float("nan")


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, tuple) and any(_has_nan(v) for v in value)


def _raw(types: Mapping, name: str) -> bool:
    for section in ("required", "optional"):
        spec = (types.get(section) or {}).get(name)
        if spec is not None:
            return bool(len(spec) > 1 and isinstance(spec[1], Mapping) and spec[1].get("rawLink"))
    return False


def execute(api: Mapping, node_classes: Mapping[str, type], *, outputs: list[str] | None = None,
            extra_pnginfo: Mapping | None = None, workflow: Mapping | None = None) -> ExecutionResult:
    """Validate and run ``api`` once with a fresh :class:`Executor` (no cache carried over)."""
    return Executor(node_classes).execute(api, outputs=outputs, extra_pnginfo=extra_pnginfo, workflow=workflow)
