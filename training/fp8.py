"""Frozen layer weights kept outside their layer for a training run: in float8 (``fp8_base``), and/or on the CPU
streamed to the device per layer (``offload_unet``, :mod:`.offload`).

Each frozen ``Linear`` / ``Conv2d`` of the denoiser (its weight does not train: a LoRA-type run's base layers) gets
a forward of its own for the block: the layer's weight is materialised on the training device just for that call
(:meth:`Layer.weight`), and the call runs through :class:`_LayerFunction`, an autograd function that saves no
weight for backward: the backward pass materialises it again to compute the input's gradient (``grad @ W`` for a
Linear, ``conv2d_input`` for a convolution). So at most a layer or two of full-precision weight exist at once, in
the forward and in the backward pass alike (what autograd saves stays as it is, and gradient checkpointing still
applies to it). The weight itself gets no gradient (it is frozen); nor does the bias (frozen with it).

float8: ``torch.float8_e4m3fn`` (4 exponent bits, 3 mantissa bits, largest finite value 448) with one fp32 scale
per tensor, ``scale = max|W| / 448``, ``q = W / scale`` rounded to e4m3, ``W' = q * scale`` computed in the
layer's own dtype (an e4m3 value is exact in bf16 and fp32). Its relative error is at most 2^-4 (3 mantissa bits,
round to nearest) for values in e4m3's normal range (scaled magnitude from 2^-6), and weights below 2^-9 of the
largest in their tensor round to the subnormals or 0.

The original weights are never changed: the layer keeps its ``weight`` Parameter (the same object); on a GPU its
storage moves to the CPU for the run (the point: the device holds 1 byte a value) and comes back after, bit for bit;
on the CPU it stays (and the float8 copies come on top). :func:`moved_from` tells the memory estimate where such a
weight belongs. The pack's handles share base weights between nodes, so everything is put back when the block
exits, also on error or cancel.

Layers wrapped by a DoRA adapter are left alone: DoRA reads its base layer's weight (for the column norms) on
every forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F  # noqa: N812

from .offload import Streamer

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)

_MOVED: dict[int, torch.device] = {}  # id(weight Parameter) -> the device it came from, while a run holds it elsewhere


def moved_from(p: torch.Tensor) -> torch.device | None:
    """The device a layer weight was taken from for this run (None: it is where it belongs)."""
    return _MOVED.get(id(p))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``w`` in float8 e4m3 with a per-tensor fp32 scale (``w ≈ q * scale``)."""
    amax = float(w.detach().abs().max()) if w.numel() else 0.0
    scale = torch.tensor(amax / FP8_MAX if amax > 0 else 1.0, dtype=torch.float32)
    q = (w.detach().float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (one tensor of ``dtype``: the cast, scaled in place)."""
    return q.to(dtype).mul_(scale.to(device=q.device, dtype=dtype))


class Layer:
    """One frozen layer whose weight lives outside it for the run: in float8 (``q``, ``scale``) or as it was, on the
    device or (``stream``) on the CPU, brought over by :meth:`weight` per call."""

    def __init__(self, module: torch.nn.Module, device: torch.device, fp8: bool) -> None:
        self.module, self.device = module, device
        self.param: torch.nn.Parameter = module.weight
        self.dtype = self.param.dtype
        self.shape = self.param.shape
        self.fp8 = fp8
        self.q = self.scale = None
        self.fetches = 0  # materialisations (tests: the layer's weight really comes from here)
        if fp8:
            q, scale = quantize(self.param)
            self.q, self.scale = q.to(device), scale.to(device)  # the scale stays on the device (also when streaming)
        self.moved = False  # the original waits on the CPU (GPU runs)
        self.fetch = None  # offload_unet: the Streamer that brings the stored weight over (.offload)
        self.index = -1

    def pin(self) -> None:
        """Page-lock the stored weight on the CPU (asynchronous copies to CUDA)."""
        if self.fp8:
            self.q = self.q.pin_memory()
        else:
            self.param.data = self.param.data.pin_memory()

    def stored(self) -> torch.Tensor:
        """What this layer keeps for its weight (float8 or the original), wherever it is."""
        return self.q if self.fp8 else self.param

    def weight(self, backward: bool = False) -> torch.Tensor:
        """The weight on the training device in the layer's dtype, for one call (``backward``: the backward pass's)."""
        self.fetches += 1
        if self.fetch is not None:
            src = self.fetch(self, backward)
        else:
            src = self.stored()
            if src.device != self.device:
                src = src.to(self.device, non_blocking=True)
        return dequantize(src, self.scale, self.dtype) if self.fp8 else src


class _LayerFunction(torch.autograd.Function):
    """``layer(x)`` with the weight from :meth:`Layer.weight`, saving no weight for backward (module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Layer) -> torch.Tensor:  # noqa: ANN001
        ctx.layer, ctx.x_shape, ctx.x_dtype = layer, x.shape, x.dtype
        ctx.autocast = torch.is_autocast_enabled(x.device.type)
        ctx.autocast_dtype = torch.get_autocast_dtype(x.device.type) if ctx.autocast else None
        return _call(layer, x, layer.weight(backward=False))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001
        layer = ctx.layer
        if not ctx.needs_input_grad[0]:
            return None, None
        w = layer.weight(backward=True)
        # the forward ran at the autocast dtype (if autocast was on): the input's gradient is computed there too
        dtype = ctx.autocast_dtype if ctx.autocast else grad.dtype
        w, g = w.to(dtype), grad.to(dtype)
        m = layer.module
        if isinstance(m, torch.nn.Linear):
            gx = g @ w
        else:
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, m.stride, m.padding, m.dilation, m.groups)
        return gx.to(ctx.x_dtype), None


