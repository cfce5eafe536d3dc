"""Evaluation metrics for generated audio: FAD, KID, classifier scores, diversity.

* **FAD** (Kilgour et al. 2019, "Fréchet Audio Distance"): the Fréchet distance between Gaussians fitted to
  two sets of embeddings (Dowson & Landau 1982),
  ``||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``. Values depend on the encoder: they are only
  comparable between runs that used the same encoder (report its name with every value).
* **KID** (Binkowski et al. 2018; seed 003, eq. 3): the unbiased estimator of MMD^2 with the inverse
  multi-quadratic kernel ``k(x, y) = 1 / (1 + ||x - y||^2 / (2 gamma^2))``, ``gamma^2 = 8`` (Rustamov 2019),
  averaged over random subsets and reported as mean ± std.
* **Classifier scores** (seed 002): top-k accuracy and mAP@10 of a class classifier's ranking (the CLAP
  evaluation convention: AP of a single relevant label = 1/rank if rank <= 10 else 0), and the Inception
  Score analogue ``exp(E_x[KL(p(y|x) || p(y))])`` (Salimans et al. 2016; seed 003, eq. 2).
* **Diversity**: mean pairwise cosine distance between clips of one class in an embedding space; the
  evaluation reports it for generated clips as a ratio to the same figure on real clips.
* **Level**: each clip's RMS level in dB full scale; the evaluation reports the mean of the generated clips'
  levels minus the mean of the real clips' (0 dB = as loud as real clips). Embedding metrics can miss it: an
  encoder trained with gain augmentation is nearly gain-invariant.

All functions take numpy arrays (or anything ``np.asarray`` accepts) and return Python floats / dicts.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg

__all__ = ["gaussian_stats", "frechet_distance", "fad", "imq_kernel", "mmd2_unbiased", "kid",
           "top_k_accuracy", "map_at_k", "class_ranks", "inception_score", "mean_pairwise_cosine_distance",
           "diversity_ratio", "rms_dbfs", "mean_level_db", "level_gap_db", "KID_GAMMA2"]

KID_GAMMA2 = 8.0


def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples, features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


# ---------------------------------------------------------------------------------------------- FAD
def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, ``ddof=1``) covariance of the rows of ``x`` (N, D); N >= 2."""
    x = _as_2d(x, "embeddings")
    if len(x) < 2:
        raise ValueError(f"need at least 2 embeddings to estimate a covariance, got {len(x)}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _sqrtm_trace(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    """tr((S1 S2)^{1/2}), numerically stable.

    First ``scipy.linalg.sqrtm(S1 @ S2)``; if that is not finite, or has a non-negligible imaginary part
    (near-singular covariances, e.g. fewer samples than dimensions), retry with ``eps * I`` added to both
    (FID's standard fix); if that still fails, use the symmetric form tr((S1^{1/2} S2 S1^{1/2})^{1/2})
    through eigen-decompositions, which is exact for PSD matrices and always real."""
    def attempt(a, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = scipy.linalg.sqrtm(a @ b)
        if isinstance(out, tuple):             # older scipy returns (sqrtm, errest) with disp=False
            out = out[0]
        if not np.all(np.isfinite(out)):
            return None
        if np.iscomplexobj(out):
            if np.max(np.abs(out.imag)) > 1e-3 * max(1.0, np.max(np.abs(out.real))):
                return None
            out = out.real
        return float(np.trace(out))

    tr = attempt(s1, s2)
    if tr is None:
        off = eps * np.eye(len(s1))
        tr = attempt(s1 + off, s2 + off)
    if tr is None:
        w1, v1 = np.linalg.eigh((s1 + s1.T) / 2)
        r1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
        m = r1 @ s2 @ r1
        w = np.linalg.eigvalsh((m + m.T) / 2)
        tr = float(np.sum(np.sqrt(np.clip(w, 0, None))))
    return tr


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes disagree: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    tr = _sqrtm_trace(s1, s2, eps)
    d = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr)
    return max(d, 0.0)          # rounding can leave a tiny negative number for identical Gaussians


def fad(x, y, eps: float = 1e-6) -> float:
    """Fréchet Audio Distance between two embedding sets (N1, D) and (N2, D) (Kilgour et al. 2019).

    Identical sets give 0. Only comparable between runs that used the same encoder."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding sizes differ: {x.shape[1]} vs {y.shape[1]} (same encoder needed)")
    return frechet_distance(*gaussian_stats(x), *gaussian_stats(y), eps=eps)


# ---------------------------------------------------------------------------------------------- KID
def imq_kernel(x, y, gamma2: float = KID_GAMMA2) -> np.ndarray:
    """Inverse multi-quadratic kernel matrix ``1 / (1 + ||x_i - y_j||^2 / (2 gamma^2))`` (seed 003)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return 1.0 / (1.0 + np.maximum(d2, 0.0) / (2.0 * gamma2))


def mmd2_unbiased(x, y, gamma2: float = KID_GAMMA2) -> float:
    """Unbiased MMD^2 estimator (Gretton et al. 2012; seed 003 eq. 3) with the IMQ kernel."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 samples per set, got {m} and {n}")
    kxx, kyy, kxy = imq_kernel(x, x, gamma2), imq_kernel(y, y, gamma2), imq_kernel(x, y, gamma2)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(x, y, subsets: int = 100, subset_size: int | None = None, gamma2: float = KID_GAMMA2,
        seed: int = 0) -> dict:
    """Kernel (Inception) Distance (Binkowski et al. 2018): the unbiased MMD^2 with the IMQ kernel over
    ``subsets`` random subsets drawn without replacement from each set, reported as mean and std.

    ``subset_size`` defaults to ``min(1000, min(|x|, |y|) // 2)`` so that the subsets really differ (a
    subset as large as the set would always be the whole set and give a std of 0); an explicit size is
    capped at ``min(|x|, |y|)``. Returns ``{"mean", "std", "subsets", "subset_size"}``."""
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding sizes differ: {x.shape[1]} vs {y.shape[1]} (same encoder needed)")
    if int(subsets) < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    smallest = min(len(x), len(y))
    if smallest < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    size = min(1000, max(2, smallest // 2)) if subset_size is None else min(int(subset_size), smallest)
    if size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(int(subsets)):
        xi = rng.choice(len(x), size, replace=False)
        yi = rng.choice(len(y), size, replace=False)
        vals.append(mmd2_unbiased(x[xi], y[yi], gamma2))
    vals = np.asarray(vals)
    return {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
            "subsets": int(subsets), "subset_size": int(size)}


# ------------------------------------------------------------------------------ classifier scores
def _scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N, K), got shape {s.shape}")
    y = np.asarray(labels)
    if y.shape != (len(s),):
        raise ValueError(f"labels must have shape ({len(s)},), got {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"labels must be in [0, {s.shape[1] - 1}]")
    return s, y.astype(np.int64)


def class_ranks(scores, labels) -> np.ndarray:
    """0-based rank of the true class in each row's descending ranking (ties: lower class index first)."""
    s, y = _scores_labels(scores, labels)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.argmax(order == y[:, None], axis=1)


def top_k_accuracy(scores, labels, k: int = 1) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (seed 002: "CA Top k")."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    r = class_ranks(scores, labels)
    return float(np.mean(r < k)) if len(r) else float("nan")


def map_at_k(scores, labels, k: int = 10) -> float:
    """mAP@k for single-label ranking (seed 002: "CA mAP10"): mean of 1/(rank+1) if rank < k else 0."""
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    r = class_ranks(scores, labels)
    return float(np.mean(np.where(r < k, 1.0 / (r + 1.0), 0.0))) if len(r) else float("nan")


def inception_score(probs, eps: float = 1e-12) -> float:
    """``exp(E_x[KL(p(y|x) || p(y))])`` with p(y) the mean prediction (seed 003 eq. 2).

    1 for a constant prediction; K for confident predictions spread uniformly over K classes."""
    p = np.asarray(probs, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs must be a non-empty (N, K) array, got shape {p.shape}")
    if np.any(p < -1e-9) or not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError("probs rows must be probability distributions (non-negative, summing to 1)")
    p = np.clip(p, 0.0, 1.0)
    py = p.mean(axis=0, keepdims=True)
    kl = np.sum(np.where(p > 0, p * (np.log(p + eps) - np.log(py + eps)), 0.0), axis=1)
    return float(math.exp(float(np.mean(kl))))


# ------------------------------------------------------------------------------------- diversity
def mean_pairwise_cosine_distance(emb) -> float:
    """Mean of ``1 - cos(e_i, e_j)`` over all pairs i < j (rows are normalised here); NaN for < 2 rows."""
    e = _as_2d(emb, "embeddings")
    n = len(e)
    if n < 2:
        return float("nan")
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    g = e @ e.T
    return float(1.0 - (g.sum() - np.trace(g)) / (n * (n - 1)))


def diversity_ratio(generated, real) -> dict:
    """Diversity of generated clips relative to real ones (1 = as diverse as the real data)."""
    dg, dr = mean_pairwise_cosine_distance(generated), mean_pairwise_cosine_distance(real)
    ratio = dg / dr if (np.isfinite(dg) and np.isfinite(dr) and dr > 0) else float("nan")
    return {"generated": dg, "real": dr, "ratio": ratio}


# ------------------------------------------------------------------------------------- level
def rms_dbfs(waves, floor_db: float = -120.0) -> np.ndarray:
    """RMS level of each clip (rows of ``waves``) in dB full scale (a full-scale sine is -3.01 dB), floored at
    ``floor_db`` so silent clips stay finite."""
    w = _as_2d(waves, "waves")
    if w.size == 0:
        raise ValueError(f"waves must hold at least one non-empty clip, got shape {w.shape}")
    rms = np.sqrt(np.mean(w * w, axis=1))
    return np.maximum(20.0 * np.log10(np.maximum(rms, 1e-300)), floor_db)


def mean_level_db(waves) -> float:
    """Mean of the clips' RMS levels in dBFS (the quantity the level gap compares)."""
    return float(np.mean(rms_dbfs(waves)))


def level_gap_db(generated, real) -> float:
    """Mean RMS level (dBFS) of the generated clips minus that of the real clips (negative: quieter)."""
    return mean_level_db(generated) - mean_level_db(real)
