"""One trial end to end on the tiny built-in model: the numbers it reports, the files it
writes, that it measures real memorization, and that a failed trial resumes from its last
epoch checkpoint."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from memray import models
from memray.files import validate_trial
from memray.trial import run_trial

ATTACKS = ["loss", "ref", "zlib", "mink", "mink++"]


def small_trial(tmp_path, **changes):
    raw = {
        "seed": 0, "output_dir": str(tmp_path),
        "model": {"name": "tiny-gpt2"},
        "data": {"dataset": "pydoc", "max_length": 64, "members": 32, "nonmembers": 32, "validation": 16},
        "method": {"name": "full", "lr": 0.003},
        "train": {"epochs": 4, "batch_size": 8},
        "eval": {"batch_size": 32},
        "attacks": ATTACKS,
    }
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_trial(raw, "test")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trial")
    config = small_trial(tmp_path)
    reports = []
    final = run_trial(config, lambda metrics, checkpoint: reports.append((metrics, checkpoint)),
                      trial_dir=tmp_path / "t", progress=False)
    return config, tmp_path / "t", reports, final


def test_full_finetuning_drives_loss_auc_up_from_chance(finished):
    _, _, reports, final = finished
    first = reports[0][0]
    assert first["epoch"] == 0
    assert abs(first["mia/loss/auc"] - 0.5) < 0.2, "before training, members and non-members look alike"
    assert first["mia/ref/auc"] == pytest.approx(0.5), "target = reference before training"
    assert final["mia/loss/auc"] > 0.9, final
    assert final["mia/ref/auc"] > 0.9
    assert final["train/loss"] < reports[1][0]["train/loss"]


def test_every_epoch_is_reported_with_its_checkpoint(finished):
    config, trial_dir, reports, _ = finished
    assert [int(m["epoch"]) for m, _ in reports] == [0, 1, 2, 3, 4]
    assert reports[0][1] is None
    for metrics, checkpoint in reports[1:]:
        assert checkpoint is not None and checkpoint.parent == trial_dir / "checkpoints"
        assert math.isfinite(metrics["train/loss"]) and metrics["perf/train_tokens_per_s"] > 0
        assert ("perf/mfu" in metrics) == torch.cuda.is_available()  # a GPU's utilization, not a CPU's
        assert 0 < metrics.get("perf/mfu", 0.5) < 1
    for metrics, _ in reports:
        assert metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]))
        for attack in ATTACKS:
            for name in ("auc", "auc_lo", "auc_hi"):
                assert 0.0 <= metrics[f"mia/{attack}/{name}"] <= 1.0
            assert metrics[f"mia/{attack}/auc_lo"] <= metrics[f"mia/{attack}/auc"] <= metrics[f"mia/{attack}/auc_hi"]
            # 32 non-members resolve neither 1% nor 0.1% FPR: no TPR is reported
            assert f"mia/{attack}/tpr@1%fpr" not in metrics and f"mia/{attack}/tpr@0.1%fpr" not in metrics
    # before training every attack is indistinguishable from chance: its interval holds 0.5
    assert all(reports[0][0][f"mia/{attack}/auc_lo"] <= 0.5 <= reports[0][0][f"mia/{attack}/auc_hi"] for attack in ATTACKS)
    # only the newest checkpoint is kept by default
    assert [p.name for p in (trial_dir / "checkpoints").iterdir() if p.name.startswith("checkpoint-")] == ["checkpoint-16"]


def test_result_files(finished):
    config, trial_dir, reports, _ = finished
    result = json.loads((trial_dir / "result.json").read_text())
    assert result["status"] == "success" and result["reason"] is None
    assert result["config"] == config.resolved()
    assert [row["epoch"] for row in result["epochs"]] == [0, 1, 2, 3, 4]
    assert result["epochs"][-1] == reports[-1][0]
    assert len(result["split_hash"]) == 64
    rules = result["attack_rules"]
    assert rules["mink_tokens"].startswith("int(k * n)") and rules["auc_interval"].startswith("95%, DeLong")
    assert set(rules["tpr_unresolved"]) == {"tpr@1%fpr", "tpr@0.1%fpr"}
    assert result["method_info"]["trainable_params"] == result["method_info"]["total_params"] > 0
    provenance = result["provenance"]
    assert provenance["versions"]["torch"] and provenance["hardware"]["cpus"]
    assert "git_sha" in provenance and "git_dirty" in provenance
    assert (trial_dir / "config.yaml").is_file()
    for epoch in range(5):
        scores = pd.read_parquet(trial_dir / "scores" / f"epoch_{epoch:03d}.parquet")
        assert list(scores.columns) == ["sample_id", "member", "copies", "nll", *ATTACKS]
        assert scores["member"].sum() == 32 and (~scores["member"]).sum() == 32
        assert set(scores.loc[scores["member"], "copies"]) == {1}
        assert set(scores.loc[~scores["member"], "copies"]) == {0}


def test_loss_scores_equal_a_direct_computation(finished, tmp_path):
    """Epoch 0 scores the base model: recompute -mean NLL per sample the slow way."""
    config, trial_dir, _, _ = finished
    from memray import data, scoring

    tokenizer = models.load_tokenizer(config.model)
    split = data.load_split(config.data, config.seed, tokenizer)
    texts = {s.id: s.text for s in split.members + split.nonmembers}
    model = models.load_model(config.model).eval()
    scores = pd.read_parquet(trial_dir / "scores" / "epoch_000.parquet")
    for row in scores.head(6).itertuples():
        ids = torch.tensor([scoring.tokenize_texts(tokenizer, [texts[row.sample_id]], 64)[0]])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert row.loss == pytest.approx(-loss, abs=1e-4)


def test_failed_trial_resumes_from_its_last_epoch(tmp_path):
    config = small_trial(tmp_path, train={"epochs": 3, "batch_size": 8})
    trial_dir = tmp_path / "t"
    seen = []

    def crash_at_epoch_2(metrics, checkpoint):
        seen.append(int(metrics["epoch"]))
        if metrics["epoch"] == 2:
            raise RuntimeError("injected fault")

    with pytest.raises(RuntimeError, match="injected fault"):
        run_trial(config, crash_at_epoch_2, trial_dir=trial_dir, progress=False)
    failed = json.loads((trial_dir / "result.json").read_text())
    assert failed["status"] == "failed" and "injected fault" in failed["reason"]
    assert [row["epoch"] for row in failed["epochs"]] == [0, 1, 2]

    resumed = []
    final = run_trial(config, lambda m, c: resumed.append(int(m["epoch"])), trial_dir=trial_dir, progress=False)
    assert resumed == [3], "epochs 0-2 are not run again"
    done = json.loads((trial_dir / "result.json").read_text())
    assert done["status"] == "success" and done["attempts"] == 2
    assert done["epochs"][:3] == failed["epochs"]
    assert final["epoch"] == 3

    again = []
    run_trial(config, lambda m, c: again.append(m), trial_dir=trial_dir, progress=False)
    assert again == [], "a finished trial is not re-run"


@pytest.mark.parametrize("keep, rerun", [(2, [2, 3]), (1, [0, 1, 2, 3])])
def test_an_epoch_checkpointed_but_never_recorded_is_trained_again(tmp_path, keep, rerun):
    """A process killed after the Trainer wrote epoch 2's checkpoint but before memray
    recorded epoch 2 leaves that checkpoint and a result.json ending at epoch 1. Epoch 2 was
    never measured, so the resume trains it again: from epoch 1's checkpoint when it is
    kept, else from the start; it never ends `success` without epoch 2's row."""
    config = small_trial(tmp_path, train={"epochs": 3, "batch_size": 8, "keep_checkpoints": keep})
    trial_dir = tmp_path / "t"

    def stop_after_epoch_2(metrics, checkpoint):
        if metrics["epoch"] == 2:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_trial(config, stop_after_epoch_2, trial_dir=trial_dir, progress=False)
    result = json.loads((trial_dir / "result.json").read_text())
    result["epochs"], result["status"] = result["epochs"][:2], "running"  # as the kill left it
    (trial_dir / "result.json").write_text(json.dumps(result))
    assert len(list((trial_dir / "checkpoints").glob("checkpoint-*"))) == keep  # epoch 2's is the newest

    resumed = []
    final = run_trial(config, lambda m, c: resumed.append(int(m["epoch"])), trial_dir=trial_dir, progress=False)
    assert resumed == rerun
    done = json.loads((trial_dir / "result.json").read_text())
    assert done["status"] == "success" and [row["epoch"] for row in done["epochs"]] == [0, 1, 2, 3]
    assert final["epoch"] == 3
    if keep == 2:
        assert done["epochs"][:2] == result["epochs"]  # epochs 0-1 kept as recorded


