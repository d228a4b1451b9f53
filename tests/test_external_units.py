"""Units from outside memray: a method (VeRA from PEFT), a per-sample attack and a dataset,
each one module of a package that names it under its `memray.methods` / `memray.attacks`
/ `memray.datasets` entry point (tests/assets/external_units: the modules and the package's
dist-info, found on PYTHONPATH as an installed package is). No file of memray names them;
they reach the dry run, a trial run by `memray run` in Ray workers, W&B and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import wandb_runs

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "tests" / "assets" / "external_units"

SWEEP = """\
name: external
base:
  model: {name: tiny-gpt2, pretrained: false}
  data: {dataset: fables, max_length: 48, members: 24, nonmembers: 24, validation: 8}
  method: {name: vera, rank: 16}
  train: {epochs: 2, batch_size: 8}
  eval: {batch_size: 24}
  attacks: [loss, maxloss]
grid:
  seed: [0]
wandb: {project: memray-test, mode: offline}
"""


def memray(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(UNITS), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "memray.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_units_are_not_known_without_their_package():
    from memray import attacks, data, methods

    assert "vera" not in methods.METHODS and "maxloss" not in attacks.ATTACKS and "fables" not in data.REGISTRY


def test_a_unit_that_fails_to_import_is_named_with_its_package(tmp_path):
    broken = tmp_path / "broken"
    (broken / "memray_broken-0.1.dist-info").mkdir(parents=True)
    (broken / "memray_broken-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: memray-broken\n"
                                                                    "Version: 0.1\n")
    (broken / "memray_broken-0.1.dist-info" / "entry_points.txt").write_text("[memray.attacks]\nbad = no_such_module\n")
    env = {**os.environ, "PYTHONPATH": str(broken)}
    proc = subprocess.run([sys.executable, "-c", "import memray.attacks"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert ("memray: the memray.attacks unit 'bad' (no_such_module) of memray-broken failed to import: "
            "ModuleNotFoundError") in proc.stderr


@pytest.mark.ray
def test_external_units_run_end_to_end_through_memray_run(tmp_path):
    sweep = tmp_path / "external.yaml"
    sweep.write_text(SWEEP)
    plan = memray("run", str(sweep), "--dry-run", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "-tiny-gpt2_vera_r16_fables_s0_" in plan.stdout, plan.stdout

    run = memray("run", str(sweep), "--storage", str(tmp_path / "results"), "--num-cpus", "2", cwd=tmp_path)
    folder = tmp_path / "results" / "external"
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (trial,) = (folder / "trials").iterdir()  # read as files: this process has no such units
    result = json.loads((trial / "result.json").read_text())
    assert result["status"] == "success" and [row["epoch"] for row in result["epochs"]] == [0, 1, 2]
    assert result["config"]["method"]["name"] == "vera" and result["config"]["data"]["dataset"] == "fables"
    assert result["method_info"]["trained"].startswith("VeRA r=16") and result["method_info"]["trainable_params"] > 0
    assert all(0 <= row["mia/maxloss/auc"] <= 1 for row in result["epochs"])

    (wandb_run,) = wandb_runs(folder / "wandb")
    assert wandb_run["config"]["method"] == "vera" and wandb_run["config"]["config"]["method"]["rank"] == 16
    assert any("mia/maxloss/auc" in row for row in wandb_run["history"])

    report = memray("report", str(folder), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    built = json.loads((folder / "report" / "report.json").read_text())
    (row,) = built["tables"]["trials"]
    assert row["method"] == "vera" and "maxloss auc" in row
    assert "vera" in (folder / "report" / "report.md").read_text()
