"""The Ray Tune side of a sweep: the only module, with the Ray Train launcher (`ray_train`),
that imports Ray (inside its functions, so that `import memray.sweep` stays light).

- the Tune trainable: a function that receives only its cell index, rebuilds the cell's
  `TrialConfig` and calls `memray.trial.run_trial`, reporting every epoch to Tune (with the
  epoch's checkpoint on URI storage, where the trial folder is node-local scratch) and to
  the trial's W&B run. A cell whose resource rule has
  `workers > 1` starts a Ray Train job from that function instead (`ray_train`);
- connecting to Ray (a local Ray, or a cluster), the Tuner, its restore;
- `memray run / resume` and the dry run (`run_sweep`, `resume_sweep`, `dry_run_text`);
  what they show while trials run is `console.SweepScreen`, fed by a Tune callback here:
  Ray Tune's own output, Ray's INFO logs and the trials' processes' output only with `-v`
  (`VERBOSE_ENV`).

The trial folder is the source of truth: a retried or resumed trial finds its own
`result.json` and checkpoints there and continues from its last epoch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from memray.config import MODEL_ALIASES, ConfigError, resolve_wandb_mode
from memray.results import (
    RESULT_FILE,
    STATE_FILE,
    SWEEP_FILE,
    TRIALS_DIR,
    TUNE_DIR,
    TrialRecord,
    read_result,
    trial_names,
)
from memray.sweep.console import SweepScreen
from memray.sweep.context import (
    DEFAULT_MAX_FAILURES,
    EPOCH_HOOK_ENV,
    VERBOSE_ENV,
    SweepContext,
    epoch_hook,
    run_and_finish,
    trial_output,
)
from memray.sweep.completion import Completer
from memray.sweep.planning import (
    PLAN_MFU,
    SweepPlan,
    axes_text,
    capacity_text,
    check_cells,
    check_rules,
    gpu_budget_gb,
    gpu_hours,
    load_checked,
    local_capacity,
    memory_estimate,
    model_info,
    plan_sweep,
    resolved_sweep_yaml,
    trial_flops,
)
from memray.sweep.ray_train import run_workers
from memray.sweep.status import clear_driver, sweep_status, text_table, write_driver
from memray.sweep.storage import SweepFolder, TrialMirror, open_sweep
from memray.sweep.wandb import WandbSettings, WandbTrial, reconcile_trial

#: Environment variables handed from the driver to every trial (never a secret such as
#: WANDB_API_KEY), besides memray's own MEMRAY_* settings.
FORWARDED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "WANDB_BASE_URL", "DS_ACCELERATOR")


def run_cell(params: dict[str, Any], context: SweepContext) -> None:
    """Tune function trainable: run grid cell `params["cell"]` as a trial in its folder,
    its process's library output in the trial's log file (`trial_output`)."""
    index = int(params["cell"])
    os.environ.update(context.env)
    if Path(context.workdir).is_dir():
        os.chdir(context.workdir)
    trial_dir = Path(context.local_root) / TRIALS_DIR / context.trial_names[index]
    _run_cell(index, context, trial_dir)


def _run_cell(index: int, context: SweepContext, trial_dir: Path) -> None:
    from ray import tune

    cell, trial_name = context.cells[index], context.trial_names[index]
    mirror = TrialMirror(context.folder, trial_name, trial_dir) if context.folder.is_uri else None
    if mirror:
        mirror.download(tune.get_checkpoint())
    done = read_result(trial_dir) or {}
    if done.get("status") == "success" and done.get("trial_id") == cell.config.trial_id():
        # finished before Tune recorded it (a driver killed in between): complete its W&B
        # history, report, touch nothing else
        reconcile_trial(context.wandb, cell, trial_name, Path(context.local_root), done)
        tune.report(dict(done["epochs"][-1]))
        return
    rule = context.resources.get(index)
    if rule is not None and rule.workers > 1:
        run_workers(index, rule, context)
        return
    # from here on the process's output goes to the trial's log (never for a finished
    # trial: its folder stays as it was); so do memray's epoch lines, but with -v (the driver
    # shows every epoch on its screen)
    console = trial_output(trial_dir)
    from memray.trial import epoch_line, run_trial  # after: transformers prints as it is imported

    run = WandbTrial.start(context.wandb, cell, trial_name, Path(context.local_root))
    run.replay(done.get("epochs") or [])  # what an earlier attempt recorded but W&B lost

    hook = epoch_hook(context.epoch_hook)

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        print(f"[memray] {trial_name}: {epoch_line(metrics, cell.config)}", file=console, flush=True)
        run.log(metrics)
        checkpoint = None
        if checkpoint_dir is not None and mirror:
            # URI storage: the checkpoint travels to another node through Tune. On a path the
            # trial folder keeps it and Tune keeps none: no second copy of the weights, and no
            # restore of a Tune checkpoint that a killed driver's state names but that is gone
            checkpoint = tune.Checkpoint.from_directory(checkpoint_dir)
            checkpoint.set_metadata({"name": Path(checkpoint_dir).name})
        if mirror:
            mirror.upload()
        tune.report(dict(metrics), checkpoint=checkpoint)
        if hook is not None:
            hook(index, int(metrics["epoch"]), 0, 1)

    def trial() -> dict[str, float]:
        # lira / rmia: the driver adds them once this trial and its reference models (trials
        # of their own) have finished (memray.sweep.completion)
        return run_trial(cell.config, report, trial_dir=trial_dir, resume=True, cache_dir=Path(context.cache_dir),
                         axes=cell.axes, progress=False)

    run_and_finish(run, mirror, trial_dir, trial)


def _verbose() -> bool:
    """`memray run / resume -v`: Ray Tune's own tables, Ray's logs and the trials' output."""
    return os.environ.get(VERBOSE_ENV) == "1"


