"""memray.sweep: resource rules, W&B settings, every shipped sweep file, and whole sweeps
on a local Ray with 2 CPUs: the demo grid, and a fault at epoch 2 finished by `resume`.

Driver kills and a two-node cluster are in test_sweep_cluster.py; both use the helpers in
helpers.py (small sweep files, trial folders, W&B offline runs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from memray import sweep
from memray.config import GPU_TYPES, ConfigError, ResourceRule, WandbConfig
from memray.files import load_sweep
from memray.sweep import trial_names

from faults import clear_fault, inject_fault
from helpers import file_states, read_result, trial_dirs, wandb_records, wandb_runs, write_small_sweep

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Every shipped sweep file
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_validates_and_expands(path):
    """Schema, every grid cell and the resource rules; each trial fits an 8-GPU node. (Hub
    models need not be downloaded here: `memray run` checks them where the trials run.)"""
    config, cells = load_sweep(path)
    assert cells
    sweep.check_rules(config.resources, cells, str(path))
    node = {"CPU": 96.0, "GPU": 8.0, **{gpu_type: 8.0 for gpu_type in GPU_TYPES}}  # one GPU type resource per GPU
    plan = sweep.plan_sweep(config, cells, str(path), node, [node], strict=True)
    assert sorted(plan.order) == [cell.index for cell in cells]
    assert len(set(trial_names(cells).values())) == len(cells)  # one folder per trial


def test_dry_run_of_a_study_sweep_needs_no_download_and_shows_the_whole_plan(monkeypatch):
    # offline, and none of the study models in the cache: the published shapes stand in
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = REPO / "sweeps" / "hou2025.yaml"
    plan = sweep.dry_run_plan(path, num_cpus=2)
    count = len(load_sweep(path)[1])
    assert len(plan.trials) == count and all(t.memory_gb > 0 for t in plan.trials)
    assert "llama-2-7b" in plan.trials[0].axes  # the longest trials start first
    small = next(t for t in plan.trials if "model.name=gpt2 " in t.axes)
    assert plan.trials[0].memory_gb > 5 * small.memory_gb
    # a laptop without GPUs cannot run it: said, not raised (the plan is still shown)
    assert any(w.startswith(f"{count} trial(s) need more than any node") for w in plan.warnings)
    models = sorted({c.config.model.name for c in load_sweep(path)[1]})
    assert f"models {', '.join(models)}: their published shapes" in plan.notes[0]
    text = sweep.render_plan(plan)
    assert text.splitlines()[0] == f"{count} trials" and f"warning: {count} trial(s) need more than any node" in text
    assert all(f"  {t.name}  {t.axes}  {t.resources}  mem {t.memory}" in text for t in plan.trials)


def test_dry_run_lists_demo_cells_longest_first_with_resources():
    path = REPO / "sweeps" / "demo.yaml"
    plan = sweep.dry_run_plan(path, ["train.epochs=2"], num_cpus=2)
    cells = load_sweep(path)[1]
    assert sorted(t.index for t in plan.trials) == [c.index for c in cells]
    # full fine-tuning costs most per token, head-only least
    costs = {c.index: sweep.trial_cost(c.config) for c in cells}
    assert [t.index for t in plan.trials] == sorted(costs, key=lambda i: -costs[i])
    assert cells[plan.trials[0].index].config.method.name == "full"
    assert cells[plan.trials[-1].index].config.method.name == "head"
    assert all(t.resources == "cpus=1 gpus=0 [default]" and t.gpu_type == "CPU" for t in plan.trials)  # no GPU here


# ---------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------

RULES_SWEEP = """\
name: rules
base: {model: {name: gpt2}, method: {name: lora}}
grid:
  model.name: [gpt2, gpt2-xl]
  method: [{name: full}, {name: lora, rank: 8}]
