"""Empirical privacy: a lower bound on the epsilon a trial's training satisfies, measured
from its membership-inference scores (every trial, DP or not: `privacy/epsilon_lb`).

If training is (epsilon, delta)-DP, then for any test "member or not" on one record,
FPR + e^epsilon FNR >= 1 - delta and FNR + e^epsilon FPR >= 1 - delta (Kairouz, Oh,
Viswanath 2015). An attack's FPR and FNR at a threshold, bounded from above with
Clopper-Pearson intervals, turn this around into a lower bound on epsilon that holds at a
stated confidence (Jagielski, Ullman, Oprea 2020, arXiv 2006.07709; Nasr et al. 2021,
arXiv 2101.04535):

    epsilon_lb = max(log((1 - delta - FPR_hi) / FNR_hi), log((1 - delta - FNR_hi) / FPR_hi))

The threshold is the best of a fixed set of candidates (`AUDIT_THRESHOLDS` quantiles of
each attack's scores), chosen on the same scores; so that the best one is still a valid
bound, the confidence is split over every candidate threshold of every attack and both rates
(Bonferroni): each upper bound is one-sided at (1 - level) / (2 x candidates). The ceiling
is the bound the same counts would give to a perfect attack (FP = FN = 0): no attack on so
few records can show a larger epsilon, however private or not the training is.

Only records trained on once enter (members with one copy; non-members): a record with k
copies is protected by group privacy, at k x epsilon, and would let a correct bound exceed
the per-record epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

#: Candidate thresholds per attack: quantiles of its pooled scores. Fewer candidates split
#: the confidence less (a tighter bound); 64 resolve the ROC curve to 1.6% of the records.
AUDIT_THRESHOLDS = 64
#: Confidence of the bound: it holds with at least this probability over the records' draw.
AUDIT_LEVEL = 0.95


@dataclass(frozen=True)
class EpsilonBound:
    """An empirical lower bound on epsilon and what it rests on."""

    epsilon_lb: float  # 0 when no threshold shows any leakage
    ceiling: float  # the bound a perfect attack would give on the same counts
    attack: str | None  # the attack (label) whose threshold gave the bound; None at 0
    members: int
    nonmembers: int
    candidates: int  # thresholds tried, over all attacks (the Bonferroni factor is 2 x this)


def _upper(failures: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bounds at confidence 1 - alpha of failures / trials."""
    failures = np.asarray(failures, dtype=np.float64)
    high = stats.beta.ppf(1 - alpha, failures + 1, np.maximum(trials - failures, 1e-300))
    return np.where(failures >= trials, 1.0, high)


def _epsilon(fpr_hi: np.ndarray, fnr_hi: np.ndarray, delta: float) -> np.ndarray:
    """max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), 0 where neither is positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(np.clip(1 - delta - fpr_hi, 0, None) / fnr_hi)
        two = np.log(np.clip(1 - delta - fnr_hi, 0, None) / fpr_hi)
    best = np.fmax(one, two)
    return np.where(np.isfinite(best), np.maximum(best, 0.0), 0.0)


def candidate_thresholds(scores: np.ndarray, count: int = AUDIT_THRESHOLDS) -> np.ndarray:
    """Up to `count` distinct thresholds: quantiles of the scores (a record is called a member
    when its score is >= the threshold)."""
    return np.unique(np.quantile(scores, np.linspace(0, 1, count + 1)[1:], method="lower"))


def epsilon_lower_bound(attack_scores: dict[str, np.ndarray], is_member: np.ndarray, delta: float,
                        level: float = AUDIT_LEVEL, thresholds: int = AUDIT_THRESHOLDS) -> EpsilonBound:
    """The empirical epsilon lower bound of the best attack at its best threshold.

    attack_scores: label -> scores (higher = member) of the same records; is_member: bool
    per record (single-copy records only: the caller leaves the others out). delta: the
    delta of the guarantee tested. The bound holds with probability >= `level` jointly over
    all candidate thresholds of all attacks (module docstring).
    """
    is_member = np.asarray(is_member, dtype=bool)
    members, nonmembers = int(is_member.sum()), int((~is_member).sum())
    if not members or not nonmembers:
        raise ValueError("an epsilon audit needs both members and non-members")
    cuts = {label: candidate_thresholds(np.asarray(scores, dtype=np.float64), thresholds)
            for label, scores in attack_scores.items()}
    candidates = sum(len(c) for c in cuts.values())
    alpha = (1 - level) / (2 * candidates)
    best, best_attack = 0.0, None
    for label, scores in attack_scores.items():
        scores = np.asarray(scores, dtype=np.float64)
        member_scores, nonmember_scores = np.sort(scores[is_member]), np.sort(scores[~is_member])
        false_negatives = np.searchsorted(member_scores, cuts[label], side="left")  # members below t
        false_positives = nonmembers - np.searchsorted(nonmember_scores, cuts[label], side="left")  # non-members >= t
        bounds = _epsilon(_upper(false_positives, nonmembers, alpha), _upper(false_negatives, members, alpha), delta)
        if bounds.size and bounds.max() > best:
            best, best_attack = float(bounds.max()), label
    ceiling = float(_epsilon(_upper(np.zeros(1), nonmembers, alpha), _upper(np.zeros(1), members, alpha), delta)[0])
    return EpsilonBound(best, ceiling, best_attack, members, nonmembers, candidates)


def audit_rule(level: float = AUDIT_LEVEL, thresholds: int = AUDIT_THRESHOLDS) -> str:
    """How `privacy/epsilon_lb` is computed, in words (recorded in result.json)."""
    return (f"membership inference on the single-copy members and the non-members: at the best of up to "
            f"{thresholds} quantile thresholds per attack and the best attack, epsilon >= max(log((1-delta-FPR)/FNR), "
            f"log((1-delta-FNR)/FPR)) with one-sided Clopper-Pearson upper bounds on FPR and FNR; {level:.0%} "
            "confidence, Bonferroni over every threshold of every attack and both rates")


def default_delta(training_texts: int) -> float:
    """delta when train.dp.delta is unset (and the delta the audit of a non-DP trial tests):
    1 / (10 x the training texts). A mechanism that publishes one random record in full is
    (0, 1/N)-DP, so a meaningful delta is well below 1/N; a tenth is the usual margin."""
    return 1.0 / (10 * max(training_texts, 1))