def _connect(address: str | None, num_cpus: int | None) -> bool:
    """Start a local Ray (address None) or join a cluster; True if this call started it.
    A Ray already initialized in this process (a notebook, a test) is used as it is, and
    RAY_ADDRESS (set by `ray job submit`) counts as an address. Without -v, Ray's INFO logs
    (its start-up lines) and the workers' output stay out of the console (in Ray's logs
    and each trial's trial.log)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    verbose = _verbose()
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if not verbose:  # a note on every start that token authentication is on (the default): not a problem
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if address is None:
        # address="local": always a fresh local Ray, never a cluster `ray start` left running
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True


def _cluster_capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def _context(folder: SweepFolder, plan: SweepPlan, state: dict[str, Any],
             max_failures: int = DEFAULT_MAX_FAILURES) -> SweepContext:
    sweep = plan.sweep
    local_root = (Path(folder.location) if not folder.is_uri
                  else Path(tempfile.gettempdir()) / "memray" / f"{sweep.name}-{state['uid']}")
    mode = resolve_wandb_mode(sweep.wandb)
    cache_dir = os.environ.get("MEMRAY_CACHE") or str(local_root / "cache")
    env = {name: value for name, value in os.environ.items() if name in FORWARDED_ENV or name.startswith("MEMRAY_")}
    # W&B reads these too (e.g. a library's own W&B callback): keep it in this sweep's mode and folder
    env.update({"WANDB_MODE": mode, "WANDB_DIR": str(local_root), "WANDB_SILENT": "true"})
    epoch_hook(os.environ.get(EPOCH_HOOK_ENV))  # a bad value is an error here, before any trial starts
    return SweepContext(
        folder=folder, name=sweep.name, cells={cell.index: cell for cell in plan.cells},
        trial_names=trial_names(plan.cells),
        wandb=WandbSettings(mode, sweep.wandb.project, sweep.wandb.entity, sweep.name, state["uid"]),
        local_root=str(local_root), cache_dir=cache_dir, workdir=state.get("workdir", os.getcwd()), env=env,
        epoch_hook=os.environ.get(EPOCH_HOOK_ENV),
        resources={index: r.rule for index, r in plan.resources.items()}, max_failures=max_failures,
    )


def _trial_dirname(trial: Any) -> str:
    return f"cell{int(trial.config['cell']):04d}"


def _trainable(context: SweepContext, plan: SweepPlan) -> Any:
    from ray import tune

    groups = {index: tune.PlacementGroupFactory(r.bundles(), strategy=r.rule.strategy)
              for index, r in plan.resources.items()}
    return tune.with_resources(tune.with_parameters(run_cell, context=context),
                               resources=lambda config: groups[int(config["cell"])])


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"  # Tune's choice of output engine, read as a run starts

#: `memray run / resume`'s exit code when Ctrl-C (or SIGTERM) stopped the sweep, as a shell's.
INTERRUPTED = 130


def _interrupted_line(folder: SweepFolder, code: int) -> None:
    """After Ray is shut down (so that no trial output follows it): the one line that says
    how to go on."""
    if code == INTERRUPTED:
        print(f"memray: interrupted; `memray resume {folder}` finishes the sweep", file=sys.stderr, flush=True)


class _TuneMessages(logging.Filter):
    """Drops Ray Tune's messages that mislead a memray user (its restore hint, the metrics
    of trials stopped before their first report) and notes whether Ctrl-C stopped the run.
    `quiet` (no -v) also drops its reports of failed trials (a traceback each, and a list at
    the end): the screen has a line per failure with its reason, the traceback is in Tune's
    error file of the trial (`tune/cellNNNN/error.txt` in the sweep folder)."""

    DROPPED = ("Stop signal received", "has been interrupted", "Failed to fetch metrics", "Could not fetch metrics")
    DROPPED_QUIET = ("Trial task failed for trial", "Trials did not complete")
    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis", "ray.tune.execution.tune_controller")

    def __init__(self, quiet: bool = False) -> None:
        super().__init__()
        self.interrupted = False
        self.dropped = self.DROPPED + (self.DROPPED_QUIET if quiet else ())
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Stop signal received"):
            self.interrupted = True
        return not any(text in message for text in self.dropped)

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def _screen(context: SweepContext) -> SweepScreen:
    """The sweep's console screen, with the state and last epoch of every trial the sweep
    folder already holds (a resume)."""
    known = {}
    for index, name in context.trial_names.items():
        text = context.folder.read_text(TRIALS_DIR, name, RESULT_FILE)
        if text:
            known[index] = json.loads(text)
    return SweepScreen(context.name, context.trial_names, {i: c.config for i, c in context.cells.items()}, known)


def _failure(context: SweepContext, trial: Any) -> tuple[str, str | None]:
    """(state, reason) of a trial Tune saw fail: as its result.json says (failed,
    interrupted), else `failed` with the last line of Tune's error file."""
    result = read_result(Path(context.local_root) / TRIALS_DIR / context.trial_names[int(trial.config["cell"])]) or {}
    if result.get("status") in ("failed", "interrupted") and result.get("reason"):
        return result["status"], result["reason"]
    error = trial.error_file
    lines = Path(error).read_text().strip().splitlines() if error and Path(error).is_file() else []
    return "failed", lines[-1] if lines else None


