"""Membership attacks calibrated by reference models: LiRA (online and offline), RMIA,
and counterfactual memorization.

Each takes one statistic per sample from the target model and the same statistic from R
reference models, each trained like the target on its own half of the target's audit pool
(its scored members and non-members) topped up to the target's training-set size, with
`in_mask[r, i]` saying whether sample i was in reference r's half. Scores follow memray's
convention: higher = more likely a member. Only numpy and scipy: the statistics come from
the per-sample files of the trials (`memray.scoring.TokenStats.loss` of every sample,
every epoch).

The per-sample statistic of a language model:
- LiRA: the logit-scaled confidence of Carlini et al. 2022, with the sample's confidence
  taken as its geometric-mean token probability p = exp(-loss):
  phi = log(p / (1 - p)) (`logit_confidence`). phi is monotone in the mean
  log-likelihood, and near-Gaussian across models as LiRA assumes.
- RMIA: that same p as Pr(x | model) (a length-normalized likelihood, so that samples of
  different lengths compare).

What keeps the statistics from degenerating (each is recorded with the scores,
`REFERENCE_RULES` and the `rules` of every `ReferenceScore`):
- at least `MIN_REFERENCES` references, an even number, dealt in complementary pairs
  (`half_masks`): every sample is in exactly half of them, so it has two or more in and
  two or more out references, and every reference trains on exactly half of the pool;
- LiRA's variance: one pooled over the samples (deviations from each sample's own mean)
  below `PER_EXAMPLE_FROM` references, each sample's own from there up (`variance_model`);
  a fit with no spread at all is refused (`DegenerateStatistic`), never clamped;
- offline RMIA's a: calibrated on the references themselves, each in turn the stand-in
  target of the others (`calibrate_offline_a`), as ML Privacy Meter tunes it, instead of
  the paper's CIFAR-10 constant, which on language-model likelihoods makes it LOSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import stats

from memray.metrics import roc_auc

#: Fewest reference models lira / rmia accept: two in and two out per sample, so that every
#: in / out fit has a spread (one in reference leaves LiRA's variance with no degree of freedom)
MIN_REFERENCES = 4
#: LiRA's variance per sample from this many references up (half of them, 8, on each side);
#: below, one variance pooled over the samples (Carlini et al. share one below 64 models)
PER_EXAMPLE_FROM = 16
#: RMIA's threshold on the pairwise likelihood ratio (Zarifzadeh et al. 2024 use gamma = 1
#: for most of their results)
RMIA_GAMMA = 1.0
#: offline RMIA: Pr(x) from out-models alone is rescaled as ((1 + a) Pr_out(x) + (1 - a)) / 2;
#: a is chosen from this grid by `calibrate_offline_a`
OFFLINE_A_GRID = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 21))

#: How the reference attacks are computed, recorded with every target's scores. Not part of
#: any trial id: the scores are recomputed from the per-sample files when these change
#: (`memray.references.has_reference_attacks`), nothing is retrained.
REFERENCE_RULES: dict[str, Any] = {
    "statistic": "nll: mean token loss per sample (lira: its logit-scaled confidence; rmia: exp(-nll) as Pr(x | model))",
    "references": f"at least {MIN_REFERENCES}, even, in complementary pairs: each audit sample in exactly half",
    "lira_variance": f"pooled over samples below {PER_EXAMPLE_FROM} references, per example from {PER_EXAMPLE_FROM} up; "
                     "no spread is refused, not clamped",
    "rmia": f"gamma {RMIA_GAMMA:g}; Pr(x) the mean over all references (online) or the out references' mean "
            "rescaled by a (offline); population z: the audit pool",
    "rmia_offline_a": "calibrated per epoch: each reference the stand-in target of the others, the a of "
                      f"{OFFLINE_A_GRID[0]:g}..{OFFLINE_A_GRID[-1]:g} (step 0.05) with the highest mean AUC",
    "epoch_0": "left out: the target is the base model, the attacks would compare it with itself",
    "counterfactual": "mean -nll over the references that trained on a sample minus over those that did not "
                      "(Zhang et al. 2021, arXiv 2112.12938)",
    "version": 2,
}


class DegenerateStatistic(ValueError):
    """The references' statistics cannot support the attack (no spread): left out, with this reason."""


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


