"""Reports: a sweep folder's result files -> the tables and figures of the studies.

`memray report SWEEP_DIR` (`report_command`, `build_report`) reads nothing but result files
(no Ray; a copied folder works) and writes into `<sweep dir>/report/`:
```
report.md          every table and figure in one Markdown file, ready to open or paste
report.json        every number: per trial, per epoch, per attack, per group of seeds
tables/<name>.md   the tables as Markdown, and as CSV (full precision) beside them:
tables/<name>.csv    trials, attacks, seeds, method_by_model_<dataset>, lora, extraction,
                     duplication, unfinished
figures/<name>.png auc_vs_epoch_<dataset>, auc_vs_model_size_<dataset>, ppl_vs_auc,
                     lora_placement_rank, roc_<dataset>_<model>, duplication_<dataset>
```
and logs the same figures and tables to a W&B run (job type "report", in the sweep's
group) when the sweep used W&B.

What the numbers mean:
- A *trial* is a folder below the sweep folder holding a memray `result.json`; grid cells
  of `sweep.yaml` with no folder yet are *pending*. Running (or interrupted) and failed
  trials are listed with their state and reason, never dropped; their recorded epochs
  appear in the per-trial tables and the per-epoch plots, but not in the averages.
- *Final* is a trial's last recorded epoch; *best* is its epoch of lowest validation
  perplexity (the checkpoint early stopping would keep).
- Trials whose configs differ only in `seed` form a *group*; the seed tables give the
  mean ± sample standard deviation (ddof=1) over the group's successful trials.
- AUC 95% intervals are percentile bootstraps of the final epoch's per-sample scores
  (members and non-members resampled separately, `BOOTSTRAP_RESAMPLES` times); a group's
  interval is that of the per-resample mean over its seeds.
- A model's size is the smallest base-parameter count any of its trials reports: a
  trial's `method_info.total_params`, less its `trainable_params` for PEFT methods (whose
  adapters, prefixes or prompts are added to the model). A model no trial has loaded yet
  takes memray.sweep's approximate count.
- Method labels say what differs: `lora (attn, r8)`, and a sweep axis that varies
  between trials of the same method, model and dataset is appended (`dup 10% x2/5/10`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sys
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, NullLocator
from scipy import stats

from memray.config import APPROX_PARAMS, METHODS, Cell, ConfigError, SweepConfig, load_sweep, resolve_wandb_mode
from memray.metrics import roc_points
from memray.results import RESULT_FILE, SWEEP_FILE, scores_path, trial_names

REPORT_DIR = "report"
BOOTSTRAP_RESAMPLES = 1000  # percentile 95% bounds move by ~0.003 AUC between reruns at this count
ROC_POINTS = 400  # per curve in plots and report.json: enough to draw the low-FPR steps
FIGURE_DPI = 110
CHANCE_AUC = 0.5
STATUSES = ("success", "running", "failed", "pending")
#: Keys that are their own table columns, not part of a method label.
OWN_COLUMNS = ("seed", "output_dir", "data.split_seed", "model.name", "data.dataset")
#: Config sections compared as one value (a duplication setting is one level of the axis).
LEAF_SECTIONS = ("data.duplicates", "data.canaries", "attacks")


# ---------------------------------------------------------------------------------------
# Reading the sweep folder
# ---------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """One attack's numbers in one trial, at the final epoch unless named otherwise."""

    label: str
    auc: float
    tpr_1: float  # TPR at 1% FPR
    tpr_01: float  # TPR at 0.1% FPR
    auc_best: float  # at the best-perplexity epoch
    tpr_1_best: float
    tpr_01_best: float
    ci: tuple[float, float] | None = None  # bootstrap 95% interval of the AUC
    resampled: np.ndarray | None = None  # the bootstrap AUCs, for intervals of seed means
    roc: tuple[np.ndarray, np.ndarray] | None = None  # (FPR, TPR) points


@dataclass
class Trial:
    """A trial folder (or a pending grid cell) as the report sees it."""

    name: str
    path: str  # relative to the sweep folder; "" for a pending cell
    status: str  # success, running, failed or pending
    reason: str | None
    config: dict[str, Any]
    axes: dict[str, Any]
    epochs: list[dict[str, Any]]
    method_info: dict[str, Any] = field(default_factory=dict)
    split_hash: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)  # python and packages that ran it
    variant: str = ""  # method label, set once every trial is known
    attacks: dict[str, AttackResult] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.config.get("model", {}).get("name", "?"))

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("dataset", "?"))

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "?"))

    @property
    def seed(self) -> int | None:
        return self.config.get("seed")

    @property
    def planned_epochs(self) -> int | None:
        return self.config.get("train", {}).get("epochs")

    @property
    def final(self) -> dict[str, Any]:
        return self.epochs[-1] if self.epochs else {}

    @property
    def best(self) -> dict[str, Any]:
        """The epoch of lowest validation perplexity ({} if none has a finite one)."""
        finite = [row for row in self.epochs if _finite(row.get("val/ppl"))]
        return min(finite, key=lambda row: row["val/ppl"]) if finite else {}

    def attack_labels(self) -> list[str]:
        """Attacks in the order the trial reports them."""
        return [key.split("/")[1] for key in self.final if key.startswith("mia/") and key.endswith("/auc")]

    def group_key(self) -> str:
        """Identity of the trial up to its seed: trials with equal keys are averaged."""
        flat = {k: v for k, v in _flatten(self.config).items() if k not in ("seed", "output_dir", "data.split_seed")}
        return json.dumps(flat, sort_keys=True, default=str)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dotted not in LEAF_SECTIONS:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _is_trial_result(data: Any) -> bool:
    """A memray result.json (Ray Tune's own result.json files, under tune/, are not)."""
    return isinstance(data, dict) and data.get("status") in STATUSES and isinstance(data.get("config"), dict)


def find_trial_dirs(sweep_dir: Path, skip: Path | None = None) -> list[Path]:
    """Every folder below `sweep_dir` holding a memray `result.json`, sorted; `skip`
    (the report folder) is not searched."""
    found = []
    for path in sorted(Path(sweep_dir).rglob(RESULT_FILE)):
        if skip is not None and path.is_relative_to(skip):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _is_trial_result(data):
            found.append(path.parent)
    return found


