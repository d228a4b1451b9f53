"""Numbers pinned: the per-epoch losses and LOSS-attack AUCs of tiny seeded trials, one
per method family (full fine-tuning, LoRA, prompt tuning), and a trial of full fine-tuning
and of LoRA interrupted after an epoch and resumed, equal to an uninterrupted one.

The pinned numbers live in `tests/assets/pinned_trial.json`. Losses must agree to a
relative 1e-3 and AUCs to 0.02: loose enough for a library update of the locked set to
pass (kernels reorder float sums), tight enough that a change in data, training, scoring or
an attack fails here. When a change of the numbers is intended, re-pin with

    MEMRAY_REPIN=1 .venv/bin/python -m pytest tests/test_pinned.py

and commit the new file (its diff shows what moved).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from memray.files import validate_trial
from memray.methods import METHOD_FAMILIES, METHODS
from memray.trial import run_trial

PINNED = Path(__file__).resolve().parent / "assets" / "pinned_trial.json"
LOSS_RTOL = 1e-3  # relative, on train/loss and val/loss
AUC_ATOL = 0.02  # absolute, on mia/loss/auc
PINNED_KEYS = ("train/loss", "val/loss", "mia/loss/auc")
#: The tiny trials, one per method family the studies compare: the tiny GPT-2 with random
#: weights (its pretrained base is built on each machine, and its float sums follow the
#: thread count), full fine-tuning and LoRA (parameter-based), prompt tuning (prompt-based),
#: each at a rate where its numbers move steadily over four epochs (no one-step spikes).
BASE = {
    "seed": 0,
    "model": {"name": "tiny-gpt2", "pretrained": False},
    "data": {"dataset": "pydoc", "max_length": 48, "members": 24, "nonmembers": 24, "validation": 12},
    "train": {"epochs": 4, "batch_size": 8},
    "eval": {"batch_size": 24},
    "attacks": ["loss"],
}
CASES = {
    "full": {**BASE, "method": {"name": "full", "lr": 5e-4}},
    "lora": {**BASE, "method": {"name": "lora", "rank": 8, "placement": "both", "lr": 1e-2}},
    "prompt": {**BASE, "method": {"name": "prompt", "virtual_tokens": 8, "lr": 3e-2}},
}


def run(tmp_path: Path, case: str, name: str, report=None) -> dict:
    config = validate_trial({**CASES[case], "output_dir": str(tmp_path)}, "test_pinned")
    run_trial(config, report, trial_dir=tmp_path / name, progress=False)
    return json.loads((tmp_path / name / "result.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, dict]:
    return {case: run(tmp_path_factory.mktemp(f"pinned-{case}"), case, "trial") for case in CASES}


def test_the_cases_cover_every_method_family():
    assert {METHODS[case["method"]["name"]].family for case in CASES.values()} == set(METHOD_FAMILIES)


def test_losses_and_auc_per_epoch_equal_the_pinned_numbers(uninterrupted):
    got = {case: [{key: row.get(key) for key in ("epoch", *PINNED_KEYS)} for row in result["epochs"]]
           for case, result in uninterrupted.items()}
    if os.environ.get("MEMRAY_REPIN"):
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps({case: {"trial": CASES[case], "epochs": got[case]} for case in CASES},
                                     indent=1) + "\n")
        pytest.skip(f"re-pinned {PINNED}")
    pinned = json.loads(PINNED.read_text())
    assert set(pinned) == set(CASES), "the pinned cases changed: re-pin (see the module docstring)"
    for case, epochs in got.items():
        assert pinned[case]["trial"] == CASES[case], f"{case}: the pinned trial changed: re-pin"
        assert [row["epoch"] for row in epochs] == [row["epoch"] for row in pinned[case]["epochs"]] == [0, 1, 2, 3, 4]
        for row, want in zip(epochs, pinned[case]["epochs"]):
            for key in ("train/loss", "val/loss"):
                if want.get(key) is None:  # epoch 0 has no training loss
                    assert row.get(key) is None, (case, row["epoch"], key)
                else:
                    assert row[key] == pytest.approx(want[key], rel=LOSS_RTOL), (case, row["epoch"], key)
            assert row["mia/loss/auc"] == pytest.approx(want["mia/loss/auc"], abs=AUC_ATOL), (case, row["epoch"])


def test_the_pinned_configurations_measure_what_their_family_should(uninterrupted):
    """Sanity of what is pinned: training lowers the training loss; the parameter-based
    methods memorize (LOSS AUC above chance and above its epoch-0 value after training),
    prompt tuning stays near chance while it fits the validation text better."""
    for case, result in uninterrupted.items():
        epochs = result["epochs"]
        assert epochs[-1]["train/loss"] < epochs[1]["train/loss"], case
        first, last = epochs[0]["mia/loss/auc"], epochs[-1]["mia/loss/auc"]
        if METHODS[CASES[case]["method"]["name"]].family == "parameter-based":
            assert last > 0.5 and last > first + 0.1, (case, first, last)
        else:
            assert abs(last - first) < 0.1 and epochs[-1]["val/loss"] < epochs[0]["val/loss"], (case, first, last)


@pytest.mark.parametrize("case", ["full", "lora"])
def test_a_trial_interrupted_after_epoch_1_and_resumed_equals_an_uninterrupted_one(uninterrupted, tmp_path, case):
    """Full fine-tuning and a PEFT method (its checkpoints hold the adapter alone)."""
    def interrupt_after_epoch_1(metrics, checkpoint):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt("interrupted after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, case, "trial", interrupt_after_epoch_1)
    stopped = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert stopped["status"] == "interrupted" and [row["epoch"] for row in stopped["epochs"]] == [0, 1]
    resumed = run(tmp_path, case, "trial")
    assert resumed["status"] == "success"
    # every number of every epoch, but time and memory (perf/*), which no two runs share
    measured = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in resumed["epochs"]]
    expected = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in uninterrupted[case]["epochs"]]
    assert measured == expected
