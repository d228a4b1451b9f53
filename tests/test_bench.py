"""`memray bench`: its two scorers compute the same attack scores, and the command prints
and writes every figure beside its baseline. Speed itself is not asserted here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memray import bench, cli, flops, methods
from memray.config import AttackConfig


@pytest.fixture(scope="module")
def model_and_samples():
    config = bench.bench_model_config("tiny-llama")
    model = bench.random_model(config, torch.device("cpu"))
    ids = bench.random_samples(12, 64, config.vocab_size, seed=3)
    return model, ids, [bench.stand_in_text(i) for i in ids]


def test_memray_scorer_equals_the_naive_scorer_to_1e_5(model_and_samples):
    model, ids, texts = model_and_samples
    attacks = [AttackConfig(name="loss"), AttackConfig(name="zlib"), AttackConfig(name="mink", k=0.2),
               AttackConfig(name="mink++", k=0.2)]
    naive = bench.naive_scores(model, ids, texts, attacks)
    for batch, chunk in ((16, 8192), (4, 1000)):  # one tile / uneven vocabulary chunks
        ours = bench.memray_scores(model, ids, texts, attacks, batch_size=batch, vocab_chunk=chunk)
        assert set(ours) == set(naive) == {a.label for a in attacks}
        for label in naive:
            assert naive[label].shape == (12,)
            np.testing.assert_allclose(ours[label], naive[label], atol=1e-5, rtol=0)
    # the scores are not degenerate: samples differ
    assert np.ptp(naive["loss"]) > 0.01


def test_flops_per_token_follow_the_stated_convention():
    config = bench.bench_model_config("gpt2")
    n, layers, hidden = 85_000_000, 12, 768
    attention = 4 * layers * hidden * 256
    assert bench.train_flops_per_token("all-weights", n, n, 1, config, 256) == 6 * n + 3 * attention
    assert bench.train_flops_per_token("frozen-body", n, 1000, 1, config, 256) == 4 * n + 2000 + 3 * attention
    assert bench.train_flops_per_token("output-layer", n, 1, 500, config, 256) == 2 * n + 1000 + attention
    # every registered method names one of the classes the count knows
    assert {methods.METHODS[name].flop_class for name in methods.METHODS} <= set(methods.FLOP_CLASSES)
    # a sample of length 2L weighs twice in the token-weighted context
    assert bench.mean_context([[0] * 10, [0] * 30]) == (100 + 900) / 40


def test_padding_share_counts_pad_positions_of_the_batches():
    assert bench.padding_share([[0] * 4, [0] * 2], batch_size=2, grouped=False, multiple_of=None) == 0.25
    assert bench.padding_share([[0] * 4, [0] * 2], batch_size=2, grouped=False, multiple_of=8) == 1 - 6 / 16
    rng = np.random.default_rng(0)  # short samples of spread lengths, as in WebNLG
    samples = [[0] * int(n) for n in rng.lognormal(3.7, 0.5, 2000).clip(8, 256)]
    grouped = bench.padding_share(samples, 8, grouped=True, multiple_of=None)
    assert grouped < 0.05 < 0.3 < bench.padding_share(samples, 8, grouped=False, multiple_of=None)


def test_mfu_divides_model_flops_by_the_peak_of_every_worker(monkeypatch):
    assert flops.mfu(1e5, 6e9, torch.device("cpu")) is None  # no peak rate for a CPU
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.mfu(1e5, 6e9, torch.device("cuda"), workers=2) == pytest.approx(1e5 * 6e9 / (989.4e12 * 2))
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.peak_tflops(torch.device("cuda")) == (756.0, "NVIDIA H100 PCIe")
    monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert flops.mfu(1e5, 6e9, torch.device("cuda")) is None  # unknown: no figure, not a wrong one


def test_study_model_shapes_have_the_published_sizes():
    counts = {}
    for name in ("gpt2", "gpt2-xl", "llama-3.2-1b"):
        with torch.device("meta"):
            model = bench.AutoModelForCausalLM.from_config(bench.bench_model_config(name))
        counts[name] = sum(p.numel() for p in model.parameters())
    assert 124e6 < counts["gpt2"] < 125e6
    assert 1.55e9 < counts["gpt2-xl"] < 1.56e9
    assert 1.23e9 < counts["llama-3.2-1b"] < 1.24e9


def test_bench_command_prints_and_writes_each_figure_beside_its_baseline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "--model", "tiny-gpt2", "--quick", "--sections", "scoring,training,reference_cache,attacks,dp",
                     "--methods", "lora", "--max-length", "96", "--out", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    scoring = record["scoring"]
    scorers = {row["scorer"]: row for row in scoring["rows"]}
    assert set(scorers) == {"naive", "memray"}  # on a CPU the trial defaults are the lean setting
    assert scorers["memray"]["batch_size"] == 4 and scorers["memray"]["tile"] == "1024x512"
    assert scorers["naive"]["speedup"] == 1 and scorers["naive"]["passes"] == 4  # one pass per attack
    assert scorers["memray"]["passes"] == 1
    for row in scorers.values():
        assert row["tokens_per_s"] > 0 and row["peak_mem_mb"] is not None
    assert scorers["memray"]["speedup"] == pytest.approx(
        scorers["memray"]["tokens_per_s"] / scorers["naive"]["tokens_per_s"], rel=0.01)
    assert scoring["scores_agree"] is True and max(scoring["max_score_difference"].values()) < 1e-5
    loops = {row["loop"]: row for row in record["training"]["rows"]}
    assert set(loops) == {"memray", "default-trainer"} and loops["memray"]["method"] == "lora"
    assert loops["memray"]["tokens_per_s"] > 0 and loops["default-trainer"]["speedup"] == 1
    padding = record["training"]["padding_share"]
    assert 0 <= padding["memray"] <= padding["default-trainer"] < 1  # (16 samples: too few to group)
    cache = record["reference_cache"]
    assert cache["cache_hits"] == cache["trials"] - 1  # scored once, then read back
    costs = {row["attack"]: row for row in record["attacks"]["rows"]}
    from memray.attacks import ATTACKS

    # every attack scored in a trial, beside the shared pass; those with a pass of their own say which
    assert set(costs) == {"(scoring pass)", *(n for n in ATTACKS if not ATTACKS[n].needs_reference_models)}
    for name, row in costs.items():
        if row.get("skipped"):  # a part it needs cannot be had here (the neighbourhood's mask-filling model)
            assert "package registry" in row["skipped"] and row["seconds"] is None, name
            continue
        assert row["seconds"] > 0 and row["x_scoring_pass"] > 0, name
        if name in ATTACKS:
            assert (row["extra_pass"] == ATTACKS[name].extra_pass) == bool(ATTACKS[name].extra_pass), name
            assert (row["prepare_seconds"] is not None) == (ATTACKS[name].prepare is not None), name
    assert costs["recall"]["extra_pass"].startswith("a forward pass") and costs["loss"]["x_scoring_pass"] < 0.5
    # DP-SGD: LoRA by its own engine (Opacus) and torch.func, DoRA by torch.func, beside the plain pass
    engines = {(row["method"], row["engine"]): row for row in record["dp"]["rows"]}
    assert set(engines) == {("lora (attn, r8)", "none (plain backward)"), ("lora (attn, r8)", "opacus (its own)"),
                            ("lora (attn, r8)", "torch.func"), ("dora (attn, r8)", "none (plain backward)"),
                            ("dora (attn, r8)", "torch.func (its own)")}
    assert all(row["seconds"] > 0 for row in engines.values())
    assert engines[("lora (attn, r8)", "torch.func")]["x_plain"] == pytest.approx(
        engines[("lora (attn, r8)", "torch.func")]["seconds"] / engines[("lora (attn, r8)", "none (plain backward)")]["seconds"],
        abs=0.01)
    assert record["model_shape"]["max_length"] == 96 and 8 * 48 <= record["dp"]["tokens"] <= 8 * 96
    assert set(record["dp"]["engines_max_relative_difference"]) == {"lora (attn, r8)"}
    assert record["dp"]["engines_max_relative_difference"]["lora (attn, r8)"] < 1e-5
    printed = capsys.readouterr().out
    assert "per-sample gradients of one batch" in printed and "x plain" in printed
    assert "x naive" in printed and "x default" in printed and "reference cache" in printed
    assert "x scoring pass" in printed and "a forward and backward pass per sample" in printed
    assert record["model_shape"]["params"] == sum(
        p.numel() for p in bench.random_model(bench.bench_model_config("tiny-gpt2"), torch.device("cpu")).parameters())


def test_unknown_section_or_method_is_a_clear_error(capsys):
    assert cli.main(["bench", "--sections", "scoring,speed", "--out", ""]) == 2
    assert "--sections: speed: not one of scoring, training, sweep, reference_cache, attacks, dp" in capsys.readouterr().err
    assert cli.main(["bench", "--methods", "lora,qlora", "--out", ""]) == 2
    assert "--methods: 'qlora' is not one of full, head" in capsys.readouterr().err
    assert cli.main(["bench", "--max-length", "1", "--out", ""]) == 2
    assert "--max-length: 1: a sample needs at least 2 tokens" in capsys.readouterr().err