def read_sweep_file(sweep_dir: Path) -> tuple[SweepConfig | None, list[Cell], str | None]:
    """The sweep's `sweep.yaml` and its cells, or (None, [], why not) when it is missing or
    no longer validates (the report then works from the trial folders alone)."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return None, [], None
    try:
        sweep, cells = load_sweep(path)
    except ConfigError as err:
        return None, [], f"{SWEEP_FILE} could not be read, so pending cells are not listed: {err}"
    return sweep, cells, None


def load_trials(sweep_dir: Path, cells: list[Cell], skip: Path | None = None) -> list[Trial]:
    """Trials of the folder, plus a pending entry for each grid cell that has no folder."""
    sweep_dir = Path(sweep_dir)
    trials = []
    for trial_dir in find_trial_dirs(sweep_dir, skip):
        data = json.loads((trial_dir / RESULT_FILE).read_text())
        trials.append(Trial(
            name=trial_dir.name, path=str(trial_dir.relative_to(sweep_dir)), status=data["status"],
            reason=data.get("reason"), config=data["config"], axes=data.get("axes") or {},
            epochs=sorted(data.get("epochs") or [], key=lambda row: row["epoch"]),
            method_info=data.get("method_info") or {}, split_hash=data.get("split_hash"),
            versions=_versions(data.get("provenance") or {}),
        ))
    names = trial_names(cells) if cells else {}
    for cell in cells:
        if not any(_is_cell_folder(trial, names[cell.index], cell.axes) for trial in trials):
            trials.append(Trial(name=names[cell.index], path="", status="pending", reason=None,
                                config=cell.config.resolved(), axes=dict(cell.axes), epochs=[]))
    return trials


def _versions(provenance: dict[str, Any]) -> dict[str, str | None]:
    """Python and package versions from a result.json's provenance."""
    return {"python": provenance.get("python"), **(provenance.get("versions") or {})}


def version_mix(trials: list[Trial]) -> str | None:
    """A note naming each package whose version differs between the trials that ran (their
    numbers may then differ for that reason alone), or None when all ran on one set."""
    ran = [t for t in trials if t.versions]
    mixed = []
    for package in dict.fromkeys(p for t in ran for p in t.versions):
        counts: dict[str, int] = {}
        for trial in ran:
            version = str(trial.versions.get(package))
            counts[version] = counts.get(version, 0) + 1
        if len(counts) > 1:
            mixed.append(f"{package} " + ", ".join(f"{v} ({n} trials)" for v, n in sorted(counts.items())))
    if not mixed:
        return None
    return ("Trials ran on different versions: " + "; ".join(mixed)
            + ". Install the locked set (`.ci/setup`) on every machine of a sweep.")


def _is_cell_folder(trial: Trial, name: str, axes: dict[str, Any]) -> bool:
    """Whether a trial folder belongs to a grid cell: the same folder name, or the same
    cell index and axes (a config schema that grew new keys since the run changes the
    trial id, and so the name, of the same cell)."""
    if trial.name == name:
        return True
    same_index = trial.name.split("-", 1)[0] == name.split("-", 1)[0]
    return same_index and json.dumps(trial.axes, sort_keys=True) == json.dumps(axes, sort_keys=True)


# ---------------------------------------------------------------------------------------
# Labels, model sizes, per-trial attack numbers
# ---------------------------------------------------------------------------------------


def method_label(config: dict[str, Any]) -> str:
    """`lora (attn, r8)`, `prefix`, ... from a resolved trial config."""
    method = config.get("method", {})
    name = method.get("name", "?")
    if name == "lora":
        placement = "custom" if method.get("target_modules") else method.get("placement")
        return f"lora ({placement}, r{method.get('rank')})"
    return str(name)


def _value_text(key: str, value: Any) -> str:
    if key == "data.duplicates":
        if not value:
            return "no dup"
        copies = "/".join(str(c) for c in value.get("copies", []))
        return f"dup {value.get('fraction', 0):.0%} x{copies}"
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)
    return f"{key.split('.')[-1]}={text}"


def label_variants(trials: list[Trial]) -> None:
    """Set each trial's `variant`: its method label, plus the config keys that tell apart
    trials of that label which share a model and dataset (e.g. a duplication axis)."""
    covered = {"method.name", "method.rank", "method.placement", "method.target_modules", *OWN_COLUMNS}
    flats = [{k: v for k, v in _flatten(t.config).items() if k not in covered} for t in trials]
    by_cell: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for index, trial in enumerate(trials):
        by_cell[(method_label(trial.config), trial.model, trial.dataset)].append(index)
    differing: dict[str, set[str]] = defaultdict(set)
    for (label, _, _), indices in by_cell.items():
        # keys every trial has: a key only newer configs have is a schema change, not an axis
        keys = set.intersection(*(set(flats[i]) for i in indices))
        for key in keys:
            if len({json.dumps(flats[i].get(key), sort_keys=True, default=str) for i in indices}) > 1:
                differing[label].add(key)
    for trial, flat in zip(trials, flats):
        label = method_label(trial.config)
        extras = [_value_text(key, flat.get(key)) for key in sorted(differing[label])]
        trial.variant = ", ".join([label, *extras])


def model_sizes(trials: list[Trial]) -> dict[str, dict[str, Any]]:
    """Model name -> {"params": base parameter count, "source": "trials" or "approx"}."""
    counts: dict[str, list[float]] = defaultdict(list)
    for trial in trials:
        info = trial.method_info
        if _finite(info.get("total_params")):
            added = (info.get("trainable_params") or 0) if info.get("peft") else 0
            counts[trial.model].append(float(info["total_params"] - added))
    sizes = {}
    for model in sorted({t.model for t in trials}):
        if counts[model]:
            sizes[model] = {"params": min(counts[model]), "source": "trials"}
        else:
            sizes[model] = {"params": APPROX_PARAMS.get(model), "source": "approx"}
    return sizes


def _bootstrap_seed(name: str, label: str) -> int:
    return int(hashlib.sha256(f"{name}:{label}".encode()).hexdigest()[:8], 16)


def bootstrap_aucs(member_scores: np.ndarray, nonmember_scores: np.ndarray, resamples: int,
                   seed: int) -> np.ndarray:
    """AUCs of `resamples` stratified bootstrap resamples (members and non-members drawn
    separately with replacement); the AUC is the Mann-Whitney U over (members x non-members)."""
    def auc(members: np.ndarray, nonmembers: np.ndarray, axis: int) -> np.ndarray:
        u = stats.mannwhitneyu(members, nonmembers, axis=axis).statistic
        return u / (members.shape[axis] * nonmembers.shape[axis])

    result = stats.bootstrap((member_scores, nonmember_scores), auc, n_resamples=resamples, vectorized=True,
                             method="percentile", batch=100, rng=np.random.default_rng(seed))
    return np.asarray(result.bootstrap_distribution)


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def attack_results(trial: Trial, sweep_dir: Path, resamples: int) -> dict[str, AttackResult]:
    """Per attack: final AUC and TPRs from result.json, AUC at the best epoch, and from the
    final epoch's per-sample scores (when the file is there) the bootstrap interval and ROC."""
    final, best = trial.final, trial.best
    if not final:
        return {}
    scores = None
    path = scores_path(sweep_dir / trial.path, int(final["epoch"]))
    if path.is_file():
        scores = pd.read_parquet(path)
    results = {}
    for label in trial.attack_labels():
        key = f"mia/{label}/"
        result = AttackResult(label, final[key + "auc"], final.get(key + "tpr@1%fpr", math.nan),
                              final.get(key + "tpr@0.1%fpr", math.nan), best.get(key + "auc", math.nan),
                              best.get(key + "tpr@1%fpr", math.nan), best.get(key + "tpr@0.1%fpr", math.nan))
        if scores is not None and label in scores:
            values = scores[label].to_numpy(dtype=float)
            member = scores["member"].to_numpy(dtype=bool)
            if np.isfinite(values).all() and member.any() and not member.all():
                if resamples:
                    result.resampled = bootstrap_aucs(values[member], values[~member], resamples,
                                                      _bootstrap_seed(trial.name, label))
                    result.ci = _percentile_interval(result.resampled)
                result.roc = roc_points(values, member, max_points=ROC_POINTS)
        results[label] = result
    return results