def test_duplicates_are_recorded_per_sample_and_broken_down(tmp_path):
    config = small_trial(tmp_path, train={"epochs": 1, "batch_size": 8},
                         data={"duplicates": {"fraction": 0.5, "copies": [4]}}, attacks=["loss"])
    final = run_trial(config, trial_dir=tmp_path / "d", progress=False)
    scores = pd.read_parquet(tmp_path / "d" / "scores" / "epoch_001.parquet")
    members = scores[scores["member"]]
    assert sorted(members["copies"].value_counts().items()) == [(1, 16), (4, 16)]
    assert {"mia/loss/auc@dup1", "mia/loss/auc@dup4"} <= set(final)
    assert final["mia/loss/auc@dup4"] > final["mia/loss/auc@dup1"]
    result = json.loads((tmp_path / "d" / "result.json").read_text())
    assert result["samples"]["train_texts"] == 16 + 16 * 4


def test_extraction_and_canaries_are_reported(tmp_path):
    config = small_trial(
        tmp_path, train={"epochs": 2, "batch_size": 8}, attacks=["loss"],
        data={"canaries": {"count": 2, "repeats": 8, "candidates": 64, "digits": 4}},
        extraction={"enabled": True, "samples": 8, "prefix_tokens": 16, "suffix_tokens": 16, "batch_size": 8})
    final = run_trial(config, trial_dir=tmp_path / "e", progress=False)
    assert 0.0 <= final["extract/exact"] <= 1.0 and "extract/nonmember/rougeL" in final
    assert final["canary/exposure"] >= 0
    rows = pd.read_parquet(tmp_path / "e" / "scores" / "extraction_epoch_002.parquet")
    assert len(rows) == 16 and set(rows["member"]) == {True, False}
    assert np.isfinite(rows["rougeL"]).all()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("method", [{"name": "ia3", "lr": 0.03}, {"name": "lora", "rank": 4, "dora": True, "lr": 0.01}],
                         ids=["ia3", "dora"])
def test_ia3_and_dora_trials_run_end_to_end(tmp_path, model, method):
    config = small_trial(tmp_path, model={"name": model}, method=method, train={"epochs": 2},
                         data={"members": 16, "nonmembers": 16, "validation": 8}, attacks=["loss", "ref"])
    final = run_trial(config, trial_dir=tmp_path / "t", progress=False)
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["status"] == "success" and [e["epoch"] for e in result["epochs"]] == [0, 1, 2]
    assert result["method_info"]["trained"].startswith("(IA)^3" if method["name"] == "ia3" else "DoRA r=4")
    assert 0 < result["method_info"]["trainable_params"] < result["method_info"]["total_params"] / 10
    assert result["epochs"][2]["train/loss"] < result["epochs"][1]["train/loss"]  # it learns its members
    assert final["mia/loss/auc"] == result["epochs"][-1]["mia/loss/auc"]
