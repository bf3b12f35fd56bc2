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


# ---------------------------------------------------------------------------------------------- score panel
_LOSSES = [0.2 + 0.3 * math.exp(-i / 40) + 0.02 * math.sin(i) for i in range(120)]
_SCORES = {
    "score": [(s, 0.2 + 0.5 * (1 - math.exp(-s / 40))) for s in range(0, 121, 20)],
    "subject": [(s, 0.1 + 0.7 * (1 - math.exp(-s / 30))) for s in range(0, 121, 20)],
}


def _colour_mask(region: torch.Tensor, rgb: tuple[int, int, int], tol: int = 12) -> torch.Tensor:
    """Pixels of ``region`` ([H, W, 3] in 0..1) within ``tol`` (0..255) of ``rgb`` in every channel."""
    target = torch.tensor(rgb, dtype=torch.float32) / 255.0
    return ((region - target).abs() <= tol / 255.0).all(-1)


def test_loss_plot_without_scores_is_the_plain_chart():
    lrs = [1e-4] * len(_LOSSES)
    for kwargs in ({}, {"lrs": lrs}, {"width": 320, "height": 200, "title": "x"}):
        plain = loss_plot(_LOSSES, **kwargs)
        assert torch.equal(loss_plot(_LOSSES, scores=None, primary=None, **kwargs), plain)
        assert torch.equal(loss_plot(_LOSSES, scores={}, primary="score", **kwargs), plain)


def test_loss_plot_with_scores_adds_a_panel_below():
    plain = loss_plot(_LOSSES, width=600, height=300)
    scored = loss_plot(_LOSSES, width=600, height=300, scores=_SCORES, primary="score")
    _check_image(plain, 300, 600)
    _check_image(scored, 300 + round(0.6 * 300), 600)
    # the loss panel keeps its height; below it, the new panel has drawn something
    assert _non_white(scored[:, 300:]) > 500


def test_score_series_colours_are_in_the_lower_panel():
    from comfy_finetune.training.plots import _SCORE_COLORS

    scored = loss_plot(_LOSSES, scores=_SCORES, primary="score")[0]
    plain = loss_plot(_LOSSES)[0]
    for rgb in _SCORE_COLORS[:2]:  # one colour per series, in the order given
        assert int(_colour_mask(scored[384:], rgb).sum()) > 100, rgb
        assert int(_colour_mask(scored[:384], rgb).sum()) == 0, rgb  # not in the loss panel
        assert int(_colour_mask(plain, rgb).sum()) == 0, rgb
    # the third colour belongs to no series here
    assert int(_colour_mask(scored, _SCORE_COLORS[2]).sum()) == 0
    # the primary series is drawn thicker: more of its colour than when it is not the primary
    one = {"score": _SCORES["score"]}
    bold = loss_plot(_LOSSES, scores=one, primary="score")[0]
    thin = loss_plot(_LOSSES, scores=one, primary="other")[0]
    assert int(_colour_mask(bold, _SCORE_COLORS[0]).sum()) > 1.3 * int(_colour_mask(thin, _SCORE_COLORS[0]).sum())


def test_best_marker_is_drawn_at_its_step_through_both_panels():
    from comfy_finetune.training.plots import _BEST, _SCORE_COLORS

    width, height = 768, 384
    without = loss_plot(_LOSSES, scores=_SCORES, width=width, height=height)[0]
    with_best = loss_plot(_LOSSES, scores=_SCORES, best=(60, 0.6), width=width, height=height)[0]
    _check_image(with_best.unsqueeze(0), height + round(0.6 * height), width)
    # x axis: steps 0..120 between the left (62 px) and right (16 px) margins
    col = round(62 + 60 / 120 * (width - 62 - 16))
    marker = _colour_mask(with_best[:, col - 1:col + 2], _BEST).any(-1)
    assert int(_colour_mask(without[:, col - 1:col + 2], _BEST).any(-1).sum()) == 0
    assert int(marker[:height].sum()) > 40 and int(marker[height:].sum()) > 40  # in both panels
    # the label is in the score legend (top rows of the lower panel), right of the series entries
    legend = slice(height, height + 24)
    label = _colour_mask(with_best[legend, :], _BEST, tol=60)
    assert int(label.sum()) > 20 and int(_colour_mask(without[legend, :], _BEST, tol=60).sum()) == 0
    label_cols = label.any(0).nonzero().flatten()
    for rgb in _SCORE_COLORS[:2]:
        assert int(_colour_mask(with_best[legend, :], rgb).any(0).nonzero().max()) < int(label_cols.min())
    # besides the marker and the label, nothing is red
    rest = with_best.clone()
    rest[:, col - 1:col + 2] = 1.0
    rest[legend] = 1.0
    assert int(_colour_mask(rest, _BEST, tol=60).sum()) == 0
    assert not torch.equal(without, with_best)


def test_scores_with_nan_and_odd_points_do_not_crash():
    nan = float("nan")
    odd = {
        "score": [(0, nan), (10, 0.5), (20, nan), (30, 0.7)],
        "all_nan": [(5, nan), (6, float("inf"))],
        "empty": [],
        "val_loss": [(nan, 0.3), (None, 0.2), (40, "0.1"), (50,)],
    }
    for losses in (_LOSSES, [], [nan] * 5):
        for best in (None, (30, 0.7), (nan, nan), (1000, 0.1)):
            img = loss_plot(losses, scores=odd, best=best, primary="score")
            _check_image(img, 384 + round(0.6 * 384), 768)
    _check_image(loss_plot(_LOSSES, scores={"only_nan": [(1, nan)]}), 384 + round(0.6 * 384), 768)
    _check_image(loss_plot([0.5], scores={"score": [(0, 0.1)]}, best=(0, 0.1), width=10, height=10), 120 + 72, 160)
    # best without scores: the marker on the loss chart, the label in the title line, the picture keeps its size
    _check_image(loss_plot(_LOSSES, best=(60, 0.5)), 384, 768)
    assert not torch.equal(loss_plot(_LOSSES, best=(60, 0.5)), loss_plot(_LOSSES))


def test_best_without_scores_labels_the_title_line():
    from comfy_finetune.training.plots import _BEST

    title_row = slice(0, 20)
    with_best = loss_plot(_LOSSES, best=(60, 0.5))[0, title_row]
    plain = loss_plot(_LOSSES)[0, title_row]
    assert int(_colour_mask(with_best, _BEST, tol=60).sum()) > 20
    assert int(_colour_mask(plain, _BEST, tol=60).sum()) == 0


def test_score_step_zero_widens_the_shared_step_axis():
    """A score taken before training (step 0) moves the loss curve right: both panels share the step axis."""
    from_one = {"score": [(s, 0.5) for s in (20, 40)]}
    from_zero = {"score": [(s, 0.5) for s in (0, 20, 40)]}
    a = loss_plot(_LOSSES[:40], scores=from_one)[0, :384]
    b = loss_plot(_LOSSES[:40], scores=from_zero)[0, :384]
    blue = (25 / 255, 85 / 255, 190 / 255)

    def first_blue_column(img):
        mask = _colour_mask(img, tuple(round(c * 255) for c in blue), tol=30).any(0)
        return int(mask.nonzero()[0])

    assert first_blue_column(b) > first_blue_column(a)