resources:
%s
"""


def _rules_sweep(tmp_path: Path, rules: str):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES_SWEEP % rules)
    config, cells = load_sweep(path)
    sweep.check_rules(config.resources, cells, str(path))
    return path, config, cells


def test_first_matching_rule_wins_else_default_by_model_size(tmp_path):
    _, config, cells = _rules_sweep(tmp_path, """\
  - {match: {model.name: gpt2-xl, method.name: full}, cpus: 8, gpus: 2}
  - {match: {model.name: [gpt2-xl]}, cpus: 4, gpus: 1}""")
    got = {(c.config.model.name, c.config.method.name): sweep.trial_resources(c.config, config.resources, True)
           for c in cells}
    assert (got["gpt2-xl", "full"].rule.gpus, got["gpt2-xl", "full"].source) == (2, "resources.0")
    assert (got["gpt2-xl", "lora"].rule.gpus, got["gpt2-xl", "lora"].source) == (1, "resources.1")
    # defaults: four GPT-2 124M LoRA trials share a GPU; full fine-tuning takes twice as much
    assert (got["gpt2", "lora"].rule.gpus, got["gpt2", "lora"].source) == (0.25, "default")
    assert got["gpt2", "full"].rule.gpus == 0.5
    assert got["gpt2", "lora"].bundles() == [{"CPU": 1.0, "GPU": 0.25}]
    # no GPU in the cluster: one CPU per trial
    cpu_only = sweep.trial_resources(cells[1].config, [], has_gpus=False)
    assert cpu_only.bundles() == [{"CPU": 1.0}]


def test_a_trial_that_fits_no_node_is_a_config_error(tmp_path):
    path, config, cells = _rules_sweep(tmp_path, "  - {match: {model.name: gpt2-xl}, cpus: 4, gpus: 2}")
    node = {"CPU": 16.0, "GPU": 1.0}
    with pytest.raises(ConfigError, match=r"resources\.0: grid cell 2 needs cpus=4 gpus=2"):
        sweep.plan_sweep(config, cells, str(path), node, [node], strict=True)
    with pytest.warns(UserWarning, match="needs cpus=4 gpus=2"):  # a cluster may still scale up
        plan = sweep.plan_sweep(config, cells, str(path), node, [node], strict=False)
    assert plan.max_concurrent is None  # single-process trials reserve all they use


@pytest.mark.parametrize(("rule", "field", "message"), [
    ("{match: {method.rnak: 8}, gpus: 1}", "resources.0.match.method.rnak", "unknown field"),
    ("{match: {model.name: gpt3}, gpus: 1}", "resources.0.match.model.name", 'no trial has "gpt3"'),
    ("{match: {method.rank: [8, 16]}, gpus: 1}", "resources.0.match.method.rank", "no trial has 16"),
    ("{match: {model.name: gpt2}, gpus: 1.5}", "resources.0.gpus", "whole GPUs"),
    ("{match: {model.name: gpt2}, gpu: 1}", "resources.0.gpu", "unknown key"),
    ("{match: {model.name: gpt2}, workers: 4, gpus_per_worker: 1}", "resources.0.workers", "multi-worker"),
])
def test_bad_rules_name_the_file_and_the_rule_field(tmp_path, rule, field, message):
    with pytest.raises(ConfigError) as caught:
        _rules_sweep(tmp_path, f"  - {rule}")
    assert caught.value.source == str(tmp_path / "rules.yaml")
    assert caught.value.field == field
    assert message in caught.value.message


def test_concurrency_cap_keeps_multi_worker_trials_from_starving_each_other():
    small = sweep.TrialResources(ResourceRule(cpus=1, gpus=0.25), "default")
    big = sweep.TrialResources(ResourceRule(cpus=1, workers=2, cpus_per_worker=4, gpus_per_worker=1), "resources.0")
    assert big.bundles() == [{"CPU": 1}]  # Ray Train asks for the workers itself
    assert big.total() == {"CPU": 9, "GPU": 2}
    assert sweep.max_concurrent_trials([small] * 8, {"CPU": 8, "GPU": 1}) is None
    # 4 GPUs hold two such jobs at once: a third driver would wait holding a CPU
    assert sweep.max_concurrent_trials([big] * 3 + [small] * 4, {"CPU": 32, "GPU": 4}) == 2
    assert sweep.max_concurrent_trials([big] * 3, {"CPU": 32, "GPU": 1}) == 1


def test_longest_trials_are_scheduled_first(tmp_path):
    path = tmp_path / "order.yaml"
    path.write_text("""\
