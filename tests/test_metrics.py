"""AUC, its DeLong and bootstrap intervals, TPR at FPR and its Clopper-Pearson interval, ROC
points and perplexity against hand-computed values, scipy's binomial test and a slow,
independent bootstrap."""

import math

import numpy as np
import pytest

from scipy.stats import binomtest

from memray.metrics import (bootstrap_auc, chance, clopper_pearson, delong_interval, mia_metrics, perplexity, roc_auc,
                            roc_points, tpr_at_fpr, tpr_interval, unresolved_fprs)

# members 0.9, 0.4, 0.7; non-members 0.8, 0.1, 0.3, 0.2
SCORES = np.array([0.9, 0.8, 0.4, 0.1, 0.7, 0.3, 0.2])
MEMBER = np.array([True, False, True, False, True, False, False])


def test_perfect_separation():
    scores, member = [3.0, 4.0, 1.0, 2.0], [True, True, False, False]
    assert roc_auc(scores, member) == 1.0
    assert tpr_at_fpr(scores, member, 0.001) == 1.0
    # reversed direction: members score lowest
    assert roc_auc([-s for s in scores], member) == 0.0


def test_auc_counts_pairs_ordered_correctly():
    # member > non-member pairs: 0.9 beats 4, 0.4 beats 3 (0.1, 0.3, 0.2), 0.7 beats 3 -> 10 of 12
    assert roc_auc(SCORES, MEMBER) == pytest.approx(10 / 12)
    # a tie counts half: (0.5, 0.5) -> 0.5, the other three pairs -> 1
    assert roc_auc([0.5, 1.0, 0.5, 0.0], [True, True, False, False]) == pytest.approx(3.5 / 4)


def test_tpr_at_fpr_takes_the_best_point_within_the_budget():
    # thresholds from the top: 0.9 (M) -> tpr 1/3 at fpr 0; 0.8 (N) -> fpr 1/4; 0.7, 0.4 (M) -> tpr 1 at fpr 1/4
    assert tpr_at_fpr(SCORES, MEMBER, 0.01) == pytest.approx(1 / 3)
    assert tpr_at_fpr(SCORES, MEMBER, 0.2) == pytest.approx(1 / 3)
    assert tpr_at_fpr(SCORES, MEMBER, 0.25) == pytest.approx(1.0)
    # a tied member/non-member pair moves both rates at once: at fpr 0 only the 1.0 member counts
    assert tpr_at_fpr([0.5, 1.0, 0.5, 0.0], [True, True, False, False], 0.01) == pytest.approx(0.5)


def test_tpr_at_fpr_keeps_collinear_roc_points():
    # three tied (member, non-member) pairs: ROC points (1/3, 1/3), (2/3, 2/3), (1, 1) lie on
    # a line; the middle one is the best point with FPR <= 0.7
    scores, member = [3.0, 2.0, 1.0, 3.0, 2.0, 1.0], [True, True, True, False, False, False]
    assert tpr_at_fpr(scores, member, 0.7) == pytest.approx(2 / 3)


def test_mia_metrics_names_and_only_resolved_tprs():
    # 4 non-members resolve neither 1% nor 0.1% FPR: both TPRs are left out, with a reason
    metrics = mia_metrics("mink@0.1", SCORES, MEMBER)
    low, high = delong_interval(SCORES, MEMBER)
    assert metrics == {"mia/mink@0.1/auc": pytest.approx(10 / 12),
                       "mia/mink@0.1/auc_lo": low, "mia/mink@0.1/auc_hi": high}
    assert set(unresolved_fprs(4)) == {"tpr@1%fpr", "tpr@0.1%fpr"}
    assert "100 are needed" in unresolved_fprs(4)["tpr@1%fpr"]
    # 100 non-members resolve 1% but not 0.1%; 1000 resolve both
    scores, member = noisy_scores(n=200)
    assert set(mia_metrics("loss", scores, member)) == {"mia/loss/auc", "mia/loss/auc_lo", "mia/loss/auc_hi",
                                                        "mia/loss/tpr@1%fpr", "mia/loss/tpr@1%fpr_lo",
                                                        "mia/loss/tpr@1%fpr_hi"}
    assert list(unresolved_fprs(100)) == ["tpr@0.1%fpr"] and unresolved_fprs(1000) == {}
    scores, member = noisy_scores(n=2000)
    found = mia_metrics("loss", scores, member)
    for suffix in ("tpr@1%fpr", "tpr@0.1%fpr"):
        tpr, low, high = (found[f"mia/loss/{suffix}{end}"] for end in ("", "_lo", "_hi"))
        assert low <= tpr <= high


@pytest.mark.parametrize("successes,trials", [(0, 1), (1, 1), (0, 100), (3, 100), (50, 100), (99, 100), (100, 100),
                                              (1, 1000), (17, 60)])
def test_clopper_pearson_equals_scipys_exact_interval(successes, trials):
    exact = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="exact")
    low, high = clopper_pearson(successes, trials)
    assert low == pytest.approx(exact.low, abs=1e-12) and high == pytest.approx(exact.high, abs=1e-12)


def test_clopper_pearson_by_hand_at_the_ends():
    # 0 of n: low 0, high solves (1 - p)^n = 0.025; n of n: high 1, low solves p^n = 0.025
    for n in (1, 10, 1000):
        assert clopper_pearson(0, n) == (0.0, pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9))
        assert clopper_pearson(n, n) == (pytest.approx(0.025 ** (1 / n), rel=1e-9), 1.0)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(5, 4)


