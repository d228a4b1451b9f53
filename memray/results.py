"""The sweep and trial folders: the names of their files, how they are written, and how
they are read back.

```
<storage>/<sweep name>/    the same on every run of the same sweep file
  sweep.yaml      the resolved sweep file (overrides applied): resume and status need only it
  sweep.json      when and from what the sweep was made, and its W&B id seed
  driver.json     while a `memray run / resume` works on the folder: its pid and host
  trials/<cell>-<slug>/   one trial folder per grid cell (below), checkpoints included
  tune/           Ray Tune's experiment state, per-trial results and its copy of the last checkpoint
  train/          Ray Train's run state of multi-worker trials (one run per attempt)
  wandb/          offline W&B runs, one per trial, for `wandb sync`
  cache/          reference-model statistics, computed once per sweep (unless MEMRAY_CACHE is set)
```

```
<trial dir>/
  config.yaml              resolved trial config
  result.json              status (STATES), reason, provenance, split hash, method info, per-epoch metrics
  scores/epoch_003.parquet per-sample scores: sample_id, member, copies, one column per attack
  checkpoints/             Trainer checkpoints (adapter weights only for PEFT methods; sharded
                           DeepSpeed checkpoints for a data-parallel trial)
  deepspeed.json           a data-parallel trial's resolved DeepSpeed config
  trial.log                in a sweep: what the trial's processes printed (library warnings, banners)
```
`result.json` is rewritten atomically after every epoch, so a killed trial leaves a
readable record of every epoch it finished. Readers (`memray status`, `memray report`)
need nothing but these files. Trials that differ only in their seeds share a
configuration key (`config_key`): the report's groups of seeds, W&B's `config_key`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

if TYPE_CHECKING:
    from memray.config import Cell

SWEEP_FILE = "sweep.yaml"
STATE_FILE = "sweep.json"
DRIVER_FILE = "driver.json"  # pid and host of the `memray run / resume` working on the folder
TRIALS_DIR = "trials"
TUNE_DIR = "tune"
TRAIN_DIR = "train"  # Ray Train's run state of multi-worker trials (their checkpoints stay in the trial folders)

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
SCORES_DIR = "scores"
CHECKPOINTS_DIR = "checkpoints"

#: Packages whose versions are recorded with every trial.
TRACKED_PACKAGES = ("memray-ft", "torch", "transformers", "peft", "accelerate", "datasets",
                    "ray", "deepspeed", "scikit-learn", "wandb", "numpy")


#: A trial's state in result.json, `memray status`, the report and W&B: `running` while a
#: process works on it (or until a reader finds no process alive: then `lost`), and how it ended.
STATES = ("success", "failed", "interrupted", "lost", "running")


def ending_state(err: BaseException) -> str:
    """How a trial that raised `err` ended: `interrupted` (Ctrl-C, SIGTERM, a stopped actor's
    SystemExit) or `failed` (any other exception)."""
    return "interrupted" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "failed"


def driver_alive(note: str | None) -> bool:
    """Whether the driver a `driver.json` text names is alive: a live process of this host
    (a driver on another host counts as alive; no note: none)."""
    if not note:
        return False
    driver = json.loads(note)
    if driver.get("host") != platform.node():
        return True
    try:
        os.kill(int(driver["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def trial_names(cells: list["Cell"]) -> dict[int, str]:
    """Stable trial folder names `<cell index>-<slug>`, zero-padded so they sort."""
    width = max(3, len(str(len(cells) - 1)))
    return {cell.index: f"{cell.index:0{width}d}-{cell.config.slug()}" for cell in cells}


#: What a configuration key leaves out: the seeds (data.split_seed None takes the seed) and
#: where the trial folder is written.
NOT_CONFIGURATION = ("seed", "output_dir", "data.split_seed")


def config_key(config: dict[str, Any]) -> str:
    """The key of a trial's configuration: the first 10 hex digits of the SHA-256 of its
    resolved config (`TrialConfig.resolved()`, result.json's `config`) without the keys of
    NOT_CONFIGURATION. Trials with equal keys differ only in their seeds."""
    payload = json.loads(json.dumps(config, default=str))  # a deep copy
    for dotted in NOT_CONFIGURATION:
        *sections, key = dotted.split(".")
        tree = payload
        for section in sections:
            tree = tree.get(section) if isinstance(tree, dict) else None
        if isinstance(tree, dict):
            tree.pop(key, None)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def provenance() -> dict[str, Any]:
    """Git sha and dirty flag of the memray checkout, package versions, hardware, time."""
    repo = Path(__file__).resolve().parent.parent
    sha, dirty = None, None
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # an installed package outside a checkout has no git state
    versions = {}
    for package in TRACKED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"git_sha": sha, "git_dirty": dirty, "versions": versions, "hardware": hardware(),
            "python": platform.python_version(), "host": platform.node()}


def hardware() -> dict[str, Any]:
    """CPU count and visible GPUs (name, memory) of this process."""
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "gpus": []}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class TrialRecord:
    """In-memory `result.json` of one trial, saved after every change."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)
    readonly: bool = False  # a data-parallel trial's other ranks: kept in memory, never written

    @classmethod
    def open(cls, trial_dir: Path) -> "TrialRecord":
        """Read `result.json` if the folder has one (an earlier run), else start empty."""
        path = Path(trial_dir) / RESULT_FILE
        data = json.loads(path.read_text()) if path.is_file() else {}
        return cls(path, data)

    @property
    def trial_dir(self) -> Path:
        return self.path.parent

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self.data.setdefault("epochs", [])

    def done_epochs(self) -> set[int]:
        return {int(row["epoch"]) for row in self.epochs}

    def start(self, config: dict[str, Any], trial_id: str, axes: dict[str, Any] | None) -> None:
        """Mark the trial running (a fresh start or a resume) and write config.yaml."""
        attempts = self.data.get("attempts", 0) + 1
        self.data.update({
            "trial_id": trial_id, "name": self.trial_dir.name, "status": "running", "reason": None,
            "config": config, "axes": axes or self.data.get("axes", {}), "attempts": attempts,
            "provenance": provenance(), "started": self.data.get("started", time.time()),
            "finished": None,
        })
        if not self.readonly:
            atomic_write_text(self.trial_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        self.save()

    def keep_epochs_up_to(self, last_epoch: int) -> None:
        """Forget epochs after `last_epoch` (they had no checkpoint; they will be re-run)."""
        self.data["epochs"] = [row for row in self.epochs if int(row["epoch"]) <= last_epoch]
        self.save()

    def add_epoch(self, metrics: dict[str, float]) -> None:
        rows = [row for row in self.epochs if int(row["epoch"]) != int(metrics["epoch"])]
        self.data["epochs"] = sorted([*rows, metrics], key=lambda row: row["epoch"])
        self.data["final"] = self.data["epochs"][-1]
        self.save()

    def finish(self, status: str, reason: str | None = None) -> None:
        self.data.update({"status": status, "reason": reason, "finished": time.time()})
        self.save()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        if self.readonly:
            return
        atomic_write_text(self.path, json.dumps(self.data, indent=2, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to result.json")


#: Per-sample column of a target's score files: counterfactual memorization (memray.references)
COUNTERFACTUAL_COLUMN = "counterfactual"


def scores_path(trial_dir: Path, epoch: int) -> Path:
    return Path(trial_dir) / SCORES_DIR / f"epoch_{epoch:03d}.parquet"


def write_scores(trial_dir: Path, epoch: int, frame: pd.DataFrame) -> Path:
    """Per-sample scores of one epoch (atomic: written beside, then renamed)."""
    path = scores_path(trial_dir, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def table_path(trial_dir: Path, kind: str, epoch: int) -> Path:
    """The file of another per-sample table of an epoch (`extraction`, `canaries`):
    `scores/<kind>_epoch_NNN.parquet`."""
    return Path(trial_dir) / SCORES_DIR / f"{kind}_epoch_{epoch:03d}.parquet"


def write_table(trial_dir: Path, kind: str, epoch: int, frame: pd.DataFrame) -> Path:
    """Other per-sample tables of an epoch (`extraction`, `canaries`): `scores/<kind>_epoch_NNN.parquet`."""
    path = table_path(trial_dir, kind, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_scores(trial_dir: Path, epoch: int) -> pd.DataFrame:
    return pd.read_parquet(scores_path(trial_dir, epoch))


def read_result(trial_dir: Path) -> dict[str, Any] | None:
    """A trial folder's result.json, or None if it has none yet."""
    path = Path(trial_dir) / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
