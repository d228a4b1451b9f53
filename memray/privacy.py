"""Empirical privacy: a lower bound on the epsilon a trial's training satisfies, measured
from its membership-inference scores (every trial, DP or not: `privacy/epsilon_lb`) and
from its canaries (`privacy/epsilon_lb_canary`).

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

The canaries' bound (`canary_epsilon_lower_bound`) is the one-run audit of Steinke, Nasr
and Jagielski 2023: guesses on the canaries of the highest and lowest scores, tested
against the accuracy that (epsilon, delta)-DP allows.

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



# ---------------------------------------------------------------------------------------
# The one-run audit of canaries (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1)
# Training Run", NeurIPS, arXiv 2305.08846)
# ---------------------------------------------------------------------------------------

#: Guesses of the canary audit, each a share of the canaries guessed at each end (the highest
#: scores guessed "in", as many of the lowest "out"); the bound is the best of these, Bonferroni
#: over them. Fixed in advance, as the paper's k+ and k- are.
CANARY_GUESS_SHARES = (0.1, 0.25, 0.5)


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least `correct` right guesses out of `guesses` (of `canaries`
    canaries, each in or out with probability 1/2) under an (epsilon, delta)-DP training
    (Steinke et al. 2023, Theorem 3.3 / their Algorithm: the binomial tail of epsilon-DP
    randomized response's accuracy, plus 2 m delta times the largest mean of its lower tail)."""
    accuracy = 1 / (1 + np.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, accuracy))
    below = np.cumsum(stats.binom.pmf(correct - np.arange(1, correct + 1), guesses, accuracy))
    spread = float(np.max(below / np.arange(1, correct + 1))) if correct else 0.0
    return min(1.0, tail + 2 * canaries * delta * spread)


def one_run_epsilon(canaries: int, guesses: int, correct: int, delta: float, alpha: float) -> float:
    """The largest epsilon that the counts reject at level `alpha` (0 when none): bisection on
    `one_run_p_value`, which grows with epsilon."""
    if not guesses or one_run_p_value(canaries, guesses, correct, 0.0, delta) >= alpha:
        return 0.0
    low, high = 0.0, 1.0
    while one_run_p_value(canaries, guesses, correct, high, delta) < alpha and high < 100:
        low, high = high, 2 * high
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if one_run_p_value(canaries, guesses, correct, middle, delta) < alpha else (low, middle)
    return low


def canary_epsilon_lower_bound(scores: np.ndarray, inserted: np.ndarray, delta: float,
                               level: float = AUDIT_LEVEL) -> tuple[float, float]:
    """(epsilon lower bound, ceiling) of the one-run audit: for each share of
    `CANARY_GUESS_SHARES`, the canaries of the highest scores (higher = inserted) guessed in and
    as many of the lowest guessed out; the best bound, at confidence `level` split over the
    shares. The ceiling: the bound if every guess of the largest share were right."""
    scores, inserted = np.asarray(scores, dtype=np.float64), np.asarray(inserted, dtype=bool)
    count = len(scores)
    # ties in a random order: an order that followed the canaries' own (inserted ones first)
    # would guess from the order, not from the scores
    shuffled = np.random.default_rng(0).permutation(count)
    order = shuffled[np.argsort(-scores[shuffled], kind="stable")]
    alpha = (1 - level) / len(CANARY_GUESS_SHARES)
    best, ceiling = 0.0, 0.0
    for share in CANARY_GUESS_SHARES:
        each = int(share * count)
        if each < 1:
            continue
        correct = int(inserted[order[:each]].sum() + (~inserted[order[count - each:]]).sum())
        best = max(best, one_run_epsilon(count, 2 * each, correct, delta, alpha))
        ceiling = max(ceiling, one_run_epsilon(count, 2 * each, 2 * each, delta, alpha))
    return best, ceiling


def canary_audit_rule(level: float = AUDIT_LEVEL) -> str:
    """How `privacy/epsilon_lb_canary` is computed, in words (recorded in result.json)."""
    shares = ", ".join(f"{share:g}" for share in CANARY_GUESS_SHARES)
    return (f"one-run audit (Steinke, Nasr, Jagielski 2023) on the single-copy inserted canaries and the held-out "
            f"ones, scored by exposure: the top and bottom {shares} of them guessed in and out; {level:.0%} confidence, "
            "Bonferroni over the shares. memray inserts a fixed number of canaries whose secrets are drawn "
            "independently (which ones are inserted is a uniformly random subset), where the paper includes each "
            "independently with probability 1/2")
