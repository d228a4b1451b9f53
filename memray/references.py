"""The reference models of a target trial's lira / rmia attacks, and the scores they give.

A target whose attacks list `lira` or `rmia` (`{name: lira, references: 8}`) needs that many
reference models: trials with the target's model, method, data and training, each trained
on a seeded half of the target's audit pool (its scored members and non-members; the
halves of `memray.reference_attacks.half_masks`), scoring the whole pool every epoch. A
reference's config is the target's with `reference: {index, of}` set and `loss` as its only
attack, so references do not depend on the target's other attacks.

`memray trial` trains them in process after the target (`run_references`, in
`<target folder>/references/`). In a sweep they are trials of their own (`sweep_cells`:
cells after the grid's, scheduled by Ray like any trial, each trained once for all the
targets that share it), and the driver completes each target once it and its references
have finished (`memray.sweep.completion`). Either way `add_reference_attacks` reads every
epoch's per-sample `nll` of the target and the references and adds to the target's
result.json and per-sample files, per epoch, under the usual metric names:
- `lira` (online) and `lira-offline`: Gaussian fits of the references' logit-scaled
  confidence (`memray.reference_attacks.logit_confidence` of the mean token loss);
- `rmia` (online, gamma 1, Pr(x) = the mean over all references) and `rmia-offline` (out
  references only, a = 0.3), with the audit pool as the population z.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memray import metrics, reference_attacks
from memray.config import AttackConfig, Cell, ReferenceConfig, TrialConfig, validate_trial
from memray.results import TrialRecord, scores_path, write_scores

REFERENCES_DIR = "references"


def reference_configs(config: TrialConfig) -> list[TrialConfig]:
    """The reference models a target needs (none when no attack asks for any)."""
    count = config.reference_models()
    raw = config.resolved()
    raw.update(attacks=[AttackConfig(name="loss").model_dump(mode="json")], reference=None)
    raw["extraction"]["enabled"] = False  # references are scored, never prompted
    return [validate_trial({**raw, "reference": ReferenceConfig(index=i, of=count).model_dump()}, "reference model")
            for i in range(count)]


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


def _labels(config: TrialConfig) -> list[str]:
    return [label for a in config.attacks if a.references is not None for label in a.labels]


def reference_scores(config: TrialConfig, target: pd.DataFrame, references: list[pd.DataFrame]) -> dict[str, np.ndarray]:
    """label -> scores of the target's samples (in `target`'s row order) from one epoch's
    per-sample `nll` of the target and of each reference (whose `member` column says which
    samples it trained on)."""
    ids = target["sample_id"].to_numpy()
    aligned = [frame.set_index("sample_id").loc[ids] for frame in references]
    losses = np.vstack([frame["nll"].to_numpy(dtype=float) for frame in aligned])
    in_mask = np.vstack([frame["member"].to_numpy(dtype=bool) for frame in aligned])
    target_loss = target["nll"].to_numpy(dtype=float)
    scores: dict[str, np.ndarray] = {}
    for label in _labels(config):
        if label == "lira":
            scores[label] = reference_attacks.lira_online(reference_attacks.logit_confidence(target_loss),
                                                          reference_attacks.logit_confidence(losses), in_mask)
        elif label == "lira-offline":
            scores[label] = reference_attacks.lira_offline(reference_attacks.logit_confidence(target_loss),
                                                           reference_attacks.logit_confidence(losses), in_mask)
        else:
            scores[label] = reference_attacks.rmia(reference_attacks.confidence(target_loss),
                                                   reference_attacks.confidence(losses), in_mask,
                                                   online=label == "rmia")
    return scores


def add_reference_attacks(config: TrialConfig, trial_dir: Path, reference_dirs: list[Path]) -> list[dict[str, Any]]:
    """For every epoch the target and all its references have scored: the lira / rmia
    scores into the target's per-sample file and their metrics (AUC with its interval,
    resolved TPRs) into its result.json. Returns the target's epochs as updated."""
    record = TrialRecord.open(trial_dir)
    for row in record.epochs:
        epoch = int(row["epoch"])
        paths = [scores_path(folder, epoch) for folder in reference_dirs]
        target_path = scores_path(trial_dir, epoch)
        if not target_path.is_file() or not all(path.is_file() for path in paths):
            continue
        target = pd.read_parquet(target_path)
        found = reference_scores(config, target, [pd.read_parquet(path) for path in paths])
        member = target["member"].to_numpy(dtype=bool)
        for label, values in found.items():
            row.update(metrics.mia_metrics(label, values, member, config.eval.bootstrap, config.seed))
            target[label] = values
        write_scores(trial_dir, epoch, target)
    if record.epochs:
        record.data["final"] = record.epochs[-1]
    record.update(reference_models={"count": len(reference_dirs), "folders": reference_folders(trial_dir, reference_dirs),
                                    "statistic": "nll: mean token loss per sample (lira: its logit-scaled "
                                                 "confidence; rmia: exp(-nll) as Pr(x | model))",
                                    "rmia": {"gamma": reference_attacks.RMIA_GAMMA,
                                             "offline_a": reference_attacks.RMIA_OFFLINE_A},
                                    "lira_fix_variance": reference_attacks.LIRA_FIX_VARIANCE})
    return record.epochs


def reference_folders(trial_dir: Path, reference_dirs: list[Path]) -> list[str]:
    """The reference folders as result.json records them: relative to the target's folder."""
    return [os.path.relpath(Path(folder).resolve(), Path(trial_dir).resolve()) for folder in reference_dirs]


def has_reference_attacks(result: dict[str, Any], trial_dir: Path, reference_dirs: list[Path]) -> bool:
    """Whether a target's result.json holds the lira / rmia of these reference models."""
    return (result.get("reference_models") or {}).get("folders") == reference_folders(trial_dir, reference_dirs)


def complete_target(config: TrialConfig, trial_dir: Path, final: dict[str, Any], *, resume: bool = True,
                    cache_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """After a target trial: train its reference models (none needed: `final` unchanged)
    and add lira / rmia to its epochs; return its final epoch's metrics."""
    if not config.reference_models():
        return final
    folders = run_references(config, trial_dir, resume=resume, cache_dir=cache_dir, progress=progress)
    return dict(add_reference_attacks(config, trial_dir, folders)[-1])