name: order
base: {model: {name: tiny-gpt2}, data: {members: 100}}
grid:
  model.name: [tiny-gpt2, gpt2]
  method: [{name: head}, {name: full}]
  train.epochs: [1, 3]
""")
    _, cells = load_sweep(path)
    order = [(cells[i].config.model.name, cells[i].config.method.name, cells[i].config.train.epochs)
             for i in sweep.schedule_order(cells)]
    assert order[:2] == [("gpt2", "full", 3), ("gpt2", "head", 3)]
    assert order[-1] == ("tiny-gpt2", "head", 1)
    costs = [sweep.trial_cost(cells[i].config) for i in sweep.schedule_order(cells)]
    assert costs == sorted(costs, reverse=True)


# ---------------------------------------------------------------------------------------
# W&B settings
# ---------------------------------------------------------------------------------------


def test_wandb_auto_mode_is_online_only_with_a_key(tmp_path):
    auto = WandbConfig(mode="auto")
    empty_netrc = tmp_path / "netrc-empty"
    empty_netrc.write_text("machine example.org login me password x\n")
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert sweep.resolve_wandb_mode(auto, {"NETRC": str(empty_netrc)}) == "offline"
    assert sweep.resolve_wandb_mode(auto, {"NETRC": str(netrc)}) == "online"
    assert sweep.resolve_wandb_mode(auto, {"NETRC": str(empty_netrc), "WANDB_API_KEY": "k" * 40}) == "online"
    assert sweep.resolve_wandb_mode(WandbConfig(mode="disabled"), {"WANDB_API_KEY": "k"}) == "disabled"


def test_the_sweep_screen_prints_each_state_change_and_epoch_or_draws_one_table():
    from io import StringIO

    from memray.config import TrialConfig
    from memray.sweep.console import SweepScreen

    config = TrialConfig(attacks=["zlib", "loss"], train={"epochs": 2})
    known = {1: {"status": "success", "epochs": [{"epoch": 2, "val/ppl": 9.5, "mia/zlib/auc": 0.61}]},
             2: {"status": "running", "epochs": [{"epoch": 1, "val/ppl": 12.0}]}}
    out = StringIO()
    screen = SweepScreen("s", {0: "a", 1: "b", 2: "c"}, {0: config, 1: config, 2: config}, known, stream=out, live=False)
    assert screen.counts() == {"pending": 1, "success": 1, "lost": 1}  # `running` with no driver: lost
    screen.started(0)
    screen.epoch(0, {"epoch": 0, "val/ppl": 20.0, "mia/loss/auc": 0.5, "mia/zlib/auc": 0.52})
    screen.ended(0, "retrying", "RuntimeError: boom")
    screen.started(0)
    screen.started(2)
    screen.ended(2, "success")
    assert out.getvalue().splitlines() == [
        "[memray] a: running",
        "[memray] a: epoch 0/2 | val ppl 20.00 | zlib AUC 0.520 | loss AUC 0.500",  # the headline attack first
        "[memray] a: failed, retrying: RuntimeError: boom",
        "[memray] a: running",
        "[memray] c: running (from epoch 1)",
        "[memray] c: success"]
    assert screen.summary().startswith("sweep s: 3 trials: 1 running, 2 success;")

    terminal = StringIO()
    screen = SweepScreen("s", {0: "a", 1: "b"}, {0: config, 1: config}, {1: known[1]}, stream=terminal, live=True).start()
    screen.started(0)
    screen.epoch(0, {"epoch": 1, "val/ppl": 20.0, "mia/zlib/auc": 0.75})
    screen.ended(0, "failed", "ValueError: NaN loss [x]")
    screen.stop()
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())
    assert "[memray] a: failed: ValueError: NaN loss [x]" in drawn and "epoch" in drawn and "zlib AUC" in drawn
    assert "[/]" not in drawn  # styles are drawn, never shown as markup
    last = drawn[drawn.rindex("elapsed"):].splitlines()
    assert last[1].split()[:5] == ["a", "failed", "1/2", "20.00", "0.750"]
    assert last[2].split()[:5] == ["b", "success", "2/2", "9.50", "0.610"]
    assert "[memray] a: running" not in drawn  # no lines for what the table shows


def test_wandb_run_id_is_stable_per_trial_and_valid_for_wandb():
    first = sweep.wandb_run_id("abcd1234", 3)
    assert first == sweep.wandb_run_id("abcd1234", 3)
    assert first != sweep.wandb_run_id("abcd1234", 4) != sweep.wandb_run_id("ffff0000", 3)
    assert re.fullmatch(r"[a-z0-9]{16}", first)


def _seeded_cells(tmp_path: Path) -> list:
    """Cells of a grid of two methods x two seeds (cell order: method, then seed)."""
    path = tmp_path / "seeded.yaml"
    path.write_text(json.dumps({
        "name": "seeded", "base": {"model": {"name": "tiny-gpt2"}, "data": {"dataset": "pydoc"}},
        "grid": {"method": [{"name": "full"}, {"name": "lora", "rank": 4}], "seed": [0, 1]}}))
    return load_sweep(path)[1]


def test_runs_of_one_configuration_share_a_config_key_column_and_tag(tmp_path):
    from memray.results import config_key
    from memray.sweep.wandb import config_name, wandb_config, wandb_tags

    cells = _seeded_cells(tmp_path)
    keys = [wandb_config(cell, f"t{cell.index}")["config_key"] for cell in cells]
    assert keys[0] == keys[1] != keys[2] == keys[3]  # the seed left out, the method kept
    assert all(re.fullmatch(r"[0-9a-f]{10}", key) for key in keys)
    assert keys[0] == config_key(cells[0].config.resolved())  # the report's key of the same trials
    for cell, key in zip(cells, keys):
        assert f"config:{key}" in wandb_tags(cell, "seeded") and "sweep:seeded" in wandb_tags(cell, "seeded")
    assert config_name(cells[0]) == "method.name=full" and config_name(cells[3]) == "method.name=lora, method.rank=4"
    # output_dir and the split seed are no part of the configuration; any other setting is
    moved = cells[0].config.model_copy(update={"output_dir": "elsewhere", "seed": 7})
    assert config_key(moved.resolved()) == keys[0]
    longer = cells[0].config.model_copy(update={"train": cells[0].config.train.model_copy(update={"epochs": 9})})
    assert config_key(longer.resolved()) != keys[0]


def test_an_offline_run_holds_the_config_key_and_every_interval(tmp_path):
    """A trial's W&B run, read back from its offline file: the config key as column and tag,
    each TPR's interval in the epoch's history row and in the AUC table beside the TPR."""
    import numpy as np
    import pandas as pd

    from memray import metrics
    from memray.results import write_scores
    from memray.sweep.wandb import WandbSettings, WandbTrial, wandb_config

    cell = _seeded_cells(tmp_path)[1]
    member = np.arange(400) < 200
    scores = np.random.default_rng(0).normal(size=400) + member
    row = {"epoch": 1, **metrics.mia_metrics("loss", scores, member)}
    assert {"mia/loss/tpr@1%fpr_lo", "mia/loss/tpr@1%fpr_hi"} <= set(row)
    trial_dir = tmp_path / "trial"
    write_scores(trial_dir, 1, pd.DataFrame({"member": member, "loss": scores}))
    settings = WandbSettings(mode="offline", project="p", entity=None, group="seeded", uid="u1")
    run = WandbTrial.start(settings, cell, "t1", trial_dir, wait_s=0)
    run.log(row)
    run.finish(trial_dir, row)
    (logged,) = wandb_runs(trial_dir / "wandb")
    key = wandb_config(cell, "t1")["config_key"]
    assert logged["config"]["config_key"] == key and logged["config"]["config_name"] == "method.name=full"
    (history,) = [r for r in logged["history"] if "epoch" in r]
    for name in ("tpr@1%fpr", "tpr@1%fpr_lo", "tpr@1%fpr_hi", "auc_lo", "auc_hi"):
        assert history[f"mia/loss/{name}"] == pytest.approx(row[f"mia/loss/{name}"])
    (run_file,) = logged["dir"].glob("run-*.wandb")
    tags = [list(r.run.tags) for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    assert f"config:{key}" in tags[0]
    table = _wandb_table(logged["dir"], "mia/auc_table")
    (line,) = table["data"]
    values = dict(zip(table["columns"], line))
    assert values["attack"] == "loss" and values["tpr@1%fpr_lo"] == pytest.approx(row["mia/loss/tpr@1%fpr_lo"])
    assert values["tpr@0.1%fpr"] is None  # 200 non-members do not resolve 0.1%: left out, interval and all


# ---------------------------------------------------------------------------------------
# Whole sweeps on a local Ray
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray(memray_cache):
    """One local Ray for this module (address="local": never a cluster left running)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