def _screen_callback(screen: SweepScreen, context: SweepContext) -> Any:
    """A Tune callback that hands the driver's trial events to `screen`."""
    from ray import tune

    class ScreenEvents(tune.Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            screen.started(int(trial.config["cell"]))

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            screen.epoch(int(trial.config["cell"]), result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            screen.ended(int(trial.config["cell"]), "success")

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            screen.ended(int(trial.config["cell"]), "retrying", _failure(context, trial)[1])

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            screen.ended(int(trial.config["cell"]), *_failure(context, trial))

    return ScreenEvents()


def settle_states(context: SweepContext, state: str) -> list[str]:
    """Trials whose result.json still says `running` when no process runs them (before a
    resume starts, or after the Tuner returned) get `state` (`lost` or `interrupted`);
    returns their names. Only trial folders on this node's storage are seen."""
    settled = []
    reason = ("its process died (killed, out of memory, or its node lost)" if state == "lost"
              else "the sweep was stopped (Ctrl-C or SIGTERM)")
    for name in context.trial_names.values():
        trial_dir = Path(context.local_root) / TRIALS_DIR / name
        record = TrialRecord.open(trial_dir)
        if record.data.get("status") == "running":
            record.finish(state, reason)
            settled.append(name)
    return settled


def complete_wandb(context: SweepContext) -> None:
    """Log into every trial's W&B run the epochs of its result.json that its local W&B
    files lack (trials whose processes died before W&B flushed). Only where the driver sees
    the trials' W&B files: the sweep folder is a path, not a URI."""
    if context.wandb.mode == "disabled" or context.folder.is_uri:
        return
    for index, cell in context.cells.items():
        result = read_result(Path(context.local_root) / TRIALS_DIR / context.trial_names[index])
        if result:
            reconcile_trial(context.wandb, cell, context.trial_names[index], Path(context.local_root), result)


def _fit(folder: SweepFolder, plan: SweepPlan, state: dict[str, Any], max_failures: int, restore: bool) -> int:
    from ray import tune

    context = _context(folder, plan, state, max_failures)
    settle_states(context, "lost")  # `running` with no driver alive: its processes died with it
    trainable = _trainable(context, plan)
    verbose = _verbose()
    screen = None if verbose else _screen(context)
    # Tune snapshots its state at every checkpoint (URI storage) and warns when that is
    # frequent; with epochs of seconds (the demo) that is expected, not a bottleneck
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tune_path = folder.path(TUNE_DIR)
    if restore and tune.Tuner.can_restore(tune_path):
        # errored and unfinished trials start again and resume from their trial folder's last
        # checkpoint (on URI storage Tune's copy, on a node that lacks the folder); finished
        # trials are not run again
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"cell": tune.grid_search(plan.order)},
            tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent, reuse_actors=False,
                                        trial_name_creator=_trial_dirname, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=folder.location,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                # URI storage only (see run_cell): the last two, as the experiment state a killed
                # driver left may name the one before the last
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        )
    # Tune's status tables with -v alone, else memray's screen. Set on the Tuner after it has
    # pickled its state (tuner.pkl), as the screen is no state to keep (it holds a terminal
    # and a lock), and after a restore, whose RunConfig is the pickled one
    run_config = tuner._local_tuner._run_config
    run_config.verbose = 1 if verbose else 0
    run_config.callbacks = [] if screen is None else [_screen_callback(screen, context)]
    write_driver(folder)
    messages = _TuneMessages(quiet=screen is not None)
    completer = Completer(context).start()  # lira / rmia of targets whose reference models have finished
    interrupted, errors = False, True
    if screen is not None:
        screen.start()
    try:
        with _tune_output(verbose):
            errors = bool(tuner.fit().errors)
        interrupted = messages.interrupted
    except KeyboardInterrupt:
        interrupted = True
    finally:
        messages.remove()
        settled = settle_states(context, "interrupted" if interrupted else "lost")
        if screen is not None:
            for index, name in context.trial_names.items():
                if name in settled:
                    screen.ended(index, "interrupted" if interrupted else "lost")
            screen.stop()
        completer.stop()
        complete_wandb(context)
        clear_driver(folder)
    if screen is None:
        print(sweep_status(folder.location))
        print("\n".join(_where_lines(folder, context)))
    else:  # the sweep's last line
        print(f"[memray] {screen.summary()}; " + "; ".join(_where_lines(folder, context)), flush=True)
    return INTERRUPTED if interrupted else 1 if errors else 0


