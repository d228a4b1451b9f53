"""Membership attacks calibrated by reference models: LiRA (online and offline) and RMIA.

Each takes one statistic per sample from the target model and the same statistic from R
reference models, each trained like the target on a seeded random half of the target's
audit pool (its members and non-members), with `in_mask[r, i]` saying whether sample i
was in reference r's half. Scores follow memray's convention: higher = more likely a
member. Only numpy and scipy: the statistics come from the per-sample files of the
trials (`memray.scoring.TokenStats.loss` of every sample, every epoch).

The per-sample statistic of a language model:
- LiRA: the logit-scaled confidence of Carlini et al. 2022, with the sample's confidence
  taken as its geometric-mean token probability p = exp(-loss):
  phi = log(p / (1 - p)) (`logit_confidence`). phi is monotone in the mean
  log-likelihood, and near-Gaussian across models as LiRA assumes.
- RMIA: that same p as Pr(x | model) (a length-normalized likelihood, so that samples of
  different lengths compare).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

#: LiRA's variance: one per sample needs many references (Carlini et al. use one variance
#: shared by all samples below 64 reference models); memray's sweeps have few, so it is shared.
LIRA_FIX_VARIANCE = True
#: RMIA's threshold on the pairwise likelihood ratio (Zarifzadeh et al. 2024 use gamma = 1
#: for most of their results)
RMIA_GAMMA = 1.0
#: RMIA offline: Pr(x) from out-models alone is rescaled as ((1 + a) Pr_out(x) + (1 - a)) / 2;
#: the paper tunes a per dataset on reference models, 0.3 is its CIFAR-10 value
RMIA_OFFLINE_A = 0.3
MIN_STD = 1e-6  # a Gaussian fit to identical statistics: no spread, not a division by 0


def confidence(losses: np.ndarray) -> np.ndarray:
    """Geometric-mean token probability exp(-loss) of each sample (losses in nats/token)."""
    return np.exp(-np.asarray(losses, dtype=np.float64))


def logit_confidence(losses: np.ndarray) -> np.ndarray:
    """LiRA's statistic: log(p / (1 - p)) with p = exp(-loss), computed stably (-loss -
    log(1 - exp(-loss))); a loss of 0 (p = 1) is clipped to 1e-12 nats."""
    losses = np.maximum(np.asarray(losses, dtype=np.float64), 1e-12)
    return -losses - np.log(-np.expm1(-losses))


def _check(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    if target.ndim != 1 or reference.ndim != 2 or reference.shape != in_mask.shape or reference.shape[1] != len(target):
        raise ValueError(f"target statistics {target.shape}, reference statistics {reference.shape} and in_mask "
                         f"{in_mask.shape} must be (n,), (references, n) and (references, n)")
    if not (np.isfinite(target).all() and np.isfinite(reference).all()):
        raise ValueError("reference-attack statistics hold NaN or infinite values")
    return target, reference, in_mask


def _masked_mean_std(values: np.ndarray, mask: np.ndarray, fix_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (column): mean and std of the values where mask holds; the std shared
    over samples (pooled deviations from each sample's mean) when fix_variance."""
    counts = mask.sum(axis=0)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} sample(s) have no reference model on this side (in / out): "
                         "more references are needed")
    means = np.where(mask, values, 0.0).sum(axis=0) / counts
    deviations = np.where(mask, values - means, 0.0)
    if fix_variance:
        dof = max(int(counts.sum() - len(counts)), 1)
        std = np.full(len(counts), np.sqrt((deviations**2).sum() / dof))
    else:
        std = np.sqrt((deviations**2).sum(axis=0) / np.maximum(counts - 1, 1))
    return means, np.maximum(std, MIN_STD)


