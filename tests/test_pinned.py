"""Numbers pinned: the per-epoch losses and LOSS-attack AUCs of one tiny seeded trial,
and a trial interrupted after an epoch and resumed, equal to an uninterrupted one.

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

from memray.config import validate_trial
from memray.trial import run_trial

PINNED = Path(__file__).resolve().parent / "assets" / "pinned_trial.json"
LOSS_RTOL = 1e-3  # relative, on train/loss and val/loss
AUC_ATOL = 0.02  # absolute, on mia/loss/auc
PINNED_KEYS = ("train/loss", "val/loss", "mia/loss/auc")
#: The tiny trial: a random-init tiny GPT-2 (no pretrained base, so nothing cached matters),
#: full fine-tuning at a high rate so that the AUC moves within three epochs.
TRIAL = {
    "seed": 0,
    "model": {"name": "tiny-gpt2", "pretrained": False},
    "data": {"dataset": "pydoc", "max_length": 48, "members": 24, "nonmembers": 24, "validation": 12},
    "method": {"name": "full", "lr": 0.003},
    "train": {"epochs": 3, "batch_size": 8},
    "eval": {"batch_size": 24},
    "attacks": ["loss"],
}


def run(tmp_path: Path, name: str, report=None) -> dict:
    config = validate_trial({**TRIAL, "output_dir": str(tmp_path)}, "test_pinned")
    run_trial(config, report, trial_dir=tmp_path / name, progress=False)
    return json.loads((tmp_path / name / "result.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("pinned"), "trial")


def test_losses_and_auc_per_epoch_equal_the_pinned_numbers(uninterrupted):
    epochs = [{key: row.get(key) for key in ("epoch", *PINNED_KEYS)} for row in uninterrupted["epochs"]]
    if os.environ.get("MEMRAY_REPIN"):
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps({"trial": TRIAL, "epochs": epochs}, indent=1) + "\n")
        pytest.skip(f"re-pinned {PINNED}")
    pinned = json.loads(PINNED.read_text())
    assert pinned["trial"] == TRIAL, "the pinned trial changed: re-pin (see the module docstring)"
    assert [row["epoch"] for row in epochs] == [row["epoch"] for row in pinned["epochs"]] == [0, 1, 2, 3]
    for got, want in zip(epochs, pinned["epochs"]):
        for key in ("train/loss", "val/loss"):
            if want.get(key) is None:  # epoch 0 has no training loss
                assert got.get(key) is None, (got["epoch"], key)
            else:
                assert got[key] == pytest.approx(want[key], rel=LOSS_RTOL), (got["epoch"], key)
        assert got["mia/loss/auc"] == pytest.approx(want["mia/loss/auc"], abs=AUC_ATOL), got["epoch"]


def test_a_trial_interrupted_after_epoch_1_and_resumed_equals_an_uninterrupted_one(uninterrupted, tmp_path):
    def interrupt_after_epoch_1(metrics, checkpoint):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt("interrupted after epoch 1")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "trial", interrupt_after_epoch_1)
    stopped = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert stopped["status"] == "interrupted" and [row["epoch"] for row in stopped["epochs"]] == [0, 1]
    resumed = run(tmp_path, "trial")
    assert resumed["status"] == "success"
    # every number of every epoch, but time and memory (perf/*), which no two runs share
    measured = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in resumed["epochs"]]
    expected = [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in uninterrupted["epochs"]]
    assert measured == expected
