"""The FID Inception v3 network in plain torch, for FID/KID (pool3 features) and the Inception Score (logits).

FID numbers are comparable with published ones only when computed with *the* FID network: TensorFlow's 2015-12-05
Inception v3 graph, as ported to PyTorch by pytorch-fid in the weights file ``pt_inception-2015-12-05-6726825d.pth``
(from pytorch-fid's GitHub releases). That file is a plain state dict of tensors (loaded here with
``torch.load(weights_only=True)``, or from a ``.safetensors`` conversion of it) for torchvision's ``Inception3``
layout with these differences, all reproduced here:

* 1008 classes (``fc`` is 2048 -> 1008), and no auxiliary classifier (no ``AuxLogits.*`` keys);
* the 3x3 average pools in the pool branches of ``Mixed_5b/5c/5d`` (InceptionA), ``Mixed_6b..6e`` (InceptionC)
  and ``Mixed_7b`` (InceptionE) do not count the zero padding (``count_include_pad=False``, as TensorFlow's pool);
* ``Mixed_7c``'s pool branch uses a 3x3 *max* pool (stride 1, padding 1) instead of the average pool.

Module and parameter names are torchvision's, so the file's keys load with ``strict=True``: the stem
``Conv2d_1a_3x3`` (3->32, 3x3 stride 2), ``Conv2d_2a_3x3`` (32->32, 3x3), ``Conv2d_2b_3x3`` (32->64, 3x3 pad 1),
max pool 3x3/2, ``Conv2d_3b_1x1`` (64->80), ``Conv2d_4a_3x3`` (80->192, 3x3), max pool 3x3/2; then ``Mixed_5b/5c/5d``
(InceptionA, in 192/256/288 channels, pool features 32/64/64), ``Mixed_6a`` (InceptionB, 288 -> 768),
``Mixed_6b/6c/6d/6e`` (InceptionC, 7x7 channels 128/160/160/192), ``Mixed_7a`` (InceptionD, 768 -> 1280),
``Mixed_7b/7c`` (InceptionE, 1280 -> 2048 -> 2048), a global average pool and ``fc``. Every convolution is a
``BasicConv2d``: ``conv`` (Conv2d without bias) + ``bn`` (BatchNorm2d, eps 0.001) + ReLU. Each BatchNorm's
``num_batches_tracked`` counter is accepted whether or not the file has it (it does not affect inference).

Input as pytorch-fid feeds it: RGB images in 0..1, resized to 299x299 by bilinear interpolation
(``align_corners=False``, also when already 299x299, which is then the identity), scaled to -1..1 by ``2x - 1``.
Outputs: the 2048-d **pool3** features (after the global average pool; what FID and KID compare) and the 1008
**logits** (``fc`` applied to pool3, bias included) for the Inception Score; IS implementations differ in which of
the 1008 columns they keep and whether they apply the bias, so the caller picks the columns.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.errors import FinetuneError
from ..core.safeio import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, load_pickle_weights_only, load_safetensors

__all__ = ["FIDInception", "load_fid_inception", "inception_features", "FID_WEIGHTS_NAME", "FID_INPUT_SIZE",
           "FID_NUM_CLASSES", "POOL3_DIM"]

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008
POOL3_DIM = 2048

_FIX = (f"use the FID Inception v3 weights file {FID_WEIGHTS_NAME} (from the GitHub releases of pytorch-fid, "
        "mseitzer/pytorch-fid, release 'fid_weights'), or a .safetensors conversion of it")
_COUNTER = "num_batches_tracked"


class BasicConv2d(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d (eps 0.001) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool that averages only the in-image values (TensorFlow's SAME padding)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1; out 64 + 64 + 96 + pool_features."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_same(x))], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | max pool 3x3/2; out 384 + 96 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``c7`` channels inside); out 4 x 192 = 768."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool_same(x))], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | max pool 3x3/2; out 320 + 192 + cin."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches; out 320 + 768 + 768 + 192 = 2048.

    ``pool="avg"``: the pool branch averages (padding not counted; Mixed_7b). ``pool="max"``: it takes a 3x3
    stride-1 max (Mixed_7c of the FID network).
    """

    def __init__(self, cin: int, pool: str = "avg"):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)
        pooled = (_avg_pool_same(x) if self.pool == "avg"
                  else F.max_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInception(nn.Module):
    """The FID Inception v3 network (see the module docstring). ``forward(x)`` -> (pool3 [B, 2048], logits [B, 1008]).

    ``x``: [B, 3, H, W] images already resized and scaled to -1..1 (:meth:`preprocess` does both from 0..1).
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(POOL3_DIM, FID_NUM_CLASSES)

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        """[B, 3, H, W] in 0..1 -> [B, 3, 299, 299] in -1..1 (bilinear, align_corners=False; then 2x - 1)."""
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def pool3(self, x: Tensor) -> Tensor:
        """[B, 3, 299, 299] in -1..1 -> pool3 features [B, 2048]."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.pool3(x)
        return feats, self.fc(feats)


# ------------------------------------------------------------------------------------------------- loading


def _shape(t: Any) -> list[int] | None:
    return list(t.shape) if isinstance(t, Tensor) else None


def _fmt(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k[:80]}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_state_dict(sd: Mapping[Any, Any], model: FIDInception, name: str, *, node: str | None,
                      input: str | None) -> dict[str, Tensor]:
    """The file's state dict, checked against ``model``'s keys and shapes; counters filled in where absent."""
    want = model.state_dict()
    non_tensor = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if non_tensor:
        raise FinetuneError(f"'{name}' is not the FID Inception weights file: entries {_fmt(non_tensor)} are not "
                            "named tensors", node=node, input=input, fix=_FIX)
    got = dict(sd)
    missing = [k for k in want if k not in got and not k.endswith("." + _COUNTER)]
    unexpected = [k for k in got if k not in want]
    wrong = [f"{k} {_shape(got[k])} (expected {list(want[k].shape)})" for k in want
             if k in got and list(got[k].shape) != list(want[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) it needs are missing ({_fmt(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) are not part of it ({_fmt(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} tensor(s) have the wrong shape ({'; '.join(wrong[:5])}"
                         + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "") + ")")
        hint = ""
        if any(k.startswith("AuxLogits.") for k in got) or _shape(got.get("fc.weight")) == [1000, POOL3_DIM]:
            hint = (" It looks like torchvision's ImageNet Inception v3 (1000 classes, auxiliary classifier), "
                    "whose weights differ from the FID network's and give FID values not comparable with "
                    "published ones.")
        raise FinetuneError(f"'{name}' is not the FID Inception v3 weights file: " + "; ".join(parts) + "." + hint,
                            node=node, input=input, fix=_FIX)
    for k, v in want.items():
        if k.endswith("." + _COUNTER) and k not in got:
            got[k] = v.clone()
    return got


def load_fid_inception(path: str | os.PathLike, *, node: str | None = None,
                       input: str | None = None) -> FIDInception:
    """The FID Inception network with the weights of ``path`` (.pth/.pt/.ckpt/.bin or .safetensors/.sft).

    Pickles are opened weights-only (anything needing code is refused unrun, as
    :class:`~comfy_finetune.core.safeio.UnsafeFileError`); a state dict that is not exactly the FID network's
    (missing, extra or misshapen tensors) raises :class:`FinetuneError` naming the file to use. Returned in
    ``eval()`` mode on the CPU in float32, every parameter with ``requires_grad=False``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        obj: Any = load_safetensors(path, node=node, input=input)[0]
    elif suffix in PICKLE_SUFFIXES:
        obj = load_pickle_weights_only(path, node=node, input=input)
        while isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
    else:
        raise FinetuneError(f"unsupported file type '{suffix or path.name}' for '{path.name}'", node=node,
                            input=input, fix=_FIX)
    if not isinstance(obj, Mapping):
        raise FinetuneError(f"'{path.name}' holds a {type(obj).__name__}, not a state dict of tensors", node=node,
                            input=input, fix=_FIX)
    model = FIDInception()
    sd = _check_state_dict(obj, model, path.name, node=node, input=input)
    model.load_state_dict(sd, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def inception_features(model: FIDInception, images: Tensor, batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """ComfyUI IMAGE [B, H, W, 3] in 0..1 -> (pool3 [B, 2048], logits [B, 1008]), float32 on the CPU.

    Runs on the model's device and dtype, ``batch_size`` images at a time, under ``torch.inference_mode()``.
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[-1] != 3:
        shape = list(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a ComfyUI IMAGE batch [B, H, W, 3], got {shape}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(model.parameters())
    feats, logits = [], []
    with torch.inference_mode():
        for start in range(0, images.shape[0], int(batch_size)):
            x = images[start:start + int(batch_size)].to(device=param.device, dtype=torch.float32)
            x = model.preprocess(x.permute(0, 3, 1, 2)).to(param.dtype)
            f, lg = model(x)
            feats.append(f.float().cpu())
            logits.append(lg.float().cpu())
    if not feats:
        return torch.zeros(0, POOL3_DIM), torch.zeros(0, FID_NUM_CLASSES)
    return torch.cat(feats), torch.cat(logits)
