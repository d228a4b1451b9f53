"""The report's findings: each claim's verdict flips with synthetic results made to hold,
not to hold, or to be undecided; the table is in report.md and report.json; DeLong's
covariance of correlated AUCs agrees with the single-AUC interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from memray import metrics
from memray.files import validate_trial
from memray.report import build_report, load_trials
from memray.report.findings import (DUPLICATION_CLAIM, FAILS, FINDINGS, HOLDS, INCONCLUSIVE, decide_findings)
from memray.results import TrialRecord, write_scores, write_table

MEMBERS = 150  # and as many non-members; 30 members duplicated
EPOCHS = 2
METHODS = {"full": {"name": "full"}, "lora-attn": {"name": "lora", "rank": 4, "placement": "attn"},
           "lora-mlp": {"name": "lora", "rank": 4, "placement": "mlp"},
           "lora-both": {"name": "lora", "rank": 4, "placement": "both"},
           "prefix": {"name": "prefix"}, "prompt": {"name": "prompt"}}
#: Per scenario and method: (member score shift at epoch 1, at the final epoch, duplication's
#: extraction effect). A shift s gives an AUC of about Phi(s / sqrt(2)).
SCENARIOS = {
    HOLDS: {"full": (0.6, 2.4, 0.4), "lora-attn": (0.2, 0.4, 0.05), "lora-mlp": (0.3, 1.0, 0.05),
            "lora-both": (0.4, 1.8, 0.05), "prefix": (0.0, 0.0, 0.0), "prompt": (0.0, 0.0, 0.0)},
    FAILS: {"full": (2.0, 0.2, 0.05), "lora-attn": (2.0, 1.8, 0.4), "lora-mlp": (2.0, 1.0, 0.4),
            "lora-both": (2.0, 0.4, 0.4), "prefix": (1.5, 2.5, 0.0), "prompt": (1.5, 2.5, 0.0)},
    INCONCLUSIVE: {name: (0.22, 0.22, 0.2) for name in METHODS},  # alike, and about 0.6 (near chance?)
}
#: Noise of each trial's own beside the samples' shared part: none where every method is alike,
#: so that nothing tells them apart (a draw would make a true difference of 0 significant 1 time in 20).
OWN_NOISE = {HOLDS: 1.0, FAILS: 1.0, INCONCLUSIVE: 0.0}


def write_scenario(sweep_dir: Path, shifts: dict[str, tuple[float, float, float]], own_noise: float,
                   seeds=(0, 1)) -> None:
    """Trial folders as a trial writes them: result.json, scores per epoch, extraction rows."""
    member = np.r_[np.ones(MEMBERS, bool), np.zeros(MEMBERS, bool)]
    copies = np.r_[np.full(30, 3), np.ones(MEMBERS - 30, int), np.ones(MEMBERS, int)]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        shared = rng.normal(0, 1, 2 * MEMBERS)  # what the samples have in common across methods
        for index, (name, method) in enumerate(METHODS.items()):
            config = validate_trial({"seed": seed, "model": {"name": "gpt2"},
                                     "data": {"dataset": "wikitext2", "members": MEMBERS, "nonmembers": MEMBERS,
                                              "duplicates": {"fraction": 0.2, "copies": [3]}},
                                     "method": method, "train": {"epochs": EPOCHS}, "attacks": ["loss", "ref"],
                                     "extraction": {"enabled": True, "samples": MEMBERS}}, "test")
            record = TrialRecord.open(sweep_dir / f"{name}_s{seed}")
            record.start(config.resolved(), config.trial_id(), {"method": method, "seed": seed})
            own = np.random.default_rng(1000 * seed + index)
            for epoch in range(EPOCHS + 1):
                shift = (0.0, *shifts[name][:2])[epoch]
                loss = shared + own_noise * own.normal(0, 0.3, 2 * MEMBERS) + np.where(member, shift, 0.0)
                scores = {"loss": loss, "ref": loss + own_noise * own.normal(0, 0.2, 2 * MEMBERS)}
                row = {"epoch": epoch, "val/loss": 3.0, "val/ppl": 20.0}
                for label, values in scores.items():
                    row.update(metrics.mia_metrics(label, values, member))
                write_scores(record.trial_dir, epoch, pd.DataFrame({"sample_id": [f"s{i}" for i in range(2 * MEMBERS)],
                                                                    "member": member, "copies": copies, **scores}))
                rouge = 0.3 + own_noise * own.normal(0, 0.05, MEMBERS) + np.where(copies[:MEMBERS] > 1, shifts[name][2], 0.0)
                write_table(record.trial_dir, "extraction", epoch, pd.DataFrame(
                    {"sample_id": [f"s{i}" for i in range(MEMBERS)], "member": True, "copies": copies[:MEMBERS],
                     "exact": False, "rougeL": rouge}))
                record.add_epoch(row)
            record.finish("success")


@pytest.mark.parametrize("expected", [HOLDS, FAILS, INCONCLUSIVE])
def test_every_verdict_flips_with_the_results(tmp_path, expected):
    write_scenario(tmp_path, SCENARIOS[expected], OWN_NOISE[expected])
    rows, untestable = decide_findings(load_trials(tmp_path, []), tmp_path)
    assert untestable == []
    verdicts = {}
    for row in rows:
        verdicts.setdefault(row["finding"], set()).add(row["verdict"])
        assert row["replicates"] == 2  # two seeds, each its own shared split
    assert set(verdicts) == {f.claim for f in FINDINGS} | {DUPLICATION_CLAIM}
    assert verdicts == {claim: {expected} for claim in verdicts}


def test_the_findings_table_is_in_report_md_and_report_json(tmp_path):
    write_scenario(tmp_path, SCENARIOS[HOLDS], OWN_NOISE[HOLDS], seeds=(0,))
    path = build_report(tmp_path, bootstrap=0)
    text = path.read_text()
    assert "## Findings of the studies on this sweep" in text
    assert "Hou et al. 2025 (arXiv 2507.00258)" in text and "Wang & Li 2025 (arXiv 2506.20856)" in text
    rows = json.loads((path.parent / "report.json").read_text())["tables"]["findings"]
    first = next(r for r in rows if r["finding"] == FINDINGS[0].claim and r["measure"] == "loss AUC")
    assert first["epochs"] == f"final epoch ({EPOCHS})" and first["verdict"] == HOLDS
    assert first["difference_lo"] > 0 and first["a_lo"] < first["a"] < first["a_hi"]


def test_a_sweep_without_the_needed_cells_lists_the_findings_it_cannot_test(tmp_path):
    write_scenario(tmp_path, SCENARIOS[HOLDS], OWN_NOISE[HOLDS], seeds=(0,))
    for name in ("full_s0", "prefix_s0", "prompt_s0"):
        (tmp_path / name / "result.json").unlink()
    rows, untestable = decide_findings(load_trials(tmp_path, []), tmp_path)
    assert {row["finding"] for row in rows} == {FINDINGS[1].claim, *(f.claim for f in FINDINGS if "placement" in f.key)}
    assert len(untestable) == 4 and any("needs methods of both families" in line for line in untestable)


def test_delong_covariance_of_correlated_aucs():
    rng = np.random.default_rng(3)
    member = np.r_[np.ones(80, bool), np.zeros(90, bool)]
    first = rng.normal(size=170) + 0.8 * member
    second = first + rng.normal(size=170) * 0.4
    aucs, covariance = metrics.delong_covariance(np.c_[first, second], member)
    assert aucs == pytest.approx([metrics.roc_auc(first, member), metrics.roc_auc(second, member)])
    low, high = metrics.delong_interval(first, member)
    assert 1.959964 * np.sqrt(covariance[0, 0]) == pytest.approx((high - low) / 2, rel=1e-6)
    # the two AUCs share their samples: the difference's variance is far below the sum of theirs
    assert covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1] < 0.3 * (covariance[0, 0] + covariance[1, 1])


@pytest.mark.parametrize("expected", [HOLDS, FAILS])
def test_the_findings_figure_draws_each_row_in_its_verdicts_colour(tmp_path, monkeypatch, expected):
    """One point with its interval per row of the table, centred on the row's difference (or
    a near-chance row's AUC less 0.5), in the colour of its verdict; in report.md and report.html."""
    from matplotlib.axes import Axes

    from memray.report.figures import VERDICT_COLORS, plot_findings
    from memray.report.findings import CHANCE_MARGIN

    write_scenario(tmp_path, SCENARIOS[expected], OWN_NOISE[expected], seeds=(0,))
    path = build_report(tmp_path, bootstrap=0)
    assert "figures/findings.png" in path.read_text()
    assert '<figure id="figure-findings">' in (path.parent / "report.html").read_text()
    rows = json.loads((path.parent / "report.json").read_text())["tables"]["findings"]

    drawn = []
    original = Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn.append((x[0], kwargs["xerr"], kwargs["color"]))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", spy)
    assert plot_findings(pd.DataFrame(rows), CHANCE_MARGIN, tmp_path / "findings.png").is_file()
    assert len(drawn) == len(rows)
    for (center, xerr, color), row in zip(drawn, rows):
        chance = row["difference"] is None
        expected_center = row["a"] - 0.5 if chance else row["difference"]
        low = row["a_lo"] - 0.5 if chance else row["difference_lo"]
        assert center == pytest.approx(expected_center) and center - xerr[0][0] == pytest.approx(low)
        assert color == VERDICT_COLORS[row["verdict"]]