def test_tpr_interval_counts_the_members_above_the_chosen_threshold():
    # SCORES at fpr 0.01: one of three members (0.9) above every non-member
    tpr, low, high = tpr_interval(SCORES, MEMBER, 0.01)
    assert tpr == pytest.approx(1 / 3)
    assert (low, high) == clopper_pearson(1, 3)
    scores, member = noisy_scores(n=2000)
    tpr, low, high = tpr_interval(scores, member, 0.001)
    assert (low, high) == clopper_pearson(round(tpr * 1000), 1000) and low < tpr < high


def test_delong_interval_equals_a_hand_computed_variance():
    # structural components by brute force over every (member, non-member) pair
    members, nonmembers = SCORES[MEMBER], SCORES[~MEMBER]
    psi = np.array([[1.0 if x > y else 0.5 if x == y else 0.0 for y in nonmembers] for x in members])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    se = math.sqrt(v10.var(ddof=1) / len(members) + v01.var(ddof=1) / len(nonmembers))
    auc = psi.mean()
    low, high = delong_interval(SCORES, MEMBER)
    assert low == pytest.approx(max(0.0, auc - 1.959964 * se), abs=1e-6)
    assert high == pytest.approx(min(1.0, auc + 1.959964 * se), abs=1e-6)


def slow_bootstrap_se(scores: np.ndarray, member: np.ndarray, resamples: int, seed: int) -> float:
    """The AUC's standard error by resampling members and non-members in a Python loop."""
    rng = np.random.default_rng(seed)
    members, nonmembers = scores[member], scores[~member]
    aucs = []
    for _ in range(resamples):
        x = rng.choice(members, len(members))
        y = rng.choice(nonmembers, len(nonmembers))
        aucs.append(((x[:, None] > y[None, :]).mean() + 0.5 * (x[:, None] == y[None, :]).mean()))
    return float(np.std(aucs, ddof=1))


@pytest.mark.parametrize("shift", [0.0, 0.8])
def test_delong_interval_agrees_with_a_slow_bootstrap(shift):
    rng = np.random.default_rng(11)
    member = np.arange(400) < 200
    scores = rng.normal(size=400) + shift * member
    low, high = delong_interval(scores, member)
    delong_se = (high - low) / (2 * 1.959964)
    assert delong_se == pytest.approx(slow_bootstrap_se(scores, member, 2000, seed=5), rel=0.08)
    # and memray's vectorized bootstrap gives about the same interval
    boot_low, boot_high = bootstrap_auc(scores, member, n=2000, seed=0)
    assert boot_low == pytest.approx(low, abs=0.012) and boot_high == pytest.approx(high, abs=0.012)
    # no signal: the interval holds 0.5; a strong shift: it does not
    assert chance(low, high) == (shift == 0.0)
    # interval from bootstrap when asked
    metrics = mia_metrics("loss", scores, member, bootstrap=300, seed=1)
    assert (metrics["mia/loss/auc_lo"], metrics["mia/loss/auc_hi"]) == bootstrap_auc(scores, member, 300, seed=1)


def noisy_scores(n: int = 200, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = np.arange(n) < n // 2
    return rng.normal(size=n) + 0.8 * member, member


def test_bootstrap_interval_contains_the_auc_and_is_deterministic():
    scores, member = noisy_scores()
    auc = roc_auc(scores, member)
    low, high = bootstrap_auc(scores, member, n=200, seed=0)
    assert low < auc < high
    assert 0.05 < high - low < 0.3  # about +-2 standard errors of an AUC on 100 + 100 samples
    assert bootstrap_auc(scores, member, n=200, seed=0) == (low, high)
    assert bootstrap_auc(scores, member, n=200, seed=1) != (low, high)


def test_roc_points_are_thinned_and_span_the_curve():
    scores, member = noisy_scores(n=2000)
    fpr, tpr = roc_points(scores, member, max_points=50)
    assert 2 <= len(fpr) <= 50 and len(fpr) == len(tpr)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # the area under the thinned curve stays close to the AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, member), abs=0.01)


def test_perplexity():
    assert perplexity(math.log(20.0)) == pytest.approx(20.0)
    assert perplexity(0.0) == 1.0
    assert perplexity(1e4) == math.inf


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="both members and non-members"):
        roc_auc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN or infinite"):
        tpr_at_fpr([0.1, float("nan")], [True, False], 0.01)
    with pytest.raises(ValueError, match="same length"):
        roc_auc([0.1, 0.2, 0.3], [True, False])


def test_metric_keys_are_built_and_read_one_way():
    from memray.metric_keys import auc_labels, is_auc_key, mia_key, parse_mia_key

    assert mia_key("mink@0.1") == "mia/mink@0.1/auc" and mia_key("loss", "tpr@1%fpr_lo") == "mia/loss/tpr@1%fpr_lo"
    assert parse_mia_key("mia/lira-offline/tpr@0.1%fpr") == ("lira-offline", "tpr@0.1%fpr")
    assert parse_mia_key("val/ppl") is None and not is_auc_key("mia/loss/auc_lo") and is_auc_key("mia/loss/auc")
    assert auc_labels(["epoch", "mia/loss/auc", "mia/loss/auc_lo", "mia/zlib/auc", "val/ppl"]) == ["loss", "zlib"]