@contextlib.contextmanager
def _tune_output(verbose: bool) -> Iterator[None]:
    """Without -v, Tune's older output engine for the body: at verbosity 0 it prints
    nothing, where the newer one still prints its experiment box, paths and a blank line."""
    if verbose:
        yield
        return
    before = os.environ.get(NEW_OUTPUT_ENV)
    os.environ[NEW_OUTPUT_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NEW_OUTPUT_ENV)
        else:
            os.environ[NEW_OUTPUT_ENV] = before


def _where_lines(folder: SweepFolder, context: SweepContext) -> list[str]:
    lines = [f"results: {folder.path(TRIALS_DIR)}/<trial>/ (result.json, scores/, checkpoints/; "
             f"`memray status {folder}`, `memray report {folder}`)"]
    mode = context.wandb.mode
    if mode == "offline":
        lines.append(f"W&B: offline runs in {Path(context.local_root) / 'wandb'}; upload with "
                     f"`wandb sync {Path(context.local_root) / 'wandb'}/offline-run-*`")
    elif mode == "online":
        entity = f"{context.wandb.entity}/" if context.wandb.entity else ""
        lines.append(f"W&B: project {entity}{context.wandb.project}, group {context.wandb.group}")
    else:
        lines.append("W&B: disabled")
    return lines