def lira_online(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray,
                fix_variance: bool = LIRA_FIX_VARIANCE) -> np.ndarray:
    """Online LiRA (Carlini et al. 2022, "Membership Inference Attacks From First
    Principles", https://arxiv.org/abs/2112.03570, Algorithm 1): per sample, Gaussians
    fitted to the statistic under the references that trained on it (in) and those that
    did not (out); the score is the log-likelihood ratio log N(t; in) - log N(t; out).

    target: (n,) statistic of the target (`logit_confidence`); reference: (R, n) the same
    under each reference; in_mask: (R, n) whether sample i was in reference r's half.
    Returns (n,) scores. Every sample needs at least one in and one out reference.
    """
    target, reference, in_mask = _check(target, reference, in_mask)
    mean_in, std_in = _masked_mean_std(reference, in_mask, fix_variance)
    mean_out, std_out = _masked_mean_std(reference, ~in_mask, fix_variance)
    return stats.norm.logpdf(target, mean_in, std_in) - stats.norm.logpdf(target, mean_out, std_out)


def lira_offline(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray,
                 fix_variance: bool = LIRA_FIX_VARIANCE) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022, section VI-C): only the out references, and a
    one-sided test: the score is log Pr[Z < t] for Z ~ N(out), high when the target fits
    the sample better than models that never saw it. Same arguments as `lira_online`."""
    target, reference, in_mask = _check(target, reference, in_mask)
    mean_out, std_out = _masked_mean_std(reference, ~in_mask, fix_variance)
    return stats.norm.logcdf(target, mean_out, std_out)


def rmia(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray, *, online: bool = True,
         gamma: float = RMIA_GAMMA, offline_a: float = RMIA_OFFLINE_A,
         population: np.ndarray | None = None) -> np.ndarray:
    """RMIA (Zarifzadeh, Liu, Shokri, Tramèr 2024, "Low-Cost High-Power Membership
    Inference Attacks", ICML, https://arxiv.org/abs/2312.03262): the likelihood ratio
    Pr(x | target) / Pr(x) of each sample, compared pairwise with that of population
    samples z; the score of x is the share of z with ratio(x) / ratio(z) >= gamma.

    target: (n,) Pr(x | target) (`confidence`); reference: (R, n) the same under each
    reference; in_mask: (R, n) as in `lira_online`. Pr(x) is the mean over all references
    (online: in and out alike, which the paper's half-in sampling makes unbiased), or with
    online=False the out references' mean rescaled by `offline_a`. population: indices of
    the samples used as z (default: all n, each x then compared with the pool including
    itself, which counts 1 at gamma <= 1 for every sample alike). Returns (n,) scores in [0, 1].
    """
    target, reference, in_mask = _check(target, reference, in_mask)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, not {gamma}")
    if online:
        marginal = reference.mean(axis=0)
    else:
        counts = (~in_mask).sum(axis=0)
        if (counts == 0).any():
            raise ValueError(f"{int((counts == 0).sum())} sample(s) have no out reference: offline RMIA needs one")
        out_mean = np.where(~in_mask, reference, 0.0).sum(axis=0) / counts
        marginal = 0.5 * ((1 + offline_a) * out_mean + (1 - offline_a))
    ratio = target / np.maximum(marginal, 1e-300)
    ratio_z = ratio if population is None else ratio[np.asarray(population)]
    # share of z with ratio(x) >= gamma * ratio(z), all x at once through the sorted ratios of z
    sorted_z = np.sort(gamma * ratio_z)
    return np.searchsorted(sorted_z, ratio, side="right") / len(sorted_z)


def half_masks(pool: int, references: int, seed: int) -> np.ndarray:
    """(references, pool) bool: which pool samples each reference trains on. Samples are
    dealt so that each is in exactly half of the references (rounded down when odd), as
    Carlini et al.'s code deals them, so each reference gets about half of the pool;
    seeded by `seed`."""
    if references < 2:
        raise ValueError(f"reference attacks need at least 2 references (one in, one out per sample), not {references}")
    rng = np.random.default_rng(seed)
    # each column gets references // 2 in-slots at random rows: rank random keys per column
    keys = rng.random((references, pool))
    order = np.argsort(np.argsort(keys, axis=0), axis=0)
    return order < references // 2