#: The CPU study on the real model (sweeps/smollm2-cpu.yaml): its result files (result.json,
#: per-sample scores) and its report, as committed.
STUDY = Path(__file__).resolve().parent.parent / "sweeps" / "results" / "smollm2-cpu"


def test_the_committed_cpu_study_report_is_rebuilt_from_its_result_files(tmp_path):
    """Nothing of the committed report is written by hand: built again from the committed
    result files, every table (findings included) and report.md come out the same."""
    import shutil

    sweep_dir = tmp_path / "smollm2-cpu"
    shutil.copytree(STUDY, sweep_dir, ignore=shutil.ignore_patterns("report"))
    path = build_report(sweep_dir)
    committed = STUDY / "report"
    tables = sorted(p.name for p in (committed / "tables").iterdir())
    assert "findings.csv" in tables and tables == sorted(p.name for p in (path.parent / "tables").iterdir())
    for name in tables:
        assert (path.parent / "tables" / name).read_text() == (committed / "tables" / name).read_text(), name
    # report.md but the line naming the folder and the time it was made
    lines = path.read_text().splitlines()
    kept_lines = (committed / "report.md").read_text().splitlines()
    assert "Made 20" in lines[2] and lines[:2] + lines[3:] == kept_lines[:2] + kept_lines[3:]
    rebuilt, kept = (json.loads((folder / "report.json").read_text()) for folder in (path.parent, committed))
    assert rebuilt["tables"] == kept["tables"] and rebuilt["trials"] == kept["trials"]
    assert sorted(p.name for p in (path.parent / "figures").iterdir()) == \
        sorted(p.name for p in (committed / "figures").iterdir())
    # every trial of the grid finished, on the packaged real model
    trials = {t["name"]: t for t in kept["trials"]}
    assert len(trials) == 9 and all(t["status"] == "success" for t in trials.values())