#: The demo grid as shipped (every method), shrunk to seconds per trial.
DEMO_OVERRIDES = ["train.epochs=2", "data.members=16", "data.nonmembers=16", "data.validation=8", "data.max_length=32"]


@pytest.mark.ray
def test_demo_grid_reports_every_epoch_to_tune_results_and_wandb(local_ray, tmp_path, capsys):
    assert sweep.run_sweep(REPO / "sweeps" / "demo.yaml", DEMO_OVERRIDES, storage=str(tmp_path)) == 0
    folder = tmp_path / "demo"
    captured = capsys.readouterr()
    printed = captured.out
    # not a terminal: a line per trial and epoch, one per state change, the sweep's first and last
    lines = (captured.err + captured.out).splitlines()
    _, cells = load_sweep(folder / "sweep.yaml")
    assert len(cells) == len(load_sweep(REPO / "sweeps" / "demo.yaml")[1])  # the grid as shipped
    assert all(c.config.train.epochs == 2 for c in cells)
    assert len(lines) <= 2 + len(cells) * ((2 + 1) + 2), "\n".join(lines)
    names = trial_names(cells)
    runs = {run["config"]["cell"]: run for run in wandb_runs(folder / "wandb")}
    assert sorted(runs) == sorted(names)  # one W&B run per trial, no strays
    for cell in cells:
        trial_dir = folder / "trials" / names[cell.index]
        result = read_result(trial_dir)
        assert result["status"] == "success"
        epochs = result["epochs"]
        assert [row["epoch"] for row in epochs] == [0, 1, 2]
        assert {"val/ppl", "mia/loss/auc", "mia/ref/auc"} <= set(epochs[-1]) and "train/loss" in epochs[1]
        assert all((trial_dir / "scores" / f"epoch_{e:03d}.parquet").is_file() for e in range(3))
        # Tune got every epoch, with the trial's own numbers
        tune_rows = [json.loads(line) for line in (folder / "tune" / f"cell{cell.index:04d}" / "result.json").open()]
        assert [row["epoch"] for row in tune_rows] == [0, 1, 2]
        assert [row["val/ppl"] for row in tune_rows] == pytest.approx([row["val/ppl"] for row in epochs])
        # W&B: the sweep's group, the axes as config columns, every epoch's metrics
        run = runs[cell.index]
        assert (run["group"], run["project"], run["name"]) == ("demo", "memray-demo", names[cell.index])
        assert run["config"]["method"] == cell.config.method.name
        assert run["config"]["model"] == "tiny-gpt2" and run["config"]["seed"] == 0
        assert run["config"]["dataset"] == "pydoc" and run["config"]["duplication"] == 0.0
        assert run["config"]["axes"] == cell.axes and run["config"]["config"]["train"]["epochs"] == 2
        logged = {row["epoch"]: row for row in run["history"] if "epoch" in row}
        assert sorted(logged) == [0, 1, 2]
        for row in epochs:
            for key in ("val/ppl", "mia/loss/auc", "mia/zlib/auc"):
                assert logged[row["epoch"]][key] == pytest.approx(row[key])
        # at the end: the per-attack AUC table and the ROC curves of the last epoch
        auc_table = _wandb_table(run["dir"], "mia/auc_table")
        assert {row[0]: row[1] for row in auc_table["data"]} == pytest.approx(
            {a.label: epochs[-1][f"mia/{a.label}/auc"] for a in cell.config.attacks})
        roc = _wandb_table(run["dir"], "mia/roc_table")
        assert roc["columns"] == ["step", "lineKey", "lineVal"]  # W&B's line-series layout: fpr, attack, tpr
        assert {row[1] for row in roc["data"]} == {a.label for a in cell.config.attacks}
        assert all(0 <= row[0] <= 1 and 0 <= row[2] <= 1 for row in roc["data"])
        assert cell.config.method.name in printed and names[cell.index] in printed
        assert [line.split(" | ")[0] for line in lines if line.startswith(f"[memray] {names[cell.index]}: epoch")] \
            == [f"[memray] {names[cell.index]}: epoch {epoch}/2" for epoch in range(3)]
    assert f"{len(cells)} success" in printed and f"wandb sync {folder / 'wandb'}" in printed
    status = sweep.sweep_status(folder)
    assert status.count(" success ") == len(cells) and status.count("2/2") == len(cells)


