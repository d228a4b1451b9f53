"""Each attack against a hand computation on fixed statistics (or, for the attacks scored
as a set, on a hand-made context and model), and the score direction."""

import math
import zlib

import numpy as np
import pytest

import torch

from memray import attacks
from memray.attacks import ATTACKS, AttackContext, AttackSetup, Prepared, attack_scores
from memray.config import AttackConfig
from memray.files import validate_trial
from memray.schema import ConfigError
from memray.scoring import TokenStats

# every attack scored per sample (mink and mink++ get k = 0.2); lira and rmia come from
# reference models, recall, dcpdd and gradnorm from a context (tested below)
ALL = [AttackConfig(name=n) for n in ATTACKS if not ATTACKS[n].needs_reference_models and ATTACKS[n].score_set is None]
SET_ATTACKS = [n for n in ATTACKS if ATTACKS[n].score_set is not None]


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


# ---------------------------------------------------------------------------------------
# Attacks scored as a set
# ---------------------------------------------------------------------------------------


def setup(validation_ids, context_length=16, max_length=8, bos=0, frequency_texts=("none", [])):
    return AttackSetup(token_ids=lambda texts, length: [[bos, *map(int, t.split())][:length] for t in texts], bos=bos,
                       validation_ids=validation_ids, context_length=context_length, max_length=max_length,
                       vocab_size=4, frequency_texts=lambda: frequency_texts, source="sweep.yaml")


def test_every_attack_is_scored_one_way_and_set_attacks_state_their_rules():
    assert {"recall", "dcpdd", "gradnorm"} <= set(SET_ATTACKS)
    for name in ATTACKS:
        spec = ATTACKS[name]
        assert (spec.score_set is not None) + spec.needs_reference_models <= 1, name
        if spec.score_set is not None:
            assert spec.rules, f"{name} records no rules"
            assert spec.needs_model == bool(spec.extra_pass), name  # bench shows the cost of a model pass


def test_recall_prefix_takes_validation_shots_without_bos_up_to_half_the_context():
    validation = [[0, 5, 6], [0, 7], [0, 8, 9, 10], [0, 11]]
    # context 16, max_length 8: cap min(16 // 2, 16 - 8) = 8 tokens; BOS + 2 + 1 + 3 = 7 fit, the 4th shot not asked
    prepared = attacks.prepare_attacks([AttackConfig(name="recall", shots=3)], setup(validation))["recall@shots3"]
    assert prepared.state == ([0, 5, 6, 7, 8, 9, 10], 0)
    assert prepared.record == {"shots": 3, "shots_asked": 3, "prefix_tokens": 7, "prefix_cap": 8, "context": 16}
    # context 12: cap min(6, 4) = 4: BOS + 2 + 1 fit, the third shot (3 tokens) does not
    small = attacks.prepare_attacks([AttackConfig(name="recall", shots=3)], setup(validation, context_length=12))
    assert small["recall@shots3"].state[0] == [0, 5, 6, 7] and small["recall@shots3"].record["shots"] == 2


def test_recall_is_the_conditioned_over_the_unconditioned_log_likelihood():
    prefix = [0, 5, 6]
    asked = []

    def score(token_ids):  # the conditioned pass: prefix + the sample without its BOS
        asked.extend(token_ids)
        return [stats([-9, -9, -2, -3, -4]), stats([-9, -9, -1, -1, -1])]

    # sample 1: LL(x) = mean(-1, -2, -3) = -2, LL(x | P) = mean of the last 3 = -3: 1.5
    # sample 2: LL(x) = -0.5 (loss 0.5), LL(x | P) = -1: 2.0
    context = AttackContext([[0, 1, 2, 3], [0, 3, 2, 1]], ["a", "b"], [stats([-1, -2, -3]), stats([-0.5, -0.5, -0.5])],
                            score=score, prepared={"recall": Prepared((prefix, 0))})
    scores = attack_scores([AttackConfig(name="recall")], context.target, context.texts, None, context)
    assert asked == [[0, 5, 6, 1, 2, 3], [0, 5, 6, 3, 2, 1]]
    np.testing.assert_allclose(scores["recall"], [1.5, 2.0])


