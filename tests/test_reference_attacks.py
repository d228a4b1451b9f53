"""LiRA and RMIA against hand computations and synthetic statistics with known answers."""

import math

import numpy as np
import pytest
from scipy import stats

from memray.metrics import roc_auc, tpr_at_fpr
from memray.reference_attacks import (MIN_REFERENCES, DegenerateStatistic, calibrate_offline_a, confidence,
                                      counterfactual, half_masks, lira_offline, lira_online, logit_confidence,
                                      reference_seed, rmia, rmia_offline_score, variance_model)


def test_logit_confidence_is_log_odds_of_the_geometric_mean_probability():
    losses = np.array([0.1, 1.0, 5.0])
    p = np.exp(-losses)
    np.testing.assert_allclose(logit_confidence(losses), np.log(p / (1 - p)))
    np.testing.assert_allclose(confidence(losses), p)
    assert np.isfinite(logit_confidence(np.array([0.0])))


def test_lira_equals_a_hand_computation():
    # two samples, four references: sample 0 in refs 0, 1; sample 1 in refs 2, 3
    reference = np.array([[2.0, 0.0], [4.0, 1.0], [0.0, 5.0], [1.0, 3.0]])
    in_mask = np.array([[True, False], [True, False], [False, True], [False, True]])
    target = np.array([3.5, 0.2])
    # per-sample variance: sample 0 in {2, 4} (mean 3, std sqrt 2), out {0, 1} (mean .5, std sqrt .5)
    online = lira_online(target, reference, in_mask, variance="per-example")
    expected0 = stats.norm.logpdf(3.5, 3, math.sqrt(2)) - stats.norm.logpdf(3.5, 0.5, math.sqrt(0.5))
    assert online[0] == pytest.approx(expected0)
    # shared variance: in deviations (-1, 1, 1, -1) -> 4 / (4 - 2) = 2; out (-.5, .5, -.5, .5) -> 1 / 2
    shared = lira_online(target, reference, in_mask, variance="pooled")
    assert shared[1] == pytest.approx(stats.norm.logpdf(0.2, 4, math.sqrt(2)) - stats.norm.logpdf(0.2, 0.5, math.sqrt(0.5)))
    offline = lira_offline(target, reference, in_mask, variance="pooled")
    assert offline[0] == pytest.approx(stats.norm.logcdf(3.5, 0.5, math.sqrt(0.5)))


def test_rmia_equals_a_hand_computation():
    reference = np.array([[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]])
    in_mask = np.array([[True, False, True], [False, True, False]])
    target = np.array([0.75, 0.5, 0.5])
    # online Pr(x): means .5, .5, .5 -> ratios 1.5, 1, 1; share of z (all three) with ratio_x >= ratio_z
    np.testing.assert_allclose(rmia(target, reference, in_mask), [1.0, 2 / 3, 2 / 3])
    # gamma 1.5: ratio_x >= 1.5 ratio_z -> x0: 1.5 >= 1.5 twice, not 2.25 -> 2/3; the others never
    np.testing.assert_allclose(rmia(target, reference, in_mask, gamma=1.5), [2 / 3, 0, 0])
    # offline, a = 0: Pr(x) = (out mean + 1) / 2: out means .75, .5, .5 -> .875, .75, .75
    ratios = target / np.array([0.875, 0.75, 0.75])
    expected = [(ratios[i] >= ratios).mean() for i in range(3)]
    np.testing.assert_allclose(rmia(target, reference, in_mask, online=False, offline_a=0.0), expected)
    # population: z = samples 1 and 2 only
    np.testing.assert_allclose(rmia(target, reference, in_mask, population=[1, 2]), [1.0, 1.0, 1.0])


def test_half_masks_put_each_sample_in_exactly_half_and_each_reference_on_half_the_pool():
    masks = half_masks(pool=201, references=8, seed=3)
    assert masks.shape == (8, 201) and (masks.sum(axis=0) == 4).all()
    assert sorted(set(masks.sum(axis=1))) == [100, 101]  # every reference trains on half the pool (to one)
    assert len({row.tobytes() for row in masks}) == 8  # distinct halves
    np.testing.assert_array_equal(masks, half_masks(201, 8, 3))
    assert not np.array_equal(masks, half_masks(201, 8, 4))
    for bad in (2, 3, 5):
        with pytest.raises(ValueError, match=f"even number of at least {MIN_REFERENCES} references"):
            half_masks(10, bad, 0)


