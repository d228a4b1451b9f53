"""W&B for a sweep: one run per trial, grouped by the sweep name, with the cell's axes and
key hyperparameters as flat config columns and tags; the same run id on every attempt of
a trial, so a resumed trial continues its run; ROC curves and an AUC table at the end.
Runs that differ only in their seeds share a configuration key (`memray.results.config_key`),
a config column `config_key` (with the readable `config_name`) and a tag `config:<key>`,
so the UI can group a sweep's runs by configuration and show the spread over seeds.

`result.json` is the source of truth for a run's history. Every attempt of a trial (and
the driver at the end of `memray run / resume`) first reads what the run's W&B files
already hold (`logged_history`: the history of every local folder of the run id, after the
processes that wrote them have closed them), then logs from `result.json` the epochs
they lack, in order, with the epoch as the W&B step. So whatever interrupts, kills and
resumes happened (a W&B process that died before it flushed included), the union of the
run's folders holds every epoch of `result.json` exactly once, and `wandb sync` of those
folders gives one run per trial with the whole curve.

Metrics added to an epoch after it was logged (lira / rmia, computed when the target's
reference models have finished) are logged later as rows of their own at the next free
step, their epoch under LATE_EPOCH (`log_late`), each of their metrics plotted against
it (`define_metric`). The history's `epoch` rows stay one per epoch.

Every call is guarded: a W&B problem is a warning, never a failed trial. Whether runs go
online (`auto`: iff an API key is set) is `memray.config.resolve_wandb_mode`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from memray.config import Cell
from memray.metric_keys import auc_labels, mia_key
from memray.results import NOT_CONFIGURATION, config_key

#: How long an attempt waits for an earlier attempt's W&B process to close the run's files
#: (it flushes what it holds when its trial process dies) before reading them.
CLOSE_WAIT_S = 60.0
#: The epoch of a late row (`WandbTrial.log_late`); its metrics are plotted against it.
LATE_EPOCH = "reference_epoch"
#: The table of the samples of highest counterfactual memorization (`log_counterfactual_top`)
COUNTERFACTUAL_TABLE = "mem/counterfactual/top"


@dataclass(frozen=True)
class WandbSettings:
    """A sweep's W&B settings, resolved once by the driver."""

    mode: str  # resolved: online, offline or disabled
    project: str
    entity: str | None
    group: str
    uid: str


def wandb_run_id(sweep_uid: str, cell_index: int) -> str:
    """The same id on every attempt of a trial, so a resumed trial continues its run."""
    return hashlib.sha256(f"{sweep_uid}:{cell_index}".encode()).hexdigest()[:16]


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: value}


def config_name(cell: Cell) -> str:
    """The readable form of a cell's configuration key: its grid axes other than the seeds
    (`method.name=lora, method.rank=8`), "base" for a grid of seeds alone; a reference
    model's ends with its index (`reference 1/4`)."""
    axes = {key: value for key, value in _flat("", cell.axes).items() if key not in NOT_CONFIGURATION}
    parts = [f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}" for key, value in axes.items()]
    reference = cell.config.reference
    if reference is not None:
        parts.append(f"reference {reference.index}/{reference.of}")
    return ", ".join(parts) or "base"


def wandb_config(cell: Cell, trial_name: str) -> dict[str, Any]:
    """W&B config of a cell's run (`trial_name` its folder name): flat columns (every grid
    axis as its dotted key, e.g. `method.rank`, the key hyperparameters, and the
    configuration's `config_key` and readable `config_name`), then the nested axes and the
    resolved config."""
    from memray.methods import default_lr

    config, method = cell.config, cell.config.method
    duplicates = config.data.duplicates
    columns = {
        "model": config.model.name, "method": method.name, "dataset": config.data.dataset,
        "lr": default_lr(method), "rank": getattr(method, "rank", None), "alpha": getattr(method, "alpha", None),
        "placement": getattr(method, "placement", None), "virtual_tokens": getattr(method, "virtual_tokens", None),
        "epochs": config.train.epochs, "batch_size": config.train.batch_size,
        "duplication": duplicates.fraction if duplicates else 0.0, "seed": config.seed,
        # DP-SGD: the target epsilon, delta and clip (None without DP)
        "dp_epsilon": config.train.dp.epsilon if config.train.dp else None,
        "dp_delta": config.train.dp.delta if config.train.dp else None,
        "dp_clip": config.train.dp.clip if config.train.dp else None,
        # the split's n-gram overlap filter as `<n>gram<=<threshold>`; None: non-members as drawn
        "overlap_filter": (f"{config.data.overlap_filter.ngram}gram<={config.data.overlap_filter.threshold:g}"
                           if config.data.overlap_filter else None),
        "cell": cell.index, "trial": trial_name,
        "config_key": config_key(config.resolved()), "config_name": config_name(cell),
    }
    columns.update(_flat("", cell.axes))
    return {**columns, "axes": cell.axes, "config": config.resolved()}