def test_recall_refuses_too_few_validation_samples_and_a_context_too_short():
    with pytest.raises(ConfigError, match=r"sweep.yaml: attacks.recall.shots: .*validation split, which holds 1"):
        attacks.prepare_attacks([AttackConfig(name="recall")], setup([[0, 5]]))
    with pytest.raises(ConfigError, match="data.max_length: ReCaLL's prefix may take at most 0 tokens"):
        attacks.prepare_attacks([AttackConfig(name="recall", shots=1)], setup([[0, 5]], context_length=8, max_length=8))


def test_dcpdd_calibrates_first_occurrences_by_laplace_smoothed_frequencies_and_caps_them():
    frequencies = attacks.token_frequencies([[1, 1, 2]], vocab_size=4)
    # counts 0, 2, 1, 0 of 3 tokens: (1 + n) / (3 + 4)
    np.testing.assert_allclose(frequencies, [1 / 7, 3 / 7, 2 / 7, 1 / 7])
    # targets 1, 2, 1, 3: the second 1 (p = 0.9) is not counted; token 3 (p = 0.5) is capped at 0.01
    sample = stats(np.log([0.001, 0.002, 0.9, 0.5]))
    context = AttackContext([[0, 1, 2, 1, 3]], ["x"], [sample], prepared={"dcpdd": Prepared(frequencies)})
    score = attack_scores([AttackConfig(name="dcpdd")], [sample], ["x"], None, context)["dcpdd"][0]
    expected = (0.001 * math.log(7 / 3) + 0.002 * math.log(7 / 2) + 0.01) / 3
    assert score == pytest.approx(expected, rel=1e-6)


def test_dcpdd_counts_the_frequency_corpus_with_the_trials_tokenizer():
    found = attacks.prepare_attacks([AttackConfig(name="dcpdd")],
                                    setup([], frequency_texts=("the pretraining text", ["1 1", "2"])))["dcpdd"]
    # token_ids puts BOS (0) first: 0 1 1 and 0 2: counts 2, 2, 1, 0 of 5
    np.testing.assert_allclose(found.state, [3 / 9, 3 / 9, 2 / 9, 1 / 9])
    assert found.record == {"frequency_source": "the pretraining text", "frequency_texts": 2, "frequency_tokens": 5}
    with pytest.raises(ConfigError, match="attacks.dcpdd: DC-PDD counts token frequencies on none"):
        attacks.prepare_attacks([AttackConfig(name="dcpdd")], setup([]))


def test_dcpdd_and_quantile_read_and_count_the_frequency_corpus_once():
    reads = []

    def frequency_texts():
        reads.append(1)
        return "the pretraining text", ["1 1", "2"]

    shared = setup([[0, 1]] * attacks.QUANTILE_MIN_SAMPLES)
    shared.frequency_texts = frequency_texts
    found = attacks.prepare_attacks([AttackConfig(name="dcpdd"), AttackConfig(name="quantile")], shared)
    assert len(reads) == 1
    np.testing.assert_array_equal(found["dcpdd"].state, found["quantile"].state)
    assert "regression_samples" in found["quantile"].record and "regression_samples" not in found["dcpdd"].record