# ---------------------------------------------------------------------------------------
# Groups of seeds
# ---------------------------------------------------------------------------------------


@dataclass
class Group:
    """Trials that differ only in their seed."""

    dataset: str
    model: str
    variant: str
    method: str
    trials: list[Trial]

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.status == "success" and t.final]

    def stat(self, key: str, best: bool = False) -> tuple[float, float, int]:
        """(mean, sample std, n) of a final-epoch metric (or the best epoch's) over the
        finished trials; NaN where no trial has it, std NaN for a single trial."""
        values = [(t.best if best else t.final).get(key) for t in self.finished]
        values = [v for v in values if _finite(v)]
        if not values:
            return math.nan, math.nan, 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return float(np.mean(values)), std, len(values)

    def auc_interval(self, label: str) -> tuple[float, float] | None:
        """Bootstrap interval of the seed-mean AUC: percentiles of the per-resample means."""
        samples = [t.attacks[label].resampled for t in self.finished if label in t.attacks]
        if not samples or any(s is None for s in samples) or len(samples) != len(self.finished):
            return None
        return _percentile_interval(np.mean(np.vstack(samples), axis=0))

    def metric_keys(self) -> list[str]:
        return list(dict.fromkeys(key for t in self.finished for key in t.final if key != "epoch"))


def make_groups(trials: list[Trial]) -> list[Group]:
    groups: dict[str, Group] = {}
    for trial in trials:
        key = trial.group_key()
        if key not in groups:
            groups[key] = Group(trial.dataset, trial.model, trial.variant, trial.method, [])
        groups[key].trials.append(trial)
    return list(groups.values())


# ---------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if not _finite(value):
        return "inf" if isinstance(value, float) and math.isinf(value) else "-"
    return f"{value:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not _finite(mean):
        return "-"
    return _num(mean, digits) + (f" ± {_num(std, digits)}" if _finite(std) else "")


def _interval(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return f"[{_num(ci[0], digits)}, {_num(ci[1], digits)}]" if ci else "-"


def params_text(params: float | None) -> str:
    if not _finite(params):
        return "?"
    if params >= 1e9:
        return f"{params / 1e9:.2g}B"
    if params >= 1e6:
        return f"{params / 1e6:.3g}M"
    return f"{params / 1e3:.3g}K"


@dataclass
class Table:
    """A table twice: numbers (CSV, report.json) and formatted text (Markdown)."""

    name: str
    title: str
    data: pd.DataFrame
    text: pd.DataFrame
    note: str = ""

    def markdown(self) -> str:
        if self.text.empty:
            return "(none)"
        return self.text.to_markdown(index=False, disable_numparse=True)


def _sort_key(trial: Trial, sizes: dict[str, dict[str, Any]]) -> tuple:
    params = sizes.get(trial.model, {}).get("params")
    method_rank = METHODS.index(trial.method) if trial.method in METHODS else len(METHODS)
    return (trial.dataset, params if _finite(params) else math.inf, trial.model, method_rank, trial.variant,
            trial.seed if trial.seed is not None else -1, trial.name)


def _epochs_text(trial: Trial) -> str:
    done = int(trial.final["epoch"]) if trial.final else "-"
    return f"{done}/{trial.planned_epochs if trial.planned_epochs is not None else '?'}"


def _note(trial: Trial) -> str:
    if trial.status == "failed":
        return f"failed: {trial.reason or 'no reason recorded'}"
    if trial.status == "running":
        return "unfinished (running, or stopped before its last epoch)"
    if trial.status == "pending":
        return "pending (not started)"
    return ""


def trials_table(trials: list[Trial], labels: list[str]) -> Table:
    rows, text = [], []
    for t in trials:
        final, best = t.final, t.best
        row = {"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant, "seed": t.seed,
               "status": t.status, "epochs done": int(final["epoch"]) if final else None,
               "epochs planned": t.planned_epochs, "final val ppl": final.get("val/ppl"),
               "best val ppl": best.get("val/ppl"), "best epoch": best.get("epoch"),
               **{f"{label} auc": final.get(f"mia/{label}/auc") for label in labels}, "note": _note(t)}
        rows.append(row)
        text.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                     "seed": str(t.seed), "status": t.status, "epochs": _epochs_text(t),
                     "val PPL (final)": _num(final.get("val/ppl"), 2),
                     "val PPL (best)": _num(best.get("val/ppl"), 2) + (f" @{int(best['epoch'])}" if best else ""),
                     **{f"{label} AUC": _num(final.get(f"mia/{label}/auc")) for label in labels},
                     "note": _note(t)})
    return Table("trials", "Trials: final and best-epoch validation perplexity, final AUC per attack",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 "Final = last recorded epoch; best = epoch of lowest validation perplexity (shown after @).")


def attacks_table(trials: list[Trial]) -> Table:
    rows, text = [], []
    for t in trials:
        for label, a in t.attacks.items():
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                         "seed": t.seed, "status": t.status, "attack": label, "epoch": t.final.get("epoch"),
                         "auc": a.auc, "auc ci95 low": a.ci[0] if a.ci else None,
                         "auc ci95 high": a.ci[1] if a.ci else None, "tpr@1%fpr": a.tpr_1,
                         "tpr@0.1%fpr": a.tpr_01, "best epoch": t.best.get("epoch"), "auc at best epoch": a.auc_best,
                         "tpr@1%fpr at best epoch": a.tpr_1_best, "tpr@0.1%fpr at best epoch": a.tpr_01_best})
            text.append({"trial": t.name, "method": t.variant, "status": t.status, "attack": label,
                         "epoch": str(int(t.final["epoch"])), "AUC": _num(a.auc), "AUC 95% CI": _interval(a.ci),
                         "TPR@1%FPR": _num(a.tpr_1), "TPR@0.1%FPR": _num(a.tpr_01),
                         "AUC (best epoch)": _num(a.auc_best)})
    return Table("attacks", "Attacks per trial: AUC with bootstrap 95% interval, TPR at 1% and 0.1% FPR",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 f"At the final epoch; intervals from {BOOTSTRAP_RESAMPLES} stratified bootstrap resamples of "
                 "the per-sample scores; the last column is the AUC at the best-perplexity epoch (its TPRs are "
                 "in the CSV).")


