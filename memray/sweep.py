"""Sweeps on Ray Tune: a sweep file's grid as Tune trials, their resources, W&B, resume.

This is the only module that imports Ray. It owns:

- the sweep folder `<storage>/<sweep name>/` (the same on every run of the same file):
  ```
  sweep.yaml      the resolved sweep file (overrides applied): resume and status need only it
  sweep.json      when and from what the sweep was made, and its W&B id seed
  trials/<cell>-<slug>/   one trial folder per grid cell (memray.results), checkpoints included
  tune/           Ray Tune's experiment state, per-trial results and its copy of the last checkpoint
  train/          Ray Train's run state of multi-worker trials (one run per attempt)
  wandb/          offline W&B runs, one per trial, for `wandb sync`
  cache/          reference-model statistics, computed once per sweep (unless MEMRAY_CACHE is set)
  ```
  With a URI storage (`s3://`, `gs://`, `file://`) the trial folders are written on the
  node that runs the trial and mirrored to the URI after every epoch (without checkpoints,
  which travel as Ray Tune checkpoints); W&B and the cache stay on the nodes.
- the Tune trainable: a function that receives only its cell index, rebuilds the cell's
  `TrialConfig` and calls `memray.trial.run_trial`, reporting every epoch to Tune with the
  epoch's checkpoint and to the trial's W&B run. A cell whose resource rule has
  `workers > 1` starts a Ray Train `TorchTrainer` from that function instead: each worker
  calls `run_trial` as one rank of a DeepSpeed ZeRO job, rank 0's metrics reach Tune
  through Ray Train's `TuneReportCallback`, and a lost worker restarts the group, which
  resumes from the trial folder's last epoch checkpoint (Ray Train's FailureConfig);
- resources per trial by rule (`SweepConfig.resources`, first match wins) or by a default
  from the model's size and the method, and the Tune settings derived from them;
- `memray run / resume / status` (`run_sweep`, `resume_sweep`, `sweep_status`, `dry_run_text`).

The trial folder is the source of truth: a retried or resumed trial finds its own
`result.json` and checkpoints there and continues from its last epoch.
"""

from __future__ import annotations

import hashlib
import json
import math
import netrc
import os
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

import yaml

from memray.config import (
    Cell,
    MODEL_ALIASES,
    ConfigError,
    ResourceRule,
    SweepConfig,
    TrialConfig,
    WandbConfig,
    load_sweep,
    parse_override,
)
from memray.methods import METHODS

DEFAULT_STORAGE = "results"  # relative to where `memray run` starts
SWEEP_FILE = "sweep.yaml"
STATE_FILE = "sweep.json"
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
TRAIN_DIR = "train"  # Ray Train's run state of multi-worker trials (their checkpoints stay in the trial folders)
CHECKPOINTS_DIR = "checkpoints"  # inside a trial folder (memray.results)
DEFAULT_MAX_FAILURES = 2  # retries per trial: enough for a lost node, cheap for a real bug (it resumes)
# "<cell>:<epoch>": that trial raises after reporting that epoch (tests); in a multi-worker
# trial its last worker process dies instead, as on a lost node
FAULT_ENV = "MEMRAY_FAULT"

#: Environment variables handed from the driver to every trial (never a secret such as WANDB_API_KEY).
FORWARDED_ENV = ("MEMRAY_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_BASE_URL", "DS_ACCELERATOR")

#: Approximate parameter counts: the default resources and the longest-first order use them.
APPROX_PARAMS: dict[str, float] = {
    "tiny-gpt2": 1e6, "tiny-llama": 1e6,
    "gpt2": 124e6, "gpt2-medium": 355e6, "gpt2-large": 774e6, "gpt2-xl": 1.56e9,
    "llama-3.2-1b": 1.24e9, "llama-2-7b": 6.74e9,
}
UNKNOWN_PARAMS = 7e9  # a hub id or local path of unknown size: assume large (a whole GPU, scheduled first)


# ---------------------------------------------------------------------------------------
# The sweep folder
# ---------------------------------------------------------------------------------------


