"""What every trial of a sweep shares (`SweepContext`, handed to the Ray side with
`tune.with_parameters`), and running one trial with its W&B run and storage mirror closed
whatever happens. No Ray here: the Tune trainable (`ray_tune`) and the Ray Train workers
(`ray_train`) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from memray.config import Cell, ConfigError, ResourceRule
from memray.sweep.storage import SweepFolder, TrialMirror
from memray.sweep.wandb import WandbSettings, WandbTrial

DEFAULT_MAX_FAILURES = 2  # retries per trial: enough for a lost node, cheap for a real bug (it resumes)
# "<cell>:<epoch>": that trial raises after reporting that epoch (tests); in a multi-worker
# trial its last worker process dies instead, as on a lost node
FAULT_ENV = "MEMRAY_FAULT"


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares; passed with `tune.with_parameters`."""

    folder: SweepFolder
    name: str
    cells: dict[int, Cell]
    trial_names: dict[int, str]
    wandb: WandbSettings
    local_root: str  # trial folders, W&B and cache on this node: the sweep folder itself, or scratch
    cache_dir: str
    workdir: str  # where `memray run` started: relative paths in the sweep mean what they meant there
    env: dict[str, str] = field(default_factory=dict)
    fault: tuple[int, int] | None = None
    resources: dict[int, ResourceRule] = field(default_factory=dict)  # cell -> its rule (workers > 1: Ray Train)
    max_failures: int = DEFAULT_MAX_FAILURES  # Ray Train's restarts of a multi-worker trial's workers


def parse_fault(text: str | None) -> tuple[int, int] | None:
    """MEMRAY_FAULT's `<cell>:<epoch>` -> (cell, epoch); None when unset."""
    if not text:
        return None
    cell, _, epoch = text.partition(":")
    try:
        return int(cell), int(epoch)
    except ValueError:
        raise ConfigError(FAULT_ENV, "", f"{text!r} must look like <cell>:<epoch>, e.g. 3:2") from None


def run_and_finish(run: "WandbTrial", mirror: "TrialMirror | None", trial_dir: Path,
                    trial: Callable[[], Mapping[str, float] | None]) -> None:
    """Run the trial; whatever happens, close its W&B run and mirror its folder to storage."""
    try:
        final = trial()
    except BaseException:
        run.finish(trial_dir, None)
        if mirror:
            mirror.upload()
        raise
    run.finish(trial_dir, final)
    if mirror:
        mirror.upload()
