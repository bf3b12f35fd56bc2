"""Adapter kinds beyond LoRA that LoRA files carry: LyCORIS LoHa, LoKr, OFT and BOFT, DoRA magnitudes, full weight /
bias differences and whole replacement weights.

Each module either adds a delta to the weight it adapts (``additive``: ``delta(strength)`` in fp32, shaped like the
target weight as far as the tensors tell; the handle reshapes it) or maps the current weight to a new one
(``apply(weight, strength)``: DoRA, OFT, BOFT, set_weight), which depends on what earlier patches left there. The
formulas are the ones ComfyUI's loader applies (``comfy/weight_adapter/*.py``, ``comfy/lora.py::calculate_weight``;
``alpha`` a file's ``.alpha``, None meaning 1 for the low-rank kinds):

* **LoHa** (Hadamard product): ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`` with ``r = w1_b.shape[0]``; with
  CP factors ``hada_t1/t2 [r, r, k, k]`` each product is ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``.
* **LoKr** (Kronecker product): ``dW = kron(w1, w2) * alpha / r``, where ``w1`` is ``lokr_w1`` or
  ``lokr_w1_a @ lokr_w1_b`` and ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or, with ``lokr_t2``,
  ``einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)``; ``r`` is the inner size of the decomposed factor (``w2_b``'s
  when ``w2`` is decomposed, else ``w1_b``'s); with both factors full the scale is 1 whatever ``alpha`` says.
  For a conv ``w1`` gains two unit dimensions before the product.
* **diff / diff_b** (full differences, as ComfyUI's trainer writes for norm layers and biases) and LyCORIS'
  **w_norm / b_norm** (norm-layer differences; ``b_norm`` only beside a ``w_norm``): ``dW = diff``, ``db = diff_b``.
* **DoRA** (``dora_scale`` beside LoRA, LoHa or LoKr factors; ComfyUI's ``weight_decompose``): with ``W`` the
  current weight and ``D`` the factors' delta at strength 1 (alpha applied, strength not),
  ``V = W + D``; the magnitudes ``m = dora_scale`` are per output row when ``dora_scale.shape[0] == W.shape[0]``,
  and then ``n`` is the row norm of ``W`` (ComfyUI takes the norm of the weight *before* ``D`` on this axis), else
  per input column with ``n`` the column norm of ``V``; ``n += eps(fp32)``; ``V' = V * m / n``. Strength 1 gives
  ``V'``, strength ``s`` gives ``W + s * (V' - W)``.
* **OFT** (``oft_blocks [k, b, b]``; ComfyUI's OFTAdapter): ``Q = B - B^T`` per block; with ``alpha > 0`` and
  ``|Q|_F + 1e-8 > alpha`` over all blocks, ``Q *= alpha / (|Q|_F + 1e-8)``; ``R = (I + Q)(I - Q)^-1``. The
  output rows of ``W`` in ``k`` groups of ``b`` are rotated by ``R^T``: ``D = s * (R^T - I) W`` blockwise and
  ``W' = W + s * D``, i.e. the strength counts twice (``s**2``) as in ComfyUI. ComfyUI does not apply an OFT's
  ``rescale``; nor does this pack (the part is listed as not applied and saved back).
* **BOFT** (``oft_blocks [m, k, b, b]``; ComfyUI's BOFTAdapter): ``R_i`` as for OFT (the norm over all stages);
  stage ``i`` (with ``s != 1`` using ``s R_i + (1 - s) I``) permutes the output rows (``g = 2``,
  ``h = 2**i * (b // 2)``: row ``a*2h + j*h + c`` goes to ``a*2h + c*2 + j``), multiplies each run of ``b`` rows by
  its block (``R @ rows``) and permutes back; then ``V = rescale * V`` (``rescale [out, 1, ...]``) and
  ``W' = W + s * (V - W)``. ComfyUI fails on a BOFT without ``alpha``; this pack then applies no norm constraint.
* **set_weight**: the weight is replaced by the tensor whatever the strength (ComfyUI's ``"set"`` patch ignores it);
  strength 0 leaves the layer alone (as for every patch of the handle).

A ``dora_scale`` beside OFT / BOFT factors, a full weight difference or a set_weight is kept (saved back) but not
applied: ComfyUI's OFT/BOFT DoRA multiplies the rotation's difference by the norm constraint, which no trainer
writes. A module of these kinds is written back with the keys it was read from (kohya layout), so a loaded file
saves without loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: The parts of each kind (see :data:`.lora_keys.PART_SUFFIXES`).
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DIFF_PARTS = ("diff", "diff_b")
NORM_PARTS = ("w_norm", "b_norm")
OFT_PARTS = ("oft_blocks", "rescale")
SET_PARTS = ("set_weight",)
#: Every part that makes a module on its own (a group of only alpha / dora_scale / rescale makes none).
MODULE_PARTS = (*LOHA_PARTS, *LOKR_PARTS, *DIFF_PARTS, "w_norm", "oft_blocks", *SET_PARTS)
_EPS32 = torch.finfo(torch.float32).eps


def _fingerprint(tensors: Sequence[Tensor | None]) -> float:
    return sum((i + 1.0) * float(t.detach().double().sum()) for i, t in enumerate(tensors) if t is not None)


def _cp(t: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    # CP/Tucker factor: out[p, r, k, l] = sum_ij t[i, j, k, l] * w_b[j, r] * w_a[i, p]
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), w_b.float().flatten(1), w_a.float().flatten(1))


def _f32(t: Tensor, like: Tensor) -> Tensor:
    return t.to(device=like.device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------- DoRA

def dora_magnitudes(dora_scale: Tensor, weight_shape: Sequence[int]) -> Tensor:
    """``dora_scale`` shaped to broadcast on a weight of ``weight_shape``: ``[out, 1, ...]`` (per output row) or
    ``[1, in, 1, ...]`` (per input column). ComfyUI picks the output axis when ``dora_scale.shape[0]`` equals the
    weight's; a file's ``[out, 1]`` fits a 1x1 conv ``[out, in, 1, 1]`` too. Raises ValueError when it fits
    neither axis (a 1-D tensor included: ComfyUI broadcasts ``[out]`` against the ``[out, 1]`` norm into
    ``[out, out]``)."""
    shape, ds = tuple(int(s) for s in weight_shape), tuple(dora_scale.shape)
    ones = (1,) * (len(shape) - 2)
    if len(ds) >= 2 and ds[0] == shape[0] and math.prod(ds) == shape[0]:
        return dora_scale.reshape(shape[0], 1, *ones)
    if len(ds) >= 2 and ds[0] == 1 and ds[1] == shape[1] and math.prod(ds) == shape[1]:
        return dora_scale.reshape(1, shape[1], *ones)
    raise ValueError(f"dora_scale {list(ds)} fits neither the output rows [{shape[0]}, 1] nor the input columns "
                     f"[1, {shape[1]}] of the layer {list(shape)}")


def weight_decompose(weight: Tensor, diff: Tensor, dora_scale: Tensor, strength: float) -> Tensor:
    """ComfyUI's DoRA merge (``comfy/weight_adapter/base.py::weight_decompose``), out of place, in fp32.

    ``weight`` the current weight, ``diff`` the factors' delta with alpha (not strength) applied."""
    m = _f32(dora_magnitudes(dora_scale, weight.shape), weight)
    calc = weight + diff.reshape(weight.shape)
    if m.shape[0] == weight.shape[0]:  # per output row: the norm of the weight before this patch, as ComfyUI
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(m.shape)
    else:  # per input column: the norm of the merged weight
        norm = calc.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(m.shape)
    calc = calc * (m / (norm + _EPS32))
    return calc if strength == 1.0 else weight + strength * (calc - weight)


