"""The report's tables: per trial, per attack, seeds aggregated, method x model size, LoRA
placement x rank, extraction, duplication, counterfactual memorization and unfinished
trials; each a `Table` written as Markdown and CSV.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import pandas as pd
from scipy import stats

from memray.methods import METHODS as METHOD_REGISTRY
from memray.metric_keys import is_auc_key, mia_key
from memray.report.loading import BOOTSTRAP_RESAMPLES, COUNTERFACTUAL, Group, Trial, is_finite



def _num(value: Any, digits: int = 3) -> str:
    if not is_finite(value):
        return "inf" if isinstance(value, float) and math.isinf(value) else "-"
    return f"{value:.{digits}f}"


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if not is_finite(mean):
        return "-"
    return _num(mean, digits) + (f" ± {_num(std, digits)}" if is_finite(std) else "")


#: Marks an AUC whose 95% interval holds 0.5 (not distinguishable from chance).
CHANCE_MARK = " (chance)"
#: Marks an AUC whose 95% interval lies below 0.5 (`below_chance_notes` gives its split audit).
BELOW_CHANCE_MARK = " (below chance!)"


def _chance_mark(trial: Trial, label: str) -> str:
    attack = trial.attacks.get(label)
    if attack is None:
        return ""
    return CHANCE_MARK if attack.chance else BELOW_CHANCE_MARK if attack.below_chance else ""


def split_audit_text(audit: dict[str, Any]) -> str:
    """`7-gram overlap mean 0.040 (max 0.69, 6% above 0.2), 13-gram ...` of a trial's split audit."""
    parts = [f"{key} overlap mean {value['mean']:.3f} (max {value['max']:.2f}, "
             f"{value.get('above_0.2', float('nan')):.0%} above 0.2)"
             for key, value in audit.items() if key.endswith("gram") and isinstance(value, dict)]
    if audit.get("filter"):
        parts.append(f"{audit['filter']['ngram']}-gram filter at {audit['filter']['threshold']:g}: "
                     f"{audit['filter']['dropped']} non-members redrawn")
    return "; ".join(parts) if parts else "no split audit recorded"


def below_chance_notes(trials: list[Trial]) -> list[str]:
    """One note per trial with an AUC significantly below 0.5 at its final epoch, with its
    split audit beside it: members scoring lower than non-members points at the split
    (near-copies across it, or members and non-members that differ in kind), not training."""
    notes = []
    for trial in trials:
        low = [f"{label} {_num(a.auc)} {_interval(a.ci)}" for label, a in trial.attacks.items() if a.below_chance]
        if low:
            notes.append(f"BELOW CHANCE in {trial.name}: {', '.join(low)} (the 95% interval excludes 0.5 from below: "
                         f"the split, not training, is the likely cause); split audit: "
                         f"{split_audit_text(trial.split_audit)}.")
    return notes


def unresolved_notes(trials: list[Trial]) -> list[str]:
    """One note per TPR@FPR that some trials leave out, with the reason they recorded."""
    reasons: dict[str, dict[str, int]] = {}
    for trial in trials:
        for suffix, reason in (trial.attack_rules.get("tpr_unresolved") or {}).items():
            reasons.setdefault(suffix, {}).setdefault(reason, 0)
            reasons[suffix][reason] += 1
    return [f"{suffix.upper()} is not reported for {count} trial(s): {reason}."
            for suffix, found in reasons.items() for reason, count in found.items()]


def epoch_zero_note(trials: list[Trial]) -> str | None:
    """How many epoch-0 AUCs (before fine-tuning, where members and non-members are alike to
    the model) hold 0.5 in their interval, i.e. are marked as chance."""
    bounds = [(row[mia_key(label, "auc_lo")], row[mia_key(label, "auc_hi")])
              for t in trials for row in t.epochs[:1] if int(row["epoch"]) == 0
              for label in t.attack_labels() if is_finite(row.get(mia_key(label, "auc_lo")))]
    if not bounds:
        return None
    chance = sum(low <= 0.5 <= high for low, high in bounds)
    return (f"Epoch 0 (before fine-tuning): {chance} of {len(bounds)} attack AUCs are not distinguishable from "
            "chance (their 95% interval holds 0.5); the per-epoch figures shade each AUC's interval.")