def variance_model(references: int) -> str:
    """LiRA's variance model for this many references: "pooled" (one variance, from every
    sample's deviations around its own mean) below PER_EXAMPLE_FROM, else "per-example"."""
    return "per-example" if references >= PER_EXAMPLE_FROM else "pooled"


def _masked_mean_std(values: np.ndarray, mask: np.ndarray, variance: str) -> tuple[np.ndarray, np.ndarray]:
    """Per sample (column): mean and std of the values where mask holds; with variance
    "pooled" one std for every sample, from the deviations around each sample's mean.
    Raises DegenerateStatistic when a sample has fewer than two values on this side or
    the fit has no spread."""
    counts = mask.sum(axis=0)
    if (counts < 2).any():
        raise DegenerateStatistic(f"{int((counts < 2).sum())} sample(s) have fewer than two reference models on "
                                  f"one side (in / out): at least {MIN_REFERENCES} references, in complementary "
                                  "pairs, are needed")
    means = np.where(mask, values, 0.0).sum(axis=0) / counts
    deviations = np.where(mask, values - means, 0.0)
    if variance == "pooled":
        std = np.full(len(counts), np.sqrt((deviations**2).sum() / (counts.sum() - len(counts))))
    elif variance == "per-example":
        std = np.sqrt((deviations**2).sum(axis=0) / (counts - 1))
    else:
        raise ValueError(f"variance must be pooled or per-example, not {variance!r}")
    if not (std > 0).all():
        raise DegenerateStatistic(f"the reference models' statistics have no spread for {int((std <= 0).sum())} "
                                  f"sample(s) ({variance} variance): they fit these samples identically")
    return means, std


def lira_online(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray, variance: str = "pooled") -> np.ndarray:
    """Online LiRA (Carlini et al. 2022, "Membership Inference Attacks From First
    Principles", https://arxiv.org/abs/2112.03570, Algorithm 1): per sample, Gaussians
    fitted to the statistic under the references that trained on it (in) and those that
    did not (out); the score is the log-likelihood ratio log N(t; in) - log N(t; out).

    target: (n,) statistic of the target (`logit_confidence`); reference: (R, n) the same
    under each reference; in_mask: (R, n) whether sample i was in reference r's half;
    variance: "pooled" or "per-example" (`variance_model`). Returns (n,) scores. Every
    sample needs at least two in and two out references.
    """
    target, reference, in_mask = _check(target, reference, in_mask)
    mean_in, std_in = _masked_mean_std(reference, in_mask, variance)
    mean_out, std_out = _masked_mean_std(reference, ~in_mask, variance)
    return stats.norm.logpdf(target, mean_in, std_in) - stats.norm.logpdf(target, mean_out, std_out)


