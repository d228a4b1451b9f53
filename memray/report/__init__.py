"""Reports: a sweep folder's result files -> the tables and figures of the studies.

`memray report SWEEP_DIR` (`report_command`, `build_report`) reads nothing but result files
(no Ray; a copied folder works) and writes into `<sweep dir>/report/`:
```
report.md          every table and figure in one Markdown file, ready to open or paste
report.html        the same in one self-contained page to open and share (figures inline,
                     tables sortable, notes and findings at the top; no server, no network)
report.json        every number: per trial, per epoch, per attack, per group of seeds
tables/<name>.md   the tables as Markdown, and as CSV (full precision) beside them:
tables/<name>.csv    trials, attacks, seeds, method_by_model_<dataset>, findings, lora (a
                     method's own axes: `report_axes` of its config section),
                     extraction, duplication, counterfactual, unfinished
figures/<name>.png auc_vs_epoch_<dataset>, auc_vs_model_size_<dataset>, ppl_vs_auc,
                     lora_placement_rank (`report_axes`), roc_<dataset>_<model>, duplication_<dataset>,
                     counterfactual_<dataset>, findings
```
and logs the same figures and tables to a W&B run (job type "report", in the sweep's
group) when the sweep used W&B.

What the numbers mean:
- A *trial* is a folder below the sweep folder holding a memray `result.json`; grid cells
  of `sweep.yaml` with no folder yet are *pending*. Running (or interrupted) and failed
  trials are listed with their state and reason, never dropped; their recorded epochs
  appear in the per-trial tables and the per-epoch plots, but not in the averages.
- *Final* is a trial's last recorded epoch; *best* is its epoch of lowest validation
  perplexity (the checkpoint early stopping would keep).
- Trials whose configs differ only in their seeds form a *group*, named by its
  configuration key (`memray.results.config_key`, the `config_key` of its W&B runs); the
  seed table gives per group the mean, the between-seed sample standard deviation (ddof=1)
  and the number of the group's successful trials (seeds) they are over.
- AUC 95% intervals are the ones each trial recorded (`mia/<attack>/auc_lo`, `auc_hi`:
  DeLong's unless `eval.bootstrap` asked for a bootstrap); a trial that recorded none gets
  a percentile bootstrap of its final epoch's per-sample scores (members and non-members
  resampled separately, `BOOTSTRAP_RESAMPLES` times). An AUC whose interval holds 0.5 is
  marked "(chance)": not distinguishable from chance; one whose interval lies below 0.5 is
  marked "(below chance!)" and noted at the top with the trial's split audit (the n-gram
  overlap of its non-members with its members, `split_audit` in result.json): members that
  score lower than non-members point at the split, not at training. A group's interval is that of the
  per-resample mean over its seeds; the seed table lists groups of two or more seeds only.
- A TPR at an FPR is reported only where the non-members resolve that FPR (at least
  1/FPR of them); the notes say which were left out and why. Beside it (the attacks table,
  error bars on the ROC figures) its Clopper-Pearson 95% interval as the trial recorded it
  (`mia/<attack>/tpr@1%fpr_lo`, `_hi`): the members' binomial uncertainty at the chosen
  threshold, not the threshold's own; older result files show the TPR alone.
- Counterfactual memorization (targets with lira / rmia reference models): the
  `counterfactual` column of a trial's final-epoch score file, against the members' copy
  counts and, where extraction ran, whether it reproduced them and how close it came
  (`counterfactual` table and figures); neither appears when no trial has the column.
- A model's size is the smallest base-parameter count any of its trials reports: a
  trial's `method_info.total_params`, less its `trainable_params` for PEFT methods (whose
  adapters, prefixes or prompts are added to the model). A model no trial has loaded yet
  takes memray's approximate count (`memray.catalogue.APPROX_PARAMS`).
- *Findings* (`findings`): each claim of the two studies the grid can test, decided from
  the per-sample scores by a paired test (DeLong) on the shared split, over seeds; the
  rules are in `memray.report.findings`.
- Method labels say what differs: `lora (attn, r8)`, and a sweep axis that varies
  between trials of the same method, model and dataset is appended (`dup 10% x2/5/10`).

The parts, each importing only those before it: `loading` (trials, labels, model sizes,
attack numbers with bootstrap intervals from `memray.metrics`, groups of seeds),
`tables`, `figures`, `html` (report.html), `publishing` (report.md, report.json, W&B); this module puts them
together (`build_report`, `report_command`). No Ray, and nothing of `memray.sweep`: the
folder layout comes from `memray.results`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


from memray.config import ConfigError
from memray.report.loading import (
    BOOTSTRAP_RESAMPLES,
    attack_results,
    counterfactual_samples,
    label_variants,
    load_trials,
    make_groups,
    model_sizes,
    read_sweep_file,
    version_mix,
)
from memray.report.tables import (
    attacks_table,
    axes_methods,
    axes_table,
    below_chance_notes,
    counterfactual_table,
    duplication_table,
    epoch_zero_note,
    extraction_table,
    method_by_model_tables,
    seeds_table,
    sort_key,
    trials_table,
    unfinished_table,
    unresolved_notes,
)
from memray.report.figures import FigureFile, counterfactual_figures, make_figures, plot_findings
from memray.report.findings import CHANCE_MARGIN, findings_table
from memray.report.html import html_report
from memray.report.publishing import (
    status_counts,
    group_json,
    jsonable,
    log_to_wandb,
    markdown,
    sweep_uses_wandb,
    table_records,
    trial_json,
)

REPORT_DIR = "report"
HTML_FILE = "report.html"  # beside report.md


def build_report(sweep_dir: Path, out_dir: Path | None = None, *, wandb: bool = False,
                 bootstrap: int = BOOTSTRAP_RESAMPLES) -> Path:
    """Write the report of a sweep folder and return the path of its report.md.

    sweep_dir: a sweep folder (or any folder holding trial folders). out_dir: where to
    write (default `<sweep_dir>/report`; its figures/ and tables/ are replaced). wandb: also
    log the figures and tables to a W&B "report" run of the sweep's group. bootstrap:
    resamples for the AUC intervals (0: none). A folder that does not exist, or holds
    neither trial results nor a sweep.yaml, is a ConfigError.
    """
    shown = Path(sweep_dir)  # as given: the report names the folder as its reader knows it
    sweep_dir = Path(sweep_dir).expanduser().resolve()
    if not sweep_dir.is_dir():
        raise ConfigError(str(sweep_dir), "", "no such folder")
    out_dir = Path(out_dir).expanduser().resolve() if out_dir else sweep_dir / REPORT_DIR
    sweep, cells, problem = read_sweep_file(sweep_dir)
    trials = load_trials(sweep_dir, cells, skip=out_dir)
    if not trials:
        raise ConfigError(str(sweep_dir), "", "no trial results below this folder (no result.json) and no sweep.yaml")
    name = sweep.name if sweep is not None else sweep_dir.name
    notes = [problem] if problem else []
    mix = version_mix(trials)
    if mix:
        notes.append(mix)

    label_variants(trials)
    sizes = model_sizes(trials)
    approx = sorted(m for m, s in sizes.items() if s["source"] == "approx")
    if approx:
        notes.append(f"No trial of {', '.join(approx)} has loaded its model yet: its size is memray's approximation.")
    trials.sort(key=lambda t: sort_key(t, sizes))
    for trial in trials:
        trial.attacks = attack_results(trial, sweep_dir, bootstrap)
    labels = list(dict.fromkeys(label for t in trials for label in t.attack_labels()))
    groups = make_groups(trials)
    notes.extend(unresolved_notes(trials))
    notes.extend(below_chance_notes(trials))
    zero = epoch_zero_note(trials)
    if zero:
        notes.append(zero)

    tables = {"unfinished": unfinished_table(trials)}
    tables.update({t.name: t for t in method_by_model_tables(groups, labels, sizes)})
    tables["seeds"] = seeds_table(groups, labels, sizes)
    findings = findings_table(trials, sweep_dir)
    if findings is not None:
        tables["findings"] = findings
    counterfactual = {t.name: frame for t in trials if (frame := counterfactual_samples(t, sweep_dir)) is not None}
    for table in (*(axes_table(groups, labels, method) for method in axes_methods()), extraction_table(trials),
                  duplication_table(trials), counterfactual_table(trials, counterfactual)):
        if table is not None:
            tables[table.name] = table
    tables["trials"] = trials_table(trials, labels)
    tables["attacks"] = attacks_table(trials)

    for stale in (out_dir / "figures", out_dir / "tables"):
        shutil.rmtree(stale, ignore_errors=True)  # figures of an earlier report that no longer apply
    figures = make_figures(trials, groups, labels, sizes, out_dir / "figures")
    figures.update(counterfactual_figures(trials, counterfactual, out_dir / "figures"))
    if findings is not None:
        path = plot_findings(findings.data, CHANCE_MARGIN, out_dir / "figures" / "findings.png")
        if path is not None:
            figures = {"findings": FigureFile(path, "Findings: each claim's difference with its 95% interval, "
                                                    "coloured by its verdict"), **figures}
    if not labels:
        notes.append("No trial has recorded an epoch yet: no attack numbers or figures.")

    tables_dir = out_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    for table in tables.values():
        table.data.to_csv(tables_dir / f"{table.name}.csv", index=False)
        (tables_dir / f"{table.name}.md").write_text(f"# {table.title}\n\n{table.markdown()}\n")

    wandb_result = log_to_wandb(sweep_dir, name, sweep, figures, tables) if wandb else None
    report = {
        "sweep": {"name": name, "dir": str(sweep_dir), "sweep_file": sweep is not None,
                  "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bootstrap_resamples": bootstrap},
        "counts": status_counts(trials), "notes": notes, "attacks": labels, "models": sizes,
        "trials": [trial_json(t, sizes) for t in trials],
        "groups": [group_json(g, labels) for g in groups],
        "tables": {key: table_records(table) for key, table in tables.items()},
        "figures": {key: figure.path.relative_to(out_dir).as_posix() for key, figure in figures.items()},
        "wandb": wandb_result,
    }
    (out_dir / "report.json").write_text(json.dumps(jsonable(report), indent=1, allow_nan=False))
    path = out_dir / "report.md"
    path.write_text(markdown(name, shown, out_dir, trials, tables, figures, notes))
    (out_dir / HTML_FILE).write_text(html_report(name, shown, status_counts(trials), tables, figures, notes))
    return path


def report_command(sweep_dir: str | Path, out_dir: str | Path | None = None) -> int:
    """`memray report SWEEP_DIR`: build the report (logging it to W&B when the sweep used
    W&B) and print where it is. Returns 0; bad input raises ConfigError (exit code 2)."""
    sweep_dir = Path(sweep_dir)
    path = build_report(sweep_dir, Path(out_dir) if out_dir else None,
                        wandb=sweep_dir.is_dir() and sweep_uses_wandb(sweep_dir))
    report = json.loads((path.parent / "report.json").read_text())
    counts = ", ".join(f"{count} {status}" for status, count in report["counts"].items())
    print(f"report: {path} ({len(report['trials'])} trials: {counts}); to open and share: {path.parent / HTML_FILE}")
    print(f"tables: {path.parent / 'tables'}/ (Markdown and CSV); figures: {path.parent / 'figures'}/; "
          f"every number: {path.parent / 'report.json'}")
    logged = report.get("wandb")
    if logged and logged.get("logged"):
        where = f"offline in {logged['dir']} (upload with `wandb sync {logged['dir']}`)" \
            if logged["mode"] == "offline" else "online"
        print(f"W&B: report run {logged['run_id']} {where}")
    elif logged:
        print(f"W&B: not logged ({logged.get('error')})", file=sys.stderr)
    return 0
