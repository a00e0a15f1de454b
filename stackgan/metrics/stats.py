"""Feature statistics that add up across ranks: Gaussian fits (Frechet distance) and
Inception Score sums. Everything is kept as float64 sums so that ranks can all-reduce them
and the final numbers are computed once from the totals."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .core import all_sum


class GaussianSums:
    """Running sum, sum of outer products and count of feature vectors."""

    def __init__(self, dim: int):
        self.dim = dim
        self.s = torch.zeros(dim, dtype=torch.float64)
        self.ss = torch.zeros(dim, dim, dtype=torch.float64)
        self.n = torch.zeros((), dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.detach().to("cpu", torch.float64).reshape(len(feats), -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have dim {f.shape[1]}, expected {self.dim}")
        self.s += f.sum(0)
        self.ss += f.T @ f
        self.n += len(f)

    def reduce(self) -> "GaussianSums":
        """Totals over all ranks (a new object; this one is unchanged)."""
        t = all_sum({"s": self.s, "ss": self.ss, "n": self.n})
        out = GaussianSums(self.dim)
        out.s, out.ss, out.n = t["s"], t["ss"], t["n"]
        return out

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        n = float(self.n)
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, have {int(n)}")
        mu = (self.s / n).numpy()
        cov = (self.ss.numpy() - n * np.outer(mu, mu)) / (n - 1)
        return mu, (cov + cov.T) / 2


def _one_blas_thread():
    """Single-threaded BLAS for the small eigen-problems here: multi-threaded OpenBLAS can
    be 50x slower on a busy machine (threads spin waiting for cores). No-op without
    threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the distance FID uses.

    Tr((C1 C2)^(1/2)) is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix C1^(1/2) C2 C1^(1/2) (the same spectrum as C1 C2), taken on the range of C1: exact,
    one symmetric eigen-decomposition, and stable where ``scipy.linalg.sqrtm`` of the product
    is slow and inaccurate (the singular covariances of fewer samples than dimensions)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    c1, c2 = np.atleast_2d(cov1).astype(np.float64), np.atleast_2d(cov2).astype(np.float64)
    if mu1.shape != mu2.shape or c1.shape != c2.shape or c1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, cov {c1.shape} vs {c2.shape}")
    diff = mu1 - mu2
    with _one_blas_thread():
        w, v = np.linalg.eigh((c1 + c1.T) / 2)
        keep = w > max(w.max(), 0.0) * 1e-12  # C1's range: a covariance of n < dim samples is low rank
        half = v[:, keep] * np.sqrt(w[keep])  # C1^(1/2) restricted to its range
        m = half.T @ c2 @ half
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(diff @ diff + np.trace(c1) + np.trace(c2) - 2 * tr_covmean, 0.0))


def frechet_distance_of_samples(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between the Gaussian fits of two sample sets (rows = samples).

    With fewer samples than dimensions the covariances are low rank and
    Tr((C1 C2)^(1/2)) is the nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1)) (A = centred
    samples): an n1 x n2 problem instead of a dim x dim one."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (n >= 2, dim) sample sets of the same dim, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) >= a.shape[1]:
        return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    ca, cb = a - a.mean(0), b - b.mean(0)
    k = (len(a) - 1) * (len(b) - 1)
    with _one_blas_thread():
        tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / np.sqrt(k)
    diff = a.mean(0) - b.mean(0)
    tr = (ca * ca).sum() / (len(a) - 1) + (cb * cb).sum() / (len(b) - 1)
    return float(max(diff @ diff + tr - 2 * tr_covmean, 0.0))


class ISSums:
    """Per-split sums for the Inception Score: sum of p(y|x), sum of sum_y p log p, count."""

    def __init__(self, splits: int, classes: int):
        self.p = torch.zeros(splits, classes, dtype=torch.float64)
        self.plogp = torch.zeros(splits, dtype=torch.float64)
        self.n = torch.zeros(splits, dtype=torch.float64)

    def add(self, logits: torch.Tensor, split_of: torch.Tensor) -> None:
        """``logits`` (B, C); ``split_of`` (B,) long: the split each image belongs to."""
        logp = torch.log_softmax(logits.detach().to("cpu", torch.float64), dim=1)
        p = logp.exp()
        idx = split_of.to("cpu", torch.long)
        self.p.index_add_(0, idx, p)
        self.plogp.index_add_(0, idx, (p * logp).sum(1))
        self.n.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def reduce(self) -> "ISSums":
        t = all_sum({"p": self.p, "plogp": self.plogp, "n": self.n})
        out = ISSums(*self.p.shape)
        out.p, out.plogp, out.n = t["p"], t["plogp"], t["n"]
        return out

    def score(self) -> tuple[float, float]:
        """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), as in the IS paper's code."""
        if (self.n <= 0).any():
            raise ValueError("every Inception Score split needs at least one image")
        pbar = self.p / self.n[:, None]
        ent_marg = torch.special.xlogy(pbar, pbar).sum(1)  # sum_y pbar log pbar
        kl = self.plogp / self.n - ent_marg
        scores = torch.exp(kl).numpy()
        return float(scores.mean()), float(scores.std())


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """IS of a set of logits in one process (contiguous splits, the usual protocol)."""
    n = len(logits)
    acc = ISSums(splits, logits.shape[1])
    acc.add(logits, torch.arange(n) * splits // n)
    return acc.score()