@dataclass(frozen=True)
class PlannedTrial:
    """One trial of a dry run's plan, in the order trials start."""

    index: int  # grid cell
    name: str  # trial folder
    axes: str  # what sets it apart in the grid, "(base)" for none
    resources: str  # what it asks Ray for and which rule gave it (`TrialResources.describe`)
    source: str  # "resources.<i>" (the rule that matched) or "default"
    memory: str  # GPU memory per worker, with its parts (`MemoryEstimate.describe`)
    memory_gb: float
    budget_gb: float | None  # the GPU memory its share has; None: no GPU
    gpu_type: str  # the rule's GPU type, "any GPU" or "CPU"
    flops: float  # model FLOPs of the whole trial (`trial_flops`)

    @property
    def fits(self) -> bool:
        return self.budget_gb is None or self.memory_gb <= self.budget_gb


@dataclass(frozen=True)
class GpuTypePlan:
    """The plan's trials of one GPU type (a node type of the cluster), or of the CPU."""

    gpu_type: str
    gpu: str  # the GPU and its memory, "-" where not a known type
    trials: int
    gpu_hours: float | None  # at PLAN_MFU of its dense bf16 peak; None where not a known type
    flops: float
    memory_gb: tuple[float, float]  # the least and most one of its trials needs
    unfit: int


@dataclass(frozen=True)
class DryRunPlan:
    """What `memray run --dry-run` found: every trial, in order, with its resources and
    memory; per GPU type, the trials, GPU-hours and memory; and the warnings. Tests read
    this; `render_plan` prints it."""

    sweep: str
    references: int  # of the trials, reference models of lira / rmia
    capacity: str  # the Ray it was planned for
    max_concurrent: int | None
    trials: list[PlannedTrial]
    gpu_types: list[GpuTypePlan]
    warnings: list[str]
    notes: list[str]