@pytest.mark.parametrize("references", [2, 3, 5])
def test_references_refused_below_the_minimum_or_odd_with_one_line_naming_the_field(tmp_path, capsys, references):
    from memray import cli

    path = tmp_path / "trial.yaml"
    path.write_text(f"attacks: [loss, {{name: lira, references: {references}}}]\n")
    assert cli.main(["trial", str(path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "attacks.1.references" in error[0] and "at least 4" in error[0], error
    assert not any(tmp_path.glob("runs/*"))


def test_reference_seeds_are_their_own():
    seeds = [reference_seed(0, i) for i in range(8)] + [reference_seed(1, i) for i in range(8)]
    assert len(set(seeds)) == 16 and 0 not in seeds and 1 not in seeds
    assert reference_seed(0, 3) == reference_seed(0, 3)


def test_variance_model_is_pooled_below_sixteen_references():
    assert variance_model(4) == variance_model(14) == "pooled"
    assert variance_model(16) == variance_model(64) == "per-example"


def test_identical_reference_statistics_are_refused_not_clamped():
    in_mask = half_masks(6, 4, 0)
    with pytest.raises(DegenerateStatistic, match="no spread"):
        lira_online(np.zeros(6), np.ones((4, 6)), in_mask)


def test_counterfactual_memorization_equals_a_hand_computation():
    nll = np.array([[1.0, 2.0], [1.5, 2.0], [3.0, 1.0], [2.5, 1.0]])
    in_mask = np.array([[True, False], [True, False], [False, True], [False, True]])
    # sample 0: in -1, -1.5 (mean -1.25); out -3, -2.5 (mean -2.75) -> 1.5; sample 1: -1 - (-2) = 1
    np.testing.assert_allclose(counterfactual(nll, in_mask), [1.5, 1.0])


def synthetic(references: int, n: int = 2000, shift: float = 1.0, seed: int = 0):
    """Samples of very different difficulty (a per-sample offset with spread 3) and a
    membership effect `shift` (std 1 noise per model): LOSS is weak, per-sample calibration strong."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 3, n)
    is_member = np.arange(n) < n // 2
    in_mask = half_masks(n, references, seed + 1)
    reference = difficulty + shift * in_mask + rng.normal(0, 1, (references, n))
    target = difficulty + shift * is_member + rng.normal(0, 1, n)
    return target, reference, in_mask, is_member


def test_lira_reaches_the_optimal_auc_and_beats_the_uncalibrated_score():
    target, reference, in_mask, is_member = synthetic(references=64)
    # the Bayes-optimal test between N(d, 1) and N(d + 1, 1) per sample: AUC = Phi(1 / sqrt 2)
    optimal = stats.norm.cdf(1 / math.sqrt(2))
    online = roc_auc(lira_online(target, reference, in_mask), is_member)
    offline = roc_auc(lira_offline(target, reference, in_mask), is_member)
    assert online == pytest.approx(optimal, abs=0.03) and offline == pytest.approx(optimal, abs=0.03)
    uncalibrated = roc_auc(target, is_member)  # LOSS's analogue: the statistic alone
    assert uncalibrated < optimal - 0.1
    assert tpr_at_fpr(lira_online(target, reference, in_mask), is_member, 0.01) > tpr_at_fpr(target, is_member, 0.01)


def test_rmia_with_few_references_beats_the_uncalibrated_score():
    target, reference, in_mask, is_member = synthetic(references=4)
    # probabilities: a sigmoid of the statistic, as p from a logit
    p_target, p_reference = 1 / (1 + np.exp(-target)), 1 / (1 + np.exp(-reference))
    online = roc_auc(rmia(p_target, p_reference, in_mask), is_member)
    offline = roc_auc(rmia(p_target, p_reference, in_mask, online=False), is_member)
    uncalibrated = roc_auc(p_target, is_member)
    assert online > uncalibrated + 0.1 and offline > uncalibrated + 0.05
    # no membership effect: chance
    target, reference, in_mask, is_member = synthetic(references=4, shift=0.0)
    assert roc_auc(rmia(1 / (1 + np.exp(-target)), 1 / (1 + np.exp(-reference)), in_mask), is_member) == \
        pytest.approx(0.5, abs=0.04)


def test_missing_side_and_bad_shapes_are_clear_errors():
    with pytest.raises(DegenerateStatistic, match="fewer than two reference models"):
        lira_online(np.zeros(2), np.zeros((4, 2)), np.array([[True, True], [False, True], [False, True], [False, False]]))
    with pytest.raises(ValueError, match="must be"):
        lira_online(np.zeros(3), np.zeros((2, 2)), np.zeros((2, 2), bool))


def lm_like(references: int, n: int = 2000, seed: int = 0):
    """Mean token losses as a fine-tuned language model gives them: per-sample difficulty
    (losses 1.5-4.5 nats, Pr 0.01-0.2), members fitted 0.25 nats better (noise 0.15 per
    model): LOSS is weak, calibration by references strong."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(1.5, 4.5, n)
    is_member = np.arange(n) < n // 2
    in_mask = half_masks(n, references, seed + 1)
    reference = difficulty - 0.25 * in_mask + rng.normal(0, 0.15, (references, n))
    target = difficulty - 0.25 * is_member + rng.normal(0, 0.15, n)
    return target, reference, in_mask, is_member


def test_offline_rmia_with_a_calibrated_a_is_not_loss_relabelled():
    target, reference, in_mask, is_member = lm_like(references=4)
    found = rmia_offline_score(target, reference, in_mask)
    assert found.rules["offline_a"] > 0.5  # the paper's CIFAR-10 0.3 would make it LOSS
    rho = stats.spearmanr(found.scores, -target).statistic
    assert rho <= 0.95
    assert roc_auc(found.scores, is_member) > roc_auc(-target, is_member) + 0.1
    # a = 0.3 on these likelihoods: LOSS relabelled (the review's finding)
    fixed = rmia(confidence(target), confidence(reference), in_mask, online=False, offline_a=0.3)
    assert stats.spearmanr(fixed, -target).statistic > 0.99
    a, mean_auc = calibrate_offline_a(confidence(reference), in_mask)
    assert a == found.rules["offline_a"] and mean_auc[a] == max(mean_auc.values())


def test_lira_with_four_references_is_not_degenerate():
    target, reference, in_mask, is_member = lm_like(references=4)
    for attack in (lira_online, lira_offline):
        scores = attack(logit_confidence(target), logit_confidence(reference), in_mask)
        assert np.isfinite(scores).all() and len(np.unique(scores)) == len(scores)
        assert roc_auc(scores, is_member) > roc_auc(-target, is_member) + 0.1
        assert tpr_at_fpr(scores, is_member, 0.01) > 0.1