def _is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class SweepFolder:
    """A sweep folder: an absolute local (or NFS) path, or a pyarrow URI."""

    location: str

    @classmethod
    def for_sweep(cls, storage: str | Path | None, name: str) -> "SweepFolder":
        """`<storage>/<name>`; a relative path is made absolute (Ray workers have other cwds)."""
        storage = str(storage or DEFAULT_STORAGE)
        if _is_uri(storage):
            return cls(storage.rstrip("/") + "/" + name)
        return cls(str(Path(storage).expanduser().resolve() / name))

    @classmethod
    def open(cls, location: str | Path) -> "SweepFolder":
        location = str(location)
        folder = cls(location.rstrip("/") if _is_uri(location) else str(Path(location).expanduser().resolve()))
        if not folder.exists(SWEEP_FILE):
            raise ConfigError(location, "", f"not a sweep folder: it has no {SWEEP_FILE}")
        return folder

    @property
    def is_uri(self) -> bool:
        return _is_uri(self.location)

    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self.is_uri:
            return pyarrow.fs.FileSystem.from_uri(self.location)
        return pyarrow.fs.LocalFileSystem(), self.location

    def path(self, *parts: str) -> str:
        """A location inside the folder (a path or URI, as the folder is)."""
        return "/".join([self.location, *parts])

    def fs_path(self, *parts: str) -> tuple[Any, str]:
        """(pyarrow filesystem, path inside it) of a location inside the folder."""
        fs, root = self._fs()
        return fs, "/".join([root, *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs

        fs, path = self.fs_path(*parts)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        if not self.exists(*parts):
            return None
        fs, path = self.fs_path(*parts)
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    def write_text(self, text: str, *parts: str) -> None:
        fs, path = self.fs_path(*parts)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(text.encode())

    def __str__(self) -> str:
        return self.location


def _parse_overrides(overrides: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    return dict(parse_override(text) for text in overrides)


# ---------------------------------------------------------------------------------------
# Resources
# ---------------------------------------------------------------------------------------


def approx_params(config: TrialConfig) -> float:
    """Approximate parameter count of the trial's model (UNKNOWN_PARAMS for other models)."""
    return APPROX_PARAMS.get(config.model.name, UNKNOWN_PARAMS)


def default_resources(config: TrialConfig, has_gpus: bool) -> ResourceRule:
    """Resources for a trial no rule matches: CPU-only without GPUs; with GPUs, a share of
    one GPU by model size (full fine-tuning needs about twice a PEFT method's memory:
    gradients and AdamW states for every weight), a whole GPU from ~1B parameters on."""
    if not has_gpus:
        return ResourceRule(cpus=1)  # one thread per trial: N trials on N cores beat one trial on N
    params, full = approx_params(config), config.method.name == "full"
    if params <= 200e6:
        gpus = 0.5 if full else 0.25  # e.g. four GPT-2 124M LoRA trials per GPU
    elif params <= 800e6:
        gpus = 1.0 if full else 0.5
    else:
        gpus = 1.0
    return ResourceRule(cpus=max(1.0, 4 * gpus), gpus=gpus)  # a few CPUs per GPU for data and eval


def _lookup(tree: Any, key: str) -> tuple[bool, Any]:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _matches(wanted: Any, value: Any) -> bool:
    if isinstance(wanted, list):
        return any(_matches(w, value) for w in wanted)
    if isinstance(wanted, dict):
        return isinstance(value, dict) and all(k in value and _matches(v, value[k]) for k, v in wanted.items())
    return wanted == value


def rule_matches(rule: ResourceRule, config: TrialConfig) -> bool:
    """Whether every `match` key of the rule has one of the accepted values in the config."""
    resolved = config.resolved()
    for key, wanted in rule.match.items():
        found, value = _lookup(resolved, key)
        if not found or not _matches(wanted, value):
            return False
    return True


def check_rules(rules: list[ResourceRule], cells: list[Cell], source: str) -> None:
    """Every `match` key must exist in some cell's config and every value must occur in
    some cell; else a ConfigError naming `resources.<i>.match.<key>`."""
    resolved = [cell.config.resolved() for cell in cells]
    for index, rule in enumerate(rules):
        for key, wanted in rule.match.items():
            field_name = f"resources.{index}.match.{key}"
            values = [value for found, value in (_lookup(tree, key) for tree in resolved) if found]
            if not values:
                raise ConfigError(source, field_name, "unknown field: no trial of this sweep has it")
            for option in wanted if isinstance(wanted, list) else [wanted]:
                if not any(_matches(option, value) for value in values):
                    seen = sorted({json.dumps(v, sort_keys=True) for v in values})
                    raise ConfigError(source, field_name, f"no trial has {json.dumps(option)} "
                                                          f"(the sweep has {', '.join(seen[:8])})")
    for cell in cells:
        index, rule = next(((i, r) for i, r in enumerate(rules) if rule_matches(r, cell.config)), (None, None))
        workers = rule.workers if rule else 1
        if workers > 1 and cell.config.method.name != "full":
            raise ConfigError(source, f"resources.{index}.workers",
                              f"grid cell {cell.index} uses method {cell.config.method.name}: multi-worker trials "
                              "(DeepSpeed ZeRO) fine-tune all weights; match only method.name: full")


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for, and where the numbers came from."""

    rule: ResourceRule
    source: str  # "resources.<i>" or "default"

    def bundles(self) -> list[dict[str, float]]:
        """Placement-group bundles Tune reserves for the trial before it starts. A
        multi-worker trial reserves only its own process: Ray Train requests its workers."""
        head = {"CPU": self.rule.cpus}
        if self.rule.workers == 1 and self.rule.gpus:
            head["GPU"] = self.rule.gpus
        return [head]

    def total(self) -> dict[str, float]:
        """Everything the trial holds while it runs, workers included."""
        rule = self.rule
        if rule.workers == 1:
            return {"CPU": rule.cpus, "GPU": rule.gpus}
        return {"CPU": rule.cpus + rule.workers * rule.cpus_per_worker, "GPU": float(rule.workers * rule.gpus_per_worker)}

    def describe(self) -> str:
        rule = self.rule
        text = f"cpus={rule.cpus:g} gpus={rule.gpus:g}"
        if rule.workers > 1:
            text = (f"cpus={rule.cpus:g} + {rule.workers} workers x (cpus={rule.cpus_per_worker:g} "
                    f"gpus={rule.gpus_per_worker})")
        return f"{text} [{self.source}]"


def memory_estimate(config: TrialConfig, rule: ResourceRule, shape: Any) -> Any:
    """GPU memory per worker of a trial under `rule` (memray.distributed.estimate_memory):
    ZeRO by train.deepspeed (or its default for the size) when the rule has workers > 1;
    bf16 where the trial has GPUs and train.precision allows it. PEFT methods train few
    weights: the output layer for `head`, about 1% of the weights for the others (rough)."""
    from memray.distributed import estimate_memory, resolve_zero

    trainable = {"full": shape.params, "head": shape.vocab * shape.hidden}.get(config.method.name, 0.01 * shape.params)
    on_gpu = rule.gpus_per_worker > 0 if rule.workers > 1 else rule.gpus > 0
    bf16 = on_gpu and config.train.precision != "fp32"
    stage, zero = 0, None
    if rule.workers > 1:
        zero = resolve_zero(config.train.deepspeed, shape.params)
        stage = zero.stage
    return estimate_memory(shape, trainable_params=trainable, workers=rule.workers, stage=stage,
                           offload_optimizer=bool(zero and zero.offload_optimizer),
                           offload_params=bool(zero and zero.offload_params), batch_size=config.train.batch_size,
                           seq_len=config.data.max_length, bf16=bf16,
                           activation_checkpointing=bool(zero and zero.activation_checkpointing))


def gpu_budget_gb(rule: ResourceRule) -> float | None:
    """GPU memory one worker of the rule may use: its share of one GPU; None without GPUs."""
    share = rule.gpus_per_worker if rule.workers > 1 else min(rule.gpus, 1.0)
    return rule.gpu_memory_gb * min(share, 1.0) if share else None


def trial_resources(config: TrialConfig, rules: list[ResourceRule], has_gpus: bool) -> TrialResources:
    """The first matching rule, else the default for the model size and method."""
    for index, rule in enumerate(rules):
        if rule_matches(rule, config):
            return TrialResources(rule, f"resources.{index}")
    return TrialResources(default_resources(config, has_gpus), "default")


def _fits(needs: Sequence[Mapping[str, float]], capacity: Mapping[str, float]) -> bool:
    keys = {key for need in needs for key in need}
    return all(sum(need.get(key, 0.0) for need in needs) <= capacity.get(key, 0.0) + 1e-9 for key in keys)


def max_concurrent_trials(resources: Sequence[TrialResources], capacity: Mapping[str, float]) -> int | None:
    """A cap on running trials so that none waits forever for another's resources.

    A single-process trial reserves everything it uses in its placement group before it
    starts, so Tune packs such trials without deadlock and needs no cap (None). A
    multi-worker trial reserves only its own process and Ray Train requests the workers
    afterwards: trials that started could hold the CPUs their workers wait for. The cap is
    then the largest n for which the n hungriest trials, workers included, fit together.
    """
    if all(r.rule.workers == 1 for r in resources):
        return None
    needs = sorted((r.total() for r in resources), key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), reverse=True)
    count = 0
    while count < len(needs) and _fits(needs[: count + 1], capacity):
        count += 1
    return max(count, 1)


def trial_cost(config: TrialConfig) -> float:
    """Relative run time: parameters x tokens through the model over the whole trial,
    training passes weighted by the method's `train_pass_cost`; the per-epoch evaluation scores members,
    non-members and the validation set once each (epoch 0 included)."""
    members = config.data.members or 1000  # None: the dataset's default, of this order
    train_tokens = members * config.data.max_length * config.train.epochs
    if config.data.duplicates:
        train_tokens *= 1 + config.data.duplicates.fraction * (max(config.data.duplicates.copies) - 1)
    scored = members + (config.data.nonmembers or members) + config.data.validation
    eval_tokens = scored * config.data.max_length * (config.train.epochs + 1)
    return approx_params(config) * (METHODS[config.method.name].train_pass_cost * train_tokens + eval_tokens)


def schedule_order(cells: list[Cell]) -> list[int]:
    """Cell indices longest trial first (ties in grid order). Tune creates the trials of
    one `grid_search` in list order and its FIFO scheduler starts pending trials in that
    order, so the longest trials start first and the short ones fill in behind them."""
    return [cell.index for cell in sorted(cells, key=lambda c: (-trial_cost(c.config), c.index))]


# ---------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------


def wandb_key_configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an API key is set: WANDB_API_KEY, or a netrc entry for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = environ.get("NETRC") or str(Path("~/.netrc").expanduser())
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(config: WandbConfig, environ: Mapping[str, str] | None = None) -> str:
    """`auto` -> `online` iff an API key is configured, else `offline`; others as written."""
    if config.mode != "auto":
        return config.mode
    return "online" if wandb_key_configured(environ) else "offline"


def wandb_run_id(sweep_uid: str, cell_index: int) -> str:
    """The same id on every attempt of a trial, so a resumed trial continues its run."""
    return hashlib.sha256(f"{sweep_uid}:{cell_index}".encode()).hexdigest()[:16]


def wandb_config(cell: Cell, trial_name: str) -> dict[str, Any]:
    """W&B config: the cell's axes as flat columns, then the grid axes and the resolved config."""
    config, method = cell.config, cell.config.method
    duplicates = config.data.duplicates
    return {
        "model": config.model.name, "method": method.name,
        "rank": getattr(method, "rank", None), "placement": getattr(method, "placement", None),
        "dataset": config.data.dataset, "duplication": duplicates.fraction if duplicates else 0.0,
        "seed": config.seed, "cell": cell.index, "trial": trial_name,
        "axes": cell.axes, "config": config.resolved(),
    }


class WandbTrial:
    """One trial's W&B run. Every call is guarded: a W&B problem is a warning, never a
    failed trial."""

    def __init__(self, run: Any):
        self.run = run

    @classmethod
    def start(cls, settings: "WandbSettings", cell: Cell, trial_name: str, directory: Path) -> "WandbTrial":
        if settings.mode == "disabled":
            return cls(None)
        modes = [settings.mode] + (["offline"] if settings.mode == "online" else [])
        for mode in modes:
            try:
                import wandb

                directory.mkdir(parents=True, exist_ok=True)
                run = wandb.init(
                    project=settings.project, entity=settings.entity, group=settings.group,
                    job_type="trial", name=trial_name, id=wandb_run_id(settings.uid, cell.index),
                    resume="allow", config=wandb_config(cell, trial_name), dir=str(directory), mode=mode,
                    settings=wandb.Settings(init_timeout=120, console="off"),
                )
                return cls(run)
            except Exception as err:  # noqa: BLE001 - W&B must never fail a trial
                warnings.warn(f"W&B {mode} run for {trial_name} could not start: {err}", stacklevel=2)
        return cls(None)

    def log(self, metrics: Mapping[str, float]) -> None:
        if self.run is None:
            return
        try:
            self.run.log(dict(metrics), step=int(metrics["epoch"]))
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B log failed: {err}", stacklevel=2)

    def finish(self, trial_dir: Path, final: Mapping[str, float] | None) -> None:
        """Log the ROC curves of the last epoch and the per-attack AUC table, then close.
        `final` is None for a failed trial (the run is closed with exit code 1)."""
        if self.run is None:
            return
        try:
            if final is not None:
                self._log_curves(trial_dir, final)
            self.run.finish(exit_code=0 if final is not None else 1)
            import wandb

            wandb.teardown()  # stop W&B's service now, not in an atexit hook Ray may cut short
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B finish failed: {err}", stacklevel=2)

    def _log_curves(self, trial_dir: Path, final: Mapping[str, float]) -> None:
        import wandb

        from memray.metrics import roc_points
        from memray.results import read_scores, scores_path

        epoch = int(final["epoch"])
        labels = [key.split("/")[1] for key in final if key.startswith("mia/") and key.endswith("/auc")]
        table = wandb.Table(columns=["attack", "auc", "tpr@1%fpr", "tpr@0.1%fpr"])
        for label in labels:
            table.add_data(label, final.get(f"mia/{label}/auc"), final.get(f"mia/{label}/tpr@1%fpr"),
                           final.get(f"mia/{label}/tpr@0.1%fpr"))
        logged: dict[str, Any] = {"mia/auc_table": table}
        if scores_path(trial_dir, epoch).is_file():
            scores = read_scores(trial_dir, epoch)
            curves = [roc_points(scores[label], scores["member"]) for label in labels if label in scores]
            logged["mia/roc"] = wandb.plot.line_series(
                xs=[fpr.tolist() for fpr, _ in curves], ys=[tpr.tolist() for _, tpr in curves],
                keys=[label for label in labels if label in scores],
                title=f"ROC, epoch {epoch}", xname="false positive rate")
        self.run.log(logged, step=epoch)


# ---------------------------------------------------------------------------------------
# The trainable
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WandbSettings:
    mode: str  # resolved: online, offline or disabled
    project: str
    entity: str | None
    group: str
    uid: str


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; passed with `tune.with_parameters`."""

    folder: SweepFolder
    name: str
    cells: dict[int, Cell]
    trial_names: dict[int, str]
    wandb: WandbSettings
    local_root: str  # trial folders, W&B and cache on this node: the sweep folder itself, or scratch
    cache_dir: str
    workdir: str  # where `memray run` started: relative paths in the sweep mean what they meant there
    env: dict[str, str] = field(default_factory=dict)
    fault: tuple[int, int] | None = None
    resources: dict[int, ResourceRule] = field(default_factory=dict)  # cell -> its rule (workers > 1: Ray Train)
    max_failures: int = DEFAULT_MAX_FAILURES  # Ray Train's restarts of a multi-worker trial's workers


def _fault(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    cell, _, epoch = text.partition(":")
    try:
        return int(cell), int(epoch)
    except ValueError:
        raise ConfigError(FAULT_ENV, "", f"{text!r} must look like <cell>:<epoch>, e.g. 3:2") from None


class _Mirror:
    """Copies a node-local trial folder to the sweep's URI storage, and back on a new node."""

    def __init__(self, folder: SweepFolder, name: str, local: Path):
        self.fs, self.remote = folder.fs_path(TRIALS_DIR, name)
        self.local = local

    def upload(self) -> None:
        import pyarrow.fs

        local_fs = pyarrow.fs.LocalFileSystem()
        for entry in self.local.iterdir():
            if entry.name != CHECKPOINTS_DIR:  # checkpoints travel as Tune checkpoints
                if entry.is_dir():
                    self.fs.create_dir(f"{self.remote}/{entry.name}", recursive=True)
                pyarrow.fs.copy_files(str(entry), f"{self.remote}/{entry.name}",
                                      source_filesystem=local_fs, destination_filesystem=self.fs)

    def download(self, checkpoint: Any) -> None:
        """Fetch the mirrored folder and the last Tune checkpoint, unless already here."""
        import pyarrow.fs

        if (self.local / "result.json").is_file():
            return
        self.local.mkdir(parents=True, exist_ok=True)
        if self.fs.get_file_info(f"{self.remote}/result.json").type != pyarrow.fs.FileType.NotFound:
            pyarrow.fs.copy_files(self.remote, str(self.local), source_filesystem=self.fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        if checkpoint is not None:
            name = checkpoint.get_metadata().get("name", "checkpoint-restored")
            checkpoint.to_directory(str(self.local / CHECKPOINTS_DIR / name))


def run_cell(params: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable: run grid cell `params["cell"]` as a trial in its folder."""
    from ray import tune

    from memray.results import read_result
    from memray.trial import run_trial

    index = int(params["cell"])
    cell, trial_name = context.cells[index], context.trial_names[index]
    os.environ.update(context.env)
    if Path(context.workdir).is_dir():
        os.chdir(context.workdir)
    trial_dir = Path(context.local_root) / TRIALS_DIR / trial_name
    mirror = _Mirror(context.folder, trial_name, trial_dir) if context.folder.is_uri else None
    if mirror:
        mirror.download(tune.get_checkpoint())
    done = read_result(trial_dir) or {}
    if done.get("status") == "success" and done.get("trial_id") == cell.config.trial_id():
        # finished before Tune recorded it (a driver killed in between): report, touch nothing
        tune.report(dict(done["epochs"][-1]))
        return
    rule = context.resources.get(index)
    if rule is not None and rule.workers > 1:
        _run_workers(index, rule, context)
        return
    run = WandbTrial.start(context.wandb, cell, trial_name, Path(context.local_root))

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        run.log(metrics)
        checkpoint = None
        if checkpoint_dir is not None:
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir)
            if mirror:
                checkpoint.set_metadata({"name": Path(checkpoint_dir).name})
        if mirror:
            mirror.upload()
        tune.report(dict(metrics), checkpoint=checkpoint)
        if context.fault == (index, int(metrics["epoch"])):
            raise RuntimeError(f"fault injected by {FAULT_ENV} at epoch {int(metrics['epoch'])}")

    _run_and_finish(run, mirror, trial_dir, lambda: run_trial(
        cell.config, report, trial_dir=trial_dir, resume=True, cache_dir=Path(context.cache_dir), axes=cell.axes,
        progress=False))


def _run_workers(index: int, rule: ResourceRule, context: SweepContext) -> None:
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
    per_worker = {"CPU": rule.cpus_per_worker, **({"GPU": rule.gpus_per_worker} if use_gpu else {})}
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
    """One Ray Train worker of a multi-worker trial: one rank of `run_trial` under DeepSpeed."""
    import ray.train

    context: SweepContext = params["context"]
    index = int(params["cell"])
    os.environ.update(context.env)
    if Path(context.workdir).is_dir():
        os.chdir(context.workdir)
    import torch

    if torch.cuda.is_available():
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU backend, before deepspeed is imported
    from memray.distributed import Distributed
    from memray.trial import run_trial

    train_context = ray.train.get_context()
    rank, world = train_context.get_world_rank(), train_context.get_world_size()
    cell, trial_name = context.cells[index], context.trial_names[index]
    trial_dir = Path(context.local_root) / TRIALS_DIR / trial_name
    lead = rank == 0
    mirror = _Mirror(context.folder, trial_name, trial_dir) if context.folder.is_uri and lead else None
    if mirror:
        mirror.download(None)
    run = WandbTrial.start(context.wandb, cell, trial_name, Path(context.local_root)) if lead else WandbTrial(None)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # every rank reports each epoch (Ray Train's barrier); Tune keeps rank 0's metrics
        run.log(metrics)
        if mirror:
            mirror.upload()
        ray.train.report(dict(metrics))
        if context.fault == (index, int(metrics["epoch"])) and rank == world - 1:
            os._exit(1)  # a worker process lost, as when its node goes away

    _run_and_finish(run, mirror, trial_dir, lambda: run_trial(
        cell.config, report, trial_dir=trial_dir, resume=True, cache_dir=Path(context.cache_dir), axes=cell.axes,
        progress=False, distributed=Distributed(rank, world)))


def _run_and_finish(run: "WandbTrial", mirror: "_Mirror | None", trial_dir: Path,
                    trial: Callable[[], Mapping[str, float] | None]) -> None:
    """Run the trial; whatever happens, close its W&B run and mirror its folder to storage."""
    try:
        final = trial()
    except BaseException:
        run.finish(trial_dir, None)
        if mirror:
            mirror.upload()
        raise
    run.finish(trial_dir, final)
    if mirror:
        mirror.upload()


# ---------------------------------------------------------------------------------------
# Planning: validation, names, resources
# ---------------------------------------------------------------------------------------


def trial_names(cells: list[Cell]) -> dict[int, str]:
    """Stable trial folder names `<cell index>-<slug>`, zero-padded so they sort."""
    width = max(3, len(str(len(cells) - 1)))
    return {cell.index: f"{cell.index:0{width}d}-{cell.config.slug()}" for cell in cells}


def check_cells(cells: list[Cell], source: str, published: bool = False) -> None:
    """Check each cell's data.path and each distinct model and method of the grid as
    `memray trial` does (names, placements that the model has), before any trial starts. published (dry runs): the
    study aliases are checked against their published shapes, not looked up."""
    from memray import data, methods, models

    seen: set[str] = set()
    for cell in cells:
        data.check_data(cell.config.data, f"{source} (grid cell {cell.index})")
        key = json.dumps([cell.config.model.model_dump(mode="json"), cell.config.method.model_dump(mode="json")],
                         sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        where = f"{source} (grid cell {cell.index})"
        methods.check_method(models.model_config(cell.config.model, where, published), cell.config.method, where)


@dataclass
class SweepPlan:
    """A validated sweep with each trial's resources and the Tune settings derived from them."""

    sweep: SweepConfig
    cells: list[Cell]
    source: str
    resources: dict[int, TrialResources]
    order: list[int]
    max_concurrent: int | None
    capacity: dict[str, float]


def plan_sweep(sweep: SweepConfig, cells: list[Cell], source: str, capacity: Mapping[str, float],
               node_capacities: Sequence[Mapping[str, float]], strict: bool) -> SweepPlan:
    """Resources per trial, longest-first order and the concurrency cap. A trial that fits
    on no node is a ConfigError when `strict` (a fixed local Ray), else a warning (an
    autoscaling cluster may still add the node it needs)."""
    has_gpus = capacity.get("GPU", 0.0) > 0
    resources = {cell.index: trial_resources(cell.config, sweep.resources, has_gpus) for cell in cells}
    for cell in cells:
        bundles = resources[cell.index].bundles()
        if not any(_fits(bundles, node) for node in node_capacities) or not _fits([resources[cell.index].total()], capacity):
            message = (f"grid cell {cell.index} needs {resources[cell.index].describe()}, more than any node "
                       f"of this Ray cluster has ({_capacity_text(capacity)} in all)")
            if strict:
                raise ConfigError(source, resources[cell.index].source.replace("default", "resources"), message)
            warnings.warn(message, stacklevel=2)
    return SweepPlan(sweep, cells, source, resources, schedule_order(cells),
                     max_concurrent_trials(list(resources.values()), capacity), dict(capacity))


def _capacity_text(capacity: Mapping[str, float]) -> str:
    return f"cpus={capacity.get('CPU', 0):g} gpus={capacity.get('GPU', 0):g}"


def _local_capacity(num_cpus: int | None) -> dict[str, float]:
    """What a local Ray started by memray will have: all cores and the visible GPUs."""
    import torch

    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


# ---------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------


def _connect(address: str | None, num_cpus: int | None) -> bool:
    """Start a local Ray (address None) or join a cluster; True if this call started it.
    A Ray already initialized in this process (a notebook, a test) is used as it is, and
    RAY_ADDRESS (set by `ray job submit`) counts as an address."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # address="local": always a fresh local Ray, never a cluster `ray start` left running
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False)
    else:
        ray.init(address=address)
    return True


def _cluster_capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def _context(folder: SweepFolder, plan: SweepPlan, state: dict[str, Any],
             max_failures: int = DEFAULT_MAX_FAILURES) -> SweepContext:
    sweep = plan.sweep
    local_root = (Path(folder.location) if not folder.is_uri
                  else Path(tempfile.gettempdir()) / "memray" / f"{sweep.name}-{state['uid']}")
    mode = resolve_wandb_mode(sweep.wandb)
    cache_dir = os.environ.get("MEMRAY_CACHE") or str(local_root / "cache")
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    # W&B reads these too (e.g. a library's own W&B callback): keep it in this sweep's mode and folder
    env.update({"WANDB_MODE": mode, "WANDB_DIR": str(local_root), "WANDB_SILENT": "true"})
    return SweepContext(
        folder=folder, name=sweep.name, cells={cell.index: cell for cell in plan.cells},
        trial_names=trial_names(plan.cells),
        wandb=WandbSettings(mode, sweep.wandb.project, sweep.wandb.entity, sweep.name, state["uid"]),
        local_root=str(local_root), cache_dir=cache_dir, workdir=state.get("workdir", os.getcwd()), env=env,
        fault=_fault(os.environ.get(FAULT_ENV)),
        resources={index: r.rule for index, r in plan.resources.items()}, max_failures=max_failures,
    )


def _trial_dirname(trial: Any) -> str:
    return f"cell{int(trial.config['cell']):04d}"


def _trainable(context: SweepContext, plan: SweepPlan) -> Any:
    from ray import tune

    groups = {index: tune.PlacementGroupFactory(r.bundles(), strategy=r.rule.strategy)
              for index, r in plan.resources.items()}
    return tune.with_resources(tune.with_parameters(run_cell, context=context),
                               resources=lambda config: groups[int(config["cell"])])


def _fit(folder: SweepFolder, plan: SweepPlan, state: dict[str, Any], max_failures: int, restore: bool) -> int:
    from ray import tune

    context = _context(folder, plan, state, max_failures)
    trainable = _trainable(context, plan)
    # Tune snapshots its state at every checkpoint (num_to_keep=1) and warns when that is
    # frequent; with epochs of seconds (the demo) that is expected, not a bottleneck
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_path = folder.path(TUNE_DIR)
    if restore and tune.Tuner.can_restore(tune_path):
        # errored trials resume from their last checkpoint (the trial folder's, or Tune's copy
        # on a node that lacks it); finished trials are not run again
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(plan.order)},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, reuse_actors=False,
                                        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=folder.location,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the trial folder keeps its own
            ),
        )
    results = tuner.fit()
    print(sweep_status(folder.location))
    print(_where_text(folder, context))
    return 1 if results.errors else 0


def _where_text(folder: SweepFolder, context: SweepContext) -> str:
    lines = [f"results: {folder.path(TRIALS_DIR)}/<trial>/ (result.json, scores/, checkpoints/)"]
    mode = context.wandb.mode
    if mode == "offline":
        lines.append(f"W&B: offline runs in {Path(context.local_root) / 'wandb'}; upload with "
                     f"`wandb sync {Path(context.local_root) / 'wandb'}/offline-run-*`")
    elif mode == "online":
        entity = f"{context.wandb.entity}/" if context.wandb.entity else ""
        lines.append(f"W&B: project {entity}{context.wandb.project}, group {context.wandb.group}")
    else:
        lines.append("W&B: disabled")
    return "\n".join(lines)


def _load(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None,
          published: bool = False) -> tuple[SweepConfig, list[Cell], dict]:
    parsed = _parse_overrides(overrides)
    sweep, cells = load_sweep(path, parsed)
    check_rules(sweep.resources, cells, str(path))
    check_cells(cells, str(path), published)
    return sweep, cells, parsed


def _sweep_yaml(sweep: SweepConfig, cells: list[Cell], source: str, overrides: dict[str, Any]) -> str:
    """The sweep file as it runs: a valid sweep file whose base has the overrides applied."""
    from memray.config import apply_overrides

    tree = sweep.model_dump(mode="json", exclude_defaults=True)
    tree["name"] = sweep.name
    tree["base"] = apply_overrides(sweep.base, overrides)
    header = f"# resolved from {source}" + (f" with {json.dumps(overrides)}" if overrides else "") + "\n"
    return header + yaml.safe_dump(tree, sort_keys=False)


# ---------------------------------------------------------------------------------------
# Public entry points (memray run / resume / status)
# ---------------------------------------------------------------------------------------


def dry_run_text(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None,
                 address: str | None = None, num_cpus: int | None = None) -> str:
    """Validate the whole sweep and describe it: "N trials", then one line per trial (in
    the order they will start) with its axes and resources. Without `address` the
    resources are those of a local Ray on this machine; with one, of that cluster."""
    sweep, cells, _ = _load(path, overrides, published=True)
    if address is None:
        capacity = _local_capacity(num_cpus)
        nodes = [capacity]
    else:
        started = _connect(address, num_cpus)
        capacity, nodes = _cluster_capacity()
        if started:
            import ray

            ray.shutdown()
    with warnings.catch_warnings(record=True) as unplaceable:  # listed below: a dry run shows the whole plan
        warnings.simplefilter("always")
        plan = plan_sweep(sweep, cells, str(path), capacity, nodes, strict=False)
    names = trial_names(cells)
    cap = plan.max_concurrent or "no cap (every trial reserves all it uses)"
    lines = [f"{len(cells)} trials", f"sweep folder: <storage>/{sweep.name}   Ray: {_capacity_text(capacity)}; "
                                     f"concurrent trials: {cap}; longest first"]
    shapes: dict[str, Any] = {}
    too_big = []
    for index in plan.order:
        cell, resources = plan.cells[index], plan.resources[index]
        axes = _axes_text(cell.axes) or "(base)"
        estimate = memory_estimate(cell.config, resources.rule, _model_shape(cell.config, shapes))
        budget = gpu_budget_gb(resources.rule)
        fits = "" if budget is None or estimate.total <= budget else f"  DOES NOT FIT {budget:g} GB"
        lines.append(f"  {names[index]}  {axes}  {resources.describe()}  mem {estimate.describe()}{fits}")
        if fits:
            too_big.append(names[index])
    if too_big:
        lines.append(f"warning: {len(too_big)} trial(s) will not fit on their GPUs ({', '.join(too_big)}): "
                     "more workers, ZeRO stage 3, offload (train.deepspeed) or a smaller batch")
    if unplaceable:
        where = "this machine's local Ray" if address is None else "this cluster"
        lines.append(f"warning: {len(unplaceable)} trial(s) need more than any node of {where} has "
                     f"(`memray run` {'refuses to start' if address is None else 'waits for an autoscaler'}); "
                     f"first: {unplaceable[0].message}")
    aliases = sorted({c.config.model.name for c in cells if c.config.model.name in MODEL_ALIASES})
    if aliases:
        lines.append(f"models {', '.join(aliases)}: their published shapes; `memray run` checks that they load "
                     "(local cache, or the hub)")
    return "\n".join(lines)


def _model_shape(config: TrialConfig, shapes: dict[str, Any]) -> Any:
    """The model's shape (parameters counted without weights), once per model."""
    from memray import models
    from memray.distributed import ModelShape

    key = json.dumps(config.model.model_dump(mode="json"), sort_keys=True)
    if key not in shapes:
        shapes[key] = ModelShape.from_config(models.model_config(config.model, published=True))
    return shapes[key]


def run_sweep(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None,
              storage: str | Path | None = None, address: str | None = None, dry_run: bool = False, *,
              num_cpus: int | None = None, max_failures: int = DEFAULT_MAX_FAILURES) -> int:
    """`memray run`: validate the sweep, then run every cell as a Ray Tune trial.

    path: the sweep file; overrides: `key=value` strings (or a mapping) applied to its
    base; storage: the folder or URI that holds `<sweep name>/` (default ./results);
    address: a Ray cluster (default: a local Ray with `num_cpus`, default all cores).
    Prints the per-trial table at the end. Returns 0 when every trial succeeded, 1 when
    some failed; bad input raises ConfigError (exit code 2 in the CLI).
    """
    if dry_run:
        print(dry_run_text(path, overrides, address, num_cpus))
        return 0
    sweep, cells, parsed = _load(path, overrides)
    folder = SweepFolder.for_sweep(storage, sweep.name)
    if folder.exists(SWEEP_FILE):
        raise ConfigError(str(path), "name", f"the sweep folder {folder} already exists: `memray resume {folder}` "
                                             "finishes it; remove it (or rename the sweep) to start over")
    started = _connect(address, num_cpus)
    try:
        capacity, nodes = _cluster_capacity()
        plan = plan_sweep(sweep, cells, str(path), capacity, nodes, strict=address is None)
        state = {"uid": secrets.token_hex(4), "name": sweep.name, "source": str(Path(path).resolve()),
                 "overrides": parsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workdir": os.getcwd()}
        folder.write_text(json.dumps(state, indent=2), STATE_FILE)
        folder.write_text(_sweep_yaml(sweep, cells, str(path), parsed), SWEEP_FILE)
        print(f"[memray] sweep {sweep.name}: {len(cells)} trials in {folder}", file=sys.stderr)
        return _fit(folder, plan, state, max_failures, restore=False)
    finally:
        if started:
            import ray

            ray.shutdown()


def _open(sweep_dir: str | Path) -> tuple[SweepFolder, SweepConfig, list[Cell], dict[str, Any], str]:
    folder = SweepFolder.open(sweep_dir)
    source = folder.path(SWEEP_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / SWEEP_FILE
        local.write_text(folder.read_text(SWEEP_FILE) or "")
        try:
            sweep, cells = load_sweep(local)
        except ConfigError as err:
            raise ConfigError(source, err.field, err.message) from None
    state = json.loads(folder.read_text(STATE_FILE) or "{}")
    if "uid" not in state:
        raise ConfigError(folder.path(STATE_FILE), "uid", "missing: this sweep folder was not made by `memray run`")
    return folder, sweep, cells, state, source


def resume_sweep(sweep_dir: str | Path, address: str | None = None, *, num_cpus: int | None = None,
                 max_failures: int = DEFAULT_MAX_FAILURES) -> int:
    """`memray resume`: finish the errored and unfinished trials of a sweep folder (a path
    or URI), each from its last epoch checkpoint; finished trials are not run again.
    Returns 0 when every trial has succeeded, else 1."""
    folder, sweep, cells, state, source = _open(sweep_dir)
    check_rules(sweep.resources, cells, source)
    check_cells(cells, source)
    started = _connect(address, num_cpus)
    try:
        capacity, nodes = _cluster_capacity()
        plan = plan_sweep(sweep, cells, source, capacity, nodes, strict=address is None)
        print(f"[memray] resuming sweep {sweep.name} in {folder}", file=sys.stderr)
        return _fit(folder, plan, state, max_failures, restore=True)
    finally:
        if started:
            import ray

            ray.shutdown()


def _axes_text(axes: Mapping[str, Any]) -> str:
    def value_text(value: Any) -> str:
        if isinstance(value, dict):
            name = value.get("name")
            rest = ",".join(f"{k}={value_text(v)}" for k, v in value.items() if k != "name")
            return f"{name}({rest})" if name is not None else f"({rest})"
        return json.dumps(value) if not isinstance(value, str) else value

    return " ".join(f"{key}={value_text(value)}" for key, value in axes.items())


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def sweep_status(sweep_dir: str | Path) -> str:
    """`memray status`: one row per trial (cell, axes, state, epoch, val PPL, each attack's
    AUC at its last epoch), read from the trial folders alone (no Ray); failed trials'
    reasons below the table."""
    folder, sweep, cells, _, _ = _open(sweep_dir)
    names = trial_names(cells)
    labels = list(dict.fromkeys(a.label for cell in cells for a in cell.config.attacks))
    header = ["trial", "axes", "state", "epoch", "val ppl", *(f"{label} auc" for label in labels)]
    rows, reasons, counts = [], [], {}
    for cell in cells:
        text = folder.read_text(TRIALS_DIR, names[cell.index], "result.json")
        result = json.loads(text) if text else {}
        state = result.get("status", "pending")
        counts[state] = counts.get(state, 0) + 1
        epochs = result.get("epochs") or []
        last = epochs[-1] if epochs else {}
        epoch = f"{int(last['epoch'])}/{cell.config.train.epochs}" if last else f"-/{cell.config.train.epochs}"
        rows.append([names[cell.index], _axes_text(cell.axes) or "(base)", state, epoch,
                     _number(last.get("val/ppl"), 2), *(_number(last.get(f"mia/{label}/auc"), 3) for label in labels)])
        if result.get("reason"):
            reasons.append(f"  {names[cell.index]}: {result['reason']}")
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    parts = [f"sweep {sweep.name} ({folder}): {len(cells)} trials: {summary}", _text_table(header, rows)]
    if reasons:
        parts += ["reasons:", *reasons]
    return "\n".join(parts)