def wandb_tags(cell: Cell, sweep_name: str) -> list[str]:
    """Run tags: sweep, model, method, dataset and configuration key, each as `kind:value`."""
    config = cell.config
    return [f"sweep:{sweep_name}", f"model:{config.model.name}", f"method:{config.method.name}",
            f"dataset:{config.data.dataset}", f"config:{config_key(config.resolved())}"]


# -- reading a run's local files back --------------------------------------------------------


def run_folders(wandb_dir: Path, run_id: str) -> list[Path]:
    """The local folders of one run id (`offline-run-*-<id>`, `run-*-<id>`), oldest first."""
    return sorted(Path(wandb_dir).glob(f"*run-*-{run_id}"), key=lambda p: p.name.split("-", 2)[-1])


def _records(path: Path) -> Iterator[bytes]:
    """The records of a `.wandb` file (W&B's LevelDB-style log: 32 KiB blocks of chunks with
    a 7-byte header, after a 7-byte file header). A file cut short (a killed writer) yields
    the records before the cut."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    block, position, pending = 32768, 7, b""
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:
            position += left
            continue
        if position + 7 + length > len(data):
            return
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


@dataclass
class History:
    """What a run's files hold: each epoch's logged metric names, and the last step."""

    keys: dict[int, set[str]]
    last_step: int | None = None

    def merge(self, other: "History") -> None:
        for epoch, keys in other.keys.items():
            self.keys.setdefault(epoch, set()).update(keys)
        if other.last_step is not None:
            self.last_step = max(other.last_step, self.last_step if self.last_step is not None else -1)


def _file_history(path: Path) -> History | None:
    """The history of a run file; None for a file with no record at all (its W&B process
    died before it wrote the run)."""
    from wandb.proto import wandb_internal_pb2

    history = History({})
    records = 0
    for raw in _records(path):
        records += 1
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a torn last record
            break
        if record.WhichOneof("record_type") != "history":
            continue
        row = {(item.key or "/".join(item.nested_key)): item.value_json for item in record.history.item}
        if "_step" in row:
            step = int(json.loads(row["_step"]))
            history.last_step = max(step, history.last_step if history.last_step is not None else -1)
        for epoch_key in ("epoch", LATE_EPOCH):
            if epoch_key in row:
                keys = {key for key in row if not key.startswith("_")} - {LATE_EPOCH}
                history.keys.setdefault(int(json.loads(row[epoch_key])), set()).update(keys)
    return history if records else None


def _open_by_any_process(paths: Sequence[Path]) -> bool:
    """Whether a process of this machine has one of `paths` open (Linux /proc; elsewhere False)."""
    targets = {str(p.resolve()) for p in paths}
    proc = Path("/proc")
    if not targets or not proc.is_dir():
        return False
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                if os.readlink(fd) in targets:
                    return True
        except OSError:
            continue
    return False


def logged_history(wandb_dir: Path, run_id: str, wait_s: float = CLOSE_WAIT_S) -> History:
    """The history of every local folder of `run_id` below `wandb_dir`, read once no process
    holds their files open (waiting up to `wait_s` for a dying attempt's W&B process to
    flush and close them). A folder whose run file holds no record at all (its W&B process
    killed before it wrote the run) is removed: it has nothing to sync, and it would be a
    run without an id beside the trial's run."""
    files = [f for folder in run_folders(wandb_dir, run_id) for f in folder.glob("run-*.wandb")]
    deadline = time.monotonic() + wait_s
    while files and _open_by_any_process(files) and time.monotonic() < deadline:
        time.sleep(0.5)
    history = History({})
    for path in files:
        found = _file_history(path)
        if found is not None:
            history.merge(found)
        elif not _open_by_any_process([path]):
            shutil.rmtree(path.parent, ignore_errors=True)
    return history


def logged_epochs(wandb_dir: Path, run_id: str, wait_s: float = CLOSE_WAIT_S) -> set[int]:
    """The epochs in the history of every local folder of `run_id` (`logged_history`)."""
    return set(logged_history(wandb_dir, run_id, wait_s).keys)


