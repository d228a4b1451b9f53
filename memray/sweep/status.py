"""`memray status`: one row per trial of a sweep folder, read from its trial folders alone
(no Ray); and the driver file (`driver.json`: the pid and host of the `memray run /
resume` working on the folder) by which a `running` trial with no driver alive reads as
`lost`."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from memray import results
from memray.metric_keys import mia_key
from memray.references import reference_attack_state, references_of
from memray.results import DRIVER_FILE, RESULT_FILE, TRIALS_DIR, trial_names
from memray.sweep.planning import axes_text
from memray.sweep.storage import SweepFolder, open_sweep


def write_driver(folder: SweepFolder) -> None:
    """Note in the sweep folder that this process drives it."""
    folder.write_text(json.dumps({"pid": os.getpid(), "host": platform.node()}), DRIVER_FILE)


def clear_driver(folder: SweepFolder) -> None:
    """Remove the driver note (the driver is done with the folder)."""
    fs, path = folder.fs_path(DRIVER_FILE)
    if folder.exists(DRIVER_FILE):
        fs.delete_file(path)


def driver_alive(folder: SweepFolder) -> bool:
    """Whether a `memray run / resume` is working on the folder (`memray.results.driver_alive`)."""
    return results.driver_alive(folder.read_text(DRIVER_FILE))


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def sweep_status(sweep_dir: str | Path) -> str:
    """`memray status`: one row per trial (cell, axes, state, epoch, val PPL, each attack's
    AUC at its last epoch), read from the trial folders alone (no Ray); the reference models
    of lira / rmia in a table of their own; failed trials' reasons below."""
    folder, sweep, cells, _, _ = open_sweep(sweep_dir)
    alive = driver_alive(folder)
    names = trial_names(cells)
    grid = [cell for cell in cells if cell.config.reference is None]
    references = [cell for cell in cells if cell.config.reference is not None]
    labels = list(dict.fromkeys(label for cell in grid for a in cell.config.attacks for label in a.labels))
    header = ["trial", "axes", "state", "epoch", "val ppl", *(f"{label} auc" for label in labels)]
    rows, reasons, counts = [], [], {}
    results = {}
    for cell in cells:
        text = folder.read_text(TRIALS_DIR, names[cell.index], RESULT_FILE)
        results[cell.index] = json.loads(text) if text else {}
    for cell in grid:
        result = results[cell.index]
        state, epoch, last = _state(result, cell, alive, counts)
        rows.append([names[cell.index], axes_text(cell.axes) or "(base)", state, epoch,
                     _number(last.get("val/ppl"), 2), *(_number(last.get(mia_key(label)), 3) for label in labels)])
        if result.get("reason"):
            reasons.append(f"  {names[cell.index]}: {result['reason']}")
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    parts = [f"sweep {sweep.name} ({folder}): {len(grid)} trials: {summary}", text_table(header, rows)]
    waiting, unscored = _targets_without_reference_attacks(results, names, references_of(cells))
    if waiting:
        parts.append(f"{waiting} finished trial(s) get lira / rmia when their reference models have finished")
    if unscored:
        parts.append(f"{unscored} finished trial(s) whose reference models have all finished lack their lira / rmia "
                     "(or hold those of references since trained again, or of older rules): "
                     f"{'the running driver adds them' if alive else '`memray resume` adds them'}")
    if references:
        ref_rows, ref_counts = [], {}
        for cell in references:
            result = results[cell.index]
            state, epoch, last = _state(result, cell, alive, ref_counts)
            ref_rows.append([names[cell.index], axes_text(cell.axes), state, epoch, _number(last.get("val/ppl"), 2)])
            if result.get("reason"):
                reasons.append(f"  {names[cell.index]}: {result['reason']}")
        ref_summary = ", ".join(f"{count} {state}" for state, count in sorted(ref_counts.items()))
        parts += [f"{len(references)} reference models of lira / rmia: {ref_summary}",
                  text_table(["reference model", "axes", "state", "epoch", "val ppl"], ref_rows)]
    if reasons:
        parts += ["reasons:", *reasons]
    return "\n".join(parts)


def _targets_without_reference_attacks(results: dict[int, dict[str, Any]], names: dict[int, str],
                                       links: dict[int, list[int]]) -> tuple[int, int]:
    """(finished targets waiting for their reference models, finished targets whose reference
    models have all finished but whose lira / rmia are missing or outdated), decided as the
    driver decides (`memray.references.reference_attack_state`)."""
    states = [reference_attack_state([results[i] for i in [target, *references]],
                                     [names[i] for i in [target, *references]]) for target, references in links.items()]
    return states.count("waiting"), states.count("missing")


def _state(result: dict[str, Any], cell: Any, alive: bool, counts: dict[str, int]) -> tuple[str, str, dict]:
    """(state, `epoch/epochs`, last epoch's row) of a trial's result.json, counted in `counts`."""
    state = result.get("status", "pending")
    if state == "running" and not alive:
        state = "lost"  # no driver works on the folder: the process running it died
    counts[state] = counts.get(state, 0) + 1
    epochs = result.get("epochs") or []
    last = epochs[-1] if epochs else {}
    epoch = f"{int(last['epoch'])}/{cell.config.train.epochs}" if last else f"-/{cell.config.train.epochs}"
    return state, epoch, last
