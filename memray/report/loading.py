"""Reading a sweep folder for the report: its trials (any folder holding a memray
`result.json`, and the pending cells of its sweep.yaml), their method labels and model
sizes, each attack's numbers with bootstrap intervals and ROC points, the groups of
trials that differ only in their seed, and the per-sample counterfactual memorization of
targets with reference models.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memray import methods
from memray.config import APPROX_PARAMS, Cell, ConfigError, SimilarityThresholds, SweepConfig
from memray.files import load_sweep
from memray.metric_keys import auc_labels, mia_prefix
from memray.metrics import TPR_AT_FPR, bootstrap_aucs, percentile_interval, roc_points
from memray.references import sweep_cells
from memray.results import (COUNTERFACTUAL_COLUMN, DRIVER_FILE, RESULT_FILE, SWEEP_FILE, config_key, driver_alive, scores_path,
                            table_path, trial_names)

#: The per-sample column of counterfactual memorization in a target's score files.
COUNTERFACTUAL = COUNTERFACTUAL_COLUMN
BOOTSTRAP_RESAMPLES = 1000  # percentile 95% bounds move by ~0.003 AUC between reruns at this count
ROC_POINTS = 400  # per curve in plots and report.json: enough to draw the low-FPR steps
STATUSES = ("success", "running", "failed", "interrupted", "lost", "pending")
#: Keys that are their own table columns, not part of a method label.
OWN_COLUMNS = ("seed", "output_dir", "data.split_seed", "model.name", "data.dataset")
#: Config sections compared as one value (a duplication setting is one level of the axis).
LEAF_SECTIONS = ("data.duplicates", "data.canaries", "attacks")


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
    ci: tuple[float, float] | None = None  # 95% interval of the AUC: the trial's own (auc_lo, auc_hi), else a bootstrap
    resampled: np.ndarray | None = None  # the bootstrap AUCs, for intervals of seed means
    roc: tuple[np.ndarray, np.ndarray] | None = None  # (FPR, TPR) points
    tpr_1_ci: tuple[float, float] | None = None  # Clopper-Pearson 95% interval of tpr_1 (None: not recorded)
    tpr_01_ci: tuple[float, float] | None = None

    @property
    def chance(self) -> bool:
        """Whether the AUC's interval holds 0.5: not distinguishable from chance."""
        return self.ci is not None and self.ci[0] <= 0.5 <= self.ci[1]

    @property
    def below_chance(self) -> bool:
        """Whether the AUC's interval lies wholly below 0.5: members score lower than non-members."""
        return self.ci is not None and self.ci[1] < 0.5

    def tpr_points(self) -> list[tuple[float, float, tuple[float, float] | None]]:
        """(FPR, TPR, the TPR's 95% interval or None) at each FPR of `TPR_AT_FPR` whose TPR
        the trial reported (result files older than the intervals have the TPR alone)."""
        found = zip((fpr for _, fpr in TPR_AT_FPR), (self.tpr_1, self.tpr_01), (self.tpr_1_ci, self.tpr_01_ci))
        return [(fpr, tpr, ci) for fpr, tpr, ci in found if is_finite(tpr)]


@dataclass
class Trial:
    """A trial folder (or a pending grid cell) as the report sees it."""

    name: str
    path: str  # relative to the sweep folder; "" for a pending cell
    status: str  # success, running, failed, interrupted, lost (running, with no driver alive) or pending
    reason: str | None
    config: dict[str, Any]
    axes: dict[str, Any]
    epochs: list[dict[str, Any]]
    method_info: dict[str, Any] = field(default_factory=dict)
    split_hash: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)  # python and packages that ran it
    attack_rules: dict[str, Any] = field(default_factory=dict)  # how the attacks were measured (result.json)
    split_audit: dict[str, Any] = field(default_factory=dict)  # members / non-members n-gram overlap (result.json)
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
        finite = [row for row in self.epochs if is_finite(row.get("val/ppl"))]
        return min(finite, key=lambda row: row["val/ppl"]) if finite else {}

    def attack_labels(self) -> list[str]:
        """Attacks in the order the trial reports them."""
        return auc_labels(self.final)

    def group_key(self) -> str:
        """Identity of the trial up to its seed (`memray.results.config_key`, the same as
        its W&B run's `config_key`): trials with equal keys are averaged."""
        return config_key(self.config)


def is_finite(value: Any) -> bool:
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
    """Trials of the folder, plus a pending entry for each grid cell that has no folder.
    Reference models of lira / rmia (a config with `reference`) are part of their target,
    not trials of their own."""
    sweep_dir = Path(sweep_dir)
    driver = sweep_dir / DRIVER_FILE
    alive = driver_alive(driver.read_text() if driver.is_file() else None)
    trials = []
    for trial_dir in find_trial_dirs(sweep_dir, skip):
        data = json.loads((trial_dir / RESULT_FILE).read_text())
        if data["config"].get("reference"):
            continue
        status = "lost" if data["status"] == "running" and not alive else data["status"]
        trials.append(Trial(
            name=trial_dir.name, path=str(trial_dir.relative_to(sweep_dir)), status=status,
            reason=data.get("reason"), config=data["config"], axes=data.get("axes") or {},
            epochs=sorted(data.get("epochs") or [], key=lambda row: row["epoch"]),
            method_info=data.get("method_info") or {}, split_hash=data.get("split_hash"),
            versions=_versions(data.get("provenance") or {}), attack_rules=data.get("attack_rules") or {},
            split_audit=data.get("split_audit") or {},
        ))
    names = trial_names(sweep_cells(cells)) if cells else {}  # the sweep's names: references included
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


