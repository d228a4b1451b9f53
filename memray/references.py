"""The reference models of a target trial's lira / rmia attacks, and the scores they give.

A target whose attacks list `lira` or `rmia` (`{name: lira, references: 8}`) needs that many
reference models (an even number, at least 4): trials with the target's model, method, data
and training, each trained like the target. Reference i trains on its half of the target's
audit pool (its scored members and non-members; the complementary halves of
`memray.reference_attacks.half_masks`, so each audit sample is in exactly half of them),
topped up from the dataset's samples outside the pool to as many training texts as the
target (`memray.data.reference_split`), with a seed of its own for initialization and data
order (`TrialConfig.reference_sections`), and scores the whole pool every epoch. A
reference's config is the target's with `reference: {index, of, seed}` set and `loss` as
its only attack, so references do not depend on the target's other attacks.

`memray trial` trains them in process after the target (`run_references`, in
`<target folder>/references/`). In a sweep they are trials of their own (`sweep_cells`:
cells after the grid's, scheduled by Ray like any trial, each trained once for all the
targets that share it), and the driver completes each target once it and its references
have finished (`memray.sweep.completion`). Either way `add_reference_attacks` reads every
epoch's per-sample `nll` of the target and the references and adds to the target's
result.json and per-sample files, for every epoch after the first (epoch 0's target is the
base model), each label from its own scorer in the attack registry
(`memray.attacks.AttackSpec.reference_scorers`: `lira`, `lira-offline`, `rmia`,
`rmia-offline`), and the counterfactual memorization of every audit sample. A target is
rescored when its references' trial ids or results change, or the reference attacks' rules
(`memray.reference_attacks.REFERENCE_RULES`) do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memray import metrics, reference_attacks
from memray.attacks import ATTACKS
from memray.config import AttackConfig, Cell, TrialConfig
from memray.files import validate_trial
from memray.metric_keys import mia_prefix
from memray.results import COUNTERFACTUAL_COLUMN, TRIALS_DIR, TrialRecord, scores_path, write_scores

REFERENCES_DIR = "references"


def reference_configs(config: TrialConfig) -> list[TrialConfig]:
    """The reference models a target needs (none when no attack asks for any)."""
    raw = config.resolved()
    raw.update(attacks=[AttackConfig(name="loss").model_dump(mode="json")], reference=None)
    raw["extraction"]["enabled"] = False  # references are scored, never prompted
    return [validate_trial({**raw, "reference": section.model_dump()}, "reference model")
            for section in config.reference_sections()]


def reference_cells(cells: list[Cell]) -> list[Cell]:
    """The reference models the grid's lira / rmia targets need, as cells of their own after
    the grid's (index len(cells) + j), each once: targets whose references are the same
    trials (they differ only in attacks or extraction) share them. A reference's axes are
    its first target's (less attacks and extraction) and `reference`, its index."""
    found: list[Cell] = []
    seen: set[str] = set()
    for cell in cells:
        axes = {key: value for key, value in cell.axes.items()
                if key.split(".")[0] not in ("attacks", "extraction")}
        for reference in reference_configs(cell.config):
            if reference.trial_id() in seen:
                continue
            seen.add(reference.trial_id())
            found.append(Cell(index=len(cells) + len(found), axes={**axes, "reference": reference.reference.index},
                              config=reference))
    return found


def sweep_cells(cells: list[Cell]) -> list[Cell]:
    """Every trial of a sweep: its grid cells, then their reference models."""
    grid = [cell for cell in cells if cell.config.reference is None]
    return grid + reference_cells(grid)


def references_of(cells: list[Cell]) -> dict[int, list[int]]:
    """Target cell index -> the indices of its reference cells, in reference order, for
    every target of `cells` (a sweep's cells, references included)."""
    by_id = {cell.config.trial_id(): cell.index for cell in cells if cell.config.reference is not None}
    return {cell.index: [by_id[r.trial_id()] for r in reference_configs(cell.config)]
            for cell in cells if cell.config.reference is None and cell.config.reference_models()}


def reference_dir(trial_dir: Path, reference: TrialConfig) -> Path:
    """Where a reference of an in-process target lives: `<target>/references/ref<index>`."""
    return Path(trial_dir) / REFERENCES_DIR / f"ref{reference.reference.index:02d}"