def lira_offline(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray, variance: str = "pooled") -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022, section VI-C): only the out references, and a
    one-sided test: the score is log Pr[Z < t] for Z ~ N(out), high when the target fits
    the sample better than models that never saw it. Same arguments as `lira_online`."""
    target, reference, in_mask = _check(target, reference, in_mask)
    mean_out, std_out = _masked_mean_std(reference, ~in_mask, variance)
    return stats.norm.logcdf(target, mean_out, std_out)


def rmia(target: np.ndarray, reference: np.ndarray, in_mask: np.ndarray, *, online: bool = True,
         gamma: float = RMIA_GAMMA, offline_a: float = 1.0, population: np.ndarray | None = None) -> np.ndarray:
    """RMIA (Zarifzadeh, Liu, Shokri, Tramèr 2024, "Low-Cost High-Power Membership
    Inference Attacks", ICML, https://arxiv.org/abs/2312.03262): the likelihood ratio
    Pr(x | target) / Pr(x) of each sample, compared pairwise with that of population
    samples z; the score of x is the share of z with ratio(x) / ratio(z) >= gamma.

    target: (n,) Pr(x | target) (`confidence`); reference: (R, n) the same under each
    reference; in_mask: (R, n) as in `lira_online`. Pr(x) is the mean over all references
    (online: in and out alike, which the half-in sampling makes unbiased), or with
    online=False the out references' mean rescaled by `offline_a` (`calibrate_offline_a`).
    population: indices of the samples used as z (default: all n, each x then compared
    with the pool including itself, which counts 1 at gamma <= 1 for every sample alike).
    Returns (n,) scores in [0, 1].
    """
    target, reference, in_mask = _check(target, reference, in_mask)
    if gamma <= 0:
        raise ValueError(f"gamma must be positive, not {gamma}")
    ratio = target / np.maximum(_marginal(reference, in_mask, online, offline_a), 1e-300)
    ratio_z = ratio if population is None else ratio[np.asarray(population)]
    # share of z with ratio(x) >= gamma * ratio(z), all x at once through the sorted ratios of z
    sorted_z = np.sort(gamma * ratio_z)
    return np.searchsorted(sorted_z, ratio, side="right") / len(sorted_z)


def _marginal(reference: np.ndarray, in_mask: np.ndarray, online: bool, offline_a: float) -> np.ndarray:
    """RMIA's Pr(x): the mean over all references, or offline the out references' mean
    rescaled as ((1 + a) Pr_out(x) + (1 - a)) / 2."""
    if online:
        return reference.mean(axis=0)
    counts = (~in_mask).sum(axis=0)
    if (counts == 0).any():
        raise DegenerateStatistic(f"{int((counts == 0).sum())} sample(s) have no out reference: offline RMIA needs one")
    out_mean = np.where(~in_mask, reference, 0.0).sum(axis=0) / counts
    return 0.5 * ((1 + offline_a) * out_mean + (1 - offline_a))


def calibrate_offline_a(reference: np.ndarray, in_mask: np.ndarray,
                        grid: tuple[float, ...] = OFFLINE_A_GRID) -> tuple[float, dict[float, float]]:
    """Offline RMIA's a, tuned without the target as ML Privacy Meter tunes it: each
    reference in turn is the stand-in target, the others its references (their out ones),
    and its own half is the membership to find; the a of `grid` with the highest AUC,
    averaged over the stand-ins, wins (the lowest such a on ties).

    reference: (R, n) Pr(x | reference) (`confidence`); in_mask: (R, n). Returns (a, the
    mean AUC of every a of the grid)."""
    reference = np.asarray(reference, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    count = len(reference)
    mean_auc: dict[float, float] = {}
    for a in grid:
        aucs = []
        for stand_in in range(count):
            others = np.arange(count) != stand_in
            scores = rmia(reference[stand_in], reference[others], in_mask[others], online=False, offline_a=a)
            aucs.append(roc_auc(scores, in_mask[stand_in]))
        mean_auc[a] = float(np.mean(aucs))
    best = max(mean_auc.values())
    return min(a for a, auc in mean_auc.items() if auc == best), mean_auc


def counterfactual(reference_nll: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """Counterfactual memorization of each sample (Zhang et al. 2021, "Counterfactual
    Memorization in Neural Language Models", https://arxiv.org/abs/2112.12938): the mean
    log-likelihood per token (-nll) over the references that trained on it minus over
    those that did not; positive = the sample is fitted better when trained on.

    reference_nll: (R, n) mean token loss under each reference; in_mask: (R, n). Returns (n,)."""
    reference_nll = np.asarray(reference_nll, dtype=np.float64)
    in_mask = np.asarray(in_mask, dtype=bool)
    ins, outs = in_mask.sum(axis=0), (~in_mask).sum(axis=0)
    if (ins == 0).any() or (outs == 0).any():
        raise DegenerateStatistic("counterfactual memorization needs every sample in and out of some reference")
    return (np.where(in_mask, -reference_nll, 0.0).sum(axis=0) / ins
            - np.where(~in_mask, -reference_nll, 0.0).sum(axis=0) / outs)


def half_masks(pool: int, references: int, seed: int) -> np.ndarray:
    """(references, pool) bool: which pool samples each reference trains on, dealt in
    complementary pairs: references 2j and 2j + 1 split the pool into a seeded random half
    (pool // 2 samples; the odd one out, if any, goes to 2j + 1) and its complement. So
    every sample is in exactly half of the references, with each reference's half drawn
    anew, and every reference trains on the same number of pool samples (to one).
    `references` must be even and at least MIN_REFERENCES."""
    if references < MIN_REFERENCES or references % 2:
        raise ValueError(f"reference attacks need an even number of at least {MIN_REFERENCES} references "
                         f"(two in and two out per sample), not {references}")
    rng = np.random.default_rng(seed)
    masks = np.zeros((references, pool), dtype=bool)
    for pair in range(references // 2):
        chosen = rng.permutation(pool)[: pool // 2]
        masks[2 * pair, chosen] = True
        masks[2 * pair + 1] = ~masks[2 * pair]
    return masks


def reference_seed(seed: int, index: int) -> int:
    """The seed of reference model `index` of a target of seed `seed`, for its
    initialization and data order: its own, drawn from both, so that no reference shares
    the target's (an attacker knows neither the target's initialization nor its order)."""
    return int(np.random.SeedSequence([seed % 2**32, index, 0x5EED]).generate_state(1)[0] % 2**31)


# ---------------------------------------------------------------------------------------
# The scorers the attack registry names (`memray.attacks`): one per metric label
# ---------------------------------------------------------------------------------------


@dataclass
class ReferenceScore:
    """One reference attack's scores of the audit pool and the rules they were computed
    under (recorded in the target's result.json)."""

    scores: np.ndarray
    rules: dict[str, Any] = field(default_factory=dict)


#: (target nll (n,), references' nll (R, n), in_mask (R, n)) -> scores and their rules
ReferenceScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], ReferenceScore]


def lira_score(target_nll: np.ndarray, reference_nll: np.ndarray, in_mask: np.ndarray) -> ReferenceScore:
    """Online LiRA on the logit-scaled confidence of the mean token loss."""
    variance = variance_model(len(reference_nll))
    return ReferenceScore(lira_online(logit_confidence(target_nll), logit_confidence(reference_nll), in_mask, variance),
                          {"variance": variance})


def lira_offline_score(target_nll: np.ndarray, reference_nll: np.ndarray, in_mask: np.ndarray) -> ReferenceScore:
    """Offline LiRA (out references only) on the logit-scaled confidence."""
    variance = variance_model(len(reference_nll))
    return ReferenceScore(lira_offline(logit_confidence(target_nll), logit_confidence(reference_nll), in_mask, variance),
                          {"variance": variance})


def rmia_score(target_nll: np.ndarray, reference_nll: np.ndarray, in_mask: np.ndarray) -> ReferenceScore:
    """Online RMIA on exp(-nll), the audit pool as population."""
    return ReferenceScore(rmia(confidence(target_nll), confidence(reference_nll), in_mask), {"gamma": RMIA_GAMMA})


def rmia_offline_score(target_nll: np.ndarray, reference_nll: np.ndarray, in_mask: np.ndarray) -> ReferenceScore:
    """Offline RMIA on exp(-nll) with a calibrated on the references (`calibrate_offline_a`)."""
    probabilities = confidence(reference_nll)
    a, mean_auc = calibrate_offline_a(probabilities, in_mask)
    scores = rmia(confidence(target_nll), probabilities, in_mask, online=False, offline_a=a)
    return ReferenceScore(scores, {"gamma": RMIA_GAMMA, "offline_a": a,
                                   "offline_a_stand_in_auc": round(mean_auc[a], 4)})