def _interval(ci: tuple[float, float] | None, digits: int = 3) -> str:
    return f"[{_num(ci[0], digits)}, {_num(ci[1], digits)}]" if ci else "-"


def _with_interval(value: float, ci: tuple[float, float] | None, digits: int = 3) -> str:
    """`0.120 [0.081, 0.168]`; the value alone where no interval was recorded, '-' for no value."""
    if not is_finite(value):
        return "-"
    return _num(value, digits) + (f" {_interval(ci, digits)}" if ci else "")


def params_text(params: float | None) -> str:
    if not is_finite(params):
        return "?"
    if params >= 1e9:
        return f"{params / 1e9:.2g}B"
    if params >= 1e6:
        return f"{params / 1e6:.3g}M"
    return f"{params / 1e3:.3g}K"


@dataclass
class Table:
    """A table twice: numbers (CSV, report.json) and formatted text (Markdown)."""

    name: str
    title: str
    data: pd.DataFrame
    text: pd.DataFrame
    note: str = ""

    def markdown(self) -> str:
        if self.text.empty:
            return "(none)"
        return self.text.to_markdown(index=False, disable_numparse=True)


def sort_key(trial: Trial, sizes: dict[str, dict[str, Any]]) -> tuple:
    params = sizes.get(trial.model, {}).get("params")
    method_rank = METHOD_REGISTRY.names().index(trial.method) if trial.method in METHOD_REGISTRY else len(METHOD_REGISTRY)
    return (trial.dataset, params if is_finite(params) else math.inf, trial.model, method_rank, trial.variant,
            trial.seed if trial.seed is not None else -1, trial.name)


def _epochs_text(trial: Trial) -> str:
    done = int(trial.final["epoch"]) if trial.final else "-"
    return f"{done}/{trial.planned_epochs if trial.planned_epochs is not None else '?'}"


def _note(trial: Trial) -> str:
    if trial.status == "failed":
        return f"failed: {trial.reason or 'no reason recorded'}"
    if trial.status == "interrupted":
        return "interrupted (Ctrl-C or SIGTERM): `memray resume` finishes it"
    if trial.status == "lost":
        return "lost: its process died (killed, out of memory, node lost): `memray resume` finishes it"
    if trial.status == "running":
        return "running"
    if trial.status == "pending":
        return "pending (not started)"
    return ""


def trials_table(trials: list[Trial], labels: list[str]) -> Table:
    rows, text = [], []
    for t in trials:
        final, best = t.final, t.best
        row = {"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant, "seed": t.seed,
               "status": t.status, "epochs done": int(final["epoch"]) if final else None,
               "epochs planned": t.planned_epochs, "final val ppl": final.get("val/ppl"),
               "best val ppl": best.get("val/ppl"), "best epoch": best.get("epoch"),
               **{f"{label} auc": final.get(mia_key(label)) for label in labels},
               "epsilon spent": final.get("privacy/epsilon"), "epsilon lb": final.get("privacy/epsilon_lb"),
               "note": _note(t)}
        rows.append(row)
        text.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                     "seed": str(t.seed), "status": t.status, "epochs": _epochs_text(t),
                     "val PPL (final)": _num(final.get("val/ppl"), 2),
                     "val PPL (best)": _num(best.get("val/ppl"), 2) + (f" @{int(best['epoch'])}" if best else ""),
                     **{f"{label} AUC": _num(final.get(mia_key(label))) + _chance_mark(t, label) for label in labels},
                     "ε spent": _num(final.get("privacy/epsilon"), 2), "ε lb": _num(final.get("privacy/epsilon_lb"), 2),
                     "note": _note(t)})
    return Table("trials", "Trials: final and best-epoch validation perplexity, final AUC per attack",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 "Final = last recorded epoch; best = epoch of lowest validation perplexity (shown after @). "
                 f"{CHANCE_MARK} = the AUC's 95% interval holds 0.5: not distinguishable from chance; "
                 f"{BELOW_CHANCE_MARK} = it lies below 0.5 (see the notes for the split audit). "
                 "ε spent: DP-SGD's epsilon by its accountant (result.json's `dp` record; - without train.dp); "
                 "ε lb: the empirical lower bound at 95% confidence (result.json's `privacy_audit`).")