class BiasModel(torch.nn.Module):
    """Logits = b + c at every position (vocabulary of 4), plus a frozen tensor in the graph."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(4))
        self.c = torch.nn.Parameter(torch.zeros(4))
        self.frozen = torch.nn.Parameter(torch.zeros(4), requires_grad=False)

    def forward(self, input_ids, use_cache=False):
        logits = (self.b + self.c + self.frozen).expand(*input_ids.shape, 4)
        return type("Output", (), {"logits": logits})()


def test_gradnorm_is_the_negated_mean_max_norm_of_the_trained_gradients():
    model = BiasModel()
    model.b.grad = torch.ones(4)  # the Trainer's gradient: put back after scoring
    context = AttackContext([[0, 1, 1, 2], [0, 3, 3, 3]], ["a", "b"], [stats([-1, -1, -1])] * 2, model=model)
    scores = attack_scores([AttackConfig(name="gradnorm")], context.target, context.texts, None, context)["gradnorm"]
    # uniform softmax 0.25 each; targets 1, 1, 2: gradient 0.25 - (0, 2/3, 1/3, 0), largest |.| 5/12, the same for b and c
    # targets 3, 3, 3: 0.25 - (0, 0, 0, 1): largest |.| 0.75
    np.testing.assert_allclose(scores, [-5 / 12, -0.75], rtol=1e-6)
    assert torch.equal(model.b.grad, torch.ones(4)) and model.c.grad is None and model.frozen.grad is None


def test_gradnorm_drops_a_prompt_methods_virtual_positions():
    class Prompted(BiasModel):
        def forward(self, input_ids, use_cache=False):  # 2 virtual positions first, whose logits favour token 0
            output = super().forward(input_ids)
            virtual = torch.tensor([9.0, 0, 0, 0]).expand(input_ids.shape[0], 2, 4)
            return type("Output", (), {"logits": torch.cat([virtual, output.logits], dim=1)})()

    context = AttackContext([[0, 1, 1, 2]], ["a"], [stats([-1, -1, -1])], model=Prompted(), virtual_tokens=2)
    score = attack_scores([AttackConfig(name="gradnorm")], context.target, context.texts, None, context)["gradnorm"]
    assert score[0] == pytest.approx(-5 / 12, rel=1e-6)


def test_set_attacks_need_a_context():
    for name in SET_ATTACKS:
        with pytest.raises(ValueError, match="AttackContext"):
            attack_scores([AttackConfig(name=name)], [SAMPLE], [TEXT], None)


def test_options_default_from_the_registry_and_only_where_taken():
    assert AttackConfig(name="recall").shots == attacks.RECALL_SHOTS
    assert AttackConfig(name="recall").label == "recall"
    assert AttackConfig(name="recall", shots=2).label == "recall@shots2"
    with pytest.raises(ValueError, match="shots is only used by recall, not loss"):
        AttackConfig(name="loss", shots=2)
    with pytest.raises(ValueError, match="greater than 0"):
        AttackConfig(name="recall", shots=0)


def test_listing_a_set_attack_puts_its_rules_in_the_trial_id_and_leaves_other_ids_alone():
    plain = validate_trial({"attacks": ["loss"]}, "t")
    with_recall = validate_trial({"attacks": ["loss", "recall"]}, "t")
    assert "shots" not in plain.resolved()["attacks"][0] or plain.resolved()["attacks"][0]["shots"] is None
    assert plain.trial_id() != with_recall.trial_id()
    rules = attacks.attack_rules(with_recall.attacks)
    assert rules["recall"] == dict(ATTACKS["recall"].rules) and "loss" not in rules


# ---------------------------------------------------------------------------------------
# AUCs below chance, flagged with the split audit beside them
# ---------------------------------------------------------------------------------------

#: an epoch like the issue's: Zlib .34 on a 64 + 64 split, its interval wholly below 0.5
BELOW = {"epoch": 3, "train/loss": 2.0, "val/ppl": 9.0,
         "mia/loss/auc": 0.45, "mia/loss/auc_lo": 0.35, "mia/loss/auc_hi": 0.55,
         "mia/zlib/auc": 0.34, "mia/zlib/auc_lo": 0.25, "mia/zlib/auc_hi": 0.43,
         "split/ngram7_overlap": 0.04, "split/ngram13_overlap": 0.031}


def test_below_chance_is_an_interval_wholly_below_one_half():
    from memray import metrics

    assert metrics.below_chance(BELOW) == ["zlib"]
    assert metrics.below_chance({**BELOW, "mia/zlib/auc_hi": 0.5}) == []  # holds 0.5: chance, not below it
    assert metrics.below_chance_note(BELOW) == "BELOW CHANCE: zlib 0.340 [0.25, 0.43]; split 7/13-gram overlap 0.04/0.03"
    assert metrics.below_chance_note({**BELOW, "mia/zlib/auc_hi": 0.6}) is None


def test_the_trial_and_console_lines_flag_it():
    from memray.sweep.console import TrialRow, epoch_text
    from memray.trial import epoch_line

    config = validate_trial({"attacks": ["loss", "zlib"]}, "t")
    assert epoch_line(BELOW, config).endswith("| BELOW CHANCE: zlib 0.340 [0.25, 0.43]; split 7/13-gram overlap 0.04/0.03")
    line = epoch_text(TrialRow("t", 3, "loss"), BELOW)
    assert "zlib AUC 0.340" in line and line.endswith("BELOW CHANCE: zlib 0.340 [0.25, 0.43]; split 7/13-gram overlap 0.04/0.03")
    assert "BELOW" not in epoch_text(TrialRow("t", 3, "loss"), {**BELOW, "mia/zlib/auc_hi": 0.51})


def test_the_report_notes_it_with_the_split_audit():
    from memray.report.loading import AttackResult, Trial
    from memray.report.tables import BELOW_CHANCE_MARK, _chance_mark, below_chance_notes

    audit = {"7gram": {"mean": 0.04, "median": 0.0, "max": 0.69, "above_0.2": 0.0625, "above_0.8": 0.0},
             "13gram": {"mean": 0.031, "median": 0.0, "max": 0.64, "above_0.2": 0.0625, "above_0.8": 0.0},
             "filter": None}
    nan = float("nan")
    trial = Trial("t1", "t1", "success", None, {}, {}, [BELOW], split_audit=audit)
    trial.attacks = {"loss": AttackResult("loss", 0.45, nan, nan, 0.45, nan, nan, ci=(0.35, 0.55)),
                     "zlib": AttackResult("zlib", 0.34, nan, nan, 0.34, nan, nan, ci=(0.25, 0.43))}
    [note] = below_chance_notes([trial])
    assert note.startswith("BELOW CHANCE in t1: zlib 0.340 [0.250, 0.430]")
    assert "7gram overlap mean 0.040 (max 0.69, 6% above 0.2); 13gram overlap mean 0.031" in note
    assert _chance_mark(trial, "zlib") == BELOW_CHANCE_MARK and _chance_mark(trial, "loss") == " (chance)"


# ---------------------------------------------------------------------------------------
# A trial with every attack that runs on its own
# ---------------------------------------------------------------------------------------


def test_a_trial_with_every_attack_reports_each_per_epoch_with_its_interval_and_the_split_audit(tmp_path):
    import json

    from memray.trial import run_trial

    names = [n for n in ATTACKS if not ATTACKS[n].needs_reference_models]
    # the neighbourhood attack's mask-filling model: a tiny random BERT (none can be had here)
    entries = [{"name": n, **({"mask_model": tiny_mask_model(tmp_path / "bert"), "neighbours": 2}
                              if ATTACKS[n].options.get("mask_model", 0) is None else {})} for n in names]
    labels = [validate_trial({"attacks": [entry]}, "t").attacks[0].label for entry in entries]
    config = validate_trial({
        "output_dir": str(tmp_path), "model": {"name": "tiny-gpt2"},
        "data": {"dataset": "pydoc", "max_length": 64, "members": 16, "nonmembers": 16, "validation": 32,
                 "overlap_filter": {"ngram": 7, "threshold": 0.5}},
        "method": {"name": "lora", "rank": 4, "lr": 0.003}, "train": {"epochs": 1, "batch_size": 8},
        "eval": {"batch_size": 16}, "attacks": entries}, "test")
    run_trial(config, trial_dir=tmp_path / "t", progress=False)
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["status"] == "success" and len(result["epochs"]) == 2
    for row in result["epochs"]:
        for label in labels:
            low, auc, high = (row[f"mia/{label}/{key}"] for key in ("auc_lo", "auc", "auc_hi"))
            assert 0 <= low <= auc <= high <= 1, label
    audit = result["split_audit"]
    assert audit["filter"]["ngram"] == 7 and audit["filter"]["kept"] == 16 and audit["7gram"]["max"] <= 0.5
    assert {"7gram", "13gram"} <= set(audit) and result["epochs"][0]["split/ngram7_overlap"] == audit["7gram"]["mean"]
    rules = result["attack_rules"]
    # 5 shots asked; whole 64-token validation blocks while the prefix fits half of 512 positions
    assert rules["recall"]["shots_asked"] == 5 and 1 <= rules["recall"]["shots"] <= 5
    assert rules["recall"]["prefix_tokens"] <= rules["recall"]["prefix_cap"] == 256
    assert rules["dcpdd"]["frequency_source"].startswith("the built-in base's pretraining text")
    assert rules["gradnorm"] == dict(ATTACKS["gradnorm"].rules)
    assert rules["quantile"]["regression_samples"] == 32


# ---------------------------------------------------------------------------------------
# The quantile attack
# ---------------------------------------------------------------------------------------


def test_quantile_regression_is_exact_on_a_linear_case_and_scores_the_residual():
    frequencies = np.array([0.1, 0.2, 0.3, 0.4])
    # known non-members of lengths 2..6 over different tokens; their -loss = -10 + 2 log n + 3 mean log f exactly
    validation_ids = [[0, *([1 + i % 3] * (n - 1)), 3] for i, n in enumerate((2, 3, 4, 5, 6, 2, 4, 6))]
    features = attacks.quantile_features(validation_ids, frequencies)
    assert features[0] == pytest.approx([math.log(2), (math.log(0.2) + math.log(0.4)) / 2])
    values = -10 + 2 * features[:, 0] + 3 * features[:, 1]
    np.testing.assert_allclose(attacks.fit_quantile(features, values), [-10, 2, 3], atol=1e-7)
    # one outlier above: the median fit does not move
    noisy = values.copy()
    noisy[0] += 10
    assert attacks.fit_quantile(features, noisy, 0.5) == pytest.approx([-10, 2, 3], abs=1e-6)
    validation = [stats([v] * (len(ids) - 1)) for v, ids in zip(values, validation_ids)]  # -loss = v
    scored_ids = [[0, 1, 2, 3], [0, 2, 2, 2, 2]]
    predicted = -10 + attacks.quantile_features(scored_ids, frequencies) @ [2, 3]
    target = [stats([-0.5] * 3), stats([-0.25] * 4)]
    context = AttackContext(scored_ids, ["a", "b"], target, prepared={"quantile": Prepared(frequencies)},
                            validation_ids=validation_ids, validation=validation)
    score = attack_scores([AttackConfig(name="quantile")], target, context.texts, None, context)["quantile"]
    np.testing.assert_allclose(score, [-0.5 - predicted[0], -0.25 - predicted[1]], atol=1e-6)


def test_quantile_needs_enough_known_non_members():
    with pytest.raises(ConfigError, match="sweep.yaml: data.validation: the quantile attack .* holds 5 samples"):
        attacks.prepare_attacks([AttackConfig(name="quantile")], setup([[0, 1]] * 5))


# ---------------------------------------------------------------------------------------
# The neighbourhood attack: its mask-filling model comes from no package registry, so its
# code runs here on stand-ins and on a tiny random BERT built in the test
# ---------------------------------------------------------------------------------------


def tiny_mask_model(folder) -> str:
    """A random BERT fill-mask model over a word-level vocabulary, saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a of to in is and for with on as by".split(),
             *(f"word{i}" for i in range(40))]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


