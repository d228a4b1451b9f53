"""Data-parallel trials under DeepSpeed ZeRO (memray.distributed, and its use in memray.trial
and memray.sweep): the memory estimate, the config checks, a 2-worker trial whose weights
and scores equal a single-process run's, a sweep mixing one such trial with single-process
ones on 3 CPUs (a worker killed at epoch 2 and the trial resumed), and the benchmark.

Everything runs on CPU with the gloo backend (DS_ACCELERATOR=cpu, set in conftest.py).
The equivalence tests use tiny-llama, which has no dropout: with dropout each worker would
draw its own masks and the runs could not agree. Two workers with batch b see the batches
of one process with batch 2b (the same shuffled order, each worker half of each batch),
and transformers' Trainer averages the loss over all tokens of the global batch, so the
two runs take the same steps up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from memray import sweep
from memray.config import ConfigError, DeepSpeedConfig, ResourceRule, TrainConfig
from memray.files import validate, validate_trial
from memray.distributed import ModelShape, deepspeed_config, estimate_memory, resolve_zero

from faults import clear_fault, inject_fault
from helpers import read_result, trial_dirs

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------
# Memory estimate
# ---------------------------------------------------------------------------------------

#: Llama-2-7B: 6.74e9 parameters.
LLAMA_7B = ModelShape(params=6_738_415_616, hidden=4096, layers=32, heads=32, vocab=32000)


def test_7b_full_finetuning_needs_16_bytes_per_parameter_and_does_not_fit_one_80gb_gpu():
    single = estimate_memory(LLAMA_7B, batch_size=1, seq_len=512, bf16=True)
    # fp32 weights and gradients, Adam's two moments: 16 bytes per parameter
    assert single.weights + single.gradients + single.optimizer == pytest.approx(16 * LLAMA_7B.params / 2**30)
    assert single.weights + single.gradients + single.optimizer == pytest.approx(100.4, abs=0.1)  # GiB
    assert single.total > 80


def test_zero_stages_partition_optimizer_then_gradients_then_weights_over_workers():
    kwargs = dict(batch_size=1, seq_len=512, bf16=True)
    stage1 = estimate_memory(LLAMA_7B, workers=8, stage=1, **kwargs)
    stage2 = estimate_memory(LLAMA_7B, workers=8, stage=2, **kwargs)
    stage3 = estimate_memory(LLAMA_7B, workers=8, stage=3, **kwargs)
    params_gb = LLAMA_7B.params / 2**30
    assert stage1.optimizer == pytest.approx(12 * params_gb / 8)  # fp32 master + 2 moments, split 8 ways
    assert stage1.gradients == pytest.approx(2 * params_gb) and stage1.weights == pytest.approx(2 * params_gb)
    assert stage2.gradients == pytest.approx(2 * params_gb / 8) and stage2.weights == pytest.approx(2 * params_gb)
    # stage 3: an eighth of the weights plus two gathered layers (a transformer block is the largest)
    assert LLAMA_7B.largest_layer_params == (LLAMA_7B.params - LLAMA_7B.vocab * LLAMA_7B.hidden) // 32
    layer_gb = 2 * 2 * LLAMA_7B.largest_layer_params / 2**30
    assert stage3.weights == pytest.approx(2 * params_gb / 8 + layer_gb)
    assert stage1.total > stage2.total > stage3.total
    assert stage3.total < 80, "ZeRO-3 on 8 GPUs fits a 7B full fine-tune on 80 GB GPUs"
    assert stage3.total == pytest.approx(16 * params_gb / 8 + layer_gb + stage3.activations + stage3.overhead)


def test_offload_and_activation_checkpointing_shrink_what_stays_on_the_gpu():
    kwargs = dict(workers=2, stage=3, batch_size=8, seq_len=2048, bf16=True)
    plain = estimate_memory(LLAMA_7B, **kwargs)
    offloaded = estimate_memory(LLAMA_7B, offload_optimizer=True, offload_params=True, **kwargs)
    assert offloaded.optimizer == 0 and offloaded.gradients == 0
    assert offloaded.weights == pytest.approx(2 * 2 * LLAMA_7B.largest_layer_params / 2**30)  # working set only
    recomputed = estimate_memory(LLAMA_7B, activation_checkpointing=True, **kwargs)
    assert recomputed.activations < plain.activations / 4
    # activations scale with batch x length: 34 bytes per token and hidden unit per layer in 16 bits
    per_layer = 34 * 8 * 2048 * 4096 / 2**30
    logits = 8 * 2048 * 32000 * 10 / 2**30
    assert plain.activations == pytest.approx(32 * per_layer + logits)


def test_model_shape_counts_parameters_without_weights():
    from transformers import GPT2Config

    shape = ModelShape.from_config(GPT2Config(n_layer=48, n_embd=1600, n_head=25))
    assert shape.params == 1_557_611_200  # GPT-2 XL
    assert (shape.hidden, shape.layers, shape.vocab) == (1600, 48, 50257)


# ---------------------------------------------------------------------------------------
# Config: train.deepspeed, resource rules, dry run
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, field, message", [
    ({"stage": 4}, "train.deepspeed.stage", "4 is not one of 1, 2, 3"),
    ({"stage": 2, "offload_params": True}, "train.deepspeed", "offload_params needs stage 3"),
    ({"offload_optimiser": True}, "train.deepspeed.offload_optimiser", "did you mean 'offload_optimizer'"),
    ({"activation_checkpointing": "sometimes"}, "train.deepspeed.activation_checkpointing", "is not valid"),
])
def test_bad_deepspeed_fields_name_the_field(raw, field, message):
    with pytest.raises(ConfigError) as err:
        validate_trial({"train": {"deepspeed": raw}}, "sweep.yaml")
    assert err.value.field == field
    assert message in err.value.message
    assert str(err.value).startswith("sweep.yaml: ")


def test_unset_deepspeed_keeps_trial_ids_and_set_deepspeed_changes_them():
    plain = validate_trial({}, "t")
    assert plain.train.deepspeed is None
    assert plain.trial_id() == "709b805a", "a trial without train.deepspeed keeps the id it had before the field"
    assert validate_trial({"train": {"deepspeed": {"stage": 3}}}, "t").trial_id() != plain.trial_id()


def test_zero_defaults_follow_model_size_and_the_json_is_explicit():
    assert resolve_zero(None, 124e6) == DeepSpeedConfig(stage=2, activation_checkpointing=False)
    assert resolve_zero(None, 6.7e9) == DeepSpeedConfig(stage=3, activation_checkpointing=True)
    assert resolve_zero(DeepSpeedConfig(stage=1), 6.7e9).stage == 1
    zero = resolve_zero(DeepSpeedConfig(offload_optimizer=True), 6.7e9)
    config = deepspeed_config(TrainConfig(batch_size=4, grad_accum=2, max_grad_norm=0.5), zero, workers=8,
                              bf16=True, lr=2e-5)
    assert config["train_batch_size"] == 4 * 2 * 8
    assert config["gradient_clipping"] == 0.5 and config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["optimizer"]["params"]["lr"] == 2e-5
    assert "auto" not in json.dumps(config)


MIXED_SWEEP = """\
name: {name}
base:
  model: {{name: tiny-llama}}
  data: {{dataset: pydoc, max_length: 64, members: 24, nonmembers: 24, validation: 12}}
  train: {{epochs: {epochs}, batch_size: 4}}
  eval: {{batch_size: 24}}
  attacks: [loss, zlib]