def _wandb_table(run_dir: Path, key: str) -> dict[str, Any]:
    (path,) = (run_dir / "files" / "media" / "table").glob(f"{key}_*.table.json")
    return json.loads(path.read_text())


def test_run_refuses_an_existing_sweep_folder(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "sweep.yaml").write_text("name: demo\n")
    with pytest.raises(ConfigError, match="already exists: `memray resume"):
        sweep.run_sweep(REPO / "sweeps" / "demo.yaml", storage=str(tmp_path))


@pytest.mark.ray
def test_fault_at_epoch_2_leaves_the_trial_errored_and_resume_finishes_it(local_ray, tmp_path, monkeypatch, capsys):
    path = write_small_sweep(tmp_path, "faulty", epochs=3)
    inject_fault(monkeypatch, 1, 2)
    assert sweep.run_sweep(path, storage=str(tmp_path / "out"), max_failures=0) == 1
    folder = tmp_path / "out" / "faulty"
    dirs = trial_dirs(folder)
    faulty = read_result(dirs[1])
    assert faulty["status"] == "failed" and "fault injected" in faulty["reason"]
    # the console: the failure in one line with its reason, and in the sweep's last line
    printed = capsys.readouterr().out.splitlines()
    assert f"[memray] {dirs[1].name}: failed: {faulty['reason']}" in printed
    assert printed[-1].startswith("[memray] sweep faulty: 3 trials: 2 success, 1 failed;"), printed[-1]
    assert [row["epoch"] for row in faulty["epochs"]] == [0, 1, 2]
    assert "failed" in sweep.sweep_status(folder) and "fault injected" in sweep.sweep_status(folder)
    finished = {index: file_states(dirs[index]) for index in (0, 2)}
    assert all(read_result(dirs[index])["status"] == "success" for index in (0, 2))
    scores_before = file_states(dirs[1] / "scores")

    clear_fault(monkeypatch)
    assert sweep.resume_sweep(folder) == 0
    printed = capsys.readouterr().out.splitlines()  # the resumed trial alone: finished ones print nothing
    assert {line.split(": ")[0] for line in printed[:-1]} == {f"[memray] {dirs[1].name}"}, printed
    assert f"[memray] {dirs[1].name}: running (from epoch 2)" in printed
    for index in (0, 2):  # finished trials: not a byte or a timestamp changed
        assert file_states(dirs[index]) == finished[index]
    resumed = read_result(dirs[1])
    assert resumed["status"] == "success" and resumed["attempts"] == 2
    assert [row["epoch"] for row in resumed["epochs"]] == [0, 1, 2, 3]
    assert resumed["epochs"][:3] == faulty["epochs"]  # epochs 0-2 kept, not re-run
    # the trial folder keeps the checkpoints it resumed from; Tune keeps no second copy (on a
    # path storage: a killed driver's state cannot send a resume to a checkpoint Tune deleted)
    assert (dirs[1] / "checkpoints").is_dir() and not list((folder / "tune").glob("cell*/checkpoint_*"))
    after = file_states(dirs[1] / "scores")
    assert {name: after[name] for name in scores_before} == scores_before
    assert "epoch_003.parquet" in after
    # W&B: the resumed attempt continued the same run (same id) with epoch 3 only
    runs = [run for run in wandb_runs(folder / "wandb") if run["config"]["cell"] == 1]
    assert len(runs) == 2 and runs[0]["id"] == runs[1]["id"]
    assert [row["epoch"] for row in runs[0]["history"] if "epoch" in row] == [0, 1, 2]
    assert [row["epoch"] for row in runs[1]["history"] if "epoch" in row] == [3]

    # a driver killed before Tune saved its state: resume starts Tune afresh, and trials the
    # folders show finished are reported from their files, not run or logged again
    import shutil

    shutil.rmtree(folder / "tune")
    trials_before, wandb_before = file_states(folder / "trials"), len(wandb_runs(folder / "wandb"))
    assert sweep.resume_sweep(folder) == 0
    assert file_states(folder / "trials") == trials_before
    assert len(wandb_runs(folder / "wandb")) == wandb_before