def attacks_table(trials: list[Trial]) -> Table:
    rows, text = [], []
    for t in trials:
        for label, a in t.attacks.items():
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                         "seed": t.seed, "status": t.status, "attack": label, "epoch": t.final.get("epoch"),
                         "auc": a.auc, "chance": a.chance, "below chance": a.below_chance, "auc ci95 low": a.ci[0] if a.ci else None,
                         "auc ci95 high": a.ci[1] if a.ci else None, "tpr@1%fpr": a.tpr_1,
                         "tpr@1%fpr ci95 low": a.tpr_1_ci[0] if a.tpr_1_ci else None,
                         "tpr@1%fpr ci95 high": a.tpr_1_ci[1] if a.tpr_1_ci else None, "tpr@0.1%fpr": a.tpr_01,
                         "tpr@0.1%fpr ci95 low": a.tpr_01_ci[0] if a.tpr_01_ci else None,
                         "tpr@0.1%fpr ci95 high": a.tpr_01_ci[1] if a.tpr_01_ci else None,
                         "best epoch": t.best.get("epoch"), "auc at best epoch": a.auc_best,
                         "tpr@1%fpr at best epoch": a.tpr_1_best, "tpr@0.1%fpr at best epoch": a.tpr_01_best})
            text.append({"trial": t.name, "method": t.variant, "status": t.status, "attack": label,
                         "epoch": str(int(t.final["epoch"])), "AUC": _num(a.auc) + _chance_mark(t, label),
                         "AUC 95% CI": _interval(a.ci),
                         "TPR@1%FPR [95% CI]": _with_interval(a.tpr_1, a.tpr_1_ci),
                         "TPR@0.1%FPR [95% CI]": _with_interval(a.tpr_01, a.tpr_01_ci),
                         "AUC (best epoch)": _num(a.auc_best)})
    return Table("attacks", "Attacks per trial: AUC with its 95% interval, TPR at 1% and 0.1% FPR",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 f"At the final epoch; intervals as the trial recorded them (DeLong's unless eval.bootstrap was set; "
                 f"trials that recorded none: {BOOTSTRAP_RESAMPLES} stratified bootstrap resamples of the per-sample "
                 f"scores); {CHANCE_MARK} = the interval holds 0.5, not distinguishable from chance; "
                 f"{BELOW_CHANCE_MARK} = the interval lies below 0.5 (see the notes for the split audit); a TPR is '-' "
                 "where the non-members cannot resolve its FPR (see the notes); beside it its Clopper-Pearson 95% "
                 "interval over the members at the threshold its FPR chose (the threshold's own uncertainty, "
                 "from the non-members, is not in it; trials run before these intervals show the TPR alone); "
                 "the last column is the AUC at the best-perplexity epoch (its TPRs are in the CSV).")