def method_label(config: dict[str, Any]) -> str:
    """The method's label (`lora (attn, r8)`, `prefix`: its unit's `MethodSchema.label`)
    from a resolved trial config."""
    return methods.method_label(config.get("method", {}))


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
    covered = {"method.name", *OWN_COLUMNS,
               *(f"method.{key}" for name in methods.METHODS for key in methods.METHODS[name].config.label_keys)}
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
        if is_finite(info.get("total_params")):
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


def attack_results(trial: Trial, sweep_dir: Path, resamples: int) -> dict[str, AttackResult]:
    """Per attack: final AUC, its interval, TPRs and their intervals from result.json, AUC
    at the best epoch, and from the final epoch's per-sample scores (when the file is there)
    the bootstrap AUCs (the interval of a trial that recorded none) and the ROC."""
    final, best = trial.final, trial.best
    if not final:
        return {}
    scores = None
    path = scores_path(sweep_dir / trial.path, int(final["epoch"]))
    if path.is_file():
        scores = pd.read_parquet(path)
    results = {}
    for label in trial.attack_labels():
        key = mia_prefix(label)
        result = AttackResult(label, final[key + "auc"], final.get(key + "tpr@1%fpr", math.nan),
                              final.get(key + "tpr@0.1%fpr", math.nan), best.get(key + "auc", math.nan),
                              best.get(key + "tpr@1%fpr", math.nan), best.get(key + "tpr@0.1%fpr", math.nan))
        if scores is not None and label in scores:
            values = scores[label].to_numpy(dtype=float)
            member = scores["member"].to_numpy(dtype=bool)
            if np.isfinite(values).all() and member.any() and not member.all():
                if resamples:
                    result.resampled = bootstrap_aucs(values, member, resamples, _bootstrap_seed(trial.name, label))
                    result.ci = percentile_interval(result.resampled)
                result.roc = roc_points(values, member, max_points=ROC_POINTS)
        if is_finite(final.get(key + "auc_lo")) and is_finite(final.get(key + "auc_hi")):
            result.ci = (final[key + "auc_lo"], final[key + "auc_hi"])  # what the trial measured (DeLong by default)
        result.tpr_1_ci, result.tpr_01_ci = (_recorded_interval(final, key + suffix) for suffix, _ in TPR_AT_FPR)
        results[label] = result
    return results


def _recorded_interval(row: dict[str, Any], key: str) -> tuple[float, float] | None:
    """(`<key>_lo`, `<key>_hi`) of an epoch row, or None where the trial recorded none."""
    low, high = row.get(key + "_lo"), row.get(key + "_hi")
    return (low, high) if is_finite(low) and is_finite(high) else None


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

    @property
    def config_key(self) -> str:
        """The configuration's key (`memray.results.config_key`, its W&B runs' `config_key`)."""
        return self.trials[0].group_key()

    def stat(self, key: str, best: bool = False) -> tuple[float, float, int]:
        """(mean, between-seed sample standard deviation (ddof=1), n) of a final-epoch metric
        (or the best epoch's) over the finished trials that have it; NaN where none has it,
        std NaN for a single trial."""
        values = [(t.best if best else t.final).get(key) for t in self.finished]
        values = [v for v in values if is_finite(v)]
        if not values:
            return math.nan, math.nan, 0
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        return float(np.mean(values)), std, len(values)

    def auc_interval(self, label: str) -> tuple[float, float] | None:
        """Bootstrap interval of the seed-mean AUC: percentiles of the per-resample means."""
        samples = [t.attacks[label].resampled for t in self.finished if label in t.attacks]
        if not samples or any(s is None for s in samples) or len(samples) != len(self.finished):
            return None
        return percentile_interval(np.mean(np.vstack(samples), axis=0))

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


def counterfactual_samples(trial: Trial, sweep_dir: Path) -> pd.DataFrame | None:
    """A trial's per-sample counterfactual memorization at its final epoch, from the score
    file of that epoch (`scores/epoch_NNN.parquet` of the trial folder below `sweep_dir`).

    Returns columns sample_id, member, copies, counterfactual, and where extraction ran
    that epoch (`scores/extraction_epoch_NNN.parquet`) `extracted` (the continuation
    reproduced exactly) and `best similarity` (the highest of the sample's similarity
    scores, rougeL / bleu / edit, each in [0, 1]), NaN for the samples it did not try. None
    when the final epoch is 0 or its file has no counterfactual column (no reference
    models, or a result written before them).
    """
    final = trial.final
    if not final or int(final["epoch"]) < 1:
        return None
    trial_dir, epoch = Path(sweep_dir) / trial.path, int(final["epoch"])
    path = scores_path(trial_dir, epoch)
    if not path.is_file():
        return None
    scores = pd.read_parquet(path)
    if COUNTERFACTUAL not in scores:
        return None
    samples = scores[["sample_id", "member", "copies", COUNTERFACTUAL]].copy()
    extraction = table_path(trial_dir, "extraction", epoch)
    if extraction.is_file():
        rows = pd.read_parquet(extraction)
        similarities = [name for name in SimilarityThresholds.model_fields if name in rows]
        tried = pd.DataFrame({"sample_id": rows["sample_id"], "member": rows["member"],
                              "extracted": rows["exact"].astype(float),
                              "best similarity": rows[similarities].max(axis=1) if similarities else math.nan})
        samples = samples.merge(tried, on=["sample_id", "member"], how="left")
    return samples
