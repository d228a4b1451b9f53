"""What every trial of a sweep shares (`SweepContext`, handed to the Ray side with
`tune.with_parameters`), and running one trial with its W&B run and storage mirror closed
whatever happens. No Ray here: the Tune trainable (`ray_tune`) and the Ray Train workers
(`ray_train`) both build on it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TextIO

from memray.config import Cell, ConfigError, ResourceRule
from memray.results import ending_state, read_result
from memray.sweep.storage import SweepFolder, TrialMirror
from memray.sweep.wandb import WandbSettings, WandbTrial

DEFAULT_MAX_FAILURES = 2  # retries per trial: enough for a lost node, cheap for a real bug (it resumes)
#: `path/to/file.py:function`: a function every trial process calls after each epoch it
#: reports, with (cell index, epoch, rank, world size). Instrumentation and tests use it
#: (the tests' fault injection is tests/faults.py); unset, nothing is called.
EPOCH_HOOK_ENV = "MEMRAY_EPOCH_HOOK"
#: "1": a trial's library output (warnings, banners, progress bars) on the console too
#: (`memray run -v`); else it goes to the trial's log file alone.
VERBOSE_ENV = "MEMRAY_VERBOSE"
TRIAL_LOG = "trial.log"  # in the trial folder: everything the trial's process printed


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


def trial_output(trial_dir: Path) -> TextIO:
    """For the rest of this process (a trial's own Ray worker): everything written to stdout
    and stderr, at the file-descriptor level (library warnings, DeepSpeed's and transformers'
    banners and bars, what W&B and Ray print as the process ends), is appended to
    `<trial_dir>/trial.log` instead of the console, unless VERBOSE_ENV is "1". Returns the
    stream for memray's own lines: the console with -v, else the log (the driver's screen
    shows every epoch, `memray.sweep.console`)."""
    if os.environ.get(VERBOSE_ENV) == "1":
        return sys.stderr
    trial_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(trial_dir / TRIAL_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    return sys.stderr


def run_and_finish(run: "WandbTrial", mirror: "TrialMirror | None", trial_dir: Path,
                    trial: Callable[[], Mapping[str, float] | None]) -> None:
    """Run the trial; whatever happens, close its W&B run with the trial's state (as
    result.json says it ended) and mirror its folder to storage."""
    try:
        final = trial()
    except BaseException as err:
        result = read_result(trial_dir) or {}
        state = result.get("status") if result.get("status") not in (None, "running") else ending_state(err)
        run.finish(trial_dir, None, state, result.get("reason"))
        if mirror:
            mirror.upload()
        raise
    run.finish(trial_dir, final, "success")
    if mirror:
        mirror.upload()
