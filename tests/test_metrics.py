"""Distribution metrics (FD, KID, IS, cosines) against closed forms, and the FID Inception network's loading.

The Inception tests build the real architecture with random weights (no download): what they check is the layout
the FID weights file must load into, the preprocessing, the outputs' shapes, and that wrong or unsafe files are
refused with a message naming the right file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_finetune.core.errors import FinetuneError
from comfy_finetune.core.safeio import UnsafeFileError
from comfy_finetune.scoring import metrics
from comfy_finetune.scoring.inception import (
    FIDInception,
    _avg_pool_same,
    inception_features,
    load_fid_inception,
)
from comfy_finetune.scoring.metrics import cosine_matrix, frechet_distance, inception_score, kernel_inception_distance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _exact_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased (n - 1) sample covariance are exactly ``mean`` and ``cov``."""
    d = mean.shape[0]
    z = torch.randn(n, d, generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = torch.linalg.solve_triangular(whiten, z.T, upper=False).T  # sample covariance now exactly I
    return z @ torch.linalg.cholesky(cov).T + mean


def _closed_form_fd(mu_a, s_a, mu_b, s_b) -> float:
    """FD from the parameters, by another route: tr sqrt(S_a S_b) = sum sqrt(eigenvalues of the product)."""
    eig = torch.linalg.eigvals(s_a @ s_b).real.clamp(min=0)
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * eig.sqrt().sum())


def _random_cov(d: int, seed: int) -> torch.Tensor:
    m = torch.randn(d, d, generator=_gen(seed), dtype=torch.float64)
    return m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ Fréchet distance


def test_fd_of_a_set_with_itself_is_zero_and_a_shift_costs_its_squared_length():
    x = torch.randn(400, 32, generator=_gen(0), dtype=torch.float64) * 5 + 3
    scale = float(x.var(0).sum())
    assert abs(frechet_distance(x, x)) < 1e-6 * scale
    shift = torch.linspace(-1, 2, 32, dtype=torch.float64)
    # same covariance: only the mean term remains
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)


def test_fd_equals_the_closed_form_on_samples_with_exact_moments():
    """Sample moments set exactly (unbiased covariance), non-commuting covariances: FD is the closed form."""
    mu_a = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    mu_b = torch.tensor([1.0, 1.0, 0.0, -0.5, 2.0], dtype=torch.float64)
    s_a, s_b = _random_cov(5, 1), _random_cov(5, 2)
    assert not torch.allclose(s_a @ s_b, s_b @ s_a), "the covariances must not commute for this test"
    a = _exact_moments(50, mu_a, s_a, seed=3)
    b = _exact_moments(80, mu_b, s_b, seed=4)
    want = _closed_form_fd(mu_a, s_a, mu_b, s_b)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    # a (N) denominator instead of (N - 1) would scale the covariances by 49/50 and 79/80: detectably different
    assert abs(_closed_form_fd(mu_a, s_a * 49 / 50, mu_b, s_b * 79 / 80) - want) > 1e-3 * want


def test_fd_of_two_gaussians_approaches_the_closed_form():
    mu_a = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    mu_b = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=torch.float64)
    var_a = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    var_b = torch.tensor([2.0, 1.0, 1.0, 0.7], dtype=torch.float64)
    a = torch.randn(20000, 4, generator=_gen(5), dtype=torch.float64) * var_a.sqrt() + mu_a
    b = torch.randn(20000, 4, generator=_gen(6), dtype=torch.float32) * var_b.float().sqrt() + mu_b.float()
    # diagonal covariances: tr sqrt(S_a S_b) = sum sqrt(s_a s_b)
    want = float((mu_a - mu_b).square().sum() + (var_a + var_b - 2 * (var_a * var_b).sqrt()).sum())
    assert want == pytest.approx(6.5707, abs=1e-3)
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.03)


