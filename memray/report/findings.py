"""The studies' findings, decided from a sweep's results: the report's "Findings" table.

Each row states a claim of Hou et al. 2025 (arXiv 2507.00258) or Wang & Li 2025 (arXiv
2506.20856) that the sweep's grid can test, memray's numbers for it, and whether it holds
there. Nothing in the table is written by hand: `FINDINGS` lists the claims and the rule
that decides each; the numbers come from the trials' per-sample score files.

The rules, the same for every row:
- Trials: the successful ones. A *setting* is a (model, dataset); a *replicate* is the
  trials of a setting that share one split (the same seed and data section, so the same
  scored members and non-members, checked by sample id). Seeds are replicates.
- Epoch: the final one, i.e. the last epoch every trial of the setting recorded.
- Attacks: LOSS and Ref (`FINDING_ATTACKS`), a row each, where the trials ran them.
- A method's family (parameter- or prompt-based) is its registry entry's
  (`memray.methods.METHOD_FAMILIES`); a family's AUC is the mean over its trials.
- Numbers: in each replicate the compared AUCs come from the same samples, so they are
  tested as correlated AUCs: DeLong's covariance (`memray.metrics.delong_covariance`)
  gives the variance of each side and of their difference. Over several replicates the
  estimate is their mean and its variance the sum of theirs / R² (independent splits).
  Intervals are 95% normal ones.
- Verdict: *holds* when the difference's interval lies above 0, *does not hold* when it
  lies below 0, *inconclusive* when it holds 0. "Stays near chance" holds when the AUC's
  interval lies within `CHANCE_MARGIN` of 0.5, does not hold when it lies wholly outside
  that band, and is inconclusive otherwise.
- Duplication (Wang & Li): per trial with duplicated members and extraction, the mean
  ROUGE-L of duplicated members' greedy continuations less that of single-copy members
  (the final epoch's extraction rows); full fine-tuning's effect less LoRA's. Its interval
  takes the trials as independent (they share samples, so it is conservative).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import stats

from memray.methods import METHODS
from memray.methods.full import FullMethod
from memray.methods.lora import PLACEMENT_ORDER, LoraMethod
from memray.metrics import delong_covariance
from memray.report.loading import Trial
from memray.report.tables import Table
from memray.results import SCORES_DIR, scores_path

HOU = "Hou et al. 2025 (arXiv 2507.00258)"
WANG = "Wang & Li 2025 (arXiv 2506.20856)"
FINDING_ATTACKS = ("loss", "ref")  # the attacks both studies report; other attacks are in the other tables
CHANCE_MARGIN = 0.1  # "near chance": an AUC interval within 0.5 +/- this
LEVEL = 0.95
TIE = 1e-9  # a difference smaller than this (float rounding of a weighted mean) is no difference
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))
FULL = FullMethod.model_fields["name"].default
LORA = LoraMethod.model_fields["name"].default
#: The extraction rows' relaxed similarity the duplication finding uses (generated vs true suffix).
EXTRACTION_SIMILARITY = "rougeL"
HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"

#: (trial, epoch, weight of side A, weight of side B): one score column of a contrast.
Entry = tuple[Trial, int, float, float]


def family(trial: Trial) -> str | None:
    """The trial's method family from the method registry (None for an unknown method)."""
    return METHODS[trial.method].family if trial.method in METHODS else None


def _mean_weights(trials: list[Trial], epoch: int, side: int) -> list[Entry]:
    weight = 1.0 / len(trials)
    return [(t, epoch, weight if side == 0 else 0.0, weight if side == 1 else 0.0) for t in trials]


def _families(replicate: list[Trial], epoch: int) -> list[Entry] | None:
    parameter = [t for t in replicate if family(t) == "parameter-based"]
    prompt = [t for t in replicate if family(t) == "prompt-based"]
    if not parameter or not prompt:
        return None
    return _mean_weights(parameter, epoch, 0) + _mean_weights(prompt, epoch, 1)


def _parameter_rises(replicate: list[Trial], epoch: int) -> list[Entry] | None:
    parameter = [t for t in replicate if family(t) == "parameter-based"]
    if not parameter or epoch < 2:
        return None
    return _mean_weights(parameter, epoch, 0) + _mean_weights(parameter, 1, 1)


def _prompt_at_chance(replicate: list[Trial], epoch: int) -> list[Entry] | None:
    prompt = [t for t in replicate if family(t) == "prompt-based"]
    return _mean_weights(prompt, epoch, 0) if prompt else None