def _call(layer: Layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    m = layer.module
    if isinstance(m, torch.nn.Linear):
        return F.linear(x, w, m.bias)
    return m._conv_forward(x, w, m.bias)


def _forward(layer: Layer):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return _LayerFunction.apply(x, layer)
    return forward


def frozen_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of ``model`` whose weight (and bias) are frozen, except DoRA's base layers (module doc)."""
    dora: set[int] = set()
    for m in model.modules():
        if any(bool(v) for v in getattr(m, "use_dora", {}).values()) and hasattr(m, "get_base_layer"):
            dora.add(id(m.get_base_layer()))
    out = []
    for m in model.modules():
        w = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        if (type(m) in LAYER_TYPES and isinstance(w, torch.nn.Parameter) and not w.requires_grad
                and (bias is None or not bias.requires_grad) and id(m) not in dora and "forward" not in vars(m)):
            out.append(m)
    return out


@contextlib.contextmanager
def layers_outside(modules: Iterable[torch.nn.Module], device: torch.device, *, fp8: bool,
                   offload: bool = False) -> Iterator[list[Layer]]:
    """For the block, every layer of ``modules`` (:func:`frozen_layers`) calls its weight from a :class:`Layer`:
    float8 with ``fp8``; the original weights (or the float8 copies, with ``offload``) wait on the CPU when
    ``device`` is not the CPU, and with ``offload`` a :class:`.offload.Streamer` brings them over per layer.
    Everything is put back when the block exits."""
    device = torch.device(device)
    layers: list[Layer] = []
    off_device = device.type != "cpu"
    streamer = None
    try:
        for m in modules:
            layer = Layer(m, device, fp8)
            layers.append(layer)
            m.forward = _forward(layer)
            if off_device and (fp8 or offload):  # the original waits on the CPU, whole, for the restore
                layer.param.data = layer.param.data.to("cpu")
                layer.moved = True
                _MOVED[id(layer.param)] = device
            if off_device and offload and fp8:
                layer.q = layer.q.to("cpu")
        if offload:
            streamer = Streamer(layers, device)
        yield layers
    finally:
        if streamer is not None:
            streamer.close()
        for layer in reversed(layers):
            vars(layer.module).pop("forward", None)
            if layer.moved:  # the same values, bit for bit, in the same layout (``to`` preserves the strides)
                layer.param.data = layer.param.data.to(device)
                layer.moved = False
            _MOVED.pop(id(layer.param), None)
            layer.q = None