def seeds_table(groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]]) -> Table:
    """Per configuration with two or more finished seeds (one seed has no spread to show)
    and attack: the mean over seeds, the between-seed sample SD (ddof=1) and the number of
    seeds of the AUC and the TPRs, the bootstrap 95% interval of the seed-mean AUC, and the
    validation perplexity's mean ± SD. Takes the groups, the attack labels and the model
    sizes (`model_sizes`); returns the table."""
    rows, text = [], []
    for g in (g for g in groups if len(g.finished) >= 2):
        ppl, ppl_std, _ = g.stat("val/ppl")
        best_ppl, best_std, _ = g.stat("val/ppl", best=True)
        for label in labels:
            auc, auc_std, n = g.stat(mia_key(label))
            tpr1, tpr1_std, _ = g.stat(mia_key(label, "tpr@1%fpr"))
            tpr01, tpr01_std, _ = g.stat(mia_key(label, "tpr@0.1%fpr"))
            ci = g.auc_interval(label)
            rows.append({"dataset": g.dataset, "model": g.model, "params": sizes[g.model]["params"],
                         "method": g.variant, "config key": g.config_key, "finished": len(g.finished),
                         "trials": len(g.trials), "attack": label, "n seeds": n, "auc mean": auc, "auc std": auc_std,
                         "auc ci95 low": ci[0] if ci else None, "auc ci95 high": ci[1] if ci else None,
                         "tpr@1%fpr mean": tpr1, "tpr@1%fpr std": tpr1_std,
                         "tpr@0.1%fpr mean": tpr01, "tpr@0.1%fpr std": tpr01_std, "final val ppl mean": ppl,
                         "final val ppl std": ppl_std, "best val ppl mean": best_ppl, "best val ppl std": best_std})
            text.append({"dataset": g.dataset, "model": g.model, "method": g.variant, "config": g.config_key,
                         "attack": label, "n seeds": f"{n} of {len(g.trials)}", "AUC mean": _num(auc),
                         "AUC SD": _num(auc_std), "AUC 95% CI": _interval(ci),
                         "TPR@1%FPR mean": _num(tpr1), "TPR@1%FPR SD": _num(tpr1_std),
                         "TPR@0.1%FPR mean": _num(tpr01), "TPR@0.1%FPR SD": _num(tpr01_std),
                         "val PPL (final)": _pm(ppl, ppl_std, 2), "val PPL (best)": _pm(best_ppl, best_std, 2)})
    return Table("seeds", "Over seeds: mean, between-seed SD and interval of each configuration",
                 pd.DataFrame(rows), pd.DataFrame(text),
                 "One row per configuration (config = its key, the `config_key` of its W&B runs) and attack; "
                 "only configurations with two or more finished seeds are listed. n seeds = finished trials the "
                 "numbers are over, of the configuration's trials. Mean = mean over seeds; SD = between-seed "
                 "sample standard deviation (ddof=1; in the CSV `std`); AUC 95% CI = bootstrap interval of the "
                 "seed-mean AUC (percentiles of the per-resample mean over seeds); val PPL: mean ± SD.")


def method_by_model_tables(groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]]) -> list[Table]:
    """Per dataset: rows = method, columns = models by size; one block per metric (val PPL,
    each attack's AUC, and exact extraction when measured)."""
    tables = []
    for dataset in sorted({g.dataset for g in groups}):
        chosen = [g for g in groups if g.dataset == dataset]
        models = sorted({g.model for g in chosen}, key=lambda m: (sizes[m]["params"] or math.inf, m))
        variants = ordered_variants(chosen)
        metrics = ["val/ppl", *(mia_key(label) for label in labels)]
        if any("extract/exact" in g.metric_keys() for g in chosen):
            metrics.append("extract/exact")
        rows, text = [], []
        for metric in metrics:
            digits = 2 if metric == "val/ppl" else 3
            for variant in variants:
                row: dict[str, Any] = {"metric": metric, "method": variant}
                line = {"metric": _metric_title(metric), "method": variant}
                for model in models:
                    match = [g for g in chosen if g.model == model and g.variant == variant]
                    mean, std, _ = match[0].stat(metric) if match else (math.nan, math.nan, 0)
                    row[model], row[f"{model} std"] = mean, std
                    line[f"{model} ({params_text(sizes[model]['params'])})"] = _pm(mean, std, digits)
                rows.append(row)
                text.append(line)
        tables.append(Table(f"method_by_model_{slug(dataset)}", f"Method x model size, {dataset}",
                            pd.DataFrame(rows), pd.DataFrame(text),
                            "Final epoch, mean ± std over seeds of finished trials; '-' where none finished."))
    return tables


def axes_groups(groups: list[Group], method: str) -> list[tuple[Group, tuple[str, float]]]:
    """The groups of `method` with their point on its `report_axes` (its unit's
    `MethodSchema.report_point`), those compared there only."""
    schema = METHOD_REGISTRY[method].config
    chosen = []
    for g in groups:
        if g.method != method:
            continue
        try:
            point = schema.model_validate(g.trials[0].config.get("method", {})).report_point()
        except ValueError:  # a section an older memray wrote, no longer valid: not compared
            point = None
        if point is not None:
            chosen.append((g, point))
    return chosen


def axes_methods() -> list[str]:
    """Registered methods that compare their variants on axes of their own (`report_axes`)."""
    return [name for name in METHOD_REGISTRY if METHOD_REGISTRY[name].config.report_axes is not None]


