"""Extraction memorization: generation, exact and relaxed similarity, copy-count breakdowns,
canary exposure. Tiny random GPT-2 models trained in seconds on CPU; a word-level
tokenizer built here (no download)."""

import math

import pytest
import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from memray.config import CanaryConfig, ConfigError, ExtractionConfig
from memray.files import validate_trial
from memray.extraction import (
    canary_metrics,
    common_prefix_length,
    duplicate_breakdown,
    exposures,
    extraction_metrics,
    generate_continuations,
    make_canaries,
    mia_duplicate_breakdown,
    sequence_log_likelihoods,
    similarity,
)

VOCAB = 256
PAD, EOS = 0, 1
CANARY_WORDS = ["my", "secret", "number", "is", *map(str, range(10))]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: [PAD]=0, [EOS]=1, the canary words, then w<i> fillers."""
    words = ["[PAD]", "[EOS]", *CANARY_WORDS]
    words += [f"w{i}" for i in range(len(words), VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # no dropout: memorizes in a few epochs
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return GPT2LMHeadModel(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=64, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,  # grouped-query cache
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    return LlamaForCausalLM(config)


def train(model, sequences: list[list[int]], epochs: int, seed: int = 0, batch_size: int = 10) -> None:
    """Plain next-token training on equal-length sequences, shuffled minibatches."""
    data = torch.tensor(sequences)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(data), batch_size):
            batch = data[order[start : start + batch_size]]
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def random_sequences(count: int, length: int, seed: int) -> list[list[int]]:
    first_filler = 2 + len(CANARY_WORDS)
    return torch.randint(first_filler, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_by_hand(model, prefix: list[int], steps: int) -> list[int]:
    """Reference decoding: full forward pass and argmax at every step, no cache, no padding."""
    tokens = list(prefix)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([tokens])
            tokens.append(int(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()))
    return tokens[len(prefix) :]


class CountingGenerate:
    """Wraps `model.generate` and counts the calls."""

    def __init__(self, model):
        self.calls, self.inner = 0, model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# Memorization: a tiny model trained on members, some duplicated
# ---------------------------------------------------------------------------------------

PREFIX, SUFFIX = 8, 8
CFG = ExtractionConfig(enabled=True, samples=30, prefix_tokens=PREFIX, suffix_tokens=SUFFIX, batch_size=16)


@pytest.fixture(scope="module")
def memorized():
    """30 members (10 with 4 copies in the training data, 20 with 1) and 30 non-members.

    Metrics before training, after 10 epochs (the duplicated ones are learnt first), after 40."""
    tokenizer = word_tokenizer()
    sequences = random_sequences(60, PREFIX + SUFFIX, seed=0)
    copies = [4] * 10 + [1] * 20
    members = [(f"m{i}", s, c) for i, (s, c) in enumerate(zip(sequences[:30], copies))]
    nonmembers = [(f"n{i}", s, 1) for i, s in enumerate(sequences[30:])]
    training_texts = [s for _, s, c in members for _ in range(c)]
    model = tiny_gpt2()
    before = extraction_metrics(CFG, model, tokenizer, members, nonmembers, seed=0)
    train(model, training_texts, epochs=10)
    early = extraction_metrics(CFG, model, tokenizer, members, nonmembers, seed=0)
    train(model, training_texts, epochs=30, seed=1)
    late = extraction_metrics(CFG, model, tokenizer, members, nonmembers, seed=0)
    return {"model": model, "tokenizer": tokenizer, "members": members, "nonmembers": nonmembers,
            "before": before, "early": early, "late": late}


def test_memorized_members_are_extracted_and_nonmembers_are_not(memorized):
    before, _ = memorized["before"]
    late, rows = memorized["late"]
    assert before["extract/exact"] == 0.0
    assert late["extract/exact"] >= 0.9
    assert late["extract/nonmember/exact"] == 0.0
    assert late["extract/lcp"] >= 0.9 * SUFFIX and late["extract/nonmember/lcp"] < 1.0
    # relaxed similarity: members near 1, the control near chance
    for name in ("rougeL", "bleu", "edit"):
        assert late[f"extract/{name}"] >= 0.9
        assert late[f"extract/nonmember/{name}"] <= late[f"extract/{name}"] - 0.4
    assert late["extract/rougeL@0.8"] >= 0.9 and late["extract/nonmember/rougeL@0.5"] == 0.0
    assert late["extract/samples"] == 30 and late["extract/nonmember/samples"] == 30
    assert late["extract/skipped"] == 0

    assert len(rows) == 60 and sum(r["member"] for r in rows) == 30
    member_row = next(r for r in rows if r["member"] and r["exact"])
    sample = dict((i, s) for i, s, _ in memorized["members"])[member_row["sample_id"]]
    expected_text = " ".join(f"w{t}" for t in sample[PREFIX:])
    assert member_row["generated_text"] == member_row["suffix_text"] == expected_text
    assert member_row["lcp"] == SUFFIX and member_row["rougeL"] == member_row["edit"] == 1.0
    assert memorized["model"].training  # put back in the mode it was in


def test_duplicated_members_are_memorized_first(memorized):
    early, _ = memorized["early"]
    assert early["extract/exact@dup4"] >= early["extract/exact@dup1"] + 0.5
    assert early["extract/rougeL@dup4"] > early["extract/rougeL@dup1"]
    # non-members have no copy-count breakdown
    assert not any(k.startswith("extract/nonmember/") and "@dup" in k for k in early)


@pytest.mark.parametrize("name", ["exact", "lcp", "rougeL", "bleu", "edit", "rougeL@0.5", "edit@0.8"])
def test_copy_count_breakdown_adds_up_to_the_overall_metric(memorized, name):
    metrics, rows = memorized["early"]
    counts = {c: metrics[f"extract/samples@dup{c}"] for c in (1, 4)}
    assert counts == {1: 20, 4: 10}
    assert sum(counts.values()) == metrics["extract/samples"]
    weighted = sum(counts[c] * metrics[f"extract/{name}@dup{c}"] for c in counts) / metrics["extract/samples"]
    assert weighted == pytest.approx(metrics[f"extract/{name}"])
    assert 0.0 < metrics["extract/exact"] < 1.0  # the check above is not trivially 0 = 0 or 1 = 1


def test_short_samples_are_skipped_and_counted(memorized):
    short = [("short", list(range(20, 20 + PREFIX + SUFFIX - 1)), 1)]
    metrics, rows = extraction_metrics(CFG, memorized["model"], memorized["tokenizer"],
                                       memorized["members"][:5] + short, memorized["nonmembers"] + short, seed=0)
    assert metrics["extract/skipped"] == 1 and metrics["extract/nonmember/skipped"] == 1
    assert metrics["extract/samples"] == 5 and metrics["extract/nonmember/samples"] == 5  # as many as members
    assert "short" not in {r["sample_id"] for r in rows}


def test_the_same_samples_are_drawn_for_the_same_seed(memorized):
    args = (memorized["model"], memorized["tokenizer"], memorized["members"], memorized["nonmembers"])
    few = CFG.model_copy(update={"samples": 7})
    ids = lambda seed: [r["sample_id"] for r in extraction_metrics(few, *args, seed=seed)[1]]
    assert ids(3) == ids(3)
    assert ids(3) != ids(4)
    assert len(ids(3)) == 14


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------


def test_generation_is_batched_and_matches_greedy_decoding_by_hand():
    model = tiny_gpt2().eval()
    prefixes = [list(range(10, 10 + n)) for n in (3, 7, 5, 4, 9, 6, 2, 8, 5, 3)]  # unequal: left padding
    counter = CountingGenerate(model)
    out = generate_continuations(model, prefixes, max_new_tokens=6, batch_size=4, pad_token_id=PAD)
    assert counter.calls == math.ceil(len(prefixes) / 4) == 3
    assert [len(o) for o in out] == [6] * len(prefixes)
    assert out == [greedy_by_hand(model, p, 6) for p in prefixes]


def test_extraction_makes_one_generate_call_per_batch(memorized):
    model = tiny_gpt2()
    counter = CountingGenerate(model)
    members, nonmembers = memorized["members"][:11], memorized["nonmembers"]
    cfg = CFG.model_copy(update={"batch_size": 5})
    extraction_metrics(cfg, model, memorized["tokenizer"], members, nonmembers, seed=0)
    assert counter.calls == math.ceil((11 + 11) / 5)


def test_continuations_do_not_stop_at_the_models_eos_unless_asked():
    model = tiny_gpt2().eval()
    prefix = [10, 11, 12]
    greedy = greedy_by_hand(model, prefix, 6)
    eos = greedy[1]
    until_eos = greedy[: greedy.index(eos) + 1]
    assert len(until_eos) < 6
    model.generation_config.eos_token_id = eos  # the model's own config says it ends early
    full = generate_continuations(model, [prefix], max_new_tokens=6, batch_size=1, pad_token_id=PAD)
    stopped = generate_continuations(model, [prefix], max_new_tokens=6, batch_size=1, pad_token_id=PAD,
                                     eos_token_id=eos)
    assert full == [greedy]
    assert stopped == [until_eos]


def test_sampling_is_seeded_and_leaves_the_callers_random_state_alone():
    model = tiny_gpt2().eval()
    prefixes = [[10, 11, 12]] * 4
    sample = lambda seed: generate_continuations(model, prefixes, max_new_tokens=8, batch_size=4, pad_token_id=PAD,
                                                 do_sample=True, temperature=2.0, seed=seed)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = sample(0)
    assert torch.equal(torch.rand(3), expected_next)
    assert first == sample(0)
    assert first != sample(1)
    assert len({tuple(s) for s in first}) > 1  # samples differ within a batch (temperature 2)


@pytest.mark.parametrize("peft_config, first_token_predicted", [
    (PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4), False),
    (PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4), True),
    (PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16), True),
], ids=["prefix", "prompt", "ptuning"])
@pytest.mark.parametrize("base", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_prompt_learning_models_generate_and_score_with_their_virtual_tokens(base, peft_config, first_token_predicted):
    model = get_peft_model(base(), peft_config)
    with torch.no_grad():  # a prompt far from its random init, so that it changes the output
        for param in model.parameters():
            if param.requires_grad:
                param.mul_(50)
    model.eval()
    prefixes = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    out = generate_continuations(model, prefixes, max_new_tokens=6, batch_size=3, pad_token_id=PAD)
    assert out == [greedy_by_hand(model, p, 6) for p in prefixes]  # PeftModel forward: virtual tokens in

    # scores are the training loss summed over the predicted tokens
    sequences = [[10, 11, 12, 13, 14], [20, 21, 22]]  # unequal lengths: right padding
    scores = sequence_log_likelihoods(model, sequences, batch_size=2, pad_token_id=PAD)
    for seq, score in zip(sequences, scores):
        ids = torch.tensor([seq])
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        predicted = len(seq) if first_token_predicted else len(seq) - 1
        assert score == pytest.approx(-loss.item() * predicted, rel=1e-5)
    with model.disable_adapter():
        without_prompt = sequence_log_likelihoods(model, sequences, batch_size=2, pad_token_id=PAD)
    assert without_prompt[0] != pytest.approx(scores[0], rel=1e-3)  # the virtual tokens were in place


# ---------------------------------------------------------------------------------------
# Similarity, by hand
# ---------------------------------------------------------------------------------------


def test_identical_texts_score_one_and_disjoint_texts_zero():
    assert similarity("the cat sat on the mat", "the cat sat on the mat") == {"rougeL": 1.0, "bleu": 1.0, "edit": 1.0}
    assert similarity("", "")["edit"] == 1.0
    assert similarity("a b", "a b")["bleu"] == pytest.approx(1.0)  # shorter than 4 words
    disjoint = similarity("xyz", "abc")
    assert disjoint == {"rougeL": 0.0, "bleu": 0.0, "edit": 0.0}


def test_rouge_l_is_the_lcs_f_measure():
    # generated 5 words, reference 6; LCS = the, cat, on, mat (4 words): P = 4/5, R = 4/6
    scores = similarity("the cat on a mat", "The cat sat on the mat")
    precision, recall = 4 / 5, 4 / 6
    assert scores["rougeL"] == pytest.approx(2 * precision * recall / (precision + recall))  # 8/11


def test_bleu_is_the_geometric_mean_of_ngram_precisions():
    # same length (brevity penalty 1); 1..4-gram matches 5/6, 3/5, 2/4, 1/3
    scores = similarity("the cat sat on the mat", "the cat sat on a mat")
    assert scores["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-4)


def test_edit_similarity_is_one_minus_normalized_levenshtein():
    assert similarity("kitten", "sitting")["edit"] == pytest.approx(1 - 3 / 7)  # k->s, e->i, +g
    assert similarity("abcd", "abXd")["edit"] == pytest.approx(0.75)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [1]) == 0


# ---------------------------------------------------------------------------------------
# Copy-count breakdowns
# ---------------------------------------------------------------------------------------


def test_duplicate_breakdown_names_each_copy_count():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    copies = [1, 1, 5, 5, 10]
    result = duplicate_breakdown(values, copies, lambda g: {"mean": sum(g) / len(g), "n": len(g)}, "extract/")
    assert result == {"extract/mean@dup1": 0.5, "extract/n@dup1": 2, "extract/mean@dup5": 1.0,
                      "extract/n@dup5": 2, "extract/mean@dup10": 0.0, "extract/n@dup10": 1}
    with pytest.raises(ValueError, match="5 values but 4 copy counts"):
        duplicate_breakdown(values, copies[:4], len)


def test_membership_auc_per_copy_count_against_all_nonmembers():
    nonmember_scores = [0.0, 1.0, 2.0, 3.0]
    member_scores = [0.5, 2.5, 10.0, 11.0]
    copies = [1, 1, 5, 5]
    result = mia_duplicate_breakdown("loss", member_scores, copies, nonmember_scores)
    # dup1: 0.5 beats 1 non-member, 2.5 beats 3: 4 of 8 pairs
    assert result == {"mia/loss/auc@dup1": 0.5, "mia/loss/auc@dup5": 1.0}


# ---------------------------------------------------------------------------------------
# Canaries and exposure
# ---------------------------------------------------------------------------------------


def test_canaries_follow_the_format_and_hold_out_controls():
    cfg = CanaryConfig(count=4, repeats=[1, 10], heldout=3, digits=5)
    canaries = make_canaries(cfg, seed=7)
    assert [c.repeats for c in canaries] == [1, 10, 1, 10, 0, 0, 0]
    assert len({c.secret for c in canaries}) == 7 and len({c.id for c in canaries}) == 7
    for c in canaries:
        assert len(c.secret) == 5 and c.secret.isdigit()
        assert c.text == "my secret number is " + " ".join(c.secret)
    assert make_canaries(cfg, seed=7) == canaries
    assert make_canaries(cfg, seed=8) != canaries
    assert [c.repeats for c in make_canaries(CanaryConfig(count=2), seed=0)] == [10, 10, 0, 0]  # heldout: as count


def test_exposure_ranks_the_canary_among_candidates_by_score():
    cfg = CanaryConfig(count=1, heldout=1, digits=4, candidates=64)
    inserted, held_out = make_canaries(cfg, seed=0)
    tokenizer = word_tokenizer()
    canary_ids = tokenizer([inserted.text])["input_ids"][0]
    # first of 64: log2(64) bits; last: 0 bits
    likes_it = lambda seqs: [1.0 if s == canary_ids else 0.0 for s in seqs]
    dislikes_it = lambda seqs: [-1.0 if s == canary_ids else 0.0 for s in seqs]
    assert exposures(cfg, None, tokenizer, [inserted], seed=0, score_fn=likes_it) == [6.0]
    assert exposures(cfg, None, tokenizer, [inserted], seed=0, score_fn=dislikes_it) == [0.0]
    # a scorer that sees no difference: every candidate ties, counted ahead: rank 64, 0 bits
    flat = lambda seqs: [0.0] * len(seqs)
    assert exposures(cfg, None, tokenizer, [inserted, held_out], seed=0, score_fn=flat) == [0.0, 0.0]
    # ranked below exactly 7 candidates: rank 8, 6 - 3 bits
    def above(seqs):
        seven = iter(range(7))
        return [1.0 if s == canary_ids else (2.0 if next(seven, None) is not None else 0.0) for s in seqs]

    assert exposures(cfg, None, tokenizer, [inserted], seed=0, score_fn=above) == [3.0]


def test_exposure_of_a_repeated_canary_is_high_and_of_an_unseen_one_chance():
    cfg = CanaryConfig(count=2, repeats=[10], heldout=10, digits=6, candidates=1000)
    canaries = make_canaries(cfg, seed=0)
    tokenizer = word_tokenizer()
    canary_ids = [tokenizer([c.text])["input_ids"][0] for c in canaries if c.repeats]
    filler = random_sequences(30, len(canary_ids[0]), seed=5)
    training = filler + [ids for ids in canary_ids for _ in range(10)]
    model = tiny_gpt2()
    before, _ = canary_metrics(cfg, model, tokenizer, canaries, seed=0)
    train(model, training, epochs=30)
    metrics, rows = canary_metrics(cfg, model, tokenizer, canaries, seed=0, batch_size=64)
    assert before["canary/exposure"] < 5
    assert metrics["canary/exposure"] > math.log2(1000) - 1  # ranked first or nearly so
    assert metrics["canary/exposure@dup10"] == metrics["canary/exposure"]
    # never inserted: rank uniform among 1000, expected 1/ln 2 = 1.44 bits
    assert metrics["canary/exposure@dup0"] < 3
    assert [r["repeats"] for r in rows] == [10, 10] + [0] * 10
    assert all(0.0 <= r["exposure"] <= math.log2(1000) for r in rows)


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, field, message", [
    ({"extraction": {"thresholds": {"rougeL": [1.5]}}}, "extraction.thresholds.rougeL.0", "less than or equal to 1"),
    ({"extraction": {"thresholds": {"rouge": [0.5]}}}, "extraction.thresholds.rouge", "did you mean 'rougeL'"),
    ({"extraction": {"decoding": {"top_p": 0.9}}}, "extraction.decoding", "only apply with do_sample"),
    ({"extraction": {"enabled": True}, "data": {"max_length": 64}}, "", "exceeds data.max_length = 64"),
    ({"data": {"canaries": {"format": "pin {pin}"}}}, "data.canaries.format", "{secret} exactly once"),
    ({"data": {"canaries": {"repeats": [0]}}}, "data.canaries.repeats", "each at least 1"),
    ({"data": {"canaries": {"digits": 3}}}, "data.canaries", "fewer than the 1020 distinct"),
])
def test_bad_extraction_and_canary_settings_name_the_field(raw, field, message):
    with pytest.raises(ConfigError) as err:
        validate_trial(raw, "t.yaml")
    assert err.value.field == field
    assert message in err.value.message


def test_extraction_and_canary_defaults():
    config = validate_trial({"data": {"canaries": {"repeats": 5}}}, "t.yaml")
    assert config.extraction.enabled is False
    assert (config.extraction.prefix_tokens, config.extraction.suffix_tokens) == (50, 50)
    assert config.data.canaries.repeats == [5] and config.data.canaries.heldout == 10
    assert validate_trial({}, "t.yaml").data.canaries is None