class _LowRank:
    """What LoRA, LoHa and LoKr share: an additive delta, or with ``dora_scale`` a DoRA merge."""

    dora_scale: Tensor | None

    @property
    def additive(self) -> bool:
        return self.dora_scale is None

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        """The new weight (fp32, out of place) given the current one."""
        if self.dora_scale is None:
            return weight + _f32(self.delta(strength, weight.shape), weight)
        return weight_decompose(weight, _f32(self.delta(1.0, weight.shape), weight), self.dora_scale, strength)

    def dora_misfit(self, want: Sequence[int]) -> str | None:
        if self.dora_scale is None:
            return None
        try:
            dora_magnitudes(self.dora_scale, want)
        except ValueError as exc:
            return str(exc)
        return None


# ------------------------------------------------------------------------------------------------- LoHa / LoKr

@dataclass
class LohaModule(_LowRank):
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None
    t1: Tensor | None = None
    t2: Tensor | None = None
    bias: Tensor | None = None  # a full bias difference beside the factors (.diff_b)
    dora_scale: Tensor | None = None  # DoRA magnitudes (see the module doc)
    kind = "loha"
    applies = frozenset({*LOHA_PARTS, "alpha", "diff_b", "dora_scale"})

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank if self.alpha else 1.0

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> Tensor:
        if self.t1 is not None and self.t2 is not None:
            m1, m2 = _cp(self.t1, self.w1_b, self.w1_a), _cp(self.t2, self.w2_b, self.w2_a)
        else:
            m1 = self.w1_a.float() @ self.w1_b.float()
            m2 = self.w2_a.float() @ self.w2_b.float()
        full = m1 * m2 * (strength * self.scale)
        return full.reshape(tuple(shape)) if shape is not None else full

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.bias is None else self.bias.float() * strength

    def target_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (int(self.w1_a.shape[1]), int(self.w1_b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1_a.shape[0]), int(self.w1_b.shape[1]))

    def tensors(self) -> dict[str, Tensor]:
        """The module's keys (after its module name) as a kohya/LyCORIS file holds them."""
        out = {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}
        if self.t1 is not None and self.t2 is not None:
            out.update(hada_t1=self.t1, hada_t2=self.t2)
        if self.bias is not None:
            out["diff_b"] = self.bias
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def fingerprint(self) -> float:
        return _fingerprint([self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2, self.bias,
                             self.dora_scale])