def test_fd_is_symmetric():
    a = torch.randn(300, 8, generator=_gen(7)) @ torch.randn(8, 8, generator=_gen(8))
    b = torch.randn(200, 8, generator=_gen(9)) * 2 + 1
    ab, ba = frechet_distance(a, b), frechet_distance(b, a)
    assert ab > 1
    assert ab == pytest.approx(ba, rel=1e-8)


def test_fd_with_more_dimensions_than_samples():
    """N < D: singular covariances; the result is finite, and round-off in the zero eigenvalues cancels."""
    x = torch.randn(10, 64, generator=_gen(10), dtype=torch.float64)
    y = torch.randn(12, 64, generator=_gen(11), dtype=torch.float64) * 1.5
    scale = float(x.var(0).sum())
    fd = frechet_distance(x, y)
    assert math.isfinite(fd) and fd > 1
    assert frechet_distance(x, x) < 1e-6 * scale
    shift = torch.full((64,), 0.25, dtype=torch.float64)
    # 55 zero eigenvalues: unless their round-off is dropped, their square roots add up to ~1e-6 of the result
    assert frechet_distance(x, x + shift) == pytest.approx(64 * 0.25**2, rel=1e-9)


def test_fd_refuses_too_few_samples_and_mismatched_widths():
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.zeros(1, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(torch.randn(10, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="different widths"):
        frechet_distance(torch.randn(10, 4), torch.randn(10, 5))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((3, 2), float("nan")), torch.randn(10, 2))


# ------------------------------------------------------------------------------------------------------ KID


def _naive_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3, pair by pair."""
    x, y = x.double().tolist(), y.double().tolist()
    d, m = len(x[0]), len(x)

    def k(u, v):
        return (sum(p * q for p, q in zip(u, v)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(u, v) for u in x for v in y)
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / (m * m)


def test_kid_equals_the_unbiased_mmd_when_each_subset_is_the_whole_set():
    x = torch.randn(24, 6, generator=_gen(12))
    y = torch.randn(24, 6, generator=_gen(13)) * 1.3 + 0.4
    mean, std = kernel_inception_distance(x, y, subsets=5, subset_size=1000)
    assert mean == pytest.approx(_naive_mmd2(x, y), rel=1e-9)
    assert std < 1e-9 * abs(mean)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shifted_one():
    a = torch.randn(400, 16, generator=_gen(14))
    b = torch.randn(400, 16, generator=_gen(15))
    mean, std = kernel_inception_distance(a, b, subsets=50, subset_size=200)
    assert std > 0
    assert abs(mean) < 3 * std
    shifted, s_std = kernel_inception_distance(a, b + 0.5, subsets=50, subset_size=200)
    assert shifted > 0.3 and shifted > 10 * s_std


def test_kid_is_deterministic_for_a_seed_and_both_kernel_paths_agree(monkeypatch):
    a = torch.randn(120, 8, generator=_gen(16))
    b = torch.randn(90, 8, generator=_gen(17)) + 0.2
    first = kernel_inception_distance(a, b, subsets=20, subset_size=50, seed=3)
    again = kernel_inception_distance(a, b, subsets=20, subset_size=50, seed=3)
    other = kernel_inception_distance(a, b, subsets=20, subset_size=50, seed=4)
    assert first == pytest.approx(again, rel=1e-12)
    assert abs(first[0] - other[0]) > 1e-9
    monkeypatch.setattr(metrics, "_FULL_KERNEL_MAX_ENTRIES", 0)  # per-subset kernels, same subsets
    assert kernel_inception_distance(a, b, subsets=20, subset_size=50, seed=3) == pytest.approx(first, rel=1e-9)


def test_kid_needs_subsets_of_two():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(torch.randn(1, 4), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(torch.randn(10, 4), torch.randn(10, 4), subset_size=1)


# -------------------------------------------------------------------------------------------- Inception Score


def test_is_of_uniform_predictions_is_one():
    mean, std = inception_score(torch.zeros(40, 10))
    assert mean == pytest.approx(1.0, abs=1e-9) and std < 1e-9


def test_is_of_confident_predictions_spread_over_k_classes_is_k():
    k, classes = 5, 12
    logits = torch.zeros(50, classes)
    logits[torch.arange(50), torch.arange(50) % k] = 60.0  # each split of 10 holds every class twice
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(k, rel=1e-6) and std < 1e-6


def test_is_splits_are_consecutive_and_capped_at_n():
    logits = torch.eye(3) * 60
    assert inception_score(logits, splits=1)[0] == pytest.approx(3.0, rel=1e-6)
    assert inception_score(logits, splits=10)[0] == pytest.approx(1.0, rel=1e-6)  # 3 splits of one sample


def test_is_matches_the_definition_on_random_logits():
    logits = torch.randn(30, 7, generator=_gen(18), dtype=torch.float64) * 2
    p = logits.softmax(1)
    py = p.mean(0)
    want = math.exp(float((p * (p.log() - py.log())).sum(1).mean()))
    assert inception_score(logits, splits=1)[0] == pytest.approx(want, rel=1e-9)
    assert 1 < want < 7


# ------------------------------------------------------------------------------------------------- cosines


def test_cosine_matrix():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 3.0], [0.0, -1.0], [5.0, 0.0]])
    c = cosine_matrix(a, b)
    assert c.shape == (2, 3)
    r = math.sqrt(0.5)
    assert torch.allclose(c, torch.tensor([[r, 0.0, 1.0], [r, -1.0, 0.0]], dtype=c.dtype), atol=1e-12)


# ---------------------------------------------------------------------------------------- the FID Inception


@pytest.fixture(scope="module")
def fid_state_dict():
    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():  # keep activations O(1) through 94 layers (the default init shrinks them to ~0)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model.state_dict()


@pytest.fixture(scope="module")
def fid_file(fid_state_dict, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(fid_state_dict, path)
    return path


def test_the_layout_is_the_fid_inception_v3():
    model = FIDInception()
    sd = model.state_dict()
    shapes = {k: list(v.shape) for k, v in sd.items()}
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision's 27_161_264 less aux, 1008 classes
    assert sum(k.endswith(".conv.weight") for k in sd) == 94
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert shapes["fc.weight"] == [1008, 2048] and shapes["fc.bias"] == [1008]
    assert shapes["Conv2d_1a_3x3.conv.weight"] == [32, 3, 3, 3]
    assert shapes["Conv2d_4a_3x3.bn.running_var"] == [192]
    assert shapes["Mixed_5b.branch_pool.conv.weight"] == [32, 192, 1, 1]
    assert shapes["Mixed_5d.branch_pool.conv.weight"] == [64, 288, 1, 1]
    assert shapes["Mixed_6a.branch3x3.conv.weight"] == [384, 288, 3, 3]
    assert shapes["Mixed_6e.branch7x7dbl_5.conv.weight"] == [192, 192, 1, 7]
    assert shapes["Mixed_7a.branch7x7x3_4.conv.weight"] == [192, 192, 3, 3]
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == [384, 384, 3, 1]
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == [192, 2048, 1, 1]


def test_pools_follow_tensorflow():
    """The FID network's average pools ignore the padding; Mixed_7c's pool branch takes the maximum."""
    ones = torch.ones(1, 2, 5, 5)
    assert torch.equal(_avg_pool_same(ones), ones)  # counting the zero padding would give 4/9 in the corners
    model = FIDInception().eval()
    x = torch.randn(1, 2048, 8, 8, generator=_gen(19))
    seen = {}
    model.Mixed_7c.branch_pool.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    with torch.inference_mode():
        model.Mixed_7c(x)
    assert torch.allclose(seen["x"], torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1))


def test_load_fid_inception_strict(fid_file, fid_state_dict, tmp_path):
    model = load_fid_inception(fid_file)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    got = model.state_dict()
    assert set(got) == set(fid_state_dict)
    assert torch.equal(got["Mixed_6c.branch7x7_2.conv.weight"], fid_state_dict["Mixed_6c.branch7x7_2.conv.weight"])
    # safetensors conversions load too, with or without BatchNorm's num_batches_tracked counters
    st = tmp_path / "fid_inception.safetensors"
    save_file({k: v for k, v in fid_state_dict.items() if not k.endswith("num_batches_tracked")}, str(st))
    again = load_fid_inception(st)
    assert torch.equal(again.fc.weight, fid_state_dict["fc.weight"])


def test_inception_features(fid_file):
    model = load_fid_inception(fid_file)
    images = torch.rand(2, 64, 64, 3, generator=_gen(20))
    feats, logits = inception_features(model, images)
    assert feats.shape == (2, 2048) and logits.shape == (2, 1008)
    assert feats.dtype == logits.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.isfinite(feats).all() and torch.isfinite(logits).all()
    assert (feats >= 0).all() and feats.std() > 1e-3  # pool3 averages ReLU outputs
    assert (feats[0] - feats[1]).abs().max() > 1e-4
    assert torch.allclose(logits, feats @ model.fc.weight.T + model.fc.bias, rtol=1e-4, atol=1e-4)
    one_by_one, _ = inception_features(model, images, batch_size=1)
    assert torch.allclose(one_by_one, feats, rtol=1e-4, atol=1e-5)


def test_preprocess_resizes_to_299_and_scales_to_minus_one_one():
    for value, want in ((0.0, -1.0), (0.5, 0.0), (1.0, 1.0)):
        x = FIDInception.preprocess(torch.full((1, 3, 64, 48), value))
        assert x.shape == (1, 3, 299, 299)
        assert torch.allclose(x, torch.full_like(x, want), atol=1e-6)
    ramp = torch.linspace(0, 1, 299).expand(1, 3, 299, 299)
    assert torch.allclose(FIDInception.preprocess(ramp), 2 * ramp - 1, atol=1e-6)  # 299 in: no resampling


def _refused(path: Path) -> FinetuneError:
    with pytest.raises(FinetuneError) as exc:
        load_fid_inception(path, node="FID", input="inception_weights")
    err = exc.value
    assert err.node == "FID" and err.input == "inception_weights" and "input 'inception_weights'" in str(err)
    return err


def test_a_renamed_key_is_refused(fid_state_dict, tmp_path):
    sd = dict(fid_state_dict)
    sd["Mixed_6b.branch7x7_1.conv.weight_renamed"] = sd.pop("Mixed_6b.branch7x7_1.conv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    err = _refused(path)
    assert not isinstance(err, UnsafeFileError)
    assert "pt_inception-2015-12-05" in err.fix
    assert "Mixed_6b.branch7x7_1.conv.weight'" in err.detail and "weight_renamed" in err.detail


def test_a_torchvision_imagenet_inception_is_refused(fid_state_dict, tmp_path):
    sd = {k: v for k, v in fid_state_dict.items() if not k.startswith("fc.")}
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    sd["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "inception_v3_google.safetensors"
    save_file(sd, str(path))
    err = _refused(path)
    assert "pt_inception-2015-12-05" in err.fix
    assert "fc.weight [1000, 2048] (expected [1008, 2048])" in err.detail
    assert "AuxLogits" in err.detail and "torchvision" in err.detail


class _Payload:
    """Unpickling this would create ``marker``: the file appears only if the loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_code_is_refused_unrun(fid_state_dict, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "trap.pth"
    torch.save({"fc.weight": fid_state_dict["fc.weight"], "trap": _Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match="trap.pth"):
        load_fid_inception(path, node="FID", input="inception_weights")
    assert not marker.exists()


def test_other_contents_are_refused(tmp_path):
    plain = tmp_path / "numbers.pt"
    torch.save({"fc.weight": torch.zeros(2), "steps": 3}, plain)
    detail = _refused(plain).detail
    assert "'steps'" in detail and "not named tensors" in detail
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    assert "list" in _refused(listed).detail
    other = tmp_path / "weights.npz"
    other.write_bytes(b"\0")
    assert "unsupported file type" in _refused(other).detail
