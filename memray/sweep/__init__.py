"""Sweeps on Ray Tune: a sweep file's grid as Tune trials, their resources, W&B, resume.

The parts, in the direction they import each other (none imports Ray at import time):

- `storage`: the sweep folder `<storage>/<sweep name>/` on a path or a URI, and mirroring
  node-local trial folders to URI storage (the folder's layout: `memray.results`);
- `planning`: validating a sweep whole, resources per trial by rule or by default, GPU
  memory estimates, the longest-first order and the concurrency cap (no Ray);
- `wandb`: one W&B run per trial, the same run on every attempt;
- `status`: `memray status` from the trial folders alone;
- `context`: what every trial of a sweep shares, running a trial with its W&B run and
  mirror closed whatever happens, and the epoch hook (`MEMRAY_EPOCH_HOOK`) that tests use
  to inject faults;
- `ray_train`: the Ray Train launcher of multi-worker (DeepSpeed ZeRO) trials;
- `ray_tune`: the Tune trainable, the Tuner and its restore, `memray run / resume` and the
  dry run. `ray_tune` and `ray_train` are the only modules of memray that import Ray.

The names below are the package's entry points (the CLI's and the tests').
"""

from memray.config import resolve_wandb_mode
from memray.results import trial_names
from memray.sweep.context import EPOCH_HOOK_ENV
from memray.sweep.planning import (
    TrialResources,
    check_rules,
    gpu_budget_gb,
    gpu_hours,
    max_concurrent_trials,
    plan_sweep,
    schedule_order,
    trial_cost,
    trial_resources,
)
from memray.sweep.ray_tune import DryRunPlan, dry_run_plan, dry_run_text, render_plan, resume_sweep, run_sweep
from memray.sweep.status import sweep_status
from memray.sweep.wandb import wandb_run_id

__all__ = ["EPOCH_HOOK_ENV", "DryRunPlan", "TrialResources", "check_rules", "dry_run_plan", "dry_run_text",
           "gpu_budget_gb", "gpu_hours", "max_concurrent_trials", "plan_sweep", "render_plan", "resolve_wandb_mode", "resume_sweep", "run_sweep", "schedule_order", "sweep_status", "trial_cost",
           "trial_names", "trial_resources", "wandb_run_id"]
