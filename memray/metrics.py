"""Metrics of membership inference and language modelling: AUC with its 95% interval
(DeLong, or a stratified bootstrap), TPR at fixed FPR with its Clopper-Pearson interval,
ROC points, perplexity.

Scores follow the attacks' convention (higher = more likely a member) and members are the
positive class. Metric names are the ones of DESIGN.md: `mia/<attack>/auc`,
`mia/<attack>/auc_lo`, `mia/<attack>/auc_hi`, `mia/<attack>/tpr@1%fpr`,
`mia/<attack>/tpr@0.1%fpr`, and beside each TPR its 95% interval
(`mia/<attack>/tpr@1%fpr_lo`, `mia/<attack>/tpr@1%fpr_hi`, the same for 0.1%). A TPR at an
FPR is reported only where the non-members resolve that FPR (at least 1/FPR of them);
`unresolved_fprs` says which are left out and why.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from memray.metric_keys import mia_key, parse_mia_key

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


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson ("exact") interval (low, high) of a binomial proportion: `successes`
    of `trials` (trials >= 1), at confidence `level`. Low is the `(1 - level) / 2` quantile
    of Beta(k, n - k + 1), high the `(1 + level) / 2` quantile of Beta(k + 1, n - k); 0 of n
    has low 0 and n of n has high 1. The same interval as
    `scipy.stats.binomtest(k, n).proportion_ci(method="exact")`."""
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, not {successes} of {trials}")
    tail = (1 - level) / 2
    low = float(stats.beta.ppf(tail, successes, trials - successes + 1)) if successes > 0 else 0.0
    high = float(stats.beta.ppf(1 - tail, successes + 1, trials - successes)) if successes < trials else 1.0
    return low, high


def tpr_interval(scores, is_member, fpr: float, level: float = 0.95) -> tuple[float, float, float]:
    """(TPR, low, high): `tpr_at_fpr` and its Clopper-Pearson interval at `level`, from the
    number of members above the threshold the FPR budget chose, out of all members.

    The interval covers the binomial sampling of the members alone, with the threshold held
    fixed. It does not cover the threshold's own uncertainty: the threshold comes from the
    non-members' scores (at 0.1% FPR out of 1,000 non-members it rests on one or two of
    them), and another draw of non-members would move it, and the TPR with it.
    """
    tpr = tpr_at_fpr(scores, is_member, fpr)
    members = int(np.asarray(is_member, dtype=bool).sum())
    low, high = clopper_pearson(round(tpr * members), members, level)
    return tpr, low, high


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