def dry_run_plan(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None,
                 address: str | None = None, num_cpus: int | None = None) -> DryRunPlan:
    """Validate the whole sweep and plan it: each trial (in the order they will start) with
    its axes and resources. Without `address` the resources are those of a local Ray on
    this machine; with one, of that cluster. ConfigError where a resource rule sends a
    trial to a GPU it cannot fit."""
    sweep, cells, _ = load_checked(path, overrides, published=True)
    if address is None:
        capacity = local_capacity(num_cpus)
        nodes = [capacity]
    else:
        started = _connect(address, num_cpus)
        capacity, nodes = _cluster_capacity()
        if started:
            import ray

            ray.shutdown()
    with warnings.catch_warnings(record=True) as unplaceable:  # listed below: a dry run shows the whole plan
        warnings.simplefilter("always")
        plan = plan_sweep(sweep, cells, str(path), capacity, nodes, strict=False)
    names = trial_names(cells)
    infos: dict[str, Any] = {}
    trials: list[PlannedTrial] = []
    for index in plan.order:
        cell, resources = plan.cells[index], plan.resources[index]
        shape, hf_config = model_info(cell.config, infos)
        estimate = memory_estimate(cell.config, resources.rule, shape)
        rule = resources.rule
        trials.append(PlannedTrial(index, names[index], axes_text(cell.axes) or "(base)", resources.describe(),
                                   resources.source, estimate.describe(), estimate.total, gpu_budget_gb(rule),
                                   rule.gpu_type or ("any GPU" if rule.gpus or rule.gpus_per_worker else "CPU"),
                                   trial_flops(cell.config, shape, hf_config)))
    misplaced = [t for t in trials if not t.fits and t.source != "default"]
    if misplaced:
        first = misplaced[0]
        rule = plan.resources[first.index].rule
        gpu = f"{rule.gpu_type} ({rule.gpu_memory:g} GB)" if rule.gpu_type else f"{rule.gpu_memory:g} GB GPU"
        more = f"; {len(misplaced) - 1} more trial(s) do not fit their rule's GPUs" if len(misplaced) > 1 else ""
        raise ConfigError(str(path), first.source,
                          f"sends grid cell {first.index} ({first.axes}) to a {gpu}, {first.resources.split(' [')[0]}: "
                          f"it needs ~{first.memory_gb:.1f} GB per GPU, its share has {first.budget_gb:g} GB (a larger "
                          f"share or GPU type, more workers, or a smaller batch){more}")
    warned = []
    too_big = [t for t in trials if not t.fits]
    if too_big:
        warned.append(f"{len(too_big)} trial(s) will not fit on their GPUs ({', '.join(t.name for t in too_big)}): "
                      "more workers, ZeRO stage 3, offload (train.deepspeed) or a smaller batch")
    if unplaceable:
        where = "this machine's local Ray" if address is None else "this cluster"
        warned.append(f"{len(unplaceable)} trial(s) need more than any node of {where} has "
                      f"(`memray run` {'refuses to start' if address is None else 'waits for an autoscaler'}); "
                      f"first: {unplaceable[0].message}")
    aliases = sorted({c.config.model.name for c in cells if c.config.model.name in MODEL_ALIASES})
    notes = [f"models {', '.join(aliases)}: their published shapes; `memray run` checks that they load "
             "(local cache, or the hub)"] if aliases else []
    return DryRunPlan(sweep.name, sum(cell.config.reference is not None for cell in cells), capacity_text(capacity),
                      plan.max_concurrent, trials, _gpu_types(trials), warned, notes)


def _gpu_types(trials: list[PlannedTrial]) -> list[GpuTypePlan]:
    from memray.config import GPU_TYPES

    rows = []
    for kind in sorted({t.gpu_type for t in trials}):
        mine = [t for t in trials if t.gpu_type == kind]
        flops = sum(t.flops for t in mine)
        rows.append(GpuTypePlan(kind, f"{GPU_TYPES[kind][0]} {GPU_TYPES[kind][1]:g} GB" if kind in GPU_TYPES else "-",
                                len(mine), gpu_hours(flops, kind) if kind in GPU_TYPES else None, flops,
                                (min(t.memory_gb for t in mine), max(t.memory_gb for t in mine)),
                                sum(not t.fits for t in mine)))
    return rows


def render_plan(plan: DryRunPlan) -> str:
    """The dry run as `memray run --dry-run` prints it: "N trials", a line per trial, the
    per-GPU-type table, then warnings and notes."""
    cap = plan.max_concurrent or "no cap (every trial reserves all it uses)"
    lines = [f"{len(plan.trials)} trials" + (f" ({plan.references} of them reference models of lira / rmia, shared "
                                             "by the targets that need the same)" if plan.references else ""),
             f"sweep folder: <storage>/{plan.sweep}   Ray: {plan.capacity}; concurrent trials: {cap}; longest first"]
    for t in plan.trials:
        lines.append(f"  {t.name}  {t.axes}  {t.resources}  mem {t.memory}"
                     + ("" if t.fits else f"  DOES NOT FIT {t.budget_gb:g} GB"))
    header = ["GPU type", "GPU", "trials", "GPU-hours", "PFLOP", "memory per trial", "do not fit"]
    rows = [[g.gpu_type, g.gpu, str(g.trials), "-" if g.gpu_hours is None else f"{g.gpu_hours:.1f}",
             f"{g.flops / 1e15:.0f}", f"{g.memory_gb[0]:.1f}-{g.memory_gb[1]:.1f} GB" if g.gpu_type != "CPU" else "-",
             str(g.unfit)] for g in plan.gpu_types]
    unfit = sum(g.unfit for g in plan.gpu_types)
    lines += [f"per GPU type (GPU-hours: the FLOP count at {PLAN_MFU:.0%} of the GPU's dense bf16 peak):",
              *("  " + line for line in text_table(header, rows).splitlines()),
              f"{unfit} trial{'s do' if unfit != 1 else ' does'} not fit their GPUs"]
    lines += [f"warning: {warning}" for warning in plan.warnings]
    return "\n".join(lines + plan.notes)


