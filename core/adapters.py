"""Adapter kinds beyond LoRA that LoRA files carry: LyCORIS LoHa and LoKr, and full weight / bias differences.

Each kind turns its tensors into a weight delta ``delta(strength)`` (fp32, shaped like the target weight as far as
the factors tell; the handle reshapes it to the weight) and, for bias differences, a bias delta. The formulas are
the ones LyCORIS defines and ComfyUI's loader applies (``alpha`` a file's ``.alpha``, None meaning 1):

* **LoHa** (Hadamard product): ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r`` with ``r = w1_b.shape[0]``; with
  CP factors ``hada_t1/t2 [r, r, k, k]`` each product is ``einsum("ijkl,jr,ip->prkl", t, w_b, w_a)``.
* **LoKr** (Kronecker product): ``dW = kron(w1, w2) * alpha / r``, where ``w1`` is ``lokr_w1`` or
  ``lokr_w1_a @ lokr_w1_b`` and ``w2`` is ``lokr_w2``, ``lokr_w2_a @ lokr_w2_b`` or, with ``lokr_t2``,
  ``einsum("ijkl,jr,ip->prkl", t2, w2_b, w2_a)``; ``r`` is the inner size of the decomposed factor (``w2_b``'s
  when ``w2`` is decomposed, else ``w1_b``'s); with both factors full the scale is 1 whatever ``alpha`` says.
  For a conv ``w1`` gains two unit dimensions before the product.
* **diff / diff_b** (full differences, as ComfyUI's trainer writes for norm layers and biases): ``dW = diff``,
  ``db = diff_b``; no alpha.

Every delta is scaled by the patch strength. A module of these kinds is written back with the keys it was read
from (kohya layout), so a loaded file saves without loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: The parts of each kind (see :data:`.lora_keys.PART_SUFFIXES`).
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DIFF_PARTS = ("diff", "diff_b")


def _fingerprint(tensors: Sequence[Tensor | None]) -> float:
    return sum((i + 1.0) * float(t.detach().double().sum()) for i, t in enumerate(tensors) if t is not None)


def _cp(t: Tensor, w_b: Tensor, w_a: Tensor) -> Tensor:
    # CP/Tucker factor: out[p, r, k, l] = sum_ij t[i, j, k, l] * w_b[j, r] * w_a[i, p]
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), w_b.float().flatten(1), w_a.float().flatten(1))


@dataclass
class LohaModule:
    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float | None
    t1: Tensor | None = None
    t2: Tensor | None = None
    bias: Tensor | None = None  # a full bias difference beside the factors (.diff_b)
    kind = "loha"

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
        return out

    def fingerprint(self) -> float:
        return _fingerprint([self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2, self.bias])


@dataclass
class LokrModule:
    alpha: float | None
    w1: Tensor | None = None
    w1_a: Tensor | None = None
    w1_b: Tensor | None = None
    w2: Tensor | None = None
    w2_a: Tensor | None = None
    w2_b: Tensor | None = None
    t2: Tensor | None = None
    bias: Tensor | None = None  # a full bias difference beside the factors (.diff_b)
    kind = "lokr"

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

    def target_shape(self) -> tuple[int, ...]:
        def dims(full, a, b):
            return tuple(full.shape[:2]) if full is not None else (int(a.shape[0]), int(b.shape[-1]))

        o1, i1 = dims(self.w1, self.w1_a, self.w1_b)
        if self.w2 is not None:
            o2, i2, rest = int(self.w2.shape[0]), int(self.w2.shape[1]), tuple(self.w2.shape[2:])
        elif self.t2 is not None:
            o2, i2, rest = int(self.w2_a.shape[1]), int(self.w2_b.shape[1]), tuple(self.t2.shape[2:])
        else:
            o2, i2, rest = int(self.w2_a.shape[0]), int(self.w2_b.shape[-1]), ()
        return (o1 * o2, i1 * i2, *rest)

    def tensors(self) -> dict[str, Tensor]:
        names = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        out = {f"lokr_{n}": getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.bias is not None:
            out["diff_b"] = self.bias
        return out

    def fingerprint(self) -> float:
        return _fingerprint([self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2, self.bias])


@dataclass
class DiffModule:
    """A full weight difference and/or bias difference (``.diff`` / ``.diff_b``)."""

    diff: Tensor | None = None
    diff_b: Tensor | None = None
    kind = "diff"
    alpha = None
    rank = 0

    def delta(self, strength: float = 1.0, shape: Sequence[int] | None = None) -> Tensor | None:
        if self.diff is None:
            return None
        full = self.diff.float() * strength
        return full.reshape(tuple(shape)) if shape is not None else full

    def bias_delta(self, strength: float = 1.0) -> Tensor | None:
        return None if self.diff_b is None else self.diff_b.float() * strength

    def target_shape(self) -> tuple[int, ...] | None:
        return tuple(self.diff.shape) if self.diff is not None else None

    def tensors(self) -> dict[str, Tensor]:
        return {n: getattr(self, n) for n in DIFF_PARTS if getattr(self, n) is not None}

    def fingerprint(self) -> float:
        return _fingerprint([self.diff, self.diff_b])


def build(parts: dict[str, Tensor], alpha: float | None):
    """The adapter module a group of parts makes, or None when they make none (e.g. a LoRA's down without up).
    Raises ValueError on factors that cannot make a delta."""
    if all(p in parts for p in LOHA_PARTS[:4]):
        return LohaModule(parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
                          parts.get("hada_t1"), parts.get("hada_t2"), parts.get("diff_b"))
    if any(p in parts for p in LOKR_PARTS):
        return LokrModule(alpha, **{p.removeprefix("lokr_"): parts[p] for p in LOKR_PARTS if p in parts},
                          bias=parts.get("diff_b"))
    if any(p in parts for p in DIFF_PARTS):
        return DiffModule(parts.get("diff"), parts.get("diff_b"))
    return None
