"""What every trial of a sweep shares (`SweepContext`, handed to the Ray side with
`tune.with_parameters`), and running one trial with its W&B run and storage mirror closed
whatever happens. No Ray here: the Tune trainable (`ray_tune`) and the Ray Train workers
(`ray_train`) both build on it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from memray.config import Cell, ConfigError, ResourceRule
from memray.sweep.storage import SweepFolder, TrialMirror
from memray.sweep.wandb import WandbSettings, WandbTrial

DEFAULT_MAX_FAILURES = 2  # retries per trial: enough for a lost node, cheap for a real bug (it resumes)
#: `path/to/file.py:function`: a function every trial process calls after each epoch it
#: reports, with (cell index, epoch, rank, world size). Instrumentation and tests use it
#: (the tests' fault injection is tests/faults.py); unset, nothing is called.
EPOCH_HOOK_ENV = "MEMRAY_EPOCH_HOOK"


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
    epoch_hook: str | None = None  # EPOCH_HOOK_ENV as the driver saw it
    resources: dict[int, ResourceRule] = field(default_factory=dict)  # cell -> its rule (workers > 1: Ray Train)
    max_failures: int = DEFAULT_MAX_FAILURES  # Ray Train's restarts of a multi-worker trial's workers


def epoch_hook(spec: str | None) -> Callable[[int, int, int, int], None] | None:
    """The function an EPOCH_HOOK_ENV value (`path/to/file.py:function`) names, loaded
    from that file; None for no value. A bad value is a ConfigError naming the variable."""
    if not spec:
        return None
    path, _, name = spec.rpartition(":")
    try:
        module_spec = importlib.util.spec_from_file_location(f"memray_epoch_hook_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return getattr(module, name)
    except (OSError, AttributeError, ImportError) as err:
        raise ConfigError(EPOCH_HOOK_ENV, "", f"{spec!r} must name a function in a Python file "
                                              f"(path/to/file.py:function): {err}") from None


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
