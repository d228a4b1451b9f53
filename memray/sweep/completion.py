"""Completing the targets of lira / rmia in a sweep, from the driver (no Ray here).

A sweep trains a target's reference models as trials of their own (`memray.references.
sweep_cells`), so a target's lira / rmia can be computed only when it and all its
references have finished. The driver does it, alone (one writer of a target's
result.json): a thread of `memray run / resume` looks every `POLL_S` seconds (URI storage:
`URI_POLL_S`) for targets whose trials have all succeeded and whose result.json lacks the
attacks of these references (or holds those of references since trained again, or of
other rules: `memray.references.has_reference_attacks`), and once more after the last trial (a resumed sweep whose
trials were all done included). For each it adds lira / rmia per epoch to the target's result.json and
per-sample files (`memray.references.add_reference_attacks`) and logs the new metrics of
every epoch into the target's W&B run. On URI storage the trial folders are fetched from
the storage into scratch and the target's is written back.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from memray.references import add_reference_attacks, reference_attack_state, references_of
from memray.results import RESULT_FILE, TRIALS_DIR
from memray.sweep.context import SweepContext
from memray.sweep.storage import TrialMirror
from memray.sweep.wandb import WandbTrial, reconcile_trial

#: How often the driver looks for targets whose trials have all finished (seconds); on URI
#: storage, where each look reads result.json files from the storage, URI_POLL_S.
POLL_S = 10.0
URI_POLL_S = 60.0


@contextmanager
def _trial_folders(context: SweepContext, indices: list[int]) -> Iterator[list[Path]]:
    """The folders of these trials where the driver can read them: on a path storage the
    trial folders themselves; on URI storage copies in scratch (`trials/<name>`, so that
    their relative paths are the sweep's)."""
    if not context.folder.is_uri:
        yield [Path(context.local_root) / TRIALS_DIR / context.trial_names[i] for i in indices]
        return
    with tempfile.TemporaryDirectory(prefix="memray-complete-") as scratch:
        folders = []
        for index in indices:
            local = Path(scratch) / TRIALS_DIR / context.trial_names[index]
            TrialMirror(context.folder, context.trial_names[index], local).download(None)
            folders.append(local)
        yield folders


def complete_targets(context: SweepContext, done: set[int] | None = None,
                     links: dict[int, list[int]] | None = None) -> list[str]:
    """Add lira / rmia to every target whose trial and reference models have all succeeded
    and whose result.json lacks them; returns the names of the targets completed. `done`:
    targets known complete (skipped; those found complete are added). `links`: the
    sweep's `references_of`, when the caller has it."""
    completed = []
    if links is None:
        links = references_of(list(context.cells.values()))
    for target, references in links.items():
        if done is not None and target in done:
            continue
        names = [context.trial_names[i] for i in [target, *references]]
        results = [_result(context, name) for name in names]
        # decided from result.json alone: on URI storage the folders are fetched only to complete
        state = reference_attack_state(results, names)
        if state in ("pending", "waiting"):
            continue
        if state == "missing":
            with _trial_folders(context, [target, *references]) as folders:
                epochs = add_reference_attacks(context.cells[target].config, folders[0], folders[1:], results[1:])
                top = json.loads((folders[0] / RESULT_FILE).read_text()).get("counterfactual_top") or {}
                if context.folder.is_uri:
                    TrialMirror(context.folder, names[0], folders[0]).upload()
            _log_late(context, target, epochs, top)
            completed.append(names[0])
        if done is not None:
            done.add(target)
    return completed


def _result(context: SweepContext, name: str) -> dict:
    """A trial's result.json through the sweep folder (a path or a URI); {} if it has none."""
    text = context.folder.read_text(TRIALS_DIR, name, RESULT_FILE)
    return json.loads(text) if text else {}


def _log_late(context: SweepContext, target: int, epochs: list[dict], top: dict) -> None:
    """The target's new metrics (and the samples of highest counterfactual memorization,
    `top`) into its W&B run: through its local W&B files where the driver has them (what
    they lack, `reconcile_trial`), else (URI storage) once, online."""
    cell, name = context.cells[target], context.trial_names[target]
    if context.wandb.mode == "disabled":
        return
    if not context.folder.is_uri:
        reconcile_trial(context.wandb, cell, name, Path(context.local_root),
                        {"epochs": epochs, "status": "success", "counterfactual_top": top})
    elif context.wandb.mode == "online":
        with tempfile.TemporaryDirectory(prefix="memray-wandb-") as scratch:
            run = WandbTrial.start(context.wandb, cell, name, Path(scratch), wait_s=0)
            if run.log_late(epochs):
                run.log_counterfactual_top(top)
            run.finish(Path(scratch), None, "success")


class Completer:
    """The driver's thread that completes targets while the sweep runs (`complete_targets`
    every POLL_S seconds); `stop` ends it and completes once more. A failure is a warning:
    the next pass, or `memray resume`, tries again."""

    def __init__(self, context: SweepContext, poll_s: float | None = None):
        self.context = context
        self.poll_s = poll_s if poll_s is not None else URI_POLL_S if context.folder.is_uri else POLL_S
        self.done: set[int] = set()
        self.links = references_of(list(context.cells.values()))  # target -> its reference cells
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> "Completer":
        if self.links:
            self._thread = threading.Thread(target=self._loop, name="memray-complete-targets", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.run_once()

    def run_once(self) -> list[str]:
        with self._lock:
            try:
                completed = complete_targets(self.context, self.done, self.links)
            except Exception as err:  # noqa: BLE001 - never the sweep's end: resume tries again
                warnings.warn(f"lira / rmia of a finished target could not be added yet: {err}", stacklevel=2)
                return []
        for name in completed:
            print(f"[memray] {name}: lira / rmia added from its reference models", file=sys.stderr, flush=True)
        return completed

    def stop(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.run_once()