def seeds_table(groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]]) -> Table:
    rows, text = [], []
    for g in groups:
        seeds = f"{len(g.finished)}/{len(g.trials)}"
        ppl, ppl_std, _ = g.stat("val/ppl")
        best_ppl, best_std, _ = g.stat("val/ppl", best=True)
        for label in labels:
            auc, auc_std, n = g.stat(f"mia/{label}/auc")
            tpr1, tpr1_std, _ = g.stat(f"mia/{label}/tpr@1%fpr")
            tpr01, tpr01_std, _ = g.stat(f"mia/{label}/tpr@0.1%fpr")
            ci = g.auc_interval(label)
            rows.append({"dataset": g.dataset, "model": g.model, "params": sizes[g.model]["params"],
                         "method": g.variant, "finished": len(g.finished), "trials": len(g.trials),
                         "attack": label, "auc mean": auc, "auc std": auc_std, "auc ci95 low": ci[0] if ci else None,
                         "auc ci95 high": ci[1] if ci else None, "tpr@1%fpr mean": tpr1, "tpr@1%fpr std": tpr1_std,
                         "tpr@0.1%fpr mean": tpr01, "tpr@0.1%fpr std": tpr01_std, "final val ppl mean": ppl,
                         "final val ppl std": ppl_std, "best val ppl mean": best_ppl, "best val ppl std": best_std})
            text.append({"dataset": g.dataset, "model": g.model, "method": g.variant, "seeds": seeds,
                         "attack": label, "AUC": _pm(auc, auc_std), "AUC 95% CI": _interval(ci),
                         "TPR@1%FPR": _pm(tpr1, tpr1_std), "TPR@0.1%FPR": _pm(tpr01, tpr01_std),
                         "val PPL (final)": _pm(ppl, ppl_std, 2), "val PPL (best)": _pm(best_ppl, best_std, 2)})
    return Table("seeds", "Over seeds: mean ± std of the finished trials of each configuration",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 "Seeds = finished / all trials of the configuration; the interval is a bootstrap 95% "
                 "interval of the seed-mean AUC.")


def method_by_model_tables(groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]]) -> list[Table]:
    """Per dataset: rows = method, columns = models by size; one block per metric (val PPL,
    each attack's AUC, and exact extraction when measured)."""
    tables = []
    for dataset in sorted({g.dataset for g in groups}):
        chosen = [g for g in groups if g.dataset == dataset]
        models = sorted({g.model for g in chosen}, key=lambda m: (sizes[m]["params"] or math.inf, m))
        variants = _ordered_variants(chosen)
        metrics = ["val/ppl", *(f"mia/{label}/auc" for label in labels)]
        if any("extract/exact" in g.metric_keys() for g in chosen):
            metrics.append("extract/exact")
        rows, text = [], []
        for metric in metrics:
            digits = 2 if metric == "val/ppl" else 3
            for variant in variants:
                row: dict[str, Any] = {"metric": metric, "method": variant}
                line = {"metric": _metric_title(metric), "method": variant}
                for model in models:
                    match = [g for g in chosen if g.model == model and g.variant == variant]
                    mean, std, _ = match[0].stat(metric) if match else (math.nan, math.nan, 0)
                    row[model], row[f"{model} std"] = mean, std
                    line[f"{model} ({params_text(sizes[model]['params'])})"] = _pm(mean, std, digits)
                rows.append(row)
                text.append(line)
        tables.append(Table(f"method_by_model_{_slug(dataset)}", f"Method x model size, {dataset}",
                            pd.DataFrame(rows), pd.DataFrame(text),
                            "Final epoch, mean ± std over seeds of finished trials; '-' where none finished."))
    return tables


def lora_table(groups: list[Group], labels: list[str]) -> Table | None:
    rows, text = [], []
    for g in groups:
        method = g.trials[0].config.get("method", {})
        if g.method != "lora" or method.get("target_modules"):
            continue
        for label in labels:
            auc, std, n = g.stat(f"mia/{label}/auc")
            ppl, ppl_std, _ = g.stat("val/ppl")
            rows.append({"dataset": g.dataset, "model": g.model, "method": g.variant,
                         "placement": method.get("placement"), "rank": method.get("rank"), "attack": label,
                         "auc mean": auc, "auc std": std, "finished": n, "final val ppl mean": ppl,
                         "final val ppl std": ppl_std})
    if not rows:
        return None
    data = pd.DataFrame(rows).sort_values(["dataset", "model", "attack", "placement", "rank"], kind="stable")
    for row in data.to_dict("records"):
        text.append({"dataset": row["dataset"], "model": row["model"], "method": row["method"],
                     "placement": row["placement"], "rank": str(row["rank"]), "attack": row["attack"],
                     "AUC": _pm(row["auc mean"], row["auc std"]),
                     "val PPL": _pm(row["final val ppl mean"], row["final val ppl std"], 2)})
    return Table("lora", "LoRA placement and rank", data.reset_index(drop=True), pd.DataFrame(text),
                 "Final epoch, mean ± std over seeds of finished trials.")


def extraction_table(trials: list[Trial]) -> Table | None:
    rows, text = [], []
    for t in trials:
        for group, prefix in (("members", "extract/"), ("non-members", "extract/nonmember/")):
            # names below the prefix, without breakdowns and without the other group's keys
            values = {key[len(prefix):]: value for key, value in t.final.items()
                      if key.startswith(prefix) and "@dup" not in key and "/" not in key[len(prefix):]}
            if not values:
                continue
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant, "seed": t.seed,
                         "status": t.status, "epoch": t.final.get("epoch"), "samples of": group, **values})
            text.append({"trial": t.name, "method": t.variant, "status": t.status, "samples of": group,
                         **{name: _num(value, 1 if name in ("lcp", "samples", "skipped") else 3)
                            for name, value in values.items()}})
    if not rows:
        return None
    return Table("extraction", "Extraction: generated continuation vs the true suffix", pd.DataFrame(rows),
                 pd.DataFrame(text).fillna("-"),
                 "Final epoch. exact = share reproduced token for token; lcp = mean common prefix (tokens); "
                 "rougeL / bleu / edit = mean similarity; name@t = share with similarity >= t. Non-members "
                 "show what the model reaches without having seen the text.")


_DUP = re.compile(r"^(?P<metric>.+)@dup(?P<copies>\d+)$")