# -- a trial's run ----------------------------------------------------------------------------


class WandbTrial:
    """One trial's W&B run: `start` reads what the run's earlier folders hold, `replay`
    logs what they lack from result.json, `log` each new epoch once, `finish` closes it
    with the trial's state. Every call is guarded."""

    def __init__(self, run: Any, history: History | None = None):
        self.run = run
        history = history or History({})
        self.keys = {epoch: set(keys) for epoch, keys in history.keys.items()}  # each logged epoch's metrics
        self.logged = set(self.keys)  # epochs in the run's history (earlier folders and this one)
        self.last_step: int | None = None  # the last epoch this folder logged
        self.next_step = history.last_step + 1 if history.last_step is not None else 0  # a late row's step

    @classmethod
    def start(cls, settings: "WandbSettings", cell: Cell, trial_name: str, directory: Path,
              wait_s: float = CLOSE_WAIT_S) -> "WandbTrial":
        """Open the trial's run (offline folders below `directory / "wandb"`), knowing the
        epochs its earlier folders already hold."""
        if settings.mode == "disabled":
            return cls(None)
        run_id = wandb_run_id(settings.uid, cell.index)
        wandb_dir = Path(directory) / "wandb"
        try:
            history = logged_history(wandb_dir, run_id, wait_s)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B files of {trial_name} could not be read: {err}", stacklevel=2)
            history = History({})
        _one_folder_per_second(wandb_dir, run_id)
        modes = [settings.mode] + (["offline"] if settings.mode == "online" else [])
        for mode in modes:
            try:
                import wandb

                wandb_dir.mkdir(parents=True, exist_ok=True)
                run = wandb.init(
                    project=settings.project, entity=settings.entity, group=settings.group,
                    job_type="reference" if cell.config.reference is not None else "trial", name=trial_name,
                    id=run_id, tags=wandb_tags(cell, settings.group), resume="allow",
                    config=wandb_config(cell, trial_name), dir=str(directory), mode=mode,
                    settings=wandb.Settings(init_timeout=120, console="off", silent=True),
                )
                trial = cls(run, history)
                if mode == "online":  # the server's history, which another node may have written
                    starting = int(getattr(run, "starting_step", 0) or 0)
                    trial.logged |= set(range(starting))
                    trial.next_step = max(trial.next_step, starting)
                return trial
            except Exception as err:  # noqa: BLE001 - W&B must never fail a trial
                warnings.warn(f"W&B {mode} run for {trial_name} could not start: {err}", stacklevel=2)
        return cls(None)

    def replay(self, rows: Sequence[Mapping[str, float]]) -> None:
        """Log the epochs of `rows` (result.json's) that the run lacks, in epoch order."""
        for row in sorted(rows, key=lambda r: int(r["epoch"])):
            self.log(row)

    def log(self, metrics: Mapping[str, float]) -> None:
        """Log one epoch at step = epoch, unless the run holds it already or a later epoch
        was logged in this folder (W&B steps only go up)."""
        epoch = int(metrics["epoch"])
        if self.run is None or epoch in self.logged or (self.last_step is not None and epoch <= self.last_step):
            return
        try:
            self.run.log(dict(metrics), step=epoch)
            self.logged.add(epoch)
            self.keys[epoch] = set(metrics)
            self.last_step = epoch
            self.next_step = max(self.next_step, epoch + 1)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B log failed: {err}", stacklevel=2)

    def log_late(self, rows: Sequence[Mapping[str, float]]) -> int:
        """For each epoch of `rows` (result.json's) that the run holds without some of the
        row's metrics (lira / rmia, added after the epoch was logged): those metrics with the
        epoch, as a row at the next free step. Returns the rows logged."""
        if self.run is None:
            return 0
        count = 0
        for row in sorted(rows, key=lambda r: int(r["epoch"])):
            epoch = int(row["epoch"])
            if epoch not in self.keys:
                continue
            new = {key: value for key, value in row.items() if key not in self.keys[epoch] and key != "epoch"}
            if not new:
                continue
            try:
                self.run.define_metric(LATE_EPOCH)
                for key in new:
                    self.run.define_metric(key, step_metric=LATE_EPOCH)
                self.run.log({LATE_EPOCH: epoch, **new}, step=self.next_step)
            except Exception as err:  # noqa: BLE001
                warnings.warn(f"W&B log failed: {err}", stacklevel=2)
                return count
            self.keys[epoch] |= set(new)
            self.next_step += 1
            count += 1
        return count

    def log_counterfactual_top(self, top: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
        """The samples of highest counterfactual memorization (result.json's
        `counterfactual_top`) of its last epoch, as a table `mem/counterfactual/top` at the
        next free step, against that epoch (`reference_epoch`)."""
        if self.run is None or not top:
            return
        epoch = max(top, key=int)
        try:
            import wandb

            table = wandb.Table(columns=["sample_id", "counterfactual", "member", "copies"])
            for row in top[epoch]:
                table.add_data(row["sample_id"], row["counterfactual"], row["member"], row["copies"])
            self.run.log({LATE_EPOCH: int(epoch), COUNTERFACTUAL_TABLE: table}, step=self.next_step)
            self.next_step += 1
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B log failed: {err}", stacklevel=2)

    def finish(self, trial_dir: Path, final: Mapping[str, float] | None, state: str = "success",
               reason: str | None = None) -> None:
        """Record the trial's state (and reason) in the run's summary, log the ROC curves of
        the last epoch and the per-attack AUC table when this folder logged that epoch, and
        close the run (exit code 1 unless the trial succeeded)."""
        if self.run is None:
            return
        try:
            self.run.summary["state"] = state
            if reason:
                self.run.summary["reason"] = reason
            if final is not None and self.last_step == int(final["epoch"]):
                self._log_curves(trial_dir, final)
            self.run.finish(exit_code=0 if state == "success" else 1)
            import wandb

            wandb.teardown()  # stop W&B's service now, not in an atexit hook Ray may cut short
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B finish failed: {err}", stacklevel=2)

    def _log_curves(self, trial_dir: Path, final: Mapping[str, float]) -> None:
        import wandb

        from memray.metrics import TPR_AT_FPR, roc_points
        from memray.results import read_scores, scores_path

        epoch = int(final["epoch"])
        labels = auc_labels(final)
        # each number with its 95% interval beside it (None where the trial left it out)
        columns = [name + end for name in ("auc", *(suffix for suffix, _ in TPR_AT_FPR)) for end in ("", "_lo", "_hi")]
        table = wandb.Table(columns=["attack", *columns])
        for label in labels:
            table.add_data(label, *(final.get(mia_key(label, column)) for column in columns))
        logged: dict[str, Any] = {"mia/auc_table": table}
        if scores_path(trial_dir, epoch).is_file():
            scores = read_scores(trial_dir, epoch)
            curves = [roc_points(scores[label], scores["member"]) for label in labels if label in scores]
            logged["mia/roc"] = wandb.plot.line_series(
                xs=[fpr.tolist() for fpr, _ in curves], ys=[tpr.tolist() for _, tpr in curves],
                keys=[label for label in labels if label in scores],
                title=f"ROC, epoch {epoch}", xname="false positive rate")
        self.run.log(logged, step=epoch)  # the same step: merged into the last epoch's row


def _one_folder_per_second(wandb_dir: Path, run_id: str) -> None:
    """W&B names a run's folder by the second it starts; a second start of the same run in
    that second would reuse (and overwrite) the folder, so wait for the next second."""
    while any(p.name.split("-")[-2] == time.strftime("%Y%m%d_%H%M%S") for p in run_folders(wandb_dir, run_id)):
        time.sleep(0.2)


def reconcile_trial(settings: WandbSettings, cell: Cell, trial_name: str, directory: Path,
                    result: Mapping[str, Any], wait_s: float = CLOSE_WAIT_S) -> bool:
    """Log into the trial's run what its `result` (result.json) holds and its W&B files lack
    (whole epochs; metrics added to an epoch after it was logged, as late rows), from this
    process (the driver, after the trials' processes are gone); True if anything was missing."""
    rows = result.get("epochs") or []
    if settings.mode == "disabled" or not rows:
        return False
    run_id = wandb_run_id(settings.uid, cell.index)
    history = logged_history(Path(directory) / "wandb", run_id, wait_s)
    missing = [row for row in rows if int(row["epoch"]) not in history.keys
               or set(row) - history.keys[int(row["epoch"])]]
    if not missing:
        return False
    run = WandbTrial.start(settings, cell, trial_name, directory, wait_s=0)
    run.replay(rows)
    if run.log_late(rows):
        run.log_counterfactual_top(result.get("counterfactual_top") or {})
    state = result.get("status") or "lost"
    run.finish(Path(directory), None, state, result.get("reason"))
    return True
