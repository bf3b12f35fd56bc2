"""The one place untrusted weight files are opened.

Checkpoints, LoRAs and embeddings come from strangers. Two rules hold everywhere:

* ``.safetensors``/``.sft``: the header is parsed and validated here, by plain Python, *before*
  safetensors touches the file and before any tensor is allocated: header length, JSON shape,
  metadata types, dtypes, shapes, offsets and total size. A truncated file, an absurd header length
  (``2**62``) or a header lying about its tensors is refused with :class:`UnsafeFileError` without
  reading more than the (bounded) header. Only then are the tensors read with ``safetensors.safe_open``.
  Optionally the shapes/dtypes are checked against what the caller needs (:func:`expect`) first.
* ``.ckpt``/``.pt``/``.pth``/``.bin``: ``torch.load(..., weights_only=True)`` only. A pickle that needs
  anything beyond tensors and plain containers is refused, never unpickled; nothing else in the pack may
  call ``torch.load`` without ``weights_only=True``.

Decisions (documented here because callers rely on them):

* Known dtypes are ``F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL`` plus ``F8_E4M3`` and ``F8_E5M2``, which are
  **accepted**: fp8 checkpoints (Flux, SD3, SDXL fp8 releases) are common, torch reads them and callers
  cast to their compute dtype. Everything else (``U16``-``U64``, ``F8_E8M0``, ``F4``, ``F6_*``, ...) is
  refused as unsupported.
* The data section must be exactly tiled by the tensors: sorted by offset, starting at 0, each one
  beginning where the previous ended (zero-size tensors allowed), the last ending at the end of the file.
  That is what safetensors itself requires, so a header we accept is one safetensors loads; gaps and
  overlaps are both refused (with different messages).
* The header must start with ``{`` (as safetensors requires); trailing spaces (alignment padding) are fine.
  Duplicate JSON keys are refused (two readers could pick different entries). Extra keys inside a tensor
  entry are ignored. The default header limit is 100 000 000 bytes, safetensors' own limit.
* Shape/dtype mismatches found by :func:`expect` are plain :class:`FinetuneError` (the file is fine, it is
  for another model); malformed files are :class:`UnsafeFileError`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import FinetuneError

__all__ = [
    "UnsafeFileError", "TensorInfo", "SafetensorsHeader", "TensorSpec", "DTYPE_SIZES", "FLOAT_DTYPES",
    "SAFETENSORS_SUFFIXES", "PICKLE_SUFFIXES", "read_safetensors_header", "expect", "load_safetensors",
    "load_pickle_weights_only", "load_weights",
]

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

#: safetensors dtype name -> bytes per element. fp8 formats are accepted (see the module docstring).
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}
#: Floating dtypes a weight or an embedding vector may have (fp8 excluded: use it explicitly where wanted).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})

DEFAULT_MAX_HEADER_BYTES = 100_000_000  # safetensors' own MAX_HEADER_SIZE
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_MAX_NDIM = 64

_FIX_CORRUPT = "re-download the file (it is truncated or corrupt), or re-export it with the tool that made it"
_FIX_PICKLE = ("use a .safetensors version of this file, or convert it to .safetensors in a trusted tool; "
               "pickled code is never run")


class UnsafeFileError(FinetuneError):
    """A weights file that is malformed, truncated or would need code to load. Never partly loaded."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header. Offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header. ``tensors`` is ordered by name (as ``safe_open().keys()``)."""

    path: Path
    header_size: int
    data_size: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size


class TensorSpec(NamedTuple):
    """What a caller needs of one tensor. A plain ``(shape, dtypes)`` tuple works too.

    ``shape``: ``None`` (any), or a tuple of ints/``None`` (``None`` = any size in that dimension); a leading
    ``...`` stands for any number of leading dimensions, e.g. ``(..., 768)`` = "last dimension 768".
    ``dtypes``: ``None`` (any) or a set of safetensors dtype names (``{"F32", "F16"}``).
    ``what``: optional words for the message ("text encoder 1's token width").
    """

    shape: tuple | None = None
    dtypes: Iterable[str] | None = None
    what: str | None = None


# ----------------------------------------------------------------------------------------------- header