def run_references(config: TrialConfig, trial_dir: Path, *, resume: bool = True, cache_dir: Path | None = None,
                   progress: bool = True) -> list[Path]:
    """Train every reference model of `config` in this process (each resumes like a trial);
    return their folders."""
    from memray.trial import run_trial  # torch only when references are trained

    folders = []
    for reference in reference_configs(config):
        folder = reference_dir(trial_dir, reference)
        run_trial(reference, trial_dir=folder, resume=resume, cache_dir=cache_dir, progress=progress)
        folders.append(folder)
    return folders


#: Metric keys the references add to a target's epoch rows besides each label's `mia/` metrics
COUNTERFACTUAL_MEAN = "mem/counterfactual/mean"
#: Samples of highest counterfactual memorization kept per epoch in result.json
COUNTERFACTUAL_TOP = 20


def _scorers(config: TrialConfig) -> dict[str, reference_attacks.ReferenceScorer]:
    """label -> its scorer, for every reference attack of the target."""
    return {attack.label + suffix: scorer for attack in config.attacks
            for suffix, scorer in ATTACKS[attack.name].reference_scorers.items()}


def _aligned(target: pd.DataFrame, references: list[pd.DataFrame]) -> tuple[np.ndarray, np.ndarray]:
    """The references' (R, n) nll and in-mask in the target's row order."""
    ids = target["sample_id"].to_numpy()
    aligned = [frame.set_index("sample_id").loc[ids] for frame in references]
    losses = np.vstack([frame["nll"].to_numpy(dtype=float) for frame in aligned])
    in_mask = np.vstack([frame["member"].to_numpy(dtype=bool) for frame in aligned])
    return losses, in_mask


def reference_scores(config: TrialConfig, target_loss: np.ndarray, losses: np.ndarray, in_mask: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], dict[str, str]]:
    """One epoch's reference attacks from the per-sample `nll` of the target (n,) and of
    the references (R, n), with in_mask (R, n) saying which samples each trained on
    (`_aligned`). Returns (label -> scores, label -> the rules its scorer used, label -> why
    it was left out where the references cannot support it)."""
    scores: dict[str, np.ndarray] = {}
    rules: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    for label, scorer in _scorers(config).items():
        try:
            found = scorer(target_loss, losses, in_mask)
        except reference_attacks.DegenerateStatistic as err:
            left_out[label] = str(err)
            continue
        scores[label], rules[label] = found.scores, found.rules
    return scores, rules, left_out


def _strip(row: dict[str, Any], labels: list[str]) -> None:
    """Remove what an earlier completion added to an epoch row (these labels' metrics and
    the counterfactual mean), so that a rescoring leaves no stale number."""
    prefixes = tuple(mia_prefix(label) for label in labels)
    for key in [key for key in row if key.startswith(prefixes) or key == COUNTERFACTUAL_MEAN]:
        del row[key]