@dataclass
class LokrModule(_LowRank):
    alpha: float | None
    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    bias: Tensor | None = None  # a full bias difference beside the factors (.diff_b)
    dora_scale: Tensor | None = None  # DoRA magnitudes (see the module doc)
    kind = "lokr"
    applies = frozenset({*LOKR_PARTS, "alpha", "diff_b", "dora_scale"})

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b")
        for a, b, name in ((self.w1_a, self.w1_b, "w1"), (self.w2_a, self.w2_b, "w2")):
            if a is not None and b is not None and self.t2 is None and a.shape[-1] != b.shape[0]:
                raise ValueError(f"LoKr lokr_{name}_a {list(a.shape)} and lokr_{name}_b {list(b.shape)} do not "
                                 "multiply (inner sizes differ)")

    @property
    def rank(self) -> int:
        if self.w2 is None:
            return int(self.w2_b.shape[0])
        if self.w1 is None:
            return int(self.w1_b.shape[0])
        return 0  # both factors full: no rank, no alpha scaling

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank if self.alpha and self.rank else 1.0

    def _factors(self) -> tuple[Tensor, Tensor]:
        w1 = self.w1.float() if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        if self.w2 is not None:
            w2 = self.w2.float()
        elif self.t2 is not None:
            w2 = _cp(self.t2, self.w2_b, self.w2_a)
        else:
            w2 = self.w2_a.float() @ self.w2_b.float()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return w1, w2

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> Tensor:
        w1, w2 = self._factors()
        full = torch.kron(w1.contiguous(), w2.contiguous()) * (strength * self.scale)
        return full.reshape(tuple(shape)) if shape is not None else full

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.bias is None else self.bias.float() * strength

    def _dims(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, ...]]:
        def dims(full, a, b):
            return tuple(full.shape[:2]) if full is not None else (int(a.shape[0]), int(b.shape[-1]))

        o1, i1 = dims(self.w1, self.w1_a, self.w1_b)
        if self.w2 is not None:
            o2, i2, rest = int(self.w2.shape[0]), int(self.w2.shape[1]), tuple(self.w2.shape[2:])
        elif self.t2 is not None:
            o2, i2, rest = int(self.w2_a.shape[1]), int(self.w2_b.shape[1]), tuple(self.t2.shape[2:])
        else:
            o2, i2, rest = int(self.w2_a.shape[0]), int(self.w2_b.shape[-1]), ()
        return (int(o1), int(i1)), (o2, i2), rest

    def target_shape(self) -> tuple[int, ...]:
        (o1, i1), (o2, i2), rest = self._dims()
        return (o1 * o2, i1 * i2, *rest)

    def describe(self) -> str:
        """The factors' sizes in words (for messages about a LoKr that does not fit its layer)."""
        (o1, i1), (o2, i2), rest = self._dims()
        return (f"LoKr factors w1 [{o1}, {i1}] and w2 {[o2, i2, *rest]} give a kron product "
                f"{list(self.target_shape())}")

    def tensors(self) -> dict[str, Tensor]:
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        out = {f"lokr_{n}": getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.bias is not None:
            out["diff_b"] = self.bias
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale
        return out

    def fingerprint(self) -> float:
        return _fingerprint([self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2, self.bias,
                             self.dora_scale])


# ------------------------------------------------------------------------------------------------- OFT / BOFT

def _cayley(blocks: Tensor, alpha: float | None) -> Tensor:
    """``R = (I + Q)(I - Q)^-1`` with ``Q = B - B^T`` per block, ``Q`` scaled down to Frobenius norm ``alpha`` over
    all blocks when larger (``alpha`` > 0; ComfyUI adds 1e-8 to the norm)."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    if alpha is not None and alpha > 0:
        norm = float(torch.linalg.norm(q)) + 1e-8
        if norm > alpha:
            q = q * (alpha / norm)
    eye = torch.eye(b.shape[-1], dtype=b.dtype, device=b.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


class _Rotation:
    """What OFT and BOFT share: weight-dependent, no additive delta, a bias difference and extra parts kept."""

    blocks: Tensor
    alpha: float | None
    rescale: Tensor | None
    bias: Tensor | None
    dora_scale: Tensor | None
    additive = False
    rank = 0

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> None:
        return None  # the change depends on the weight: see apply()

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.bias is None else self.bias.float() * strength

    def target_shape(self) -> None:
        return None  # only the output width is known: out_dim

    def dora_misfit(self, want: Sequence[int]) -> str | None:
        return None  # kept, not applied

    def tensors(self) -> dict[str, Tensor]:
        out = {"oft_blocks": self.blocks}
        for name, t in (("rescale", self.rescale), ("diff_b", self.bias), ("dora_scale", self.dora_scale)):
            if t is not None:
                out[name] = t
        return out

    def fingerprint(self) -> float:
        return _fingerprint([self.blocks, self.rescale, self.bias, self.dora_scale])


@dataclass
class OftModule(_Rotation):
    """LyCORIS diag-OFT: ``oft_blocks [k, b, b]`` rotate the ``k`` groups of ``b`` output rows (see the module doc)."""

    blocks: Tensor
    alpha: float | None = None
    rescale: Tensor | None = None  # kept for saving; ComfyUI does not apply an OFT's rescale
    bias: Tensor | None = None
    dora_scale: Tensor | None = None  # kept for saving, not applied
    kind = "oft"
    applies = frozenset({"oft_blocks", "alpha", "diff_b"})

    @property
    def out_dim(self) -> int:
        return int(self.blocks.shape[0] * self.blocks.shape[1])

    def misfit(self, want: Sequence[int]) -> str | None:
        k, b = int(self.blocks.shape[0]), int(self.blocks.shape[1])
        if tuple(self.blocks.shape[1:]) != (b, b):
            return f"OFT blocks {list(self.blocks.shape)} are not square"
        if k * b != int(want[0]):
            return f"OFT blocks {list(self.blocks.shape)} rotate {k * b} output rows, the layer has {int(want[0])}"
        return None

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        r = _f32(_cayley(self.blocks, self.alpha), weight)
        k, b = int(self.blocks.shape[0]), int(self.blocks.shape[1])
        eye = torch.eye(b, dtype=r.dtype, device=r.device)
        rows = weight.reshape(k, b, *weight.shape[1:])
        # D[k, m] = sum_n (s R - s I)[k, n, m] W[k, n]: R^T applied to each group of rows
        diff = torch.einsum("knm,kn...->km...", r * strength - strength * eye, rows).reshape(weight.shape)
        return weight + strength * diff


@dataclass
class BoftModule(_Rotation):
    """LyCORIS BOFT: ``oft_blocks [m, k, b, b]``, ``m`` butterfly stages of ``k`` blocks (see the module doc)."""

    blocks: Tensor
    alpha: float | None = None
    rescale: Tensor | None = None  # [out, 1, ...]: scales each output row after the rotation
    bias: Tensor | None = None
    dora_scale: Tensor | None = None  # kept for saving, not applied
    kind = "boft"
    applies = frozenset({"oft_blocks", "rescale", "alpha", "diff_b"})

    @property
    def out_dim(self) -> int:
        return int(self.blocks.shape[1] * self.blocks.shape[2])

    def misfit(self, want: Sequence[int]) -> str | None:
        m, k, b = (int(s) for s in self.blocks.shape[:3])
        out = int(want[0])
        if tuple(self.blocks.shape[2:]) != (b, b):
            return f"BOFT blocks {list(self.blocks.shape)} are not square"
        if k * b != out:
            return f"BOFT blocks {list(self.blocks.shape)} rotate {k * b} output rows, the layer has {out}"
        if b < 2 or out % (2 ** m * (b // 2)):
            return f"BOFT blocks {list(self.blocks.shape)}: {m} butterfly stages of size {b} do not tile {out} rows"
        if self.rescale is not None and (self.rescale.shape[0] != out or self.rescale.numel() != out):
            return f"BOFT rescale {list(self.rescale.shape)} does not scale the layer's {out} output rows"
        return None

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        r = _f32(_cayley(self.blocks, self.alpha), weight)
        m, b = int(self.blocks.shape[0]), int(self.blocks.shape[2])
        eye = torch.eye(b, dtype=r.dtype, device=r.device)
        x = weight
        for i in range(m):
            block = r[i] if strength == 1 else r[i] * strength + (1 - strength) * eye
            h = 2 ** i * (b // 2)
            # rows a*2h + j*h + c -> a*2h + c*2 + j, then runs of b rows; and back
            x = x.unflatten(0, (-1, 2, h)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            x = torch.einsum("bij,bj...->bi...", block, x)
            x = x.flatten(0, 1).unflatten(0, (-1, h, 2)).transpose(1, 2).flatten(0, 2)
        if self.rescale is not None:
            x = x * _f32(self.rescale, weight).reshape(weight.shape[0], *(1,) * (weight.dim() - 1))
        return weight + strength * (x - weight)


# ------------------------------------------------------------------------------------------------- full tensors

@dataclass
class DiffModule:
    """A full weight difference and/or bias difference (``.diff`` / ``.diff_b``, or LyCORIS' ``.w_norm`` /
    ``.b_norm`` for norm layers: ``names`` is the spelling read, written back)."""

    diff: Tensor | None = None
    diff_b: Tensor | None = None
    names: tuple[str, str] = ("diff", "diff_b")
    kind = "diff"
    alpha = None
    rank = 0
    additive = True
    dora_scale = None

    @property
    def applies(self) -> frozenset[str]:
        return frozenset(n for n, t in zip(self.names, (self.diff, self.diff_b), strict=True) if t is not None)

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> Tensor | None:
        if self.diff is None:
            return None
        full = self.diff.float() * strength
        return full.reshape(tuple(shape)) if shape is not None else full

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        return weight if self.diff is None else weight + _f32(self.delta(strength, weight.shape), weight)

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * strength

    def target_shape(self) -> tuple[int, ...] | None:
        return tuple(self.diff.shape) if self.diff is not None else None

    def dora_misfit(self, want: Sequence[int]) -> None:
        return None

    def tensors(self) -> dict[str, Tensor]:
        return {n: t for n, t in zip(self.names, (self.diff, self.diff_b), strict=True) if t is not None}

    def fingerprint(self) -> float:
        return _fingerprint([self.diff, self.diff_b])


@dataclass
class SetModule:
    """``.set_weight``: the layer's weight replaced by this tensor (strength ignored, 0 excepted); a ``.diff_b``
    beside it still adds to the bias."""

    weight: Tensor
    bias: Tensor | None = None
    kind = "set"
    alpha = None
    rank = 0
    additive = False
    dora_scale = None
    applies = frozenset({"set_weight", "diff_b"})

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> None:
        return None  # a replacement, not a difference: see apply()

    def apply(self, weight: Tensor, strength: float) -> Tensor:
        return _f32(self.weight, weight).reshape(weight.shape).clone()

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.bias is None else self.bias.float() * strength

    def target_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dora_misfit(self, want: Sequence[int]) -> None:
        return None

    def tensors(self) -> dict[str, Tensor]:
        return {"set_weight": self.weight, **({"diff_b": self.bias} if self.bias is not None else {})}

    def fingerprint(self) -> float:
        return _fingerprint([self.weight, self.bias])


def build(parts: dict[str, Tensor], alpha: float | None):
    """The adapter module a group of parts (without a LoRA down/up pair) makes, or None when they make none.

    One kind per group, the first of: LoHa, LoKr, OFT/BOFT, set_weight, full differences (a ``.diff`` before a
    ``.w_norm``, a ``.diff_b`` before a ``.b_norm``, which counts only beside a ``.w_norm``, as in ComfyUI); the
    group's other parts are reported as not applied. Raises ValueError on factors that cannot make a delta."""
    dora, bias = parts.get("dora_scale"), parts.get("diff_b")
    if all(p in parts for p in LOHA_PARTS[:4]):
        return LohaModule(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
                          parts.get("hada_t1"), parts.get("hada_t2"), bias, dora)
    if any(p in parts for p in LOKR_PARTS):
        return LokrModule(alpha, **{p.removeprefix("lokr_"): parts[p] for p in LOKR_PARTS if p in parts},
                          bias=bias, dora_scale=dora)
    if "oft_blocks" in parts:
        blocks = parts["oft_blocks"]
        cls = {3: OftModule, 4: BoftModule}.get(blocks.ndim)
        if cls is None:
            raise ValueError(f"oft_blocks {list(blocks.shape)} is neither OFT [blocks, size, size] nor BOFT "
                             "[stages, blocks, size, size]")
        return cls(blocks, alpha, parts.get("rescale"), bias, dora)
    if "set_weight" in parts:
        return SetModule(parts["set_weight"], bias)
    weight_name = "diff" if "diff" in parts else "w_norm" if "w_norm" in parts else None
    bias_name = "diff_b" if "diff_b" in parts else "b_norm" if "b_norm" in parts and "w_norm" in parts else None
    if weight_name or bias_name:
        return DiffModule(parts.get(weight_name) if weight_name else None,
                          parts.get(bias_name) if bias_name else None,
                          (weight_name or "diff", bias_name or "diff_b"))
    return None
