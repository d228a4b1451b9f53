"""Metrics of membership inference and language modelling: AUC, TPR at fixed FPR, ROC
points, bootstrap intervals of the AUC, perplexity.

Scores follow the attacks' convention (higher = more likely a member) and members are the
positive class. Metric names are the ones of DESIGN.md: `mia/<attack>/auc`,
`mia/<attack>/tpr@1%fpr`, `mia/<attack>/tpr@0.1%fpr`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

#: (metric-name suffix, false-positive rate) reported for every attack
TPR_AT_FPR: tuple[tuple[str, float], ...] = (("tpr@1%fpr", 0.01), ("tpr@0.1%fpr", 0.001))


def _checked(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and is_member {labels.shape} must be 1-D and of the same length")
    if labels.all() or not labels.any():
        raise ValueError("membership metrics need both members and non-members")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} score(s) are NaN or infinite")
    return scores, labels


def roc_auc(scores, is_member) -> float:
    """Area under the ROC curve of `scores` (float array) for `is_member` (bool array)."""
    scores, labels = _checked(scores, is_member)
    return float(roc_auc_score(labels, scores))


def tpr_at_fpr(scores, is_member, fpr: float) -> float:
    """True-positive rate at the lowest threshold whose false-positive rate is <= `fpr`.

    No interpolation between ROC points: the ROC is a step function and this takes the
    best point that does not exceed the FPR budget (the conservative reading, as in Carlini
    et al. 2022's LiRA evaluation). With fewer than 1/fpr non-members the only such point
    may be FPR = 0, so the value is the TPR with no false positive at all.
    """
    scores, labels = _checked(scores, is_member)
    # keep every point: dropping collinear ones would lose points just under the budget
    false_rates, true_rates, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(true_rates[false_rates <= fpr].max())


def roc_points(scores, is_member, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve, thinned to at most
    `max_points` points (the first and last are always kept) for plots and result files."""
    scores, labels = _checked(scores, is_member)
    false_rates, true_rates, _ = roc_curve(labels, scores)
    if len(false_rates) > max_points:
        keep = np.unique(np.linspace(0, len(false_rates) - 1, max(max_points, 2)).round().astype(int))
        false_rates, true_rates = false_rates[keep], true_rates[keep]
    return false_rates, true_rates


def bootstrap_aucs(scores, is_member, n: int, seed: int = 0) -> np.ndarray:
    """AUCs of `n` bootstrap resamples, deterministic in `seed`.

    Members and non-members are resampled separately with replacement (a stratified
    bootstrap), so every resample keeps the class sizes and has an AUC; each AUC is the
    Mann-Whitney U over (members x non-members), all resamples computed at once.
    """
    scores, labels = _checked(scores, is_member)
    if n < 1:
        raise ValueError(f"n must be a positive number of resamples, not {n}")

    def auc(members: np.ndarray, nonmembers: np.ndarray, axis: int) -> np.ndarray:
        u = stats.mannwhitneyu(members, nonmembers, axis=axis).statistic
        return u / (members.shape[axis] * nonmembers.shape[axis])

    result = stats.bootstrap((scores[labels], scores[~labels]), auc, n_resamples=n, vectorized=True,
                             method="percentile", batch=100, rng=np.random.default_rng(seed))
    return np.asarray(result.bootstrap_distribution)


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval (low, high) of resampled values."""
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_auc(scores, is_member, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval (low, high) of the AUC from `n` stratified
    resamples (`bootstrap_aucs`)."""
    return percentile_interval(bootstrap_aucs(scores, is_member, n, seed))


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss in nats); inf when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def mia_metrics(label: str, scores, is_member) -> dict[str, float]:
    """AUC and TPR at 1% and 0.1% FPR of one attack, under their metric names."""
    metrics = {f"mia/{label}/auc": roc_auc(scores, is_member)}
    for suffix, fpr in TPR_AT_FPR:
        metrics[f"mia/{label}/{suffix}"] = tpr_at_fpr(scores, is_member, fpr)
    return metrics
