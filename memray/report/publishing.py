"""Publishing a report: report.md (every table and figure), report.json (every number) and
a W&B run of job type "report" in the sweep's group.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memray.config import SweepConfig, resolve_wandb_mode
from memray.results import STATE_FILE
from memray.report.loading import Group, STATUSES, Trial, read_sweep_file
from memray.report.tables import Table, axes_methods
from memray.report.figures import FigureFile



def jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as numbers and lists, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _with_nulls(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def table_records(table: Table) -> list[dict[str, Any]]:
    return _with_nulls(table.data).to_dict("records")


def trial_json(trial: Trial, sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": trial.name, "path": trial.path, "status": trial.status, "reason": trial.reason,
        "dataset": trial.dataset, "model": trial.model, "model_params": sizes[trial.model]["params"],
        "method": trial.method, "variant": trial.variant, "seed": trial.seed, "axes": trial.axes,
        "epochs_done": int(trial.final["epoch"]) if trial.final else None, "epochs_planned": trial.planned_epochs,
        "best_epoch": trial.best.get("epoch"), "final": trial.final, "best": trial.best,
        "attacks": {label: {"auc": a.auc, "tpr@1%fpr": a.tpr_1, "tpr@0.1%fpr": a.tpr_01, "auc_ci95": list(a.ci) if a.ci else None,
                            "tpr@1%fpr_ci95": list(a.tpr_1_ci) if a.tpr_1_ci else None,
                            "tpr@0.1%fpr_ci95": list(a.tpr_01_ci) if a.tpr_01_ci else None,
                            "best_epoch": {"auc": a.auc_best, "tpr@1%fpr": a.tpr_1_best, "tpr@0.1%fpr": a.tpr_01_best},
                            "roc": {"fpr": a.roc[0], "tpr": a.roc[1]} if a.roc is not None else None}
                    for label, a in trial.attacks.items()},
        "method_info": trial.method_info, "split_hash": trial.split_hash, "config": trial.config,
        "epochs": trial.epochs,
    }


def group_json(group: Group, labels: list[str]) -> dict[str, Any]:
    """A group of seeds for report.json: its configuration key, trials, finished trials and
    seeds, per final-epoch metric {mean, std (between-seed sample SD, ddof=1), n (seeds)},
    the best-epoch perplexity alike, and per attack the bootstrap 95% interval of the
    seed-mean AUC (None without per-sample scores)."""
    stats = {}
    for key in group.metric_keys():
        mean, std, n = group.stat(key)
        stats[key] = {"mean": mean, "std": std, "n": n}
    best_mean, best_std, best_n = group.stat("val/ppl", best=True)
    return {
        "dataset": group.dataset, "model": group.model, "variant": group.variant, "method": group.method,
        "config_key": group.config_key, "trials": [t.name for t in group.trials],
        "finished": [t.name for t in group.finished],
        "seeds": [t.seed for t in group.trials], "final": stats,
        "best_val_ppl": {"mean": best_mean, "std": best_std, "n": best_n},
        "auc_ci95": {label: group.auc_interval(label) for label in labels},
    }


def status_counts(trials: list[Trial]) -> dict[str, int]:
    counts = {status: sum(t.status == status for t in trials) for status in STATUSES}
    return {status: count for status, count in counts.items() if count}


def markdown(name: str, sweep_dir: Path, out_dir: Path, trials: list[Trial], tables: dict[str, Table],
              figures: dict[str, FigureFile], notes: list[str]) -> str:
    counted = ", ".join(f"{count} {status}" for status, count in status_counts(trials).items())
    lines = [f"# Sweep report: {name}", "",
             f"{len(trials)} trials: {counted}. Sweep folder: `{sweep_dir}`. "
             f"Made {time.strftime('%Y-%m-%d %H:%M')} by `memray report` from the trial result files; "
             "every number is also in `report.json`, every table in `tables/` as CSV.", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])

    def add_table(table: Table) -> None:
        lines.extend([f"## {table.title}", ""])
        if table.note:
            lines.extend([table.note, ""])
        lines.extend([table.markdown(), "", f"CSV: `tables/{table.name}.csv`", ""])

    unfinished = tables["unfinished"]
    if unfinished.data.empty:
        lines.extend(["Every trial finished.", ""])
    else:
        add_table(unfinished)
    for key in [k for k in tables if k.startswith("method_by_model_")]:
        add_table(tables[key])
    add_table(tables["seeds"])
    if "findings" in tables:
        add_table(tables["findings"])
    lines.extend(["## Figures", ""])
    for figure in figures.values():
        lines.extend([f"![{figure.caption}]({figure.path.relative_to(out_dir).as_posix()})", ""])
    for key in (*axes_methods(), "extraction", "duplication", "counterfactual", "trials", "attacks"):
        if key in tables:
            add_table(tables[key])
    return "\n".join(lines)


def sweep_uses_wandb(sweep_dir: Path) -> bool:
    """Whether the sweep logged to W&B: a `wandb/` folder, or a sweep.yaml whose W&B mode
    is not `disabled`."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / "wandb").is_dir():
        return True
    sweep, _, _ = read_sweep_file(sweep_dir)
    return sweep is not None and sweep.wandb.mode != "disabled"


def report_run_id(sweep_dir: Path, name: str) -> str:
    """The sweep's report run id: from its W&B id seed (sweep.json), else its name."""
    state_file = Path(sweep_dir) / STATE_FILE
    seed = json.loads(state_file.read_text()).get("uid", name) if state_file.is_file() else name
    return hashlib.sha256(f"{seed}:report".encode()).hexdigest()[:16]


def log_to_wandb(sweep_dir: Path, name: str, sweep: SweepConfig | None, figures: dict[str, FigureFile],
                 tables: dict[str, Table]) -> dict[str, Any]:
    """Log the figures and tables to the sweep's one W&B report run (job type "report", in
    the sweep's group, the same id on every `memray report`, so that each report updates it),
    in the sweep's W&B mode (offline where that is `disabled` or unknown). Never raises: a
    W&B problem is a warning and comes back as {"logged": False, "error": ...}."""
    settings = sweep.wandb if sweep is not None else None
    mode = resolve_wandb_mode(settings) if settings is not None else "offline"
    mode = "offline" if mode == "disabled" else mode
    error = ""
    for attempt in [mode] + (["offline"] if mode == "online" else []):
        try:
            import wandb

            run = wandb.init(project=settings.project if settings else "memray",
                             entity=settings.entity if settings else None, group=name, job_type="report",
                             name=f"{name}-report", id=report_run_id(sweep_dir, name), resume="allow",
                             dir=str(sweep_dir), mode=attempt,
                             config={"sweep": name, "sweep_dir": str(sweep_dir)},
                             settings=wandb.Settings(init_timeout=120, console="off", silent=True))
            logged: dict[str, Any] = {f"report/{key}": wandb.Image(str(figure.path), caption=figure.caption)
                                      for key, figure in figures.items()}
            for key, table in tables.items():
                if not table.data.empty:
                    logged[f"report/table/{key}"] = wandb.Table(dataframe=_with_nulls(table.data))
            run.log(logged)
            run_id, run_dir = run.id, run.dir
            run.finish()
            wandb.teardown()
            return {"logged": True, "mode": attempt, "run_id": run_id, "dir": str(Path(run_dir).parent)}
        except Exception as err:  # noqa: BLE001 - a report must never fail because of W&B
            error = f"{type(err).__name__}: {err}"
            warnings.warn(f"W&B {attempt} report run not logged: {error}", stacklevel=2)
    return {"logged": False, "mode": mode, "error": error}