grid:
  method: [{{name: full, lr: 0.003}}, {{name: head, lr: 0.003}}, {{name: lora, rank: 4, lr: 0.003}}]
resources:
  - {{match: {{method.name: full}}, cpus: 1, workers: 2, cpus_per_worker: 1{extra}}}
  - {{cpus: 1}}
wandb: {{project: memray-test, mode: offline}}
"""


def write_mixed_sweep(directory: Path, name: str, epochs: int = 3, extra: str = "") -> Path:
    path = Path(directory) / f"{name}.yaml"
    path.write_text(MIXED_SWEEP.format(name=name, epochs=epochs, extra=extra))
    return path


def test_dry_run_shows_workers_memory_per_gpu_and_what_does_not_fit(tmp_path, monkeypatch):
    from transformers import GPT2Config

    from memray import models

    monkeypatch.setattr(sweep.ray_tune, "local_capacity", lambda num_cpus: {"CPU": 8.0, "GPU": 2.0})  # a 2-GPU machine
    path = write_mixed_sweep(tmp_path, "mixed", extra=", gpus_per_worker: 1")
    text = sweep.dry_run_text(path)
    full = next(line for line in text.splitlines() if "method=full" in line)
    assert "cpus=1 + 2 workers x (cpus=1 gpus=1) [resources.0]" in full
    assert "mem ~" in full and "GB/GPU" in full and "DOES NOT FIT" not in full
    assert "concurrent trials: 3" in text  # 3 CPUs + 2 GPUs for the 2-worker trial, 1 CPU for each other
    # the same trial at GPT-2 XL shape with batch 64 x 1024 tokens on two 24 GB GPUs does not fit
    path.write_text(path.read_text().replace("gpus_per_worker: 1", "gpus_per_worker: 1, gpu_memory_gb: 24"))
    monkeypatch.setattr(models, "model_config", lambda model, source="config", published=False: GPT2Config(
        n_layer=48, n_embd=1600, n_head=25))
    with pytest.raises(ConfigError) as error:  # a rule that sends a trial to GPUs it cannot fit
        sweep.dry_run_text(path, ["train.batch_size=64"])
    assert (error.value.source, error.value.field) == (str(path), "resources.0")
    assert "to a 24 GB GPU" in error.value.message and "its share has 24 GB" in error.value.message


def test_multi_worker_rules_are_for_full_finetuning_with_whole_gpus(tmp_path):
    path = write_mixed_sweep(tmp_path, "bad")
    path.write_text(path.read_text().replace("match: {method.name: full}", "match: {method.name: [full, lora]}"))
    with pytest.raises(ConfigError) as err:
        sweep.dry_run_text(path, num_cpus=3)
    assert err.value.field == "resources.0.workers" and "uses method lora" in err.value.message
    with pytest.raises(ConfigError) as err:
        validate(ResourceRule, {"workers": 2, "gpus_per_worker": 0.5}, "s.yaml", "resources.0")
    assert "whole GPUs" in err.value.message


# ---------------------------------------------------------------------------------------
# One trial on 2 workers (torch.distributed, no Ray) against a single process
# ---------------------------------------------------------------------------------------


def equivalence_trial(output_dir: Path, batch_size: int, stage: int | None = None):
    raw = {
        "seed": 0, "output_dir": str(output_dir),
        "model": {"name": "tiny-llama"},
        "data": {"dataset": "pydoc", "max_length": 64, "members": 32, "nonmembers": 32, "validation": 16},
        "method": {"name": "full", "lr": 0.003},
        "train": {"epochs": 2, "batch_size": batch_size},
        "eval": {"batch_size": 32},
        "attacks": ["loss", "ref", "zlib", "mink++"],
    }
    if stage:
        raw["train"]["deepspeed"] = {"stage": stage}
    return validate_trial(raw, "test")


def _trial_worker(rank: int, world: int, port: int, stage: int, trial_dir: str, reports_file: str) -> None:
    import torch.distributed as dist

    from memray.distributed import Distributed
    from memray.trial import run_trial

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    reports = []
    run_trial(equivalence_trial(Path(trial_dir).parent, 4, stage), lambda m, c: reports.append(m),
              trial_dir=Path(trial_dir), progress=False, distributed=Distributed(rank, world))
    Path(f"{reports_file}.{rank}").write_text(json.dumps(reports))
    dist.barrier()
    # Leave without interpreter teardown: a communication thread (gloo / DeepSpeed's shared-memory
    # op) can abort the process there (std::terminate) after all the work is done and written,
    # which mp.spawn would report as a failed worker (Ray ends its Train workers by killing them).
    os._exit(0)


def run_two_workers(stage: int, trial_dir: Path) -> list[list[dict]]:
    """The trial as 2 worker processes of batch 4; each rank's reports."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reports_file = str(trial_dir) + ".reports"
    mp.spawn(_trial_worker, args=(2, port, stage, str(trial_dir), reports_file), nprocs=2)
    return [json.loads(Path(f"{reports_file}.{rank}").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    from memray.trial import run_trial

    trial_dir = tmp_path_factory.mktemp("single") / "t"
    reports = []
    run_trial(equivalence_trial(trial_dir.parent, 8), lambda m, c: reports.append(m), trial_dir=trial_dir,
              progress=False)
    return trial_dir, reports


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Trained weights of a checkpoint: a Trainer's safetensors, or DeepSpeed's shards merged."""
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(checkpoint / "model.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


@pytest.mark.parametrize("stage", [2, 3])
def test_two_zero_workers_match_one_process_with_twice_the_batch(single_process, tmp_path, stage):
    single_dir, single_reports = single_process
    trial_dir = tmp_path / "t"
    lead, other = run_two_workers(stage, trial_dir)

    # every rank reported each epoch once; rank 0 with the metrics
    assert [m["epoch"] for m in lead] == [m["epoch"] for m in other] == [0, 1, 2]
    assert set(other[1]) <= {"epoch", "train/loss", "perf/train_tokens_per_s", "perf/peak_mem_gb"}
    for mine, theirs in zip(lead, single_reports):
        assert mine["epoch"] == theirs["epoch"]
        for key in ("val/loss", "mia/loss/auc", "mia/ref/auc", "mia/zlib/auc", "mia/mink++/auc", "train/loss"):
            if key in theirs:
                # float32 sums in another order: ~1e-7 relative on the losses; AUCs identical
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["epoch"], key)
    assert lead[-1]["mia/loss/auc"] > lead[0]["mia/loss/auc"] + 0.2, "it trained, and memorized"

    # the same files as a single-process trial, and the same per-sample scores
    result = json.loads((trial_dir / "result.json").read_text())
    assert result["status"] == "success" and [int(e["epoch"]) for e in result["epochs"]] == [0, 1, 2]
    assert result["distributed"] == {"workers": 2, "global_batch_size": 8,
                                     "zero": {"stage": stage, "offload_optimizer": False, "offload_params": False,
                                              "activation_checkpointing": False}}
    assert json.loads((trial_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == stage
    for epoch in (0, 1, 2):
        mine = pd.read_parquet(trial_dir / "scores" / f"epoch_{epoch:03d}.parquet")
        theirs = pd.read_parquet(single_dir / "scores" / f"epoch_{epoch:03d}.parquet")
        assert list(mine["sample_id"]) == list(theirs["sample_id"])
        for label in ("loss", "ref", "zlib", "mink++"):
            np.testing.assert_allclose(mine[label], theirs[label], rtol=1e-5, atol=1e-4)

    # the final weights, merged from the sharded DeepSpeed checkpoint
    mine = _weights(trial_dir / "checkpoints" / "checkpoint-8")
    theirs = _weights(single_dir / "checkpoints" / "checkpoint-8")  # 32 samples / batch 8 x 2 epochs
    assert set(theirs) <= set(mine)
    for name, tensor in theirs.items():
        difference = mine[name].float() - tensor.float()
        # Adam divides by sqrt(v): in an embedding row seen once or twice, a near-zero gradient's
        # summation-order noise can change the step's size or sign (measured: 1.3e-3 under ZeRO-3),
        # so one element may differ by up to two Adam steps (lr 3e-3), never more; the tensors as a
        # whole agree to 1e-4 relative (measured: 5e-5)
        assert difference.abs().max() < 2 * 3e-3, name
        assert difference.norm() < 1e-4 * tensor.float().norm(), name
    assert not (trial_dir / "checkpoints" / "checkpoint-4").exists(), "only the last checkpoint is kept"
    assert (trial_dir / "checkpoints" / "checkpoint-8" / "global_step8").is_dir()


# ---------------------------------------------------------------------------------------
# A sweep on Ray: one 2-worker ZeRO-3 trial and two single-process trials on 3 CPUs
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_3_cpus():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_mixed_sweep_on_3_cpus_survives_a_worker_killed_at_epoch_2(ray_3_cpus, tmp_path, monkeypatch):
    path = write_mixed_sweep(tmp_path, "mixed", epochs=3)
    # single-process trials do not read train.deepspeed: the base may set it for the 2-worker cell
    path.write_text(path.read_text().replace("batch_size: 4}", "batch_size: 4, deepspeed: {stage: 3}}"))
    inject_fault(monkeypatch, 0, 2)  # cell 0 (full, 2 workers): its last worker dies after epoch 2
    code = sweep.run_sweep(path, storage=tmp_path / "results", max_failures=1)
    assert code == 0
    sweep_dir = tmp_path / "results" / "mixed"
    dirs = trial_dirs(sweep_dir)
    assert len(dirs) == 3
    for index, trial_dir in dirs.items():
        result = read_result(trial_dir)
        assert result["status"] == "success", (index, result.get("reason"))
        assert [int(e["epoch"]) for e in result["epochs"]] == [0, 1, 2, 3]
        assert (trial_dir / "scores" / "epoch_003.parquet").is_file()
    distributed = read_result(dirs[0])
    assert distributed["distributed"]["workers"] == 2 and distributed["distributed"]["zero"]["stage"] == 3
    assert distributed["attempts"] == 2, "the worker group restarted once and resumed"
    assert distributed["epochs"][-1]["mia/loss/auc"] > distributed["epochs"][0]["mia/loss/auc"] + 0.2
    assert "distributed" not in read_result(dirs[1])
    # Tune saw every epoch of the distributed trial once, from rank 0 (metrics, not just the epoch)
    tune_results = [json.loads(line) for trial in (sweep_dir / "tune").glob("cell0000*/result.json")
                    for line in trial.read_text().splitlines()]
    assert sorted(int(r["epoch"]) for r in tune_results) == [0, 1, 2, 3]
    assert all("val/loss" in r and "mia/loss/auc" in r for r in tune_results)
    status = sweep.sweep_status(sweep_dir)
    assert "3 success" in status


# ---------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------


def test_zero_throughput_benchmark_runs_a_tiny_shape_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "memray.cli", "bench-zero", "--model-shape", "tiny", "--stage", "3",
                    "--steps", "3", "--warmup", "1", "--batch", "2", "--length", "64", "--out", str(out)],
                   check=True, cwd=REPO, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(out.read_text())
    assert result["workers"] == 1 and result["stage"] == 3 and result["device"] == "cpu"
    assert result["params"] == 658_944
    assert result["tokens_per_s"] > 0 and result["tokens_per_s"] == pytest.approx(2 * 64 / result["step_s"])
    assert result["flops_per_token"] == 6 * 658_944 + 12 * 2 * 128 * 64
    assert result["last_loss"] < result["first_loss"], "the steps trained"
    assert result["mfu"] is None  # no peak given


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_multi_worker_trial_is_finished_by_resume_from_its_last_epoch(ray_3_cpus, tmp_path, monkeypatch):
    path = write_mixed_sweep(tmp_path, "resumed", epochs=3)
    path.write_text(path.read_text().replace("  method: [{name: full, lr: 0.003}, {name: head, lr: 0.003}, "
                                             "{name: lora, rank: 4, lr: 0.003}]",
                                             "  method: [{name: full, lr: 0.003}]"))
    inject_fault(monkeypatch, 0, 1)
    assert sweep.run_sweep(path, storage=tmp_path / "results", max_failures=0) == 1  # no retries: it fails
    sweep_dir = tmp_path / "results" / "resumed"
    trial_dir = trial_dirs(sweep_dir)[0]
    failed = read_result(trial_dir)
    assert failed["status"] == "failed" and [int(e["epoch"]) for e in failed["epochs"]] == [0, 1]
    epoch_1_scores = (trial_dir / "scores" / "epoch_001.parquet").stat().st_mtime_ns

    clear_fault(monkeypatch)
    assert sweep.resume_sweep(sweep_dir, max_failures=0) == 0
    resumed = read_result(trial_dir)
    assert resumed["status"] == "success" and [int(e["epoch"]) for e in resumed["epochs"]] == [0, 1, 2, 3]
    assert resumed["attempts"] == 2
    assert (trial_dir / "scores" / "epoch_001.parquet").stat().st_mtime_ns == epoch_1_scores, "epoch 1 not re-run"
    assert sorted(p.name for p in (trial_dir / "checkpoints").iterdir()) == ["checkpoint-9"]  # 24 samples / 8 per step x 3 epochs


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path, monkeypatch):
    """A process killed while it JIT-built DeepSpeed's CPU communication op leaves
    `<extensions>/deepspeed_shm_comm/lock`, on which every later multi-worker trial would
    wait forever; one of a build under way (minutes old at most) stays."""
    import time

    from memray.distributed import STALE_BUILD_LOCK_S, clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.write_text("")
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))
    with pytest.warns(UserWarning, match="deepspeed_shm_comm/lock"):
        assert clear_stale_build_locks() == [str(stale)]
    assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu_adam", "deepspeed_shm_comm"]  # nothing made

    # without TORCH_EXTENSIONS_DIR: the folder torch itself builds in (below the user's cache)
    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stale = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "lock"
    stale.write_text("")
    os.utime(stale, (old, old))
    with pytest.warns(UserWarning, match="deepspeed_shm_comm/lock"):
        assert clear_stale_build_locks() == [str(stale)]
