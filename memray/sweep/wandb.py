"""W&B for a sweep: one run per trial, grouped by the sweep name, with the cell's axes as
config columns; the same run id on every attempt of a trial, so a resumed trial continues
its run; ROC curves and an AUC table at the end. Every call is guarded: a W&B problem is a
warning, never a failed trial. Whether runs go online (`auto`: iff an API key is set) is
`memray.config.resolve_wandb_mode`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from memray.config import Cell


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