def test_word_neighbours_replace_one_word_at_positions_spread_evenly():
    upper = lambda words, position: words[position].upper()  # noqa: E731 (a stand-in mask filler)
    assert attacks.word_neighbours("a b c d e", 3, upper) == ["A b c d e", "a b C d e", "a b c d E"]
    assert attacks.word_neighbours("a b", 5, upper) == ["A b", "a B"]  # no more than one per word
    same = lambda words, position: words[position] if position else "z"  # noqa: E731
    assert attacks.word_neighbours("a b", 2, same) == ["z b"]  # a filler equal to the word makes no neighbour


def test_neighbourhood_is_the_neighbours_mean_loss_less_the_samples():
    made = {"a b": ["x b", "a y"], "c": []}
    losses = {"x b": 3.0, "a y": 4.0}
    asked = []

    def score(token_ids):
        asked.extend(token_ids)
        return [stats([-losses[text]] * 2) for text in token_ids]  # the stand-in tokenization keeps the text

    state = {"substitute": None, "token_ids": lambda texts, length: list(texts), "max_length": 8, "neighbours": made}
    target = [stats([-1.0, -2.0]), stats([-1.0])]
    context = AttackContext([[0, 1, 2], [0, 1]], ["a b", "c"], target, score=score,
                            prepared={"neighbourhood": Prepared(state)})
    scores = attack_scores([AttackConfig(name="neighbourhood", mask_model="m")], target, context.texts, None, context)
    # (3 + 4) / 2 - 1.5 = 2; no neighbour: 0
    np.testing.assert_allclose(scores["neighbourhood"], [2.0, 0.0])
    assert asked == ["x b", "a y"]


