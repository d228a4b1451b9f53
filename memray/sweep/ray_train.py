"""The Ray Train launcher: a cell whose resource rule has `workers > 1` runs, from its Tune
trial, as a Ray Train `TorchTrainer` job of that many DeepSpeed ZeRO workers. Each worker
calls `memray.trial.run_trial` as one rank; rank 0's metrics of every epoch travel from
Ray Train's controller to the Tune trial through a Ray queue (a Ray Train callback puts
them there; the trial reads and reports them to Tune); a lost worker restarts the group,
which resumes from the trial folder's last epoch checkpoint (Ray Train's FailureConfig).
With `ray_tune`, the only module that imports Ray.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from memray.config import ResourceRule
from memray.results import TRAIN_DIR, TRIALS_DIR, read_result
from memray.sweep.context import SweepContext, epoch_hook, run_and_finish, trial_output
from memray.sweep.planning import gpu_resources
from memray.sweep.storage import TrialMirror
from memray.sweep.wandb import WandbTrial


def run_workers(index: int, rule: ResourceRule, context: SweepContext) -> None:
    """Run cell `index` as a Ray Train job of `rule.workers` DeepSpeed workers, from its
    Tune trial, and report rank 0's per-epoch metrics to Tune as they come. Raises when the
    workers fail more than `context.max_failures` times (Tune then retries the trial, which
    resumes too). The epoch checkpoints stay in the trial folder (sharded, possibly large):
    they are not copied into Tune's storage as a single-process trial's are."""
    import threading

    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    class ForwardEpochs(UserCallback):
        """Puts rank 0's metrics of every `ray.train.report` on the queue this trial reads
        (it runs in Ray Train's controller, which cannot report to Tune itself)."""

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            epochs.put(dict(metrics[0]))

    use_gpu = rule.gpus_per_worker > 0
    per_worker = {"CPU": rule.cpus_per_worker, **gpu_resources(rule, rule.gpus_per_worker)}
    epochs = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"cell": index, "context": context},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=rule.workers, use_gpu=use_gpu, resources_per_worker=per_worker,
                                     placement_strategy=rule.strategy),
        run_config=RunConfig(
            # a fresh Ray Train run per attempt: the trial folder, not Ray Train, holds what resumes
            name=f"{context.trial_names[index]}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}",
            storage_path=context.folder.path(TRAIN_DIR),
            failure_config=FailureConfig(max_failures=context.max_failures),
            callbacks=[ForwardEpochs()],
        ),
    )
    failure: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as err:  # noqa: BLE001 - raised again in the trial below
            failure.append(err)
        finally:
            epochs.put(None)

    trial_dir = Path(context.local_root) / TRIALS_DIR / context.trial_names[index]
    last = _recorded_epochs(trial_dir)[-1:]  # what an earlier attempt finished (and reported)
    last_epoch = int(last[0]["epoch"]) if last else -1
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while (metrics := epochs.get()) is not None:
        # a worker lost right after an epoch may take that epoch's report with it, though
        # rank 0 recorded it: forward such epochs from the trial folder first
        for row in _recorded_epochs(trial_dir):
            if last_epoch < int(row["epoch"]) < int(metrics["epoch"]):
                tune.report(dict(row))
        tune.report(metrics)
        last_epoch = int(metrics["epoch"])
    thread.join()
    if failure:
        raise failure[0]


def _recorded_epochs(trial_dir: Path) -> list[dict[str, Any]]:
    """The epochs in a trial folder's result.json (none if this node cannot see it)."""
    from memray.results import read_result

    try:
        return (read_result(trial_dir) or {}).get("epochs", [])
    except (OSError, ValueError):
        return []


def _train_worker(params: dict[str, Any]) -> None:
    """One Ray Train worker of a multi-worker trial: one rank of `run_trial` under DeepSpeed,
    its library output in the trial's log file."""
    context: SweepContext = params["context"]
    index = int(params["cell"])
    os.environ.update(context.env)
    if Path(context.workdir).is_dir():
        os.chdir(context.workdir)
    trial_output(Path(context.local_root) / TRIALS_DIR / context.trial_names[index])
    _train_rank(index, context)


def _train_rank(index: int, context: SweepContext) -> None:
    import ray.train
    import torch

    if torch.cuda.is_available():
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU backend, before deepspeed is imported
    from memray.distributed import Distributed, clear_stale_build_locks
    from memray.trial import run_trial

    clear_stale_build_locks()  # a lock a killed build left would hold this trial's op build forever

    train_context = ray.train.get_context()
    rank, world = train_context.get_world_rank(), train_context.get_world_size()
    cell, trial_name = context.cells[index], context.trial_names[index]
    trial_dir = Path(context.local_root) / TRIALS_DIR / trial_name
    lead = rank == 0
    mirror = TrialMirror(context.folder, trial_name, trial_dir) if context.folder.is_uri and lead else None
    if mirror:
        mirror.download(None)
    run = WandbTrial.start(context.wandb, cell, trial_name, Path(context.local_root)) if lead else WandbTrial(None)
    if lead:
        run.replay((read_result(trial_dir) or {}).get("epochs") or [])  # what an earlier attempt's W&B lost

    hook = epoch_hook(context.epoch_hook)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # every rank reports each epoch (Ray Train's barrier); Tune keeps rank 0's metrics
        run.log(metrics)
        if mirror:
            mirror.upload()
        ray.train.report(dict(metrics))
        if hook is not None:
            hook(index, int(metrics["epoch"]), rank, world)

    run_and_finish(run, mirror, trial_dir, lambda: run_trial(
        cell.config, report, trial_dir=trial_dir, resume=True, cache_dir=Path(context.cache_dir), axes=cell.axes,
        progress=False, distributed=Distributed(rank, world)))