def duplicate_metrics(final: dict[str, Any]) -> dict[int, dict[str, float]]:
    """copies -> {metric: value} from a final-epoch dict's `...@dup<c>` keys."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for key, value in final.items():
        match = _DUP.match(key)
        if match:
            out[int(match["copies"])][match["metric"]] = value
    return dict(sorted(out.items()))


def duplication_table(trials: list[Trial]) -> Table | None:
    rows = []
    for t in trials:
        for copies, values in duplicate_metrics(t.final).items():
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                         "seed": t.seed, "status": t.status, "epoch": t.final.get("epoch"), "copies": copies, **values})
    if not rows:
        return None
    data = pd.DataFrame(rows)
    text = data.drop(columns=["dataset", "model", "seed", "epoch"]).copy()
    for column in text.columns:
        if column not in ("trial", "method", "status", "copies"):
            text[column] = [_num(v, 1 if column.endswith("samples") else 3) for v in text[column]]
    text["copies"] = text["copies"].astype(str)
    return Table("duplication", "By copy count in the training data", data, text,
                 "Final epoch; each metric over the members with that many copies (AUC: against all non-members).")


def unfinished_table(trials: list[Trial]) -> Table:
    rows = [{"trial": t.name, "status": t.status, "epochs": _epochs_text(t), "reason": _note(t), "path": t.path}
            for t in trials if t.status != "success"]
    data = pd.DataFrame(rows, columns=["trial", "status", "epochs", "reason", "path"])
    return Table("unfinished", "Trials not finished", data, data.astype(str))


def _ordered_variants(groups: Iterable[Group]) -> list[str]:
    seen = {}
    for g in groups:
        seen.setdefault(g.variant, METHODS.index(g.method) if g.method in METHODS else len(METHODS))
    return sorted(seen, key=lambda v: (seen[v], v))


def _metric_title(metric: str) -> str:
    if metric == "val/ppl":
        return "val PPL"
    if metric == "extract/exact":
        return "exact extraction"
    if metric.startswith("mia/") and metric.endswith("/auc"):
        return f"{metric.split('/')[1]} AUC"
    return metric


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


# ---------------------------------------------------------------------------------------
# Figures (matplotlib's object API: Figure renders with Agg, no pyplot global state)
# ---------------------------------------------------------------------------------------


def _colors(variants: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {variant: cmap(index % cmap.N) for index, variant in enumerate(variants)}


MARKERS = "osD^vP*Xh<>p"


def _figure(rows: int, cols: int, width: float = 4.4, height: float = 3.3):
    figure = Figure(figsize=(width * cols, height * rows + 0.9), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _legend(figure, axes_grid, handles: dict[str, Any] | None = None) -> None:
    """One legend below the panels: the labelled artists of every panel, or `handles`."""
    if handles is None:
        handles = {}
        for ax in axes_grid.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                      ncols=min(4, len(handles)), fontsize="small", frameon=False)


def _plain_log_ticks(axis) -> None:
    """Plain numbers (20, 30, 50) on a log axis instead of 2x10^1."""
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _ticks_at(axis, values: list[float], labels: list[str]) -> None:
    """Ticks exactly at `values` (model sizes, copy counts) on a log axis, no minor ticks."""
    axis.set_ticks(values, labels)
    axis.set_minor_locator(NullLocator())


def _finish_grid(figure, axes_grid, used: int, title: str, path: Path) -> Path:
    """Hide the grid's panels past the first `used`, title it, add the legend, save it."""
    cols = len(axes_grid[0])
    for index in range(used, len(axes_grid) * cols):
        axes_grid[index // cols][index % cols].set_visible(False)
    figure.suptitle(title)
    _legend(figure, axes_grid)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _attack_title(label: str) -> str:
    return f"attack: {label}"


def _by_epoch(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs and the mean and std over trials of a metric at each epoch."""
    values: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for row in t.epochs:
            if _finite(row.get(key)):
                values[int(row["epoch"])].append(row[key])
    epochs = np.array(sorted(values))
    means = np.array([np.mean(values[e]) for e in epochs])
    stds = np.array([np.std(values[e], ddof=1) if len(values[e]) > 1 else 0.0 for e in epochs])
    return epochs, means, stds


def plot_auc_vs_epoch(trials: list[Trial], dataset: str, labels: list[str], sizes: dict, colors: dict,
                      path: Path) -> Path:
    chosen = [t for t in trials if t.dataset == dataset and t.epochs]
    models = sorted({t.model for t in chosen}, key=lambda m: (sizes[m]["params"] or math.inf, m))
    figure, axes = _figure(len(models), len(labels))
    for row, model in enumerate(models):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            for variant in colors:
                group = [t for t in chosen if t.model == model and t.variant == variant]
                epochs, means, stds = _by_epoch(group, f"mia/{label}/auc")
                if not len(epochs):
                    continue
                ax.plot(epochs, means, marker="o", markersize=3, color=colors[variant], label=variant)
                if any(stds):
                    ax.fill_between(epochs, means - stds, means + stds, color=colors[variant], alpha=0.15)
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{model} ({params_text(sizes[model]['params'])}), {_attack_title(label)}", fontsize="medium")
            ax.set_xlabel("epoch (0 = before fine-tuning)")
            ax.set_ylabel("membership AUC-ROC")
            ax.grid(alpha=0.3)
    figure.suptitle(f"Membership-inference AUC per epoch, {dataset} (mean ± std over seeds; dotted: chance)")
    _legend(figure, axes)
    return _save(figure, path)


def plot_auc_vs_model_size(groups: list[Group], dataset: str, labels: list[str], sizes: dict, colors: dict,
                           path: Path) -> Path:
    chosen = [g for g in groups if g.dataset == dataset and g.finished]
    models = sorted({g.model for g in chosen if _finite(sizes[g.model]["params"])}, key=lambda m: sizes[m]["params"])
    figure, axes = _figure(1, len(labels))
    for col, label in enumerate(labels):
        ax = axes[0][col]
        for variant in colors:
            points = sorted(((sizes[g.model]["params"], *g.stat(f"mia/{label}/auc")[:2]) for g in chosen
                             if g.variant == variant and _finite(sizes[g.model]["params"])), key=lambda p: p[0])
            points = [p for p in points if _finite(p[1])]
            if not points:
                continue
            x, y, err = (np.array(v, dtype=float) for v in zip(*points))
            ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3, color=colors[variant], label=variant)
        ax.set_xscale("log")
        if models:  # room either side of the outer models, also when there is only one
            ax.set_xlim(sizes[models[0]]["params"] / 1.6, sizes[models[-1]]["params"] * 1.6)
        _ticks_at(ax.xaxis, [sizes[m]["params"] for m in models],
                  [f"{m}\n{params_text(sizes[m]['params'])}" for m in models])
        ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
        ax.set_title(_attack_title(label), fontsize="medium")
        ax.set_xlabel("model parameters (log scale)")
        ax.set_ylabel("membership AUC-ROC, final epoch")
        ax.grid(alpha=0.3, which="both")
    figure.suptitle(f"AUC vs model size, {dataset} (mean ± std over seeds)")
    _legend(figure, axes)
    return _save(figure, path)


def plot_ppl_vs_auc(trials: list[Trial], labels: list[str], models: list[str], colors: dict, path: Path) -> Path:
    chosen = [t for t in trials if t.final and _finite(t.final.get("val/ppl"))]
    datasets = sorted({t.dataset for t in chosen})
    markers = {model: MARKERS[i % len(MARKERS)] for i, model in enumerate(models)}
    figure, axes = _figure(len(datasets), len(labels))
    for row, dataset in enumerate(datasets):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            for t in chosen:
                auc = t.final.get(f"mia/{label}/auc")
                if t.dataset != dataset or not _finite(auc):
                    continue
                done = t.status == "success"
                ax.scatter(t.final["val/ppl"], auc, marker=markers[t.model], s=36,
                           color=colors[t.variant] if done else "none", edgecolors=colors[t.variant])
            ax.set_xscale("log")
            _plain_log_ticks(ax.xaxis)
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            ax.set_title(f"{dataset}, {_attack_title(label)}", fontsize="medium")
            ax.set_xlabel("validation perplexity, final epoch (log scale)")
            ax.set_ylabel("membership AUC-ROC, final epoch")
            ax.grid(alpha=0.3, which="both")
    shown = {t.variant for t in chosen}
    handles = {variant: Line2D([], [], color=color, marker="o", linestyle="") for variant, color in colors.items()
               if variant in shown}
    handles.update({model: Line2D([], [], color="dimgrey", marker=markers[model], linestyle="")
                    for model in models if any(t.model == model for t in chosen)})
    handles["unfinished trial"] = Line2D([], [], color="none", markeredgecolor="dimgrey", marker="o", linestyle="")
    figure.suptitle("Privacy vs utility: one point per trial (colour: method, marker: model)")
    _legend(figure, axes, handles)
    return _save(figure, path)


def plot_lora(groups: list[Group], labels: list[str], path: Path) -> Path | None:
    lora = [g for g in groups if g.method == "lora" and g.finished
            and not g.trials[0].config.get("method", {}).get("target_modules")]
    if not lora:
        return None
    panels = sorted({(g.dataset, g.model) for g in lora})
    placements = [p for p in ("attn", "mlp", "both") if any(g.trials[0].config["method"]["placement"] == p for g in lora)]
    ranks = sorted({g.trials[0].config["method"]["rank"] for g in lora})
    colors = _colors(placements)
    width = 0.8 / len(placements)
    figure, axes = _figure(len(panels), len(labels), width=max(4.4, 0.5 * len(ranks) * len(placements)))
    for row, (dataset, model) in enumerate(panels):
        for col, label in enumerate(labels):
            ax = axes[row][col]
            tops = [CHANCE_AUC]  # bar ends with their error bars, for the y range
            for index, placement in enumerate(placements):
                x, heights, errors = [], [], []
                for position, rank in enumerate(ranks):
                    match = [g for g in lora if (g.dataset, g.model) == (dataset, model)
                             and g.trials[0].config["method"]["placement"] == placement
                             and g.trials[0].config["method"]["rank"] == rank]
                    # several groups of one placement and rank (another axis varies): their mean
                    values = [g.stat(f"mia/{label}/auc") for g in match]
                    values = [v for v in values if _finite(v[0])]
                    if values:
                        x.append(position + (index - (len(placements) - 1) / 2) * width)
                        heights.append(np.mean([v[0] for v in values]) - CHANCE_AUC)
                        errors.append(np.nan_to_num(values[0][1]) if len(values) == 1 else 0.0)
                if x:
                    ax.bar(x, heights, width=width, bottom=CHANCE_AUC, yerr=errors, capsize=2,
                           color=colors[placement], label=f"LoRA on {placement}")
                    tops += [CHANCE_AUC + h + e for h, e in zip(heights, errors)]
                    tops += [CHANCE_AUC + h - e for h, e in zip(heights, errors)]
            span = max(tops) - min(tops) or 0.1
            ax.set_ylim(min(tops) - 0.1 * span, max(tops) + 0.1 * span)
            ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
            ax.axhline(CHANCE_AUC, color="grey", linewidth=1)
            ax.set_title(f"{dataset}, {model}, {_attack_title(label)}", fontsize="medium")
            ax.set_xlabel("LoRA rank")
            ax.set_ylabel("membership AUC-ROC, final epoch")
            ax.grid(alpha=0.3, axis="y")
    figure.suptitle("LoRA placement and rank (bars from chance = 0.5; mean ± std over seeds)")
    _legend(figure, axes)
    return _save(figure, path)


def plot_roc(trials: list[Trial], dataset: str, model: str, variants: list[str], path: Path) -> Path | None:
    """ROC curves (log-log) of one dataset and model: a panel per method, a line per
    attack, from the finished trial of the lowest seed (else the latest unfinished one)."""
    panels = []
    for variant in variants:
        candidates = [t for t in trials if (t.dataset, t.model, t.variant) == (dataset, model, variant)
                      and any(a.roc is not None for a in t.attacks.values())]
        if candidates:
            candidates.sort(key=lambda t: (t.status != "success", t.seed if t.seed is not None else 0))
            panels.append((variant, candidates[0]))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure, axes = _figure(rows, cols, width=4.0, height=3.6)
    attack_colors = _colors(list(dict.fromkeys(label for _, t in panels for label in t.attacks)))
    for index, (variant, trial) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        floor = 1.0
        for label, attack in trial.attacks.items():
            if attack.roc is None:
                continue
            fpr, tpr = attack.roc
            positive = fpr[fpr > 0]
            floor = min(floor, positive.min() if positive.size else 1.0)
            ax.plot(fpr, tpr, color=attack_colors[label], label=label)
        grid = np.logspace(np.log10(floor), 0, 50)
        ax.plot(grid, grid, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor, 1)
        ax.set_ylim(floor, 1.05)
        aucs = "\n".join(f"{label} AUC {a.auc:.3f}" for label, a in trial.attacks.items() if a.roc is not None)
        ax.text(0.97, 0.03, aucs, transform=ax.transAxes, ha="right", va="bottom", fontsize="small",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        status = "" if trial.status == "success" else f", {trial.status}"
        ax.set_title(f"{variant}\nseed {trial.seed}, epoch {int(trial.final['epoch'])}{status}", fontsize="medium")
        ax.set_xlabel("false-positive rate (log scale)")
        ax.set_ylabel("true-positive rate (log scale)")
        ax.grid(alpha=0.3, which="both")
    return _finish_grid(figure, axes, len(panels), f"ROC curves, {dataset}, {model} (dotted: chance)", path)


def _duplication_panels(trials: list[Trial]) -> list[str]:
    keys: dict[str, None] = {}
    for t in trials:
        for values in duplicate_metrics(t.final).values():
            keys.update(dict.fromkeys(values))
    wanted = []
    for key in keys:
        extraction_rate = key == "extract/exact" or (key.startswith("extract/") and "@" in key
                                                     and not key.startswith("extract/nonmember/"))
        if extraction_rate or (key.startswith("mia/") and key.endswith("/auc")) or key == "canary/exposure":
            wanted.append(key)
    return sorted(wanted, key=lambda k: (not k.startswith("extract/"), k != "extract/exact", k))


def plot_duplication(trials: list[Trial], dataset: str, colors: dict, path: Path) -> Path | None:
    chosen = [t for t in trials if t.dataset == dataset and t.status == "success" and duplicate_metrics(t.final)]
    panels = _duplication_panels(chosen)
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure, axes = _figure(rows, cols)
    models = sorted({t.model for t in chosen})
    styles = {model: ["-", "--", "-.", ":"][i % 4] for i, model in enumerate(models)}
    levels = sorted({c for t in chosen for c in duplicate_metrics(t.final)})
    for index, key in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for model in models:
            for variant in colors:
                values: dict[int, list[float]] = defaultdict(list)
                for t in chosen:
                    if (t.model, t.variant) == (model, variant):
                        for copies, metrics in duplicate_metrics(t.final).items():
                            if _finite(metrics.get(key)):
                                values[copies].append(metrics[key])
                if not values:
                    continue
                copies = sorted(values)
                ax.plot(copies, [np.mean(values[c]) for c in copies], marker="o", linestyle=styles[model],
                        color=colors[variant], label=f"{variant}, {model}" if len(models) > 1 else variant)
        ax.set_xscale("log", base=2)
        _ticks_at(ax.xaxis, levels, [str(c) for c in levels])
        if key.startswith("mia/"):
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            ylabel = "membership AUC-ROC vs all non-members"
        elif key == "canary/exposure":
            ylabel = "canary exposure (bits)"
        else:
            ylabel = "share of members extracted"
        ax.set_title(_duplicate_title(key), fontsize="medium")
        ax.set_xlabel("copies in the training data (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    return _finish_grid(figure, axes, len(panels), f"Memorization vs duplication, {dataset} (final epoch, mean over seeds)", path)


def _duplicate_title(key: str) -> str:
    if key == "extract/exact":
        return "exact extraction"
    if key.startswith("extract/"):
        name, _, threshold = key.removeprefix("extract/").partition("@")
        return f"{name} >= {threshold}"
    if key.startswith("mia/"):
        return _attack_title(key.split("/")[1])
    return key


@dataclass
class FigureFile:
    path: Path
    caption: str


def make_figures(trials: list[Trial], groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]],
                 figures_dir: Path) -> dict[str, FigureFile]:
    """Every figure the trials have data for, by key (the file's stem)."""
    variants = _ordered_variants(groups)
    colors = _colors(variants)
    models = sorted(sizes, key=lambda m: (sizes[m]["params"] or math.inf, m))
    recorded = [t for t in trials if t.epochs]
    datasets = sorted({t.dataset for t in recorded})
    figures: dict[str, FigureFile] = {}

    def add(stem: str, caption: str, path: Path | None) -> None:
        if path is not None:
            figures[stem] = FigureFile(path, caption)

    def file(stem: str) -> Path:
        return figures_dir / f"{stem}.png"

    if labels:
        for dataset in datasets:
            stem = f"auc_vs_epoch_{_slug(dataset)}"
            add(stem, f"AUC vs epoch per method, {dataset}",
                plot_auc_vs_epoch(recorded, dataset, labels, sizes, colors, file(stem)))
        for dataset in sorted({g.dataset for g in groups if g.finished}):
            stem = f"auc_vs_model_size_{_slug(dataset)}"
            add(stem, f"AUC vs model size, {dataset}",
                plot_auc_vs_model_size(groups, dataset, labels, sizes, colors, file(stem)))
        if any(_finite(t.final.get("val/ppl")) for t in recorded):
            add("ppl_vs_auc", "Validation perplexity vs AUC, one point per trial",
                plot_ppl_vs_auc(recorded, labels, models, colors, file("ppl_vs_auc")))
        add("lora_placement_rank", "LoRA placement and rank", plot_lora(groups, labels, file("lora_placement_rank")))
        for dataset in datasets:
            for model in models:
                stem = f"roc_{_slug(dataset)}_{_slug(model)}"
                add(stem, f"ROC curves (log-log), {dataset}, {model}",
                    plot_roc(recorded, dataset, model, variants, file(stem)))
    for dataset in datasets:
        stem = f"duplication_{_slug(dataset)}"
        add(stem, f"Memorization vs duplication, {dataset}", plot_duplication(recorded, dataset, colors, file(stem)))
    return figures


# ---------------------------------------------------------------------------------------
# report.md, report.json, W&B
# ---------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as numbers and lists, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _with_nulls(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.astype(object).where(frame.notna(), None)


def _table_records(table: Table) -> list[dict[str, Any]]:
    return _with_nulls(table.data).to_dict("records")


def _trial_json(trial: Trial, sizes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": trial.name, "path": trial.path, "status": trial.status, "reason": trial.reason,
        "dataset": trial.dataset, "model": trial.model, "model_params": sizes[trial.model]["params"],
        "method": trial.method, "variant": trial.variant, "seed": trial.seed, "axes": trial.axes,
        "epochs_done": int(trial.final["epoch"]) if trial.final else None, "epochs_planned": trial.planned_epochs,
        "best_epoch": trial.best.get("epoch"), "final": trial.final, "best": trial.best,
        "attacks": {label: {"auc": a.auc, "tpr@1%fpr": a.tpr_1, "tpr@0.1%fpr": a.tpr_01, "auc_ci95": list(a.ci) if a.ci else None,
                            "best_epoch": {"auc": a.auc_best, "tpr@1%fpr": a.tpr_1_best, "tpr@0.1%fpr": a.tpr_01_best},
                            "roc": {"fpr": a.roc[0], "tpr": a.roc[1]} if a.roc is not None else None}
                    for label, a in trial.attacks.items()},
        "method_info": trial.method_info, "split_hash": trial.split_hash, "config": trial.config,
        "epochs": trial.epochs,
    }


def _group_json(group: Group, labels: list[str]) -> dict[str, Any]:
    stats = {}
    for key in group.metric_keys():
        mean, std, n = group.stat(key)
        stats[key] = {"mean": mean, "std": std, "n": n}
    best_mean, best_std, best_n = group.stat("val/ppl", best=True)
    return {
        "dataset": group.dataset, "model": group.model, "variant": group.variant, "method": group.method,
        "trials": [t.name for t in group.trials], "finished": [t.name for t in group.finished],
        "seeds": [t.seed for t in group.trials], "final": stats,
        "best_val_ppl": {"mean": best_mean, "std": best_std, "n": best_n},
        "auc_ci95": {label: group.auc_interval(label) for label in labels},
    }


def _counts(trials: list[Trial]) -> dict[str, int]:
    counts = {status: sum(t.status == status for t in trials) for status in STATUSES}
    return {status: count for status, count in counts.items() if count}


def _markdown(name: str, sweep_dir: Path, out_dir: Path, trials: list[Trial], tables: dict[str, Table],
              figures: dict[str, FigureFile], notes: list[str]) -> str:
    counts = ", ".join(f"{count} {status}" for status, count in _counts(trials).items())
    lines = [f"# Sweep report: {name}", "",
             f"{len(trials)} trials: {counts}. Sweep folder: `{sweep_dir}`. "
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
    lines.extend(["## Figures", ""])
    for figure in figures.values():
        lines.extend([f"![{figure.caption}]({figure.path.relative_to(out_dir).as_posix()})", ""])
    for key in ("lora", "extraction", "duplication", "trials", "attacks"):
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


def log_to_wandb(sweep_dir: Path, name: str, sweep: SweepConfig | None, figures: dict[str, FigureFile],
                 tables: dict[str, Table]) -> dict[str, Any]:
    """Log the figures and tables to a W&B run of job type "report" in the sweep's group,
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
                             name=f"{name}-report", dir=str(sweep_dir), mode=attempt,
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


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------


def build_report(sweep_dir: Path, out_dir: Path | None = None, *, wandb: bool = False,
                 bootstrap: int = BOOTSTRAP_RESAMPLES) -> Path:
    """Write the report of a sweep folder and return the path of its report.md.

    sweep_dir: a sweep folder (or any folder holding trial folders). out_dir: where to
    write (default `<sweep_dir>/report`; its figures/ and tables/ are replaced). wandb: also
    log the figures and tables to a W&B "report" run of the sweep's group. bootstrap:
    resamples for the AUC intervals (0: none). A folder that does not exist, or holds
    neither trial results nor a sweep.yaml, is a ConfigError.
    """
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise ConfigError(str(sweep_dir), "", "no such folder")
    out_dir = Path(out_dir).expanduser().resolve() if out_dir else sweep_dir / REPORT_DIR
    sweep, cells, problem = read_sweep_file(sweep_dir)
    trials = load_trials(sweep_dir, cells, skip=out_dir)
    if not trials:
        raise ConfigError(str(sweep_dir), "", "no trial results below this folder (no result.json) and no sweep.yaml")
    name = sweep.name if sweep is not None else sweep_dir.name
    notes = [problem] if problem else []
    mix = version_mix(trials)
    if mix:
        notes.append(mix)

    label_variants(trials)
    sizes = model_sizes(trials)
    approx = sorted(m for m, s in sizes.items() if s["source"] == "approx")
    if approx:
        notes.append(f"No trial of {', '.join(approx)} has loaded its model yet: its size is memray's approximation.")
    trials.sort(key=lambda t: _sort_key(t, sizes))
    for trial in trials:
        trial.attacks = attack_results(trial, sweep_dir, bootstrap)
    labels = list(dict.fromkeys(label for t in trials for label in t.attack_labels()))
    groups = make_groups(trials)

    tables = {"unfinished": unfinished_table(trials)}
    tables.update({t.name: t for t in method_by_model_tables(groups, labels, sizes)})
    tables["seeds"] = seeds_table(groups, labels, sizes)
    for table in (lora_table(groups, labels), extraction_table(trials), duplication_table(trials)):
        if table is not None:
            tables[table.name] = table
    tables["trials"] = trials_table(trials, labels)
    tables["attacks"] = attacks_table(trials)

    for stale in (out_dir / "figures", out_dir / "tables"):
        shutil.rmtree(stale, ignore_errors=True)  # figures of an earlier report that no longer apply
    figures = make_figures(trials, groups, labels, sizes, out_dir / "figures")
    if not labels:
        notes.append("No trial has recorded an epoch yet: no attack numbers or figures.")

    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    for table in tables.values():
        table.data.to_csv(tables_dir / f"{table.name}.csv", index=False)
        (tables_dir / f"{table.name}.md").write_text(f"# {table.title}\n\n{table.markdown()}\n")

    wandb_result = log_to_wandb(sweep_dir, name, sweep, figures, tables) if wandb else None
    report = {
        "sweep": {"name": name, "dir": str(sweep_dir), "sweep_file": sweep is not None,
                  "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bootstrap_resamples": bootstrap},
        "counts": _counts(trials), "notes": notes, "attacks": labels, "models": sizes,
        "trials": [_trial_json(t, sizes) for t in trials],
        "groups": [_group_json(g, labels) for g in groups],
        "tables": {key: _table_records(table) for key, table in tables.items()},
        "figures": {key: figure.path.relative_to(out_dir).as_posix() for key, figure in figures.items()},
        "wandb": wandb_result,
    }
    (out_dir / "report.json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False))
    path = out_dir / "report.md"
    path.write_text(_markdown(name, sweep_dir, out_dir, trials, tables, figures, notes))
    return path


def report_command(sweep_dir: str | Path, out_dir: str | Path | None = None) -> int:
    """`memray report SWEEP_DIR`: build the report (logging it to W&B when the sweep used
    W&B) and print where it is. Returns 0; bad input raises ConfigError (exit code 2)."""
    sweep_dir = Path(sweep_dir)
    path = build_report(sweep_dir, Path(out_dir) if out_dir else None,
                        wandb=sweep_dir.is_dir() and sweep_uses_wandb(sweep_dir))
    report = json.loads((path.parent / "report.json").read_text())
    counts = ", ".join(f"{count} {status}" for status, count in report["counts"].items())
    print(f"report: {path} ({len(report['trials'])} trials: {counts})")
    print(f"tables: {path.parent / 'tables'}/ (Markdown and CSV); figures: {path.parent / 'figures'}/; "
          f"every number: {path.parent / 'report.json'}")
    logged = report.get("wandb")
    if logged and logged.get("logged"):
        where = f"offline in {logged['dir']} (upload with `wandb sync {logged['dir']}`)" \
            if logged["mode"] == "offline" else "online"
        print(f"W&B: report run {logged['run_id']} {where}")
    elif logged:
        print(f"W&B: not logged ({logged.get('error')})", file=sys.stderr)
    return 0
