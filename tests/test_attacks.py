"""Each attack against a hand computation on fixed statistics, and the score direction."""

import math
import zlib

import numpy as np
import pytest

from memray.attacks import ATTACKS, attack_scores
from memray.config import AttackConfig
from memray.scoring import TokenStats

# every attack scored per sample (mink and mink++ get k = 0.2); lira and rmia come from reference models
ALL = [AttackConfig(name=n) for n in ATTACKS if not ATTACKS[n].needs_reference_models]


def float32(values) -> np.ndarray | None:
    return None if values is None else np.array(values, dtype=np.float32)


def stats(logprobs, mu=None, sigma=None) -> TokenStats:
    return TokenStats(float32(logprobs), float32(mu), float32(sigma))


SAMPLE = stats([-1, -2, -3, -4], mu=[-2, -2, -2, -2], sigma=[1, 2, 0.5, 1])  # loss 2.5
REFERENCE = stats([-3, -3, -3, -3])  # loss 3
TEXT = "the cat sat on the mat, the cat sat on the mat"


def test_each_attack_equals_a_hand_computation():
    configs = [*ALL, AttackConfig(name="mink", k=0.5), AttackConfig(name="mink++", k=0.5)]
    scores = attack_scores(configs, [SAMPLE], [TEXT], [REFERENCE])
    assert scores["loss"][0] == pytest.approx(-2.5)
    assert scores["ref"][0] == pytest.approx(3.0 - 2.5)
    compressed = len(zlib.compress(TEXT.encode()))
    assert 10 < compressed < len(TEXT)  # the repeated text compresses
    assert scores["zlib"][0] == pytest.approx(-2.5 / compressed)
    # k = 0.2 of 4 tokens: int(0.8) = 0, at least 1 token: the lowest log-prob
    assert scores["mink"][0] == pytest.approx(-4.0)
    # k = 0.5: the 2 lowest, -4 and -3
    assert scores["mink@0.5"][0] == pytest.approx(-3.5)
    # standardized: (-1+2)/1 = 1, (-2+2)/2 = 0, (-3+2)/0.5 = -2, (-4+2)/1 = -2
    assert scores["mink++"][0] == pytest.approx(-2.0)
    assert scores["mink++@0.5"][0] == pytest.approx(-2.0)
    assert all(s.dtype == np.float64 and s.shape == (1,) for s in scores.values())


def test_min_k_counts_int_of_k_tokens_at_least_one():
    """The rule of Shi et al. 2024's code and MIMIR: int(k * n) lowest tokens, at least 1."""
    logprobs = -np.arange(1, 101, dtype=np.float32)  # -1 .. -100
    scores = attack_scores([AttackConfig(name="mink", k=0.553)], [stats(logprobs)], ["x"], None)
    assert scores["mink@0.553"][0] == pytest.approx(-np.mean(np.arange(46, 101)))  # int(55.3) = 55
    nine = -np.arange(1, 10, dtype=np.float32)  # 0.2 of 9 tokens: int(1.8) = 1 (ceil would take 2)
    assert attack_scores([AttackConfig(name="mink")], [stats(nine)], ["x"], None)["mink"][0] == pytest.approx(-9.0)
    standardized = stats(nine, mu=[0] * 9, sigma=[1] * 9)
    assert attack_scores([AttackConfig(name="mink++")], [standardized], ["x"], None)["mink++"][0] == pytest.approx(-9.0)
    one = stats([-2.0])  # 0.2 of 1 token: int(0.2) = 0, so the one token
    assert attack_scores([AttackConfig(name="mink")], [one], ["x"], None)["mink"][0] == pytest.approx(-2.0)


def test_lower_loss_scores_higher_for_every_attack():
    """The shared contract of every registered attack: higher score = more likely a member."""
    member = stats([-0.5, -1.0, -0.2, -1.5], mu=[-2, -2, -2, -2], sigma=[1, 1, 1, 1])
    nonmember = stats([-2.5, -3.0, -2.2, -3.5], mu=[-2, -2, -2, -2], sigma=[1, 1, 1, 1])
    reference = stats([-3, -3, -3, -3])
    scores = attack_scores(ALL, [member, nonmember], [TEXT, TEXT], [reference, reference])
    for label, (member_score, nonmember_score) in scores.items():
        assert member_score > nonmember_score, label


def test_scores_keep_the_sample_order():
    samples = [stats([-float(i)] * 3, mu=[0] * 3, sigma=[1] * 3) for i in range(1, 6)]
    scores = attack_scores(ALL, samples, ["abc"] * 5, samples)
    np.testing.assert_allclose(scores["loss"], [-1, -2, -3, -4, -5])
    np.testing.assert_allclose(scores["ref"], 0)


def test_ref_without_reference_is_a_clear_error():
    with pytest.raises(ValueError, match="'ref' needs the reference model's statistics"):
        attack_scores([AttackConfig(name="ref")], [SAMPLE], [TEXT], None)
    # attacks that need no reference run without one
    assert math.isfinite(attack_scores([AttackConfig(name="loss")], [SAMPLE], [TEXT], None)["loss"][0])


def test_mink_plus_plus_without_vocab_stats_is_a_clear_error():
    with pytest.raises(ValueError, match="need_vocab_stats=True"):
        attack_scores([AttackConfig(name="mink++")], [stats([-1, -2])], [TEXT], None)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="one entry per sample"):
        attack_scores(ALL, [SAMPLE, SAMPLE], [TEXT], [REFERENCE, REFERENCE])


def test_zlib_divides_by_the_compressed_size_of_the_scored_text():
    """A text truncated to max_length is scored on its kept part, and zlib compresses that part."""
    from memray import models, scoring
    from memray.config import ModelConfig

    tokenizer = models.load_tokenizer(ModelConfig(name="tiny-gpt2"))
    text = " ".join(f"word{i}" for i in range(200))
    ids = scoring.tokenize_texts(tokenizer, [text], 16)
    [kept] = scoring.scored_texts(tokenizer, ids)
    assert text.startswith(kept) and len(kept) < len(text) / 5
    sample = stats([-2.0] * (len(ids[0]) - 1))
    score = attack_scores([AttackConfig(name="zlib")], [sample], [kept], None)["zlib"][0]
    assert score == pytest.approx(-2.0 / len(zlib.compress(kept.encode())))


def test_reference_model_attacks_are_left_to_their_references():
    configs = [AttackConfig(name="loss"), AttackConfig(name="lira", references=4), AttackConfig(name="rmia", references=4)]
    assert list(attack_scores(configs, [SAMPLE], [TEXT], None)) == ["loss"]
    with pytest.raises(ValueError, match="scored from reference models"):
        ATTACKS["lira"].score(configs[1], SAMPLE, TEXT, None)