def _bad(path: Path, what: str, *, node: str | None, input: str | None, fix: str = _FIX_CORRUPT) -> UnsafeFileError:
    return UnsafeFileError(f"'{path.name}' is not a valid safetensors file: {what}", node=node, input=input, fix=fix)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        for text in (k, v) if isinstance(v, str) else (k,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape ("\\ud800"): not a real string
                raise _BadString(text.encode("utf-8", "backslashreplace").decode("ascii")) from None
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class _DuplicateKey(ValueError):
    pass


class _BadString(ValueError):
    pass


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _short(v: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError, RecursionError):
        text = type(v).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_safetensors_header(path: str | os.PathLike, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
                            node: str | None = None, input: str | None = None) -> SafetensorsHeader:
    """Parse and validate the header of a safetensors file without allocating any tensor.

    Reads 8 + header-length bytes at most (and refuses a header length over ``max_header_bytes`` or over the
    file's size before reading it). Raises :class:`UnsafeFileError` naming the file, what is wrong and a fix.
    """
    path = Path(path)

    def bad(what: str, fix: str = _FIX_CORRUPT) -> UnsafeFileError:
        return _bad(path, what, node=node, input=input, fix=fix)

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n == 0:
                raise bad("the header length is 0")
            if n > max_header_bytes:
                raise bad(f"the header length is {n} bytes, over the limit of {max_header_bytes}"
                          + (f" (and the file has only {size} bytes)" if n > size - 8 else ""))
            if n > size - 8:
                raise bad(f"truncated: the header length is {n} bytes, but the file has only {size - 8} "
                          "bytes after the length field")
            raw = f.read(n)
    except UnsafeFileError:
        raise
    except OSError as exc:
        raise UnsafeFileError(f"cannot read '{path.name}': {exc.strerror or exc}", node=node, input=input,
                              fix="check that the file exists and is readable") from exc
    if len(raw) != n:  # the file shrank while we read it
        raise bad(f"truncated: the header length is {n} bytes, but only {len(raw)} could be read")
    if raw[:1] != b"{":
        raise bad("the header does not start with '{' (it is not a JSON object)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"the header is not UTF-8 text (byte {exc.start})") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise bad(f"the header names '{exc.args[0][:80]}' twice") from None
    except _BadString as exc:
        raise bad(f"the header has an invalid unicode escape in '{exc.args[0][:80]}'") from None
    except RecursionError:
        raise bad("the header JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and int-digit limits
        raise bad(f"the header is not valid JSON ({_clip(str(exc))})") from None
    if not isinstance(doc, dict):
        raise bad(f"the header is a JSON {type(doc).__name__}, not an object")

    metadata = doc.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise bad(f"__metadata__ is a {type(metadata).__name__}, not a map of strings")
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise bad(f"__metadata__ entry '{k[:80]}' is {_short(v)}, not a string")

    data_size = size - 8 - n
    infos: list[TensorInfo] = []
    for name, entry in doc.items():
        label = f"tensor '{name[:80]}'"
        if not isinstance(entry, dict):
            raise bad(f"{label} is described by {_short(entry)}, not an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str):
            raise bad(f"{label} has no dtype")
        if dtype not in DTYPE_SIZES:
            raise bad(f"{label} has dtype '{dtype[:40]}', which is not supported "
                      f"(supported: {', '.join(DTYPE_SIZES)})",
                      fix="convert the file to a supported dtype (fp32/fp16/bf16) with the tool that made it")
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise bad(f"{label} has shape {_short(shape)}, not a list of sizes")
        if len(shape) > _MAX_NDIM:
            raise bad(f"{label} has {len(shape)} dimensions (at most {_MAX_NDIM} are possible)")
        for d in shape:
            if not _is_int(d) or d < 0 or d > _MAX_DIM:
                raise bad(f"{label} has shape {_short(shape)}: sizes must be non-negative whole numbers")
        offsets = entry.get("data_offsets")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)):
            raise bad(f"{label} has data_offsets {_short(offsets)}, not [begin, end]")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise bad(f"{label} has data_offsets [{begin}, {end}]: begin must be >= 0 and <= end")
        numel = 1
        for d in shape:
            numel *= d
        want = numel * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise bad(f"{label} is {dtype} of shape {list(shape)}, which is {want} bytes, but its data_offsets "
                      f"[{begin}, {end}] span {end - begin} bytes")
        infos.append(TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end))

    pos, prev = 0, None
    for t in sorted(infos, key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise bad(f"tensor '{t.name[:80]}' (bytes {t.begin}-{t.end}) overlaps tensor '{prev.name[:80]}' "
                      f"(bytes {prev.begin}-{prev.end})")
        if t.begin > pos:
            raise bad(f"there is a gap of {t.begin - pos} unclaimed bytes before tensor '{t.name[:80]}' "
                      f"(at data byte {pos})")
        pos, prev = t.end, t
    if pos > data_size:
        raise bad(f"truncated: the header says {pos} bytes of tensors, the file has {data_size}")
    if pos < data_size:
        raise bad(f"the header accounts for {pos} bytes of tensors, but the file has {data_size} "
                  "(extra data after the last tensor)")
    return SafetensorsHeader(path=path, header_size=n, data_size=data_size, metadata=dict(metadata),
                             tensors={t.name: t for t in sorted(infos, key=lambda t: t.name)})


# ------------------------------------------------------------------------------------------------ expect

_TORCH_TO_ST = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
}


def _fmt_shape(shape: Iterable[Any]) -> str:
    return "[" + ", ".join("..." if d is Ellipsis else "*" if d is None else str(d) for d in shape) + "]"


def _shape_ok(got: tuple[int, ...], want: tuple) -> bool:
    if want and want[0] is Ellipsis:
        tail = want[1:]
        if len(got) < len(tail):
            return False
        got = got[len(got) - len(tail):] if tail else ()
        want = tail
    return len(got) == len(want) and all(w is None or w == g for g, w in zip(got, want))


def _described(source: Any) -> tuple[str, dict[str, tuple[tuple[int, ...], str]]]:
    """(file name, {tensor name: (shape, safetensors dtype name)}) of a header or a dict of tensors."""
    if isinstance(source, SafetensorsHeader):
        return source.path.name, {k: (t.shape, t.dtype) for k, t in source.tensors.items()}
    out = {}
    for k, v in source.items():
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            out[k] = (tuple(int(d) for d in v.shape), _TORCH_TO_ST.get(str(v.dtype).replace("torch.", ""),
                                                                          str(v.dtype)))
    return "", out


def expect(source: SafetensorsHeader | Mapping[str, Any],
           expected: Mapping[str, TensorSpec | tuple], *, node: str | None = None, input: str | None = None,
           fix: str | None = None, name: str | None = None) -> None:
    """Check tensor shapes/dtypes against what the caller needs, before (header) or after (tensors) loading.

    ``source`` is a :class:`SafetensorsHeader` (nothing loaded yet) or a dict of tensors (from a pickle).
    Every name in ``expected`` must be present; tensors not named are not checked. Raises :class:`FinetuneError`
    (not :class:`UnsafeFileError`: the file is fine, it is for something else).
    """
    file_name, described = _described(source)
    file_name = name or file_name
    where = f"'{file_name}': " if file_name else ""
    fix = fix or "use a file made for this model"
    for key, spec in expected.items():
        spec = TensorSpec(*spec)
        label = f"tensor '{key[:80]}'"
        if key not in described:
            raise FinetuneError(f"{where}{label} is missing", node=node, input=input, fix=fix)
        shape, dtype = described[key]
        if spec.dtypes is not None and dtype not in set(spec.dtypes):
            raise FinetuneError(f"{where}{label} has dtype {dtype}, but "
                                f"{spec.what or 'this model'} needs one of {', '.join(sorted(spec.dtypes))}",
                                node=node, input=input, fix=fix)
        if spec.shape is not None and not _shape_ok(shape, tuple(spec.shape)):
            want = tuple(spec.shape)
            ctx = f" ({spec.what})" if spec.what else ""
            if shape and want and want[-1] is not None and want[-1] is not Ellipsis and shape[-1] != want[-1] \
                    and _shape_ok(shape[:-1] + (want[-1],), want):
                msg = (f"{where}{label} has size {shape[-1]} in its last dimension, but this model expects "
                       f"{want[-1]}{ctx}; shape {_fmt_shape(shape)}, expected {_fmt_shape(want)}")
            else:
                msg = f"{where}{label} has shape {_fmt_shape(shape)}, but this model expects {_fmt_shape(want)}{ctx}"
            raise FinetuneError(msg, node=node, input=input, fix=fix)


# ------------------------------------------------------------------------------------------------ loading

def _safe_open(path: Path):  # seam for tests: proves nothing is read before validation
    from safetensors import safe_open  # noqa: PLC0415

    return safe_open(str(path), framework="pt", device="cpu")


def _resolve_expected(expected: Any, source: Any) -> Mapping[str, Any] | None:
    if expected is None:
        return None
    return expected(source) if callable(expected) else expected


def load_safetensors(path: str | os.PathLike, *, node: str | None = None, input: str | None = None,
                     expected: Any = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of a safetensors file: header validated (and ``expected`` checked) first.

    ``expected``: a mapping for :func:`expect`, or a callable ``header -> mapping`` when what to check depends
    on the names in the file. Tensors come back on the CPU, ordered by name.
    """
    path = Path(path)
    header = read_safetensors_header(path, max_header_bytes=max_header_bytes, node=node, input=input)
    spec = _resolve_expected(expected, header)
    if spec:
        expect(header, spec, node=node, input=input)
    try:
        with _safe_open(path) as f:
            tensors = {k: f.get_tensor(k) for k in header.tensors}
    except Exception as exc:  # noqa: BLE001 - anything safetensors dislikes (file changed, dtype torch lacks)
        first = _clip((str(exc).strip().splitlines() or [type(exc).__name__])[0], 200)
        raise _bad(path, f"safetensors could not read it ({first})", node=node, input=input) from exc
    return tensors, dict(header.metadata)


def load_pickle_weights_only(path: str | os.PathLike, *, node: str | None = None, input: str | None = None) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``; any failure is an :class:`UnsafeFileError`.

    A pickle that references anything but tensors and plain containers is refused by torch's weights-only
    unpickler before any of its code runs; we report that, and never retry with a full unpickle.
    """
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise UnsafeFileError(f"file not found: {path}", node=node, input=input,
                              fix="pick a file from the list, or refresh the node list")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means we will not trust this pickle
        first = _clip((str(exc).strip().splitlines() or [type(exc).__name__])[0], 200)
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            msg = (f"'{path.name}' cannot be loaded safely: it is a pickle that needs arbitrary code to load, "
                   f"which we never run (weights-only load failed: {first})")
        else:
            msg = (f"'{path.name}' cannot be loaded safely: it is not a readable weights-only PyTorch file "
                   f"({type(exc).__name__}: {first}); it is corrupt, or a pickle that needs arbitrary code to "
                   "load, which we never run")
        raise UnsafeFileError(msg, node=node, input=input, fix=_FIX_PICKLE) from exc


def load_weights(path: str | os.PathLike, *, node: str | None = None, input: str | None = None,
                 expected: Any = None) -> tuple[dict[Any, Any], dict[str, str]]:
    """(state dict, metadata) of a weights file, chosen by extension.

    ``.safetensors``/``.sft``: :func:`load_safetensors` (all values are tensors). ``.ckpt/.pt/.pth/.bin``:
    :func:`load_pickle_weights_only`, nested ``state_dict`` entries unwrapped; the top-level mapping comes back
    as stored (it may hold non-tensor values, e.g. an A1111 embedding's ``string_to_param``); metadata is
    empty. ``expected`` is checked before loading for safetensors, after loading for pickles.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        if not path.is_file():
            raise UnsafeFileError(f"file not found: {path}", node=node, input=input,
                                  fix="pick a file from the list, or refresh the node list")
        return load_safetensors(path, node=node, input=input, expected=expected)
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle_weights_only(path, node=node, input=input)
        while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise FinetuneError(f"'{path.name}' holds a {type(obj).__name__}, not a dict of tensors",
                                node=node, input=input, fix="check that this is a model weights file")
        sd = dict(obj)
        spec = _resolve_expected(expected, sd)
        if spec:
            expect(sd, spec, node=node, input=input, name=path.name)
        return sd, {}
    raise FinetuneError(f"unsupported file type '{suffix or path.name}' for '{path.name}'", node=node, input=input,
                        fix="use .safetensors (or .ckpt/.pt/.pth/.bin holding only tensors)")
