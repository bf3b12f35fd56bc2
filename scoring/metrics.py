"""Distribution metrics on feature arrays: Fréchet distance, KID, Inception Score and cosine similarities.

Every function takes ``torch`` tensors (any float dtype, any device), moves them to the CPU and computes in float64.
Inputs must be finite; sizes that make an estimator undefined raise :class:`ValueError` saying what is needed.

**Fréchet distance** (FID when the features are Inception v3 pool3 features). Two sets of features ``a`` [N, D] and
``b`` [M, D] are modelled as Gaussians with their sample means ``mu`` and *unbiased* sample covariances
``S = (X - mu)^T (X - mu) / (N - 1)``; the Fréchet (2-Wasserstein) distance between the Gaussians is::

    FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

``S_a S_b`` is not symmetric, but it is similar to the symmetric PSD matrix ``S_a^(1/2) S_b S_a^(1/2)`` (conjugate by
``S_a^(1/2)``), so both have the same non-negative eigenvalues and ``tr((S_a S_b)^(1/2))`` is the sum of the square
roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``. ``S_a^(1/2)`` comes from a symmetric eigendecomposition
with negative eigenvalues clamped to 0, and the eigenvalues of the product are clamped to >= 0 too: no complex
square roots, no scipy, and rank-deficient covariances (D > N, e.g. 2048-d features of 100 images) are fine. In both
eigendecompositions eigenvalues below ``D * eps * max eigenvalue`` count as 0: they are float64 round-off of true
zeros (a rank-deficient covariance has D - N + 1 of them), and their square roots (~1e-8 of the scale each) would
otherwise add up to an error of ~1e-7 of the scale instead of ~1e-12. Both sets need at least 2 samples (the
unbiased covariance divides by N - 1). The result is clamped to >= 0. FD on DINOv2 features is called FD-DINOv2
(Stein et al. 2023).

**Kernel Inception Distance** (Binkowski et al. 2018, as torch-fidelity and clean-fid compute it): the squared MMD
with the polynomial kernel ``k(x, y) = (x . y / D + 1)^3``, by its unbiased estimator on two samples of size m::

    MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
              - 2 sum_{i, j} k(x_i, y_j) / m^2

averaged over ``subsets`` random subsets, each drawn without replacement from each set with
``m = min(subset_size, N, M)``, by a ``torch.Generator`` seeded with ``seed`` (same inputs and seed, same subsets).
Returns (mean, std) over the subsets; std is the population std (divides by ``subsets``), as those libraries report.
Being unbiased, the estimate can be slightly negative for two samples of one distribution. Needs m >= 2.

**Inception Score** (Salimans et al. 2016): ``IS = exp(E_x KL(p(y|x) || p(y)))`` where ``p(y|x)`` is the softmax of
a sample's class logits and ``p(y)`` the mean of ``p(y|x)`` over the split. The N samples are cut in order into
``min(splits, N)`` nearly equal consecutive splits; returns (mean, population std) of the per-split scores. IS lies
in [1, C] for C classes: 1 when every prediction is the same (or uniform), C when predictions are confident and
spread evenly over all C classes. All logit columns given are used; which columns (the FID Inception network has
1008 outputs, ImageNet has 1000 classes) and whether the classifier bias is applied are the caller's convention, and
published IS values differ between conventions.

**Comparability.** FID, KID, IS and FD-DINOv2 values depend on the feature extractor (network, weights, resizing
and input scaling) and on the number of samples: FID and KID are biased or noisy at small N (FID's bias shrinks
like 1/N), IS depends on the number of splits. Numbers are comparable only when computed with the same extractor,
the same preprocessing and the same N (and splits / subset settings).

**Cosine matrix**: ``cosine_matrix(a, b)[i, j]`` is the cosine of the angle between rows ``a[i]`` and ``b[j]``
(rows L2-normalised first; an all-zero row has cosine 0 with everything).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["frechet_distance", "kernel_inception_distance", "inception_score", "cosine_matrix"]

#: Precompute the full kernel matrices (instead of one per subset) when they hold at most this many entries.
_FULL_KERNEL_MAX_ENTRIES = 1 << 26


def _features(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-d feature array [N, D], got shape {list(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} has no samples")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has no feature columns (shape {list(x.shape)})")
    x = x.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _same_width(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two feature sets have different widths: {a.shape[1]} and {b.shape[1]} "
                         "(they must come from the same feature extractor)")


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    mu = x.mean(dim=0)
    xc = x - mu
    cov = xc.T @ xc / (x.shape[0] - 1)
    return mu, (cov + cov.T) / 2


def _psd_eigvals(w: Tensor) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix with round-off removed: those below D * eps * max set to 0."""
    tol = float(w.abs().max()) * w.shape[0] * torch.finfo(w.dtype).eps if w.numel() else 0.0
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * _psd_eigvals(w).sqrt()) @ v.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``a`` [N, D] and ``b`` [M, D] (N, M >= 2)."""
    a = _features(a, "a")
    b = _features(b, "b")
    _same_width(a, b)
    for name, x in (("a", a), ("b", b)):
        if x.shape[0] < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 samples in each set (the covariance "
                             f"divides by N - 1); {name} has {x.shape[0]}")
    mu_a, s_a = _mean_cov(a)
    mu_b, s_b = _mean_cov(b)
    root_a = _psd_sqrt(s_a)
    inner = root_a @ s_b @ root_a
    eig = _psd_eigvals(torch.linalg.eigvalsh((inner + inner.T) / 2))
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * eig.sqrt().sum()
    return max(float(fd), 0.0)


def _poly_kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def _mmd2_unbiased(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> float:
    m = kxx.shape[0]
    off_xx = kxx.sum() - kxx.diagonal().sum()
    off_yy = kyy.sum() - kyy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_inception_distance(a: Tensor, b: Tensor, *, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over ``subsets`` random subsets (see the module doc)."""
    a = _features(a, "a")
    b = _features(b, "b")
    _same_width(a, b)
    if int(subsets) < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    n, n_b = a.shape[0], b.shape[0]
    m = min(int(subset_size), n, n_b)
    if m < 2:
        raise ValueError(f"KID needs subsets of at least 2 samples; min(subset_size={subset_size}, N={n}, "
                         f"M={n_b}) = {m}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    full = None
    if (n * n + n_b * n_b + n * n_b <= min(3 * m * m * int(subsets), _FULL_KERNEL_MAX_ENTRIES)):
        # Kernel values do not depend on which subset they are read for: compute each pair once.
        full = (_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b))
    values = []
    for _ in range(int(subsets)):
        ia = torch.randperm(n, generator=gen)[:m]
        ib = torch.randperm(n_b, generator=gen)[:m]
        if full is not None:
            kaa, kbb, kab = full
            values.append(_mmd2_unbiased(kaa[ia][:, ia], kbb[ib][:, ib], kab[ia][:, ib]))
        else:
            x, y = a[ia], b[ib]
            values.append(_mmd2_unbiased(_poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(correction=0))


def inception_score(logits: Tensor, *, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``min(splits, N)`` consecutive splits of exp(E_x KL(p(y|x) || p(y))) from logits [N, C]."""
    logits = _features(logits, "logits")
    if int(splits) < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    n = logits.shape[0]
    scores = []
    for part in torch.tensor_split(logits, min(int(splits), n)):
        log_p = F.log_softmax(part, dim=1)
        log_py = torch.logsumexp(log_p, dim=0) - math.log(part.shape[0])  # log of the split's mean p(y|x)
        kl = (log_p.exp() * (log_p - log_py)).sum(dim=1)
        scores.append(float(kl.mean().exp()))
    s = torch.tensor(scores, dtype=torch.float64)
    return float(s.mean()), float(s.std(correction=0))


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """[N, M] float64 cosines between the rows of ``a`` [N, D] and ``b`` [M, D]."""
    a = _features(a, "a")
    b = _features(b, "b")
    _same_width(a, b)
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
