"""Training pictures as ComfyUI IMAGE tensors: the loss curve and image grids (PIL + numpy, no matplotlib).

Everything returns ``[1, H, W, 3]`` float tensors in 0..1, so a PreviewImage/SaveImage node shows them directly.
Bad input never raises: no points, one point, NaN/inf losses and constant curves all give a readable picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["ema", "loss_plot", "image_grid", "table_image"]

_BG = (255, 255, 255)
_AXIS = (60, 60, 60)
_GRID = (232, 232, 232)
_TEXT = (30, 30, 30)
_RAW = (170, 200, 235)  # raw loss: thin, light
_SMOOTH = (25, 85, 190)  # EMA: bold
_LR = (245, 205, 160)  # learning rate: faint, right axis
_LR_TEXT = (190, 110, 30)
_BEST = (200, 30, 30)  # best-checkpoint marker: dashed, through both panels
# score series, in the order given: distinct from the loss blues, the LR orange and the best-marker red
_SCORE_COLORS = [(34, 150, 70), (140, 60, 190), (0, 150, 165), (165, 105, 25), (225, 90, 170), (115, 120, 0),
                 (95, 95, 95), (70, 70, 170)]
SCORE_PANEL_RATIO = 0.6  # the score panel's height, as a share of the loss panel's


def ema(values: Sequence[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average ``s = alpha * s + (1 - alpha) * x``, started at the first finite value.

    Non-finite values (NaN, inf) are skipped: the average carries over them, and positions before the first finite
    value stay NaN. Same length as ``values``.
    """
    alpha = min(max(float(alpha), 0.0), 1.0)
    out: list[float] = []
    state: float | None = None
    for v in values:
        x = _num(v)
        if math.isfinite(x):
            state = x if state is None else alpha * state + (1.0 - alpha) * x
        out.append(float("nan") if state is None else state)
    return out


# ------------------------------------------------------------------------------------------------- helpers

def _font():
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)  # [1, H, W, 3]


