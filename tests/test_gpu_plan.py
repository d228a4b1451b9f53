"""Trials bound to GPU types: the study sweeps' resource rules send every trial to a GPU type
of launch/cluster.yaml whose share fits memray's memory estimate, the dry run prints per GPU
type the trials, GPU-hours and memory, a rule that sends a trial to a GPU it cannot fit is
an error naming the file and the rule, and the binding is a Ray resource of those nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from memray import cli, sweep
from memray.config import GPU_TYPES, ConfigError, ResourceRule
from memray.files import load_sweep
from memray.references import sweep_cells

REPO = Path(__file__).resolve().parent.parent
#: The GPU studies: the sweep files whose resource rules bind trials to GPU types.
STUDIES = sorted(path.stem for path in (REPO / "sweeps").glob("*.yaml")
                 if any(rule.gpu_type for rule in load_sweep(path)[0].resources))


def test_the_gpu_studies_are_found():
    assert {"hou2025", "wang2025"} <= set(STUDIES)


def _cluster_gpu_types() -> dict[str, float]:
    """GPU type -> GPUs per node, of the shipped cluster's node types."""
    cluster = yaml.safe_load((REPO / "launch" / "cluster.yaml").read_text())
    return {name: amount for node in cluster["available_node_types"].values()
            for name, amount in node["resources"].items() if name in GPU_TYPES}


@pytest.mark.parametrize("study", STUDIES)
def test_study_trials_fit_the_gpu_types_of_the_shipped_cluster(study, monkeypatch):
    monkeypatch.setattr(sweep.ray_tune, "local_capacity", lambda num_cpus: {"CPU": 8.0, "GPU": 1.0})
    path = REPO / "sweeps" / f"{study}.yaml"
    plan = sweep.dry_run_plan(path)
    types = _cluster_gpu_types()
    assert len(plan.trials) == len(sweep_cells(load_sweep(path)[1]))  # every trial, references included
    assert all(t.gpu_type in types and t.source.startswith("resources.") for t in plan.trials)  # none left to "any GPU"
    assert all(t.fits for t in plan.trials)
    assert {g.gpu_type for g in plan.gpu_types} <= set(types)
    assert sum(g.trials for g in plan.gpu_types) == len(plan.trials)  # trials per GPU type
    assert all(g.gpu_hours > 0 and g.unfit == 0 for g in plan.gpu_types)
    text = sweep.render_plan(plan)
    assert "0 trials do not fit their GPUs" in text
    assert "GPU-hours: the FLOP count at 25% of the GPU's dense bf16 peak" in text


def test_a_rule_that_sends_a_trial_to_a_gpu_it_cannot_fit_is_an_error(tmp_path, capsys):
    text = (REPO / "sweeps" / "hou2025.yaml").read_text()
    # Llama-2-7B on XSum (~46 GB) sent to an A10G (24 GB)
    bad = tmp_path / "hou2025.yaml"
    bad.write_text(text.replace("{match: {model.name: llama-2-7b, data.dataset: xsum}, cpus: 12, gpus: 1, "
                                "gpu_type: a100_80gb}",
                                "{match: {model.name: llama-2-7b, data.dataset: xsum}, cpus: 8, gpus: 1, "
                                "gpu_type: a10g_24gb}"))
    assert bad.read_text() != text
    assert cli.main(["run", str(bad), "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"memray: error: {bad}: resources.0: sends grid cell ")
    assert "llama-2-7b" in error and "a10g_24gb (24 GB)" in error and "4 more trial(s)" in error


def test_gpu_type_is_a_ray_resource_of_its_nodes(tmp_path):
    rule = ResourceRule(cpus=2, gpus=0.25, gpu_type="a10g_24gb")
    resources = sweep.TrialResources(rule, "resources.0")
    assert resources.bundles() == [{"CPU": 2, "GPU": 0.25, "a10g_24gb": 0.25}]
    assert rule.gpu_memory == 24 and sweep.gpu_budget_gb(rule) == 6
    workers = ResourceRule(cpus=1, workers=2, gpus_per_worker=1, gpu_type="a100_80gb")
    assert sweep.TrialResources(workers, "resources.0").total() == {"CPU": 3, "GPU": 2.0, "a100_80gb": 2.0}
    path = tmp_path / "bound.yaml"
    path.write_text("name: bound\nbase: {model: {name: tiny-gpt2}, data: {dataset: pydoc}}\n"
                    "resources: [{cpus: 1, gpus: 0.25, gpu_type: a10g_24gb}]\n")
    swept, cells = load_sweep(path)
    a10g_node = {"CPU": 8.0, "GPU": 1.0, "a10g_24gb": 1.0}
    other_gpu_node = {"CPU": 8.0, "GPU": 1.0}
    plan = sweep.plan_sweep(swept, cells, str(path), a10g_node, [other_gpu_node, a10g_node], strict=True)
    assert plan.resources[0].bundles()[0]["a10g_24gb"] == 0.25
    with pytest.raises(ConfigError, match="more than any node"):  # only GPUs of another type
        sweep.plan_sweep(swept, cells, str(path), other_gpu_node, [other_gpu_node], strict=True)


@pytest.mark.parametrize(("rule", "field", "message"), [
    ("{gpus: 1, gpu_type: v100}", "resources.0.gpu_type", "'v100' is not one of a10g_24gb"),
    ("{cpus: 2, gpu_type: a10g_24gb}", "resources.0", "gpu_type a10g_24gb needs GPUs"),
])
def test_bad_gpu_types_name_the_field(tmp_path, rule, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: bad\nbase: {{model: {{name: tiny-gpt2}}}}\nresources: [{rule}]\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert error.value.field == field and message in error.value.message