def axes_table(groups: list[Group], labels: list[str], method: str) -> Table | None:
    """The method's variants by its `report_axes` (LoRA: placement and rank), a row per
    variant and attack; table name: the method's name."""
    schema = METHOD_REGISTRY[method].config
    category, number = schema.report_axes  # type: ignore[misc]
    rows, text = [], []
    for g, (kind, value) in axes_groups(groups, method):
        for label in labels:
            auc, std, n = g.stat(mia_key(label))
            ppl, ppl_std, _ = g.stat("val/ppl")
            rows.append({"dataset": g.dataset, "model": g.model, "method": g.variant,
                         category: kind, number: value, "attack": label,
                         "auc mean": auc, "auc std": std, "finished": n, "final val ppl mean": ppl,
                         "final val ppl std": ppl_std})
    if not rows:
        return None
    data = pd.DataFrame(rows).sort_values(["dataset", "model", "attack", category, number], kind="stable")
    for row in data.to_dict("records"):
        text.append({"dataset": row["dataset"], "model": row["model"], "method": row["method"],
                     category: row[category], number: str(row[number]), "attack": row["attack"],
                     "AUC": _pm(row["auc mean"], row["auc std"]),
                     "val PPL": _pm(row["final val ppl mean"], row["final val ppl std"], 2)})
    return Table(method, schema.report_title, data.reset_index(drop=True), pd.DataFrame(text),
                 "Final epoch, mean ± std over seeds of finished trials.")


def extraction_table(trials: list[Trial]) -> Table | None:
    rows, text = [], []
    for t in trials:
        for group, prefix in (("members", "extract/"), ("non-members", "extract/nonmember/")):
            # names below the prefix, without breakdowns and without the other group's keys
            values = {key[len(prefix):]: value for key, value in t.final.items()
                      if key.startswith(prefix) and "@dup" not in key and "/" not in key[len(prefix):]}
            if not values:
                continue
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant, "seed": t.seed,
                         "status": t.status, "epoch": t.final.get("epoch"), "samples of": group, **values})
            text.append({"trial": t.name, "method": t.variant, "status": t.status, "samples of": group,
                         **{name: _num(value, 1 if name in ("lcp", "samples", "skipped") else 3)
                            for name, value in values.items()}})
    if not rows:
        return None
    return Table("extraction", "Extraction: generated continuation vs the true suffix", pd.DataFrame(rows),
                 pd.DataFrame(text).fillna("-"),
                 "Final epoch. exact = share reproduced token for token; lcp = mean common prefix (tokens); "
                 "rougeL / bleu / edit = mean similarity; name@t = share with similarity >= t. Non-members "
                 "show what the model reaches without having seen the text.")


_DUP = re.compile(r"^(?P<metric>.+)@dup(?P<copies>\d+)$")