def dry_run_text(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None,
                 address: str | None = None, num_cpus: int | None = None) -> str:
    """The dry run's text (`render_plan` of `dry_run_plan`)."""
    return render_plan(dry_run_plan(path, overrides, address, num_cpus))


@contextlib.contextmanager
def _ray_session(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Ray for the body: a local Ray or a cluster (`_connect`), shut down after the body
    when this call started it (a Ray the caller had initialized is left running)."""
    started = _connect(address, num_cpus)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def run_sweep(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] | None = None,
              storage: str | Path | None = None, address: str | None = None, dry_run: bool = False, *,
              num_cpus: int | None = None, max_failures: int = DEFAULT_MAX_FAILURES) -> int:
    """`memray run`: validate the sweep, then run every cell as a Ray Tune trial.

    path: the sweep file; overrides: `key=value` strings (or a mapping) applied to its
    base; storage: the folder or URI that holds `<sweep name>/` (default ./results);
    address: a Ray cluster (default: a local Ray with `num_cpus`, default all cores).
    Prints the per-trial table at the end. Returns 0 when every trial succeeded, 1 when
    some failed; bad input raises ConfigError (exit code 2 in the CLI).
    """
    if dry_run:
        print(dry_run_text(path, overrides, address, num_cpus))
        return 0
    sweep, cells, parsed = load_checked(path, overrides)
    folder = SweepFolder.for_sweep(storage, sweep.name)
    if folder.exists(SWEEP_FILE):
        raise ConfigError(str(path), "name", f"the sweep folder {folder} already exists: `memray resume {folder}` "
                                             "finishes it; remove it (or rename the sweep) to start over")
    with _ray_session(address, num_cpus):
        capacity, nodes = _cluster_capacity()
        plan = plan_sweep(sweep, cells, str(path), capacity, nodes, strict=address is None)
        state = {"uid": secrets.token_hex(4), "name": sweep.name, "source": str(Path(path).resolve()),
                 "overrides": parsed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "workdir": os.getcwd()}
        folder.write_text(json.dumps(state, indent=2), STATE_FILE)
        folder.write_text(resolved_sweep_yaml(sweep, cells, str(path), parsed), SWEEP_FILE)
        print(f"[memray] sweep {sweep.name}: {len(cells)} trials in {folder}", file=sys.stderr)
        code = _fit(folder, plan, state, max_failures, restore=False)
    _interrupted_line(folder, code)
    return code


def resume_sweep(sweep_dir: str | Path, address: str | None = None, *, num_cpus: int | None = None,
                 max_failures: int = DEFAULT_MAX_FAILURES) -> int:
    """`memray resume`: finish the errored and unfinished trials of a sweep folder (a path
    or URI), each from its last epoch checkpoint; finished trials are not run again.
    Returns 0 when every trial has succeeded, else 1."""
    folder, sweep, cells, state, source = open_sweep(sweep_dir)
    check_rules(sweep.resources, cells, source)
    check_cells(cells, source)
    with _ray_session(address, num_cpus):
        capacity, nodes = _cluster_capacity()
        plan = plan_sweep(sweep, cells, source, capacity, nodes, strict=address is None)
        print(f"[memray] resuming sweep {sweep.name} in {folder}", file=sys.stderr)
        code = _fit(folder, plan, state, max_failures, restore=True)
    _interrupted_line(folder, code)
    return code