@pytest.mark.ray
def test_uri_storage_mirrors_trial_folders_and_resumes_on_a_node_without_them(local_ray, tmp_path, monkeypatch):
    """With a URI storage (file:// here, s3:// on a cluster) a trial works in node-local
    scratch; a resume on a node that lacks it gets the folder from the URI and the
    checkpoint from Ray Tune."""
    import shutil
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    path = write_small_sweep(tmp_path, "remote", epochs=2, wandb_mode="disabled", methods=("full", "lora"))
    storage = f"file://{tmp_path / 'bucket'}"
    inject_fault(monkeypatch, 1, 1)
    assert sweep.run_sweep(path, storage=storage, max_failures=0) == 1
    folder = tmp_path / "bucket" / "remote"
    dirs = trial_dirs(folder)
    assert not any((d / "checkpoints").exists() for d in dirs.values())  # checkpoints go through Tune
    faulty = read_result(dirs[1])
    assert faulty["status"] == "failed" and [row["epoch"] for row in faulty["epochs"]] == [0, 1]
    shutil.rmtree(tmp_path / "scratch" / "memray")  # the node that ran it is gone

    clear_fault(monkeypatch)
    assert sweep.resume_sweep(storage + "/remote") == 0
    resumed = read_result(dirs[1])
    assert resumed["status"] == "success" and resumed["attempts"] == 2
    assert resumed["epochs"][:2] == faulty["epochs"]  # continued from the epoch-1 checkpoint
    assert [row["epoch"] for row in resumed["epochs"]] == [0, 1, 2]
    assert "2 success" in sweep.sweep_status(storage + "/remote")