def delong_interval(scores, is_member, level: float = 0.95) -> tuple[float, float]:
    """DeLong's interval (low, high) of the AUC: AUC -/+ z * its standard error, clipped to [0, 1].

    The variance is DeLong, DeLong, Clarke-Pearson 1988 ("Comparing the areas under two or
    more correlated ROC curves", Biometrics 44:837), computed from midranks as in Sun & Xu
    2014 (IEEE Signal Processing Letters 21:1389): V10_i = (rank of member i among all -
    its rank among members) / n, V01_j = 1 - (rank of non-member j among all - its rank
    among non-members) / m, var = var(V10) / m + var(V01) / n. Closed form, O(N log N).
    """
    aucs, covariance = delong_covariance(np.asarray(scores, dtype=np.float64)[:, None], is_member)
    auc, se = float(aucs[0]), math.sqrt(float(covariance[0, 0]))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def delong_covariance(score_columns, is_member) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of several score columns on the same samples and DeLong's covariance of them.

    score_columns: [n_samples, k] (e.g. k trials, or one trial at k epochs, scoring the same
    members and non-members). Returns (aucs [k], covariance [k, k]) from the structural
    components of DeLong et al. 1988, each column's from midranks (Sun & Xu 2014):
    S = cov(V10) / m + cov(V01) / n. The variance of a contrast c of the AUCs (a difference
    of two, or of two means) is c' S c: the paired test of correlated AUCs.
    """
    columns = np.asarray(score_columns, dtype=np.float64)
    labels = np.asarray(is_member, dtype=bool)
    if columns.ndim != 2 or columns.shape[0] != labels.shape[0]:
        raise ValueError(f"score columns {columns.shape} must be [samples, k] with is_member {labels.shape}")
    m, n = int(labels.sum()), int((~labels).sum())
    if m < 2 or n < 2:
        raise ValueError("DeLong's variance needs at least two members and two non-members")
    v10, v01 = np.empty((m, columns.shape[1])), np.empty((n, columns.shape[1]))
    for j, scores in enumerate(columns.T):
        _checked(scores, labels)
        members, nonmembers = scores[labels], scores[~labels]
        all_ranks = stats.rankdata(np.concatenate([members, nonmembers]))
        v10[:, j] = (all_ranks[:m] - stats.rankdata(members)) / n
        v01[:, j] = 1.0 - (all_ranks[m:] - stats.rankdata(nonmembers)) / m
    covariance = np.atleast_2d(np.cov(v10, rowvar=False)) / m + np.atleast_2d(np.cov(v01, rowvar=False)) / n
    return v10.mean(axis=0), covariance


def resolves(fpr: float, nonmembers: int) -> bool:
    """Whether `nonmembers` non-members resolve a false-positive rate of `fpr`: at least
    1/fpr of them, so that one false positive is not already above the budget."""
    return nonmembers >= math.ceil(1 / fpr - 1e-9)


def unresolved_fprs(nonmembers: int) -> dict[str, str]:
    """Metric suffix -> why it is not reported, for each TPR@FPR that `nonmembers` non-members
    cannot resolve."""
    return {suffix: f"{nonmembers} non-members cannot resolve an FPR of {fpr:g} (at least {math.ceil(1 / fpr - 1e-9)} are needed)"
            for suffix, fpr in TPR_AT_FPR if not resolves(fpr, nonmembers)}


def chance(low: float, high: float) -> bool:
    """Whether an AUC interval holds 0.5: the attack is not distinguishable from chance."""
    return low <= 0.5 <= high


def perplexity(mean_loss: float) -> float:
    """exp(mean token loss in nats); inf when it overflows."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def mia_metrics(label: str, scores, is_member, bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    """One attack's metrics under their names: the AUC, its 95% interval (`auc_lo`,
    `auc_hi`: DeLong's, or with `bootstrap` > 0 the percentile interval of that many
    stratified resamples seeded by `seed`), and the TPR at each FPR of `TPR_AT_FPR` that
    the non-members resolve (`resolves`) with its 95% Clopper-Pearson interval over the
    members (`<suffix>_lo`, `<suffix>_hi`; `tpr_interval` says what it leaves out); an
    unresolved one is left out, interval and all."""
    metrics = {mia_key(label): roc_auc(scores, is_member)}
    if bootstrap:
        low, high = bootstrap_auc(scores, is_member, bootstrap, seed)
    else:
        low, high = delong_interval(scores, is_member)
    metrics[mia_key(label, "auc_lo")], metrics[mia_key(label, "auc_hi")] = low, high
    nonmembers = int((~np.asarray(is_member, dtype=bool)).sum())
    for suffix, fpr in TPR_AT_FPR:
        if resolves(fpr, nonmembers):
            tpr, low, high = tpr_interval(scores, is_member, fpr)
            metrics[mia_key(label, suffix)] = tpr
            metrics[mia_key(label, f"{suffix}_lo")], metrics[mia_key(label, f"{suffix}_hi")] = low, high
    return metrics


#: Epoch metrics that carry the split audit beside the AUCs (the mean word n-gram overlap
#: of the non-members with the members, `memray.data.split_audit`), so that a line that
#: flags an AUC below chance can show it.
SPLIT_OVERLAP_METRICS: dict[int, str] = {7: "split/ngram7_overlap", 13: "split/ngram13_overlap"}


def below_chance(metrics: Mapping[str, Any]) -> list[str]:
    """The attack labels whose AUC is significantly below 0.5: its 95% interval
    (`mia/<label>/auc_hi`) lies wholly below 0.5. Members then score *lower* than
    non-members, which training alone rarely causes: look at the split (members and
    non-members that differ in kind, or near-copies across it)."""
    return [parsed[0] for key, value in metrics.items()
            if (parsed := parse_mia_key(key)) and parsed[1] == "auc_hi" and value is not None
            and math.isfinite(value) and value < 0.5]


def below_chance_note(metrics: Mapping[str, Any]) -> str | None:
    """`BELOW CHANCE: zlib 0.340 [0.21, 0.47]; split 7/13-gram overlap 0.04/0.03` for an
    epoch with AUCs below chance (`below_chance`), else None."""
    labels = below_chance(metrics)
    if not labels:
        return None
    aucs = ", ".join(f"{label} {metrics[mia_key(label)]:.3f} [{metrics[mia_key(label, 'auc_lo')]:.2f}, "
                     f"{metrics[mia_key(label, 'auc_hi')]:.2f}]" for label in labels)
    overlap = [(n, metrics.get(key)) for n, key in SPLIT_OVERLAP_METRICS.items() if metrics.get(key) is not None]
    split = ("; split " + "/".join(str(n) for n, _ in overlap) + "-gram overlap "
             + "/".join(f"{value:.2f}" for _, value in overlap)) if overlap else ""
    return f"BELOW CHANCE: {aucs}{split}"