def test_neighbourhood_refuses_a_missing_or_broken_mask_model_and_runs_a_real_one(tmp_path):
    with pytest.raises(ConfigError, match=r"attacks.neighbourhood.mask_model: .*from a package registry"):
        attacks.prepare_attacks([AttackConfig(name="neighbourhood")], setup([]))
    with pytest.raises(ConfigError, match="attacks.neighbourhood.mask_model: .*not a loadable"):
        attacks.prepare_attacks([AttackConfig(name="neighbourhood", mask_model=str(tmp_path))], setup([]))
    path = tiny_mask_model(tmp_path / "bert")
    config = AttackConfig(name="neighbourhood", mask_model=path, neighbours=3)
    assert config.label == "neighbourhood@neighbours3"
    prepared = attacks.prepare_attacks([config], setup([]))[config.label]
    assert prepared.record == {"mask_model": path, "neighbours": 3}
    text = "the word1 of word2 and word3"
    neighbours = attacks.word_neighbours(text, 3, prepared.state["substitute"])
    assert 1 <= len(neighbours) <= 3
    for neighbour in neighbours:  # one word replaced, by a whole word
        assert sum(a != b for a, b in zip(neighbour.split(), text.split())) == 1


def test_a_trial_an_attack_cannot_run_is_refused_while_validating_naming_the_field():
    with pytest.raises(ConfigError, match=r"s.yaml: .*attacks.recall.shots: ReCaLL draws its 5 shots .* = 3"):
        validate_trial({"data": {"validation": 3}, "attacks": ["recall"]}, "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: .*data.validation: the quantile attack .* 20 samples"):
        validate_trial({"data": {"validation": 20}, "attacks": ["quantile"]}, "s.yaml")
    with pytest.raises(ConfigError, match=r"s.yaml: .*attacks.neighbourhood.mask_model: .*package registry"):
        validate_trial({"attacks": ["neighbourhood"]}, "s.yaml")
    validate_trial({"data": {"validation": 30}, "attacks": [{"name": "recall", "shots": 30}, "quantile"]}, "s.yaml")