def add_reference_attacks(config: TrialConfig, trial_dir: Path, reference_dirs: list[Path],
                          reference_results: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """For every epoch after epoch 0 that the target and all its references have scored:
    the reference attacks' scores and the counterfactual memorization into the target's
    per-sample file, their metrics (AUC with its interval, resolved TPRs) and the mean
    counterfactual memorization into its result.json, with what they rest on under
    `reference_models` and the samples of highest counterfactual memorization under
    `counterfactual_top`. reference_results: the references' result.json (read from their
    folders when not given). Returns the target's epochs as updated."""
    record = TrialRecord.open(trial_dir)
    if reference_results is None:
        reference_results = [TrialRecord.open(folder).data for folder in reference_dirs]
    labels = list(_scorers(config))
    per_epoch: dict[str, Any] = {}
    top: dict[str, list[dict[str, Any]]] = {}
    for row in record.epochs:
        epoch = int(row["epoch"])
        _strip(row, labels)
        paths = [scores_path(folder, epoch) for folder in reference_dirs]
        target_path = scores_path(trial_dir, epoch)
        if epoch == 0 or not target_path.is_file() or not all(path.is_file() for path in paths):
            continue
        target = pd.read_parquet(target_path).drop(columns=[*labels, COUNTERFACTUAL_COLUMN], errors="ignore")
        frames = [pd.read_parquet(path) for path in paths]
        losses, in_mask = _aligned(target, frames)
        found, rules, left_out = reference_scores(config, target["nll"].to_numpy(dtype=float), losses, in_mask)
        member = target["member"].to_numpy(dtype=bool)
        for label, values in found.items():
            row.update(metrics.mia_metrics(label, values, member, config.eval.bootstrap, config.seed))
            target[label] = values
        memorized = reference_attacks.counterfactual(losses, in_mask)
        target[COUNTERFACTUAL_COLUMN] = memorized
        row[COUNTERFACTUAL_MEAN] = float(memorized.mean())
        top[str(epoch)] = _highest(target, memorized)
        per_epoch[str(epoch)] = {"rules": rules, **({"left_out": left_out} if left_out else {})}
        write_scores(trial_dir, epoch, target)
    if record.epochs:
        record.data["final"] = record.epochs[-1]
    record.data["counterfactual_top"] = top
    record.data.setdefault("attack_rules", {})["reference_attacks"] = reference_attacks.REFERENCE_RULES
    record.update(reference_models={"count": len(reference_dirs), "folders": reference_folders(trial_dir, reference_dirs),
                                    "fingerprints": reference_fingerprints(reference_results),
                                    "rules": reference_attacks.REFERENCE_RULES, "epochs": per_epoch})
    return record.epochs


def _highest(target: pd.DataFrame, memorized: np.ndarray) -> list[dict[str, Any]]:
    """The COUNTERFACTUAL_TOP samples of highest counterfactual memorization, highest first."""
    order = np.argsort(-memorized, kind="stable")[:COUNTERFACTUAL_TOP]
    copies = target["copies"].to_numpy() if "copies" in target else np.zeros(len(target), dtype=int)
    return [{"sample_id": str(target["sample_id"].iloc[i]), "counterfactual": float(memorized[i]),
             "member": bool(target["member"].iloc[i]), "copies": int(copies[i])} for i in order]


def reference_folders(trial_dir: Path, reference_dirs: list[Path]) -> list[str]:
    """The reference folders as result.json records them: relative to the target's folder."""
    return [os.path.relpath(Path(folder).resolve(), Path(trial_dir).resolve()) for folder in reference_dirs]


def reference_fingerprints(reference_results: list[dict[str, Any]]) -> list[str]:
    """What identifies the references a target was scored with: each one's trial id and
    the time it finished (a reference trained again in the same folder finishes anew)."""
    return [f"{result.get('trial_id')}@{result.get('finished')}" for result in reference_results]


def has_reference_attacks(result: dict[str, Any], trial_dir: Path, reference_dirs: list[Path],
                          reference_results: list[dict[str, Any]]) -> bool:
    """Whether a target's result.json holds the reference attacks of these reference models
    (their folders, trial ids and results) under today's rules."""
    recorded = result.get("reference_models") or {}
    return (recorded.get("folders") == reference_folders(trial_dir, reference_dirs)
            and recorded.get("fingerprints") == reference_fingerprints(reference_results)
            and recorded.get("rules") == reference_attacks.REFERENCE_RULES)


def reference_attack_state(results: list[dict[str, Any]], names: list[str]) -> str:
    """Where a target of a sweep stands with its lira / rmia, from result.json files alone:
    `results` and `names` (trial folder names) of the target, then its reference models in
    order. "pending": the target has not succeeded; "waiting": a reference model has not;
    "missing": all have, but the target's result.json lacks their attacks (or holds those of
    references since trained again, or of other rules: `has_reference_attacks`); "complete"."""
    if results[0].get("status") != "success":
        return "pending"
    if not all(result.get("status") == "success" for result in results[1:]):
        return "waiting"
    trials = Path(TRIALS_DIR)
    if not has_reference_attacks(results[0], trials / names[0], [trials / name for name in names[1:]], results[1:]):
        return "missing"
    return "complete"


def complete_target(config: TrialConfig, trial_dir: Path, final: dict[str, Any], *, resume: bool = True,
                    cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """After a target trial: train its reference models (none needed: `final` unchanged)
    and add lira / rmia to its epochs; return its final epoch's metrics."""
    if not config.reference_models():
        return final
    folders = run_references(config, trial_dir, resume=resume, cache_dir=cache_dir, progress=progress)
    return dict(add_reference_attacks(config, trial_dir, folders)[-1])