def duplicate_metrics(final: dict[str, Any]) -> dict[int, dict[str, float]]:
    """copies -> {metric: value} from a final-epoch dict's `...@dup<c>` keys."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for key, value in final.items():
        match = _DUP.match(key)
        if match:
            out[int(match["copies"])][match["metric"]] = value
    return dict(sorted(out.items()))


def duplication_table(trials: list[Trial]) -> Table | None:
    rows = []
    for t in trials:
        for copies, values in duplicate_metrics(t.final).items():
            rows.append({"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant,
                         "seed": t.seed, "status": t.status, "epoch": t.final.get("epoch"), "copies": copies, **values})
    if not rows:
        return None
    data = pd.DataFrame(rows)
    text = data.drop(columns=["dataset", "model", "seed", "epoch"]).copy()
    for column in text.columns:
        if column not in ("trial", "method", "status", "copies"):
            text[column] = [_num(v, 1 if column.endswith("samples") else 3) for v in text[column]]
    text["copies"] = text["copies"].astype(str)
    return Table("duplication", "By copy count in the training data", data, text,
                 "Final epoch; each metric over the members with that many copies (AUC: against all non-members).")


def _mean_of(values: pd.Series) -> tuple[float, int]:
    """(mean, count) of the finite values; NaN mean for none."""
    values = values[np.isfinite(values.to_numpy(dtype=float))]
    return (float(values.mean()) if len(values) else math.nan), len(values)


def _mean_text(mean: float, count: int) -> str:
    return f"{_num(mean)} (n={count})" if count else "-"


def counterfactual_table(trials: list[Trial], samples: dict[str, pd.DataFrame]) -> Table | None:
    """Counterfactual memorization against duplication and extraction, per trial at its
    final epoch. Takes the trials and, per trial name, its samples (`counterfactual_samples`:
    trials without any are left out). Per trial: the mean counterfactual of its members
    by copy count and over all members, of its non-members, of the members extraction
    reproduced exactly and of those it did not, and Spearman's rank correlation between the
    members' counterfactual and their best extraction similarity (where extraction ran;
    NaN for fewer than 3 members or constant values). None when no trial has samples."""
    chosen = [t for t in trials if t.name in samples]
    if not chosen:
        return None
    levels = sorted({int(c) for t in chosen for c in samples[t.name].loc[samples[t.name]["member"], "copies"]})
    rows, text = [], []
    for t in chosen:
        frame = samples[t.name]
        members, nonmembers = frame[frame["member"]], frame[~frame["member"]]
        row = {"trial": t.name, "dataset": t.dataset, "model": t.model, "method": t.variant, "seed": t.seed,
               "status": t.status, "epoch": t.final.get("epoch")}
        line = {"trial": t.name, "method": t.variant, "status": t.status, "epoch": str(int(t.final["epoch"]))}
        groups = [("members", members)] + [(f"copies {c}", members[members["copies"] == c]) for c in levels]
        groups.append(("non-members", nonmembers))
        if "extracted" in frame:
            groups += [("extracted", members[members["extracted"] == 1.0]),
                       ("not extracted", members[members["extracted"] == 0.0])]
        for name, group in groups:
            mean, count = _mean_of(group[COUNTERFACTUAL])
            row[f"{name} mean"], row[f"{name} n"] = mean, count
            line[name.replace("copies ", "x")] = _mean_text(mean, count)
        if "best similarity" in frame:
            tried = members[np.isfinite(members["best similarity"].to_numpy(dtype=float))
                            & np.isfinite(members[COUNTERFACTUAL].to_numpy(dtype=float))]
            rho = math.nan
            if len(tried) >= 3 and tried[COUNTERFACTUAL].nunique() > 1 and tried["best similarity"].nunique() > 1:
                rho = float(stats.spearmanr(tried[COUNTERFACTUAL], tried["best similarity"]).statistic)
            row["spearman best similarity"], row["spearman n"] = rho, len(tried)
            line["Spearman (best similarity)"] = f"{_num(rho)} (n={len(tried)})" if len(tried) else "-"
        rows.append(row)
        text.append(line)
    return Table("counterfactual", "Counterfactual memorization vs duplication and extraction", pd.DataFrame(rows),
                 pd.DataFrame(text).fillna("-"),
                 "Final epoch. Counterfactual memorization of a sample (Zhang et al. 2021): its mean log-likelihood "
                 "under the reference models that trained on it minus under those that did not (positive = "
                 "memorized); mean over the trial's members, by copies in the training data (xc), over its "
                 "non-members, and over the members extraction tried: reproduced exactly (extracted) or not. "
                 "Spearman: rank correlation over those members between counterfactual memorization and the best "
                 "of their extraction similarities (rougeL, bleu, edit). '-' where the trial ran no extraction.")


def unfinished_table(trials: list[Trial]) -> Table:
    rows = [{"trial": t.name, "status": t.status, "epochs": _epochs_text(t), "reason": _note(t), "path": t.path}
            for t in trials if t.status != "success"]
    data = pd.DataFrame(rows, columns=["trial", "status", "epochs", "reason", "path"])
    return Table("unfinished", "Trials not finished", data, data.astype(str))


def ordered_variants(groups: Iterable[Group]) -> list[str]:
    seen = {}
    for g in groups:
        seen.setdefault(g.variant, METHOD_REGISTRY.names().index(g.method) if g.method in METHOD_REGISTRY
                       else len(METHOD_REGISTRY))
    return sorted(seen, key=lambda v: (seen[v], v))


def _metric_title(metric: str) -> str:
    if metric == "val/ppl":
        return "val PPL"
    if metric == "extract/exact":
        return "exact extraction"
    if is_auc_key(metric):
        return f"{metric.split('/')[1]} AUC"
    return metric


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"
