"""Loss plot and image grid: ComfyUI IMAGE tensors, robust to empty, single-point and NaN input."""

from __future__ import annotations

import math

import pytest
import torch

from comfy_finetune.training.plots import ema, image_grid, loss_plot


def _check_image(img: torch.Tensor, h: int, w: int) -> None:
    assert img.shape == (1, h, w, 3)
    assert img.dtype == torch.float32
    assert torch.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 1.0


def test_ema_basic():
    assert ema([]) == []
    assert ema([2.0]) == [2.0]
    out = ema([1.0, 2.0, 3.0], alpha=0.5)
    assert out == pytest.approx([1.0, 1.5, 2.25])
    flat = ema([0.7] * 10)
    assert flat == pytest.approx([0.7] * 10)


def test_ema_skips_non_finite():
    out = ema([float("nan"), 1.0, float("inf"), 3.0], alpha=0.5)
    assert math.isnan(out[0])
    assert out[1:] == pytest.approx([1.0, 1.0, 2.0])


@pytest.mark.parametrize("losses", [
    [], [0.5], [0.5, 0.5], [float("nan")], [float("nan")] * 3, [1.0, float("nan"), 0.5, float("inf"), 0.25],
    [0.0] * 4, [-1.0, 1.0], [1e-6, 1e3], list(range(1000)),
], ids=["empty", "one", "flat2", "nan", "all-nan", "mixed-nan", "zeros", "negative", "decades", "many"])
def test_loss_plot_shapes_and_range(losses):
    _check_image(loss_plot(losses), 384, 768)


def test_loss_plot_size_and_lrs():
    losses = [1.0 / (i + 1) for i in range(50)]
    img = loss_plot(losses, lrs=[1e-4 * min(1.0, i / 10) for i in range(50)], title="run 1", width=320, height=200)
    _check_image(img, 200, 320)
    # LR given but empty / NaN, and more LRs than losses: still a picture.
    _check_image(loss_plot(losses, lrs=[]), 384, 768)
    _check_image(loss_plot(losses, lrs=[float("nan")] * 50), 384, 768)
    _check_image(loss_plot([0.3], lrs=[1e-4] * 5), 384, 768)
    _check_image(loss_plot([0.3, None, torch.tensor(0.2)], lrs=[None, 1e-4]), 384, 768)  # gaps, 0-d tensors
    # Tiny sizes are clamped, never crash.
    _check_image(loss_plot(losses, width=10, height=10), 120, 160)


def _non_white(img: torch.Tensor) -> int:
    return int((img[0] < 0.99).any(-1).sum())


def test_loss_plot_draws_the_curves():
    noisy = [1.0 + 0.5 * math.sin(i) for i in range(100)]
    flat = [1.0] * 100
    a, b = loss_plot(noisy), loss_plot(flat)
    assert not torch.equal(a, b)
    # The noisy curve covers more pixels than a flat line; the smoothed (bold) line uses its own blue.
    assert _non_white(a) > _non_white(b)
    blue = (a[0, :, :, 2] > 0.6) & (a[0, :, :, 0] < 0.2)
    assert int(blue.sum()) > 100
    empty = loss_plot([])
    assert _non_white(a) > _non_white(empty)


def test_loss_plot_lr_curve_changes_pixels():
    losses = [1.0 / (i + 1) for i in range(30)]
    assert not torch.equal(loss_plot(losses), loss_plot(losses, lrs=[1e-4] * 30))


def test_grid_rows_from_list_with_labels():
    base = torch.rand(3, 16, 20, 3)
    trained = torch.rand(2, 16, 20, 3)
    pad = 4
    plain = image_grid([base, trained], pad=pad)
    # 2 rows x 3 columns of 16x20 cells with padding around and between.
    _check_image(plain, 2 * 16 + 3 * pad, 3 * 20 + 4 * pad)
    labelled = image_grid([base, trained], labels=["base", "trained"], pad=pad)
    assert labelled.shape[1] == plain.shape[1]
    assert labelled.shape[2] > plain.shape[2]  # label column on the left
    extra = labelled.shape[2] - plain.shape[2]
    # Images are copied exactly (no re-quantisation) and labels drew something dark in the label column.
    assert torch.equal(labelled[0, pad:pad + 16, extra + pad:extra + pad + 20], base[0])
    assert (labelled[0, :, :extra] < 0.5).any()


def test_grid_single_tensor_is_near_square():
    img = image_grid(torch.rand(4, 8, 8, 3), pad=2)
    _check_image(img, 2 * 8 + 3 * 2, 2 * 8 + 3 * 2)
    img = image_grid(torch.rand(5, 8, 8, 3), rows=1, pad=0)
    _check_image(img, 8, 40)


def test_grid_odd_inputs():
    # Different sizes, 4 channels, single frame [H, W, C], values out of range, no pad, NaN.
    frames = [torch.rand(1, 8, 10, 4), torch.rand(12, 6, 3) * 3 - 1, torch.full((1, 5, 5, 1), float("nan"))]
    img = image_grid(frames, pad=0)
    _check_image(img, 3 * 12, 10)
    # Fewer labels than rows and an empty label are fine.
    for labels in (["a"], ["a", ""], ["中文", "b", "c", "extra"]):
        out = image_grid(frames, labels=labels)
        assert out.shape[0] == 1 and out.shape[-1] == 3 and out.shape[1] == 3 * 12 + 4 * 4


def test_grid_empty():
    img = image_grid([])
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.numel() > 0