def _nice_step(span: float, target: int) -> float:
    """A 1/2/5 x 10^k step giving about ``target`` intervals over ``span``."""
    raw = span / max(target, 1)
    if not math.isfinite(raw) or raw <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _linear_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    step = _nice_step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def _num(v) -> float:
    """A plot value as float; None or anything unconvertible is NaN (a gap, never an error)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _finite(values: Sequence[float] | None) -> list[float]:
    return [v for v in (_num(x) for x in (values or [])) if math.isfinite(v)]


class _Axis:
    """Maps data values to pixel rows (linear or log10)."""

    def __init__(self, values: list[float], top: int, bottom: int, allow_log: bool = True) -> None:
        self.top, self.bottom = top, bottom
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        self.log = bool(allow_log and values and lo > 0 and hi / lo > 100.0)
        if self.log:
            self.lo, self.hi = math.log10(lo), math.log10(hi)
        else:
            self.lo, self.hi = lo, hi
        if self.hi - self.lo <= 0:  # flat curve or one point: centre it
            pad = abs(self.lo) * 0.1 if self.lo != 0 else 1.0
            self.lo, self.hi = self.lo - pad, self.hi + pad
        elif not self.log:
            pad = (self.hi - self.lo) * 0.05
            self.lo, self.hi = self.lo - pad, self.hi + pad

    def y(self, v: float) -> float:
        t = math.log10(v) if self.log else v
        return self.bottom - (t - self.lo) / (self.hi - self.lo) * (self.bottom - self.top)

    def ticks(self) -> list[tuple[float, str]]:
        if self.log:
            return [(10.0 ** e, f"1e{e}") for e in range(math.ceil(self.lo - 1e-9), math.floor(self.hi + 1e-9) + 1)]
        return [(t, _fmt(t)) for t in _linear_ticks(self.lo, self.hi, 6)]

    def ok(self, v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not self.log)


def _polyline(draw: ImageDraw.ImageDraw, points: list[tuple[float, float] | None], color, width: int) -> None:
    """Draw runs of consecutive points; ``None`` breaks the line (NaN). Lone points become dots."""
    run: list[tuple[float, float]] = []
    for p in points + [None]:
        if p is not None:
            run.append(p)
            continue
        if len(run) == 1:
            x, y = run[0]
            r = max(width, 2)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)
        elif run:
            draw.line(run, fill=color, width=width, joint="curve")
        run = []


# ------------------------------------------------------------------------------------------------- loss plot

_Series = list[tuple[str, list[tuple[float, float]]]]


def _score_series(scores: Mapping[str, Sequence[tuple[int, float]]] | None) -> _Series:
    """The score series as (name, [(step, value), ...]) sorted by step; points with a non-finite step or value are
    dropped, malformed points too (never an error)."""
    out = []
    for name, points in (scores or {}).items():
        clean = []
        for p in points or []:
            try:
                step, value = p
            except (TypeError, ValueError):
                continue
            step, value = _num(step), _num(value)
            if math.isfinite(step) and math.isfinite(value):
                clean.append((step, value))
        out.append((str(name), sorted(clean, key=lambda sv: sv[0])))
    return out


def _dashed_vline(draw: ImageDraw.ImageDraw, x: float, top: float, bottom: float, color, dash: int = 5,
                  gap: int = 4, width: int = 2) -> None:
    y = top
    while y < bottom:
        draw.line([(x, y), (x, min(y + dash, bottom))], fill=color, width=width)
        y += dash + gap


def _legend_rows(draw, entries: list[tuple[str, tuple]], font, x0: int, x1: int) -> list[list[tuple[int, str, tuple]]]:
    """Lay legend entries (text, colour) out left to right from ``x0``, wrapping before ``x1``: rows of
    (x, text, colour). Each entry is a 14 px line sample, a gap and the text."""
    rows: list[list[tuple[int, str, tuple]]] = [[]]
    x = x0
    for text, color in entries:
        tw, _ = _text_size(draw, text, font)
        need = 18 + tw
        if rows[-1] and x + need > x1:
            rows.append([])
            x = x0
        rows[-1].append((x, text, color))
        x += need + 14
    return rows


def loss_plot(losses: Sequence[float], *, lrs: Sequence[float] | None = None, title: str = "training loss",
              width: int = 768, height: int = 384, scores: Mapping[str, Sequence[tuple[int, float]]] | None = None,
              best: tuple[int, float] | None = None, primary: str | None = None) -> torch.Tensor:
    """Draw a training-loss chart, with the validation scores in a second panel below it when given.

    Args:
        losses: one loss per step (NaN/inf allowed: they are skipped and break the raw line).
        lrs: optional learning rate per step, drawn faintly against its own right-hand axis.
        title: text at the top left.
        width, height: picture size in pixels (at least 160 x 120); ``height`` is the loss panel's.
        scores: optional score series, name -> ``[(step, value), ...]`` (optimizer steps, 0 = before training;
            non-finite values are skipped). With at least one series the picture grows by a score panel
            :data:`SCORE_PANEL_RATIO` x ``height`` tall under the loss panel, on the same step axis (which then
            starts at 0 when a score has step 0 and ends at the last step of either), with its own linear y axis;
            each series a coloured line with dots, and a legend of names and last values.
        best: optional ``(step, value)`` of the best checkpoint: a dashed vertical marker through both panels and
            a "best: <value> at step <step>" label (in the score legend; in the title line without scores).
        primary: the name of the series drawn thicker (the combined score).
    Returns:
        ``[1, H, width, 3]`` float32 in 0..1 (``H = height``, plus the score panel): the raw loss thin and light, its
        EMA (:func:`ema`) bold, step on x, loss on y (log scale when the finite values span more than two decades),
        and the last smoothed value. Without ``scores`` and ``best`` the picture is exactly the plain loss chart.
    """
    width, height = max(int(width), 160), max(int(height), 120)
    losses = [_num(v) for v in losses]
    lrs_list = [_num(v) for v in lrs] if lrs is not None else []
    series = _score_series(scores)
    score_h = round(height * SCORE_PANEL_RATIO) if series else 0
    best_step, best_value = (_num(best[0]), _num(best[1])) if best is not None else (float("nan"), float("nan"))
    img = Image.new("RGB", (width, height + score_h), _BG)
    draw = ImageDraw.Draw(img)
    font = _font()
    _, th = _text_size(draw, "0.1234", font)
    left, right = 62, (62 if _finite(lrs_list) else 16)
    top, bottom = 10 + th + 10, height - (th + 16)
    x0, x1, y0, y1 = left, width - right, top, bottom

    draw.text((left, 6), title, fill=_TEXT, font=font)
    n = max(len(losses), len(lrs_list))
    axis = _Axis(_finite(losses), y0, y1)

    # x: steps 1..n (from 0 when a score was taken before training, to the last loss or score step)
    score_steps = [s for _, pts in series for s, _ in pts] + ([best_step] if math.isfinite(best_step) else [])
    if score_steps:
        xlo = 0.0 if min(score_steps) < 1 else 1.0
        xhi = max([float(n)] + score_steps)
        if xhi - xlo < 1:
            xlo, xhi = xlo - 1.0, xhi + 1.0
        tick_lo, tick_hi = max(xlo, 0.0), xhi
    else:
        xlo, xhi = (1.0, float(n)) if n > 1 else (0.0, 2.0)
        tick_lo, tick_hi = max(xlo, 1.0), min(xhi, max(n, 1))

    def xs(step: float) -> float:
        return x0 + (step - xlo) / (xhi - xlo) * (x1 - x0)

    def x(i: int) -> float:
        return xs(i + 1)

    def step_ticks(y_axis: int) -> None:
        for t in _linear_ticks(xlo, xhi, 6):
            if t != int(t) or not (tick_lo <= t <= tick_hi):
                continue
            xx = xs(t)
            draw.line([(xx, y_axis), (xx, y_axis + 4)], fill=_AXIS)
            label = str(int(t))
            tw, _ = _text_size(draw, label, font)
            draw.text((xx - tw / 2, y_axis + 6), label, fill=_TEXT, font=font)

    for value, label in axis.ticks():
        yy = axis.y(value)
        if y0 - 0.5 <= yy <= y1 + 0.5:
            draw.line([(x0, yy), (x1, yy)], fill=_GRID)
            tw, th2 = _text_size(draw, label, font)
            draw.text((x0 - 6 - tw, yy - th2 / 2 - 1), label, fill=_TEXT, font=font)
    step_ticks(y1)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_AXIS, width=1)
    step_label = "step" + (" (log loss)" if axis.log else "")
    draw.text((4, y1 + 6), step_label, fill=_TEXT, font=font)

    finite_lrs = _finite(lrs_list)
    if finite_lrs:
        lr_axis = _Axis(finite_lrs, y0, y1, allow_log=False)
        draw.line([(x1, y0), (x1, y1)], fill=_LR_TEXT)
        for value, _ in lr_axis.ticks():
            yy = lr_axis.y(value)
            if y0 - 0.5 <= yy <= y1 + 0.5:
                draw.text((x1 + 6, yy - th / 2 - 1), _fmt(value), fill=_LR_TEXT, font=font)
        _polyline(draw, [(x(i), lr_axis.y(v)) if math.isfinite(v) else None for i, v in enumerate(lrs_list)],
                  _LR, 1)
        draw.text((x1 + 6, 6), "lr", fill=_LR_TEXT, font=font)

    best_x = xs(best_step) if math.isfinite(best_step) else None
    if best_x is not None:
        _dashed_vline(draw, best_x, y0, y1, _BEST)

    if not _finite(losses):
        msg = "no loss values yet" if not losses else "no finite loss values (NaN/inf)"
        mw, mh = _text_size(draw, msg, font)
        draw.text(((x0 + x1 - mw) / 2, (y0 + y1 - mh) / 2), msg, fill=_TEXT, font=font)
    else:
        def pts(values: list[float]) -> list[tuple[float, float] | None]:
            return [(x(i), axis.y(v)) if axis.ok(v) else None for i, v in enumerate(values)]

        smooth = ema(losses)
        _polyline(draw, pts(losses), _RAW, 1)
        _polyline(draw, pts(smooth), _SMOOTH, 3)
        last = next((v for v in reversed(smooth) if math.isfinite(v)), float("nan"))
        text = f"last (smoothed): {_fmt(last)}"
        tw, _ = _text_size(draw, text, font)
        draw.text((x1 - tw - 4, 6), text, fill=_SMOOTH, font=font)

    best_text = f"best: {_fmt(best_value)} at step {_fmt(best_step)}" if best_x is not None else ""
    if series:
        _score_panel(draw, font, series, primary, best_x, best_text, step_ticks,
                     x0, x1, xs, height, height + score_h, th)
    elif best_text:  # no score panel: the label goes in the title line, after the title
        tw, _ = _text_size(draw, title, font)
        draw.text((left + tw + 24, 6), best_text, fill=_BEST, font=font)
    return _to_tensor(img)


def _score_panel(draw, font, series, primary, best_x, best_text, step_ticks, x0, x1, xs, panel_top, panel_bottom,
                 th) -> None:
    """The score panel between rows ``panel_top`` and ``panel_bottom``: legend rows, then the chart."""
    colors = {name: _SCORE_COLORS[i % len(_SCORE_COLORS)] for i, (name, _) in enumerate(series)}
    entries = [(f"{name} {_fmt(pts[-1][1]) if pts else '-'}", colors[name]) for name, pts in series]
    if best_text:  # in the legend, after the series, so it never covers a curve
        entries.append((best_text, _BEST))
    rows = _legend_rows(draw, entries, font, x0, x1)
    row_h = th + 6
    for r, row in enumerate(rows):
        ly = panel_top + 6 + r * row_h
        for lx, text, color in row:
            if text == best_text and color == _BEST:  # a short piece of the dashed marker
                _dashed_vline(draw, lx + 7, ly - 1, ly + th + 3, color, dash=4, gap=3)
            else:
                mid = ly + th / 2 + 1
                draw.line([(lx, mid), (lx + 14, mid)], fill=color, width=3)
            draw.text((lx + 18, ly), text, fill=color, font=font)
    y0 = panel_top + 6 + len(rows) * row_h + 6
    y1 = max(panel_bottom - (th + 16), y0 + 10)
    values = [v for _, pts in series for _, v in pts]
    axis = _Axis(values, y0, y1, allow_log=False)
    for value, label in axis.ticks():
        yy = axis.y(value)
        if y0 - 0.5 <= yy <= y1 + 0.5:
            draw.line([(x0, yy), (x1, yy)], fill=_GRID)
            tw, th2 = _text_size(draw, label, font)
            draw.text((x0 - 6 - tw, yy - th2 / 2 - 1), label, fill=_TEXT, font=font)
    step_ticks(y1)
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=_AXIS, width=1)
    draw.text((4, y1 + 6), "step", fill=_TEXT, font=font)
    if best_x is not None:
        _dashed_vline(draw, best_x, y0, y1, _BEST)
    if not values:
        msg = "no finite score values yet"
        mw, mh = _text_size(draw, msg, font)
        draw.text(((x0 + x1 - mw) / 2, (y0 + y1 - mh) / 2), msg, fill=_TEXT, font=font)
    # the primary series last, so it is drawn on top
    for name, pts in sorted(series, key=lambda item: item[0] == primary):
        bold = name == primary
        line = [(xs(s), axis.y(v)) for s, v in pts]
        if len(line) > 1:
            draw.line(line, fill=colors[name], width=4 if bold else 2, joint="curve")
        r = 4 if bold else 3
        for px, py in line:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colors[name])


# ------------------------------------------------------------------------------------------------- image grid

def _frames(images) -> list[list[torch.Tensor]]:
    """Input as groups of ``[H, W, 3]`` frames: one group per list entry (a tensor input is one group)."""
    groups = [images] if isinstance(images, torch.Tensor) else list(images)
    out: list[list[torch.Tensor]] = []
    for g in groups:
        t = torch.as_tensor(g).detach().to("cpu", torch.float32)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4:
            raise ValueError(f"image_grid expects [B, H, W, C] tensors, got shape {tuple(t.shape)}")
        c = t.shape[-1]
        if c == 1:
            t = t.expand(*t.shape[:-1], 3)
        elif c >= 3:
            t = t[..., :3]
        else:
            raise ValueError(f"image_grid expects 1, 3 or 4 channels, got {c}")
        out.append([f for f in t.nan_to_num(0.0).clamp(0, 1)])
    return out


def image_grid(images, *, rows: int | None = None, labels: Sequence[str] | None = None,
               pad: int = 4) -> torch.Tensor:
    """Tile images into one picture, e.g. base-model vs trained samples.

    Args:
        images: ``[B, H, W, 3]`` tensor, or a list of them (0..1 floats; 1 or 4 channels are accepted too).
        rows: number of rows. Default: one row per list entry (its batch across), or a near-square grid for a
            single tensor. With ``rows`` given, all frames are laid out row by row.
        labels: one text per row, drawn on the left (PIL's default font); missing labels are blank.
        pad: pixels between and around the cells.
    Returns:
        ``[1, H, W, 3]`` float32 in 0..1 on white. Frames of different sizes sit top-left in cells of the
        largest size. No frames gives a small blank picture.
    """
    pad = max(int(pad), 0)
    groups = _frames(images)
    if rows is None and len(groups) > 1:
        grid = groups
    else:
        flat = [f for g in groups for f in g]
        if rows is None:
            cols = max(1, math.ceil(math.sqrt(len(flat))))
            rows = max(1, math.ceil(len(flat) / cols))
        rows = max(1, int(rows))
        cols = max(1, math.ceil(len(flat) / rows))
        grid = [flat[r * cols:(r + 1) * cols] for r in range(rows)]
    frames = [f for row in grid for f in row]
    cell_h = max((int(f.shape[0]) for f in frames), default=8)
    cell_w = max((int(f.shape[1]) for f in frames), default=8)
    ncols = max((len(row) for row in grid), default=1) or 1

    texts = [str(t) for t in labels] if labels else []
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font()
    label_w = max((_text_size(probe, t, font)[0] for t in texts if t), default=0)
    label_w = label_w + 2 * max(pad, 4) if label_w else 0

    height = len(grid) * cell_h + (len(grid) + 1) * pad
    width = label_w + ncols * cell_w + (ncols + 1) * pad
    canvas = np.full((height, width, 3), 1.0, dtype=np.float32)
    for r, row in enumerate(grid):
        top = pad + r * (cell_h + pad)
        for c, frame in enumerate(row):
            left = label_w + pad + c * (cell_w + pad)
            h, w = int(frame.shape[0]), int(frame.shape[1])
            canvas[top:top + h, left:left + w] = frame.numpy()
    if texts:
        img = Image.fromarray((canvas * 255.0 + 0.5).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for r, text in enumerate(texts[:len(grid)]):
            if not text:
                continue
            tw, th = _text_size(draw, text, font)
            top = pad + r * (cell_h + pad)
            draw.text((max(pad, 4), top + (cell_h - th) / 2 - 1), text, fill=_TEXT, font=font)
        label_part = np.asarray(img, dtype=np.float32)[:, :label_w] / 255.0
        canvas[:, :label_w] = label_part  # only the label column is re-quantised; images stay exact
    return torch.from_numpy(canvas).unsqueeze(0)


# ------------------------------------------------------------------------------------------------- table
def table_image(rows: Sequence[Sequence[str]], *, header: Sequence[str] = ("measure", "value", "on"),
                pad: int = 8) -> torch.Tensor:
    """A small table of text ``rows`` (each as many cells as ``header``) as ``[1, H, W, 3]`` in 0..1."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    table = [list(header)] + [[str(c) for c in r] for r in rows]
    cols = max(len(r) for r in table)
    table = [r + [""] * (cols - len(r)) for r in table]
    widths = [max(_text_size(probe, r[c], font)[0] for r in table) for c in range(cols)]
    th = max(_text_size(probe, "Ag", font)[1], 1)
    line = th + pad
    width = sum(widths) + pad * (cols + 1)
    img = Image.new("RGB", (max(width, 64), line * len(table) + pad), _BG)
    draw = ImageDraw.Draw(img)
    for i, r in enumerate(table):
        y = pad // 2 + i * line
        if i == 1:
            draw.line([(0, y - pad // 4), (img.width, y - pad // 4)], fill=_AXIS)
        x = pad
        for c, cell in enumerate(r):
            draw.text((x, y), cell, fill=_TEXT if i else _SMOOTH, font=font)
            x += widths[c] + pad
    return _to_tensor(img)