def _full_over_lora(replicate: list[Trial], epoch: int) -> list[Entry] | None:
    full = [t for t in replicate if t.method == FULL]
    lora = [t for t in replicate if t.method == LORA]
    if not full or not lora:
        return None
    return _mean_weights(full, epoch, 0) + _mean_weights(lora, epoch, 1)


def _placement_above(lower: str, higher: str) -> Callable[[list[Trial], int], list[Entry] | None]:
    """LoRA with `higher` against LoRA with `lower`, among trials whose method settings differ
    only in their placement (each such group weighted alike)."""
    def entries(replicate: list[Trial], epoch: int) -> list[Entry] | None:
        groups: dict[str, dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
        for trial in replicate:
            if trial.method == LORA:
                rest = {k: v for k, v in trial.config["method"].items() if k != "placement"}
                groups[json.dumps(rest, sort_keys=True, default=str)][trial.config["method"].get("placement")].append(trial)
        paired = [g for g in groups.values() if g.get(lower) and g.get(higher)]
        if not paired:
            return None
        found: list[Entry] = []
        for group in paired:
            found += [(t, e, a / len(paired), b / len(paired)) for t, e, a, b in
                      _mean_weights(group[higher], epoch, 0) + _mean_weights(group[lower], epoch, 1)]
        return found
    return entries


@dataclass(frozen=True)
class Finding:
    """A claim of the studies and the rule that decides it from a replicate's trials."""

    key: str
    claim: str
    source: str
    sides: tuple[str, str]  # what side A and side B are, in words ("" for a one-sided claim)
    entries: Callable[[list[Trial], int], list[Entry] | None]
    needs: str  # what the grid must have for the finding to be testable
    chance: bool = False  # decided by the "near chance" band, not by a difference
    epoch_rule: str = "final epoch"


FINDINGS: tuple[Finding, ...] = (
    Finding("families", "Parameter-based methods memorize more than prompt-based ones", HOU,
            ("parameter-based", "prompt-based"), _families,
            "methods of both families on one split"),
    Finding("parameter_rises", "Parameter-based methods' AUC rises with epochs", HOU,
            ("final epoch", "epoch 1"), _parameter_rises,
            "parameter-based methods trained for 2 or more epochs", epoch_rule="epoch 1 vs final epoch"),
    Finding("prompt_near_chance", "Prompt-based methods' AUC stays near chance", HOU,
            ("prompt-based", ""), _prompt_at_chance, "prompt-based methods", chance=True),
    Finding("lora_below_full", "LoRA memorizes less than full fine-tuning", WANG,
            ("full", "LoRA"), _full_over_lora, "full fine-tuning and LoRA on one split"),
    *(Finding(f"placement_{higher}_over_{lower}",
              f"LoRA on {higher} memorizes more than LoRA on {lower}", HOU,
              (f"LoRA {higher}", f"LoRA {lower}"), _placement_above(lower, higher),
              f"LoRA on {lower} and on {higher}, otherwise alike")
      for lower, higher in zip(PLACEMENT_ORDER, PLACEMENT_ORDER[1:])),
)
DUPLICATION_CLAIM = "Duplication raises full fine-tuning's extraction more than LoRA's"


@dataclass
class Estimate:
    """A side or a difference over replicates: the mean and its variance."""

    value: float
    variance: float

    @property
    def interval(self) -> tuple[float, float]:
        half = Z * math.sqrt(max(self.variance, 0.0))
        return self.value - half, self.value + half

    def text(self, signed: bool = False) -> str:
        low, high = self.interval
        fmt = "{:+.3f}" if signed else "{:.3f}"
        return f"{fmt.format(self.value)} [{fmt.format(low)}, {fmt.format(high)}]"


def _combine(parts: list[tuple[float, float]]) -> Estimate:
    return Estimate(float(np.mean([v for v, _ in parts])), float(sum(var for _, var in parts)) / len(parts) ** 2)


class ScoreFiles:
    """Per-sample score files of the sweep's trials, read once each."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = Path(sweep_dir)
        self.frames: dict[tuple[str, int, str], pd.DataFrame | None] = {}

    def frame(self, trial: Trial, epoch: int, kind: str = "") -> pd.DataFrame | None:
        key = (trial.path, epoch, kind)
        if key not in self.frames:
            folder = self.sweep_dir / trial.path
            path = (folder / SCORES_DIR / f"{kind}_epoch_{epoch:03d}.parquet") if kind else scores_path(folder, epoch)
            self.frames[key] = pd.read_parquet(path) if path.is_file() else None
        return self.frames[key]


def _contrast(files: ScoreFiles, entries: list[Entry], label: str) -> dict[str, tuple[float, float]] | None:
    """Side A, side B and A - B in one replicate, with DeLong variances; None when a score
    file or column is missing or the trials did not score the same samples."""
    columns, reference = [], None
    for trial, epoch, _, _ in entries:
        frame = files.frame(trial, epoch)
        if frame is None or label not in frame.columns:
            return None
        frame = frame.set_index("sample_id")
        if reference is None:
            reference = frame["member"]
        elif not frame.index.equals(reference.index) or not frame["member"].equals(reference):
            return None
        columns.append(frame[label].to_numpy(np.float64))
    aucs, covariance = delong_covariance(np.column_stack(columns), reference.to_numpy(bool))
    side_a = np.array([a for _, _, a, _ in entries])
    side_b = np.array([b for _, _, _, b in entries])
    difference = side_a - side_b
    return {name: (float(w @ aucs), float(w @ covariance @ w))
            for name, w in (("a", side_a), ("b", side_b), ("difference", difference))}


def _verdict(estimate: Estimate, chance: bool) -> str:
    low, high = estimate.interval
    if chance:
        if 0.5 - CHANCE_MARGIN <= low and high <= 0.5 + CHANCE_MARGIN:
            return HOLDS
        return FAILS if low > 0.5 + CHANCE_MARGIN or high < 0.5 - CHANCE_MARGIN else INCONCLUSIVE
    return HOLDS if low > TIE else FAILS if high < -TIE else INCONCLUSIVE


def _settings(trials: list[Trial]) -> dict[tuple[str, str], tuple[int, list[list[Trial]]]]:
    """(model, dataset) -> (the final epoch every trial recorded, the replicates)."""
    done = [t for t in trials if t.status == "success" and t.epochs]
    settings: dict[tuple[str, str], dict[str, list[Trial]]] = defaultdict(lambda: defaultdict(list))
    for trial in done:
        split = json.dumps([trial.seed, trial.config.get("data")], sort_keys=True, default=str)
        settings[(trial.model, trial.dataset)][split].append(trial)
    found = {}
    for key, splits in settings.items():
        members = [t for group in splits.values() for t in group]
        found[key] = (min(int(t.final["epoch"]) for t in members), list(splits.values()))
    return found


def _row(finding_claim: str, source: str, measure: str, epochs: str, setting: tuple[str, str], replicates: int,
         sides: tuple[str, str], a: Estimate, b: Estimate | None, difference: Estimate | None,
         verdict: str) -> dict[str, Any]:
    model, dataset = setting
    return {"finding": finding_claim, "source": source, "measure": measure, "epochs": epochs,
            "model": model, "dataset": dataset, "replicates": replicates,
            "side_a": sides[0], "a": a.value, "a_lo": a.interval[0], "a_hi": a.interval[1],
            "side_b": sides[1] or None, "b": b.value if b else None,
            "b_lo": b.interval[0] if b else None, "b_hi": b.interval[1] if b else None,
            "difference": difference.value if difference else None,
            "difference_lo": difference.interval[0] if difference else None,
            "difference_hi": difference.interval[1] if difference else None,
            "verdict": verdict,
            "numbers": (f"{sides[0]} {a.text()}" + (f" vs {sides[1]} {b.text()}; difference "
                                                     f"{difference.text(signed=True)}" if b and difference else ""))}


def _duplication_rows(files: ScoreFiles, settings: dict[tuple[str, str], tuple[int, list[list[Trial]]]]) -> list[dict[str, Any]]:
    rows = []
    for setting, (epoch, replicates) in settings.items():
        parts: dict[str, list[tuple[float, float]]] = {"a": [], "b": [], "difference": []}
        for replicate in replicates:
            effects: dict[str, list[tuple[float, float]]] = {FULL: [], LORA: []}
            for trial in replicate:
                if trial.method not in effects or not trial.config.get("data", {}).get("duplicates"):
                    continue
                frame = files.frame(trial, epoch, "extraction")
                if frame is None or EXTRACTION_SIMILARITY not in frame.columns:
                    continue
                members = frame[frame["member"].astype(bool)]
                duplicated = members.loc[members["copies"] > 1, EXTRACTION_SIMILARITY].to_numpy(np.float64)
                single = members.loc[members["copies"] == 1, EXTRACTION_SIMILARITY].to_numpy(np.float64)
                if len(duplicated) < 2 or len(single) < 2:
                    continue
                effects[trial.method].append((duplicated.mean() - single.mean(),
                                              duplicated.var(ddof=1) / len(duplicated) + single.var(ddof=1) / len(single)))
            if not effects[FULL] or not effects[LORA]:
                continue
            sides = [(np.mean([v for v, _ in effects[m]]), sum(var for _, var in effects[m]) / len(effects[m]) ** 2)
                     for m in (FULL, LORA)]
            parts["a"].append(sides[0])
            parts["b"].append(sides[1])
            parts["difference"].append((sides[0][0] - sides[1][0], sides[0][1] + sides[1][1]))
        if parts["difference"]:
            a, b, difference = (_combine(parts[k]) for k in ("a", "b", "difference"))
            rows.append(_row(DUPLICATION_CLAIM, WANG, f"extraction {EXTRACTION_SIMILARITY}: duplicated - single members",
                             f"final epoch ({epoch})", setting, len(parts["difference"]), ("full", "LoRA"),
                             a, b, difference, _verdict(difference, chance=False)))
    return rows


def decide_findings(trials: list[Trial], sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every finding the sweep's trials can test, decided: (rows, the claims not testable
    on this grid with what they need). A row holds the claim, its source, the measure and
    epochs, the setting, the replicates, each side's estimate and the difference with 95%
    intervals, the verdict, and `numbers` (the same as text)."""
    files = ScoreFiles(sweep_dir)
    settings = _settings(trials)
    rows, untestable = [], []
    for finding in FINDINGS:
        found = False
        for setting, (epoch, replicates) in settings.items():
            for label in FINDING_ATTACKS:
                parts: dict[str, list[tuple[float, float]]] = {"a": [], "b": [], "difference": []}
                for replicate in replicates:
                    entries = finding.entries(replicate, epoch)
                    contrast = _contrast(files, entries, label) if entries else None
                    if contrast is not None:
                        for key in parts:
                            parts[key].append(contrast[key])
                if not parts["a"]:
                    continue
                found = True
                a, b, difference = (_combine(parts[k]) for k in ("a", "b", "difference"))
                epochs = finding.epoch_rule.replace("final epoch", f"final epoch ({epoch})")
                rows.append(_row(finding.claim, finding.source, f"{label} AUC", epochs, setting, len(parts["a"]),
                                 finding.sides, a, None if finding.chance else b,
                                 None if finding.chance else difference,
                                 _verdict(a if finding.chance else difference, finding.chance)))
        if not found:
            untestable.append(f"{finding.claim}, {finding.source}: needs {finding.needs}")
    duplication = _duplication_rows(files, settings)
    rows += duplication
    if not duplication:
        untestable.append(f"{DUPLICATION_CLAIM}, {WANG}: needs full fine-tuning and LoRA trials with "
                          "data.duplicates and extraction enabled")
    return rows, untestable


def findings_table(trials: list[Trial], sweep_dir: Path) -> Table | None:
    """The "Findings" table of report.md (None when no finding is testable on the sweep)."""
    rows, untestable = decide_findings(trials, sweep_dir)
    if not rows:
        return None
    data = pd.DataFrame(rows)
    text = pd.DataFrame({
        "finding": data["finding"], "source": data["source"], "attack, epochs": data["measure"] + ", " + data["epochs"],
        "model, dataset": data["model"] + ", " + data["dataset"], "seeds": data["replicates"].astype(str),
        "memray (95% intervals)": data["numbers"], "verdict": data["verdict"]})
    note = (f"Each claim decided from this sweep's per-sample scores: a paired test of the AUCs on the shared "
            f"split (DeLong's covariance of correlated AUCs), averaged over seeds; holds / does not hold when "
            f"the difference's {LEVEL:.0%} interval lies above / below 0, inconclusive when it holds 0; near "
            f"chance: the interval within 0.5 +/- {CHANCE_MARGIN:g}. The rules: `memray/report/findings.py`.")
    if untestable:
        note += " Not testable on this grid: " + "; ".join(untestable) + "."
    return Table("findings", "Findings of the studies on this sweep", data, text, note)
