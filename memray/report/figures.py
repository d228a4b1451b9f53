"""The report's figures (matplotlib's object API: a Figure renders with Agg, no pyplot
global state): AUC vs epoch, AUC vs model size, privacy-utility, LoRA bars, ROC curves on
log-log axes, extraction vs duplicate count, counterfactual memorization vs duplicate count,
the findings table as a forest plot, and privacy vs utility against DP-SGD's target epsilon.

One style throughout, for what the studies compare: a method's colour comes from its
family (`memray.methods.METHOD_FAMILIES`: cool hues and solid lines for parameter-based
methods, warm hues and dashed lines for prompt-based ones), the same in every figure;
one panel per attack (or per attack and model), wrapped into a grid of at most
`GRID_COLUMNS` columns that fits a laptop screen, its legend in a spare panel or below;
intervals as light bands under the lines.
"""

from __future__ import annotations

import math
import typing
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogFormatter, NullLocator

from memray.methods import METHOD_FAMILIES, METHODS
from memray.metric_keys import is_auc_key, is_mia_key, mia_key, parse_mia_key
from memray.report.loading import COUNTERFACTUAL, Group, Trial, is_finite, method_label
from memray.report.tables import axes_groups, axes_methods, duplicate_metrics, ordered_variants, params_text, slug

FIGURE_DPI = 110
CHANCE_AUC = 0.5
GRID_COLUMNS = 3  # panels per row: three 4-inch panels are about 1,300 pixels wide
#: Opacity of interval bands: one band alone at BAND_ALPHA, and where a panel has many, all
#: of them stacked no darker than about BAND_ALPHA_TOTAL, so that every line shows through
BAND_ALPHA, BAND_ALPHA_TOTAL = 0.12, 0.3
LINE_WIDTH = 1.5


def _colors(variants: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {variant: cmap(index % cmap.N) for index, variant in enumerate(variants)}


MARKERS = "osD^vP*Xh<>p"
#: Colours of each method family, distinct shades of one hue family in the order they are
#: handed out: parameter-based methods in blues, greens and purples, prompt-based ones in
#: oranges, reds and browns; a method no family claims (no longer registered) is grey.
FAMILY_COLORS = {
    "parameter-based": ["#08519c", "#31a354", "#756bb1", "#6baed6", "#006d2c", "#9e9ac8", "#17becf", "#74c476"],
    "prompt-based": ["#e6550d", "#a50f15", "#fd8d3c", "#c51b7d", "#8c510a", "#ef3b2c"],
}
FAMILY_LINESTYLES = {"parameter-based": "-", "prompt-based": "--"}
OTHER_FAMILY = "other"


@dataclass(frozen=True)
class MethodStyle:
    """How a method (a variant label) is drawn in every figure."""

    color: str
    linestyle: str
    marker: str
    family: str  # a key of METHOD_FAMILIES, or OTHER_FAMILY

    def line(self) -> dict[str, Any]:
        """Keyword arguments of `Axes.plot` / `errorbar` for this method's line."""
        return {"color": self.color, "linestyle": self.linestyle, "marker": self.marker, "markersize": 4,
                "linewidth": LINE_WIDTH}


def method_family(method: str) -> str:
    """A method's family as its registry entry names it (OTHER_FAMILY for an unknown one)."""
    return METHODS[method].family if method in METHODS else OTHER_FAMILY


def method_styles(groups: list[Group]) -> dict[str, MethodStyle]:
    """Variant label -> its style: colour from its family's palette, in the report's order
    of variants (`ordered_variants`), the family's line style, a marker per variant."""
    methods = {g.variant: g.method for g in groups}
    styles, used = {}, defaultdict(int)
    for variant in ordered_variants(groups):
        family = method_family(methods[variant])
        index = used[family]
        used[family] += 1
        palette = FAMILY_COLORS.get(family, ["#636363", "#969696", "#252525"])
        styles[variant] = MethodStyle(palette[index % len(palette)], FAMILY_LINESTYLES.get(family, ":"),
                                      MARKERS[index % len(MARKERS)], family)
    return styles


def _figure(rows: int, cols: int, width: float = 4.4, height: float = 3.3, sharey: bool = False):
    figure = Figure(figsize=(width * cols, height * rows + 0.9), layout="constrained", dpi=FIGURE_DPI)
    axes = figure.subplots(rows, cols, squeeze=False, sharey=sharey)
    return figure, axes


def _grid(panels: int, width: float = 4.0, height: float = 2.9, sharey: bool = False, row: int | None = None):
    """A figure of `panels` panels, GRID_COLUMNS to a row (or `row`, the panels of one
    model or dataset, where they fit in one): (figure, axes grid)."""
    cols = min(GRID_COLUMNS, panels) if row is None or row > GRID_COLUMNS else row
    return _figure(math.ceil(panels / cols), cols, width, height, sharey)


def _legend(figure, axes_grid, handles: dict[str, Any] | None = None) -> None:
    """One legend below the panels: the labelled artists of every panel, or `handles`."""
    if handles is None:
        handles = {}
        for ax in axes_grid.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                      ncols=min(4, len(handles)), fontsize="small", frameon=False)


def _method_legend(figure, axes_grid, used: int, styles: dict[str, MethodStyle], shown: set[str],
                   extra: dict[str, Any] | None = None) -> None:
    """The methods' legend, one column per family under its name (then `extra` entries),
    in the grid's first spare panel (those past `used` are hidden), else below the panels."""
    columns: list[list[tuple[str, Any]]] = []
    for family, title in [*METHOD_FAMILIES.items(), (OTHER_FAMILY, "other")]:
        members = [(variant, Line2D([], [], **style.line())) for variant, style in styles.items()
                   if style.family == family and variant in shown]
        if members:
            columns.append([(title, Line2D([], [], alpha=0)), *members])
    if extra:
        columns.append([("", Line2D([], [], alpha=0)), *extra.items()])
    if not columns:
        return
    depth = max(len(column) for column in columns)
    entries = [entry for column in columns for entry in column + [("", Line2D([], [], alpha=0))] * (depth - len(column))]
    titles = {column[0][0] for column in columns}
    cols = len(axes_grid[0])
    spare = [axes_grid[i // cols][i % cols] for i in range(used, len(axes_grid) * cols)]
    for ax in spare:
        ax.set_axis_off()
    kwargs = {"ncols": len(columns), "fontsize": "small", "frameon": False, "handlelength": 2.6}
    if spare:
        legend = spare[0].legend([h for _, h in entries], [t for t, _ in entries], loc="center", **kwargs)
    else:
        legend = figure.legend([h for _, h in entries], [t for t, _ in entries], loc="outside lower center", **kwargs)
    for text in legend.get_texts():
        if text.get_text() in titles and text.get_text():
            text.set_fontweight("bold")


def _plain_log_ticks(axis) -> None:
    """Plain numbers (20, 30, 50) on a log axis instead of 2x10^1."""
    axis.set_major_formatter(LogFormatter(labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


def _ticks_at(axis, values: list[float], labels: list[str]) -> None:
    """Ticks exactly at `values` (model sizes, copy counts) on a log axis, no minor ticks."""
    axis.set_ticks(values, labels)
    axis.set_minor_locator(NullLocator())


def _finish_grid(figure, axes_grid, used: int, title: str, path: Path) -> Path:
    """Title the grid, add the legend (in its first panel past the `used` ones, where there
    is one, else below), hide the other unused panels, save it."""
    cols = len(axes_grid[0])
    spare = [axes_grid[index // cols][index % cols] for index in range(used, len(axes_grid) * cols)]
    figure.suptitle(title)
    if spare:
        handles = {}
        for ax in axes_grid.flat:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        for ax in spare:
            ax.set_axis_off()
        if handles:
            spare[0].legend(list(handles.values()), list(handles), loc="center", fontsize="small", frameon=False)
    else:
        _legend(figure, axes_grid)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _attack_title(label: str) -> str:
    return f"attack: {label}"


def _by_epoch(trials: list[Trial], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epochs and the mean and std over trials of a metric at each epoch."""
    values: dict[int, list[float]] = defaultdict(list)
    for t in trials:
        for row in t.epochs:
            if is_finite(row.get(key)):
                values[int(row["epoch"])].append(row[key])
    epochs = np.array(sorted(values))
    means = np.array([np.mean(values[e]) for e in epochs])
    stds = np.array([np.std(values[e], ddof=1) if len(values[e]) > 1 else 0.0 for e in epochs])
    return epochs, means, stds


def _bands(ax, bands: list[tuple[Any, Any, Any, MethodStyle]]) -> None:
    """Intervals (x, lows, highs, style) as light bands without edges, under the lines:
    the more bands a panel has, the lighter each (BAND_ALPHA, BAND_ALPHA_TOTAL)."""
    alpha = min(BAND_ALPHA, BAND_ALPHA_TOTAL / max(1, len(bands)))
    for x, lows, highs, style in bands:
        ax.fill_between(x, lows, highs, color=style.color, alpha=alpha, linewidth=0, zorder=1)


def _label_outer(axes_grid, used: int, xlabel: str, ylabel: str) -> None:
    """Axis labels on the panels at the grid's left edge and bottom (of the used ones) only."""
    cols = len(axes_grid[0])
    for index in range(used):
        ax = axes_grid[index // cols][index % cols]
        if index % cols == 0:
            ax.set_ylabel(ylabel)
        if index + cols >= used:
            ax.set_xlabel(xlabel)


def plot_auc_vs_epoch(trials: list[Trial], dataset: str, labels: list[str], sizes: dict,
                      styles: dict[str, MethodStyle], path: Path) -> Path:
    """A panel per model and attack: each method's AUC per epoch, its interval as a band."""
    chosen = [t for t in trials if t.dataset == dataset and t.epochs]
    models = sorted({t.model for t in chosen}, key=lambda m: (sizes[m]["params"] or math.inf, m))
    panels = [(model, label) for model in models for label in labels]
    figure, axes = _grid(len(panels), sharey=True, row=len(labels))
    cols = len(axes[0])
    for index, (model, label) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        bands = []
        for variant, style in styles.items():
            group = [t for t in chosen if t.model == model and t.variant == variant]
            epochs, means, stds = _by_epoch(group, mia_key(label))
            if not len(epochs):
                continue
            ax.plot(epochs, means, label=variant, zorder=3, **style.line())
            if len(group) == 1:  # one seed: its own 95% interval per epoch
                _, lows, _ = _by_epoch(group, mia_key(label, "auc_lo"))
                _, highs, _ = _by_epoch(group, mia_key(label, "auc_hi"))
                if len(lows) == len(highs) == len(epochs):
                    bands.append((epochs, lows, highs, style))
            elif any(stds):
                bands.append((epochs, means - stds, means + stds, style))
        _bands(ax, bands)
        ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
        title = _attack_title(label) if len(models) == 1 else f"{model} ({params_text(sizes[model]['params'])}), {label}"
        ax.set_title(title, fontsize="medium")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    _label_outer(axes, len(panels), "epoch (0 = before fine-tuning)", "membership AUC-ROC")
    model_text = f", {models[0]} ({params_text(sizes[models[0]]['params'])})" if len(models) == 1 else ""
    figure.suptitle(f"Membership-inference AUC per epoch, {dataset}{model_text}\n(band: 95% interval of one seed, "
                    "or ± std over seeds; dotted: chance)")
    _method_legend(figure, axes, len(panels), styles, {t.variant for t in chosen})
    return _save(figure, path)


def plot_auc_vs_model_size(groups: list[Group], dataset: str, labels: list[str], sizes: dict,
                           styles: dict[str, MethodStyle], path: Path) -> Path:
    chosen = [g for g in groups if g.dataset == dataset and g.finished]
    models = sorted({g.model for g in chosen if is_finite(sizes[g.model]["params"])}, key=lambda m: sizes[m]["params"])
    figure, axes = _grid(len(labels), sharey=True)
    cols = len(axes[0])
    for col, label in enumerate(labels):
        ax = axes[col // cols][col % cols]
        for variant, style in styles.items():
            points = sorted(((sizes[g.model]["params"], *g.stat(mia_key(label))[:2]) for g in chosen
                             if g.variant == variant and is_finite(sizes[g.model]["params"])), key=lambda p: p[0])
            points = [p for p in points if is_finite(p[1])]
            if not points:
                continue
            x, y, err = (np.array(v, dtype=float) for v in zip(*points))
            ax.errorbar(x, y, yerr=np.nan_to_num(err), capsize=3, elinewidth=0.8, label=variant, **style.line())
        ax.set_xscale("log")
        if models:  # room either side of the outer models, also when there is only one
            ax.set_xlim(sizes[models[0]]["params"] / 1.6, sizes[models[-1]]["params"] * 1.6)
        _ticks_at(ax.xaxis, [sizes[m]["params"] for m in models],
                  [f"{m}\n{params_text(sizes[m]['params'])}" for m in models])
        ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
        ax.set_title(_attack_title(label), fontsize="medium")
        ax.grid(alpha=0.3, which="both")
    _label_outer(axes, len(labels), "model parameters (log scale)", "membership AUC-ROC, final epoch")
    figure.suptitle(f"AUC vs model size, {dataset} (mean ± std over seeds)")
    _method_legend(figure, axes, len(labels), styles, {g.variant for g in chosen})
    return _save(figure, path)


def plot_ppl_vs_auc(trials: list[Trial], labels: list[str], models: list[str], styles: dict[str, MethodStyle],
                    path: Path) -> Path:
    """Privacy vs utility: a panel per dataset and attack, a point per trial (colour: its
    method, marker: its model; hollow: unfinished)."""
    chosen = [t for t in trials if t.final and is_finite(t.final.get("val/ppl"))]
    datasets = sorted({t.dataset for t in chosen})
    markers = {model: MARKERS[i % len(MARKERS)] for i, model in enumerate(models)}
    panels = [(dataset, label) for dataset in datasets for label in labels]
    figure, axes = _grid(len(panels), sharey=True, row=len(labels))
    cols = len(axes[0])
    for index, (dataset, label) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for t in chosen:
            auc = t.final.get(mia_key(label))
            if t.dataset != dataset or not is_finite(auc):
                continue
            color = styles[t.variant].color
            ax.scatter(t.final["val/ppl"], auc, marker=markers[t.model], s=36, zorder=3,
                       color=color if t.status == "success" else "none", edgecolors=color)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
        ax.set_title(_attack_title(label) if len(datasets) == 1 else f"{dataset}, {label}", fontsize="medium")
        ax.grid(alpha=0.3, which="both")
    _label_outer(axes, len(panels), "validation perplexity, final epoch (log scale)", "membership AUC-ROC, final epoch")
    extra = {model: Line2D([], [], color="dimgrey", marker=markers[model], linestyle="")
             for model in models if any(t.model == model for t in chosen)}
    extra["unfinished trial"] = Line2D([], [], color="none", markeredgecolor="dimgrey", marker="o", linestyle="")
    dataset_text = f", {datasets[0]}" if len(datasets) == 1 else ""
    figure.suptitle(f"Privacy vs utility{dataset_text}: one point per trial (colour: method, marker: model)")
    _method_legend(figure, axes, len(panels), styles, {t.variant for t in chosen}, extra)
    return _save(figure, path)


def axes_figure_stem(method: str) -> str:
    """File stem of a method's `report_axes` figure: `lora_placement_rank`."""
    return "_".join([method, *METHODS[method].config.report_axes])  # type: ignore[misc]


def plot_axes(groups: list[Group], labels: list[str], method: str, path: Path) -> Path | None:
    """Bars of the method's variants on its `report_axes` (LoRA: a bar per kind at each
    value), from chance, a panel per dataset, model and attack."""
    schema = METHODS[method].config
    category, number = schema.report_axes  # type: ignore[misc]
    chosen = [(g, point) for g, point in axes_groups(groups, method) if g.finished]
    if not chosen:
        return None
    panels = sorted({(g.dataset, g.model) for g, _ in chosen})
    # the category axis in the order its config field declares (LoRA: attn, mlp, both)
    declared = list(typing.get_args(schema.model_fields[category].annotation)) or sorted({p[0] for _, p in chosen})
    kinds = [k for k in declared if any(point[0] == k for _, point in chosen)]
    numbers = sorted({point[1] for _, point in chosen})
    colors = _colors(kinds)
    width = 0.8 / len(kinds)
    cells = [(dataset, model, label) for dataset, model in panels for label in labels]
    figure, axes = _grid(len(cells), width=max(4.0, 0.5 * len(numbers) * len(kinds)), row=len(labels))
    cols = len(axes[0])
    for index, (dataset, model, label) in enumerate(cells):
        ax = axes[index // cols][index % cols]
        tops = [CHANCE_AUC]  # bar ends with their error bars, for the y range
        for slot, kind in enumerate(kinds):
            x, heights, errors = [], [], []
            for position, value in enumerate(numbers):
                match = [g for g, point in chosen if (g.dataset, g.model) == (dataset, model)
                         and point == (kind, value)]
                # several groups at one point (another axis varies): their mean
                values = [g.stat(mia_key(label)) for g in match]
                values = [v for v in values if is_finite(v[0])]
                if values:
                    x.append(position + (slot - (len(kinds) - 1) / 2) * width)
                    heights.append(np.mean([v[0] for v in values]) - CHANCE_AUC)
                    errors.append(np.nan_to_num(values[0][1]) if len(values) == 1 else 0.0)
            if x:
                ax.bar(x, heights, width=width, bottom=CHANCE_AUC, yerr=errors, capsize=2,
                       color=colors[kind], label=f"{category} {kind}")
                tops += [CHANCE_AUC + h + e for h, e in zip(heights, errors)]
                tops += [CHANCE_AUC + h - e for h, e in zip(heights, errors)]
        span = max(tops) - min(tops) or 0.1
        ax.set_ylim(min(tops) - 0.1 * span, max(tops) + 0.1 * span)
        ax.set_xticks(range(len(numbers)), [f"{v:g}" for v in numbers])
        ax.axhline(CHANCE_AUC, color="grey", linewidth=1)
        ax.set_title(f"{dataset}, {model}, {_attack_title(label)}", fontsize="medium")
        ax.grid(alpha=0.3, axis="y")
    _label_outer(axes, len(cells), number, "membership AUC-ROC, final epoch")
    return _finish_grid(figure, axes, len(cells), f"{schema.report_title} (bars from chance = 0.5; mean ± std over "
                        "seeds)", path)


def plot_roc(trials: list[Trial], dataset: str, model: str, variants: list[str], path: Path) -> Path | None:
    """ROC curves (log-log) of one dataset and model: a panel per method, a line per
    attack, from the finished trial of the lowest seed (else the latest unfinished one);
    at each reported FPR (1%, 0.1%) the attack's TPR as a point with its 95% Clopper-Pearson
    interval as an error bar (a point alone where the trial recorded no interval). Returns
    the file written, or None when no trial has ROC points."""
    panels = []
    for variant in variants:
        candidates = [t for t in trials if (t.dataset, t.model, t.variant) == (dataset, model, variant)
                      and any(a.roc is not None for a in t.attacks.values())]
        if candidates:
            candidates.sort(key=lambda t: (t.status != "success", t.seed if t.seed is not None else 0))
            panels.append((variant, candidates[0]))
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure, axes = _figure(rows, cols, width=4.0, height=3.6)
    attack_colors = _colors(list(dict.fromkeys(label for _, t in panels for label in t.attacks)))
    for index, (variant, trial) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        floor = 1.0
        for label, attack in trial.attacks.items():
            if attack.roc is None:
                continue
            fpr, tpr = attack.roc
            positive = fpr[fpr > 0]
            floor = min(floor, positive.min() if positive.size else 1.0, *(x for x, _, _ in attack.tpr_points()))
            ax.plot(fpr, tpr, color=attack_colors[label], label=label)
        for label, attack in trial.attacks.items():
            if attack.roc is not None:
                _tpr_error_bars(ax, attack.tpr_points(), floor, attack_colors[label])
        grid = np.logspace(np.log10(floor), 0, 50)
        ax.plot(grid, grid, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(floor / 1.5, 1)  # room for the point at the lowest FPR
        ax.set_ylim(floor, 1.05)
        aucs = "\n".join(f"{label} AUC {a.auc:.3f}" for label, a in trial.attacks.items() if a.roc is not None)
        ax.text(0.97, 0.03, aucs, transform=ax.transAxes, ha="right", va="bottom", fontsize="small",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        status = "" if trial.status == "success" else f", {trial.status}"
        ax.set_title(f"{variant}\nseed {trial.seed}, epoch {int(trial.final['epoch'])}{status}", fontsize="medium")
        ax.set_xlabel("false-positive rate (log scale)")
        ax.set_ylabel("true-positive rate (log scale)")
        ax.grid(alpha=0.3, which="both")
    return _finish_grid(figure, axes, len(panels),
                        f"ROC curves, {dataset}, {model}\n(dotted: chance; bars: 95% interval of each TPR)", path)


def _tpr_error_bars(ax, points: list[tuple[float, float, tuple[float, float] | None]], floor: float, color) -> None:
    """Each (FPR, TPR, interval) of `points` as a point with its interval as an error bar on
    a log-log ROC panel whose axes start at `floor` (a bound or TPR below it drawn at it)."""
    for fpr, tpr, ci in points:
        shown = max(tpr, floor)
        error = None if ci is None else [[shown - max(ci[0], floor)], [max(ci[1], floor) - shown]]
        ax.errorbar([fpr], [shown], yerr=error, color=color, marker="o", markersize=4, capsize=3, linestyle="")


def _duplication_panels(trials: list[Trial]) -> list[str]:
    keys: dict[str, None] = {}
    for t in trials:
        for values in duplicate_metrics(t.final).values():
            keys.update(dict.fromkeys(values))
    wanted = []
    for key in keys:
        extraction_rate = key == "extract/exact" or (key.startswith("extract/") and "@" in key
                                                     and not key.startswith("extract/nonmember/"))
        if extraction_rate or is_auc_key(key) or key == "canary/exposure":
            wanted.append(key)
    return sorted(wanted, key=lambda k: (not k.startswith("extract/"), k != "extract/exact", k))


def plot_duplication(trials: list[Trial], dataset: str, styles: dict[str, MethodStyle], path: Path) -> Path | None:
    chosen = [t for t in trials if t.dataset == dataset and t.status == "success" and duplicate_metrics(t.final)]
    panels = _duplication_panels(chosen)
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    figure, axes = _figure(rows, cols)
    models = sorted({t.model for t in chosen})
    model_styles = {model: ["-", "--", "-.", ":"][i % 4] for i, model in enumerate(models)}
    levels = sorted({c for t in chosen for c in duplicate_metrics(t.final)})
    for index, key in enumerate(panels):
        ax = axes[index // cols][index % cols]
        for model in models:
            for variant, style in styles.items():
                values: dict[int, list[float]] = defaultdict(list)
                for t in chosen:
                    if (t.model, t.variant) == (model, variant):
                        for copies, metrics in duplicate_metrics(t.final).items():
                            if is_finite(metrics.get(key)):
                                values[copies].append(metrics[key])
                if not values:
                    continue
                copies = sorted(values)
                line = {**style.line(), **({"linestyle": model_styles[model]} if len(models) > 1 else {})}
                ax.plot(copies, [np.mean(values[c]) for c in copies], label=f"{variant}, {model}" if len(models) > 1
                        else variant, **line)
        ax.set_xscale("log", base=2)
        _ticks_at(ax.xaxis, levels, [str(c) for c in levels])
        if is_mia_key(key):
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            ylabel = "membership AUC-ROC vs all non-members"
        elif key == "canary/exposure":
            ylabel = "canary exposure (bits)"
        else:
            ylabel = "share of members extracted"
        ax.set_title(_duplicate_title(key), fontsize="medium")
        ax.set_xlabel("copies in the training data (log scale)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
    return _finish_grid(figure, axes, len(panels), f"Memorization vs duplication, {dataset} (final epoch, mean over seeds)", path)


def _duplicate_title(key: str) -> str:
    if key == "extract/exact":
        return "exact extraction"
    if key.startswith("extract/"):
        name, _, threshold = key.removeprefix("extract/").partition("@")
        return f"{name} >= {threshold}"
    if is_mia_key(key):
        return _attack_title(key.split("/")[1])
    return key


def plot_counterfactual(trials: list[Trial], samples: dict[str, pd.DataFrame], dataset: str, path: Path) -> Path | None:
    """Counterfactual memorization vs copies in the training data, one dataset: a panel per
    model and method (its seeds' final epochs pooled), a box per copy count of the members
    and one of the non-members, each sample a dot over it. Takes the trials, their samples
    by trial name (`counterfactual_samples`), the dataset and the file to write; returns
    the file, or None when no trial of the dataset has samples."""
    chosen = [t for t in trials if t.dataset == dataset and t.name in samples]
    panels = sorted({(t.model, t.variant) for t in chosen})
    if not panels:
        return None
    figure, axes = _grid(len(panels), width=4.4, height=3.3)
    cols = len(axes[0])
    rng = np.random.default_rng(0)  # the dots' horizontal jitter, the same on every report
    for index, (model, variant) in enumerate(panels):
        ax = axes[index // cols][index % cols]
        pooled = [samples[t.name] for t in chosen if (t.model, t.variant) == (model, variant)]
        frame = pd.concat(pooled)
        frame = frame[np.isfinite(frame[COUNTERFACTUAL].to_numpy(dtype=float))]
        members, nonmembers = frame[frame["member"]], frame[~frame["member"]]
        boxes = [("non-members", nonmembers[COUNTERFACTUAL], "grey")]
        boxes += [(f"x{c}", members.loc[members["copies"] == c, COUNTERFACTUAL], "tab:blue")
                  for c in sorted(members["copies"].unique())]
        boxes = [(name, values.to_numpy(dtype=float), color) for name, values, color in boxes if len(values)]
        for position, (_, values, color) in enumerate(boxes):
            ax.boxplot([values], positions=[position], widths=0.6, showfliers=False,
                       medianprops={"color": color}, boxprops={"color": color}, whiskerprops={"color": color},
                       capprops={"color": color})
            ax.scatter(position + rng.uniform(-0.2, 0.2, len(values)), values, s=4, alpha=0.3, color=color)
        ax.set_xticks(range(len(boxes)), [f"{name}\n(n={len(values)})" for name, values, _ in boxes])
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{model}, {variant}", fontsize="medium")
        ax.set_xlabel("members by copies in the training data")
        ax.set_ylabel("counterfactual memorization\n(log-likelihood: trained on it - not)")
        ax.grid(alpha=0.3, axis="y")
    return _finish_grid(figure, axes, len(panels), f"Counterfactual memorization vs duplication, {dataset}\n"
                        "(final epoch, seeds pooled; dotted: none)", path)


def counterfactual_figures(trials: list[Trial], samples: dict[str, pd.DataFrame],
                           figures_dir: Path) -> dict[str, FigureFile]:
    """`counterfactual_<dataset>` for each dataset with counterfactual samples (by trial
    name, `counterfactual_samples`), by key; {} when no trial has any."""
    figures = {}
    for dataset in sorted({t.dataset for t in trials if t.name in samples}):
        stem = f"counterfactual_{slug(dataset)}"
        path = plot_counterfactual(trials, samples, dataset, figures_dir / f"{stem}.png")
        if path is not None:
            figures[stem] = FigureFile(path, f"Counterfactual memorization vs copies in the training data, {dataset}")
    return figures


#: Verdicts of the findings table and their marker colours (the table's words).
VERDICT_COLORS = {"holds": "#31a354", "does not hold": "#de2d26", "inconclusive": "#737373"}


def _wrapped(text: str, width: int = 44) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def plot_findings(rows: pd.DataFrame, chance_margin: float, path: Path) -> Path | None:
    """The findings table as a forest plot, one panel per (model, dataset): each row's
    difference (side a - side b, AUC or ROUGE-L) with its 95% interval, or for a
    "near chance" row its AUC less 0.5 inside the shaded +/- `chance_margin` band; the
    marker coloured by the verdict; 0 marked. rows: the findings table's data
    (`memray.report.findings`: finding, measure, model, dataset, a, a_lo, a_hi,
    difference, difference_lo, difference_hi, verdict). None when it has no row."""
    if rows.empty:
        return None
    settings = list(dict.fromkeys(zip(rows["model"], rows["dataset"])))
    most = int(rows.groupby(["model", "dataset"]).size().max())
    figure, axes_grid = _figure(len(settings), 1, width=8.0, height=max(2.4, 0.55 * most + 1.0))
    for ax, (model, dataset) in zip(axes_grid[:, 0], settings):
        part = rows[(rows["model"] == model) & (rows["dataset"] == dataset)].reset_index(drop=True)
        labels = []
        for y, row in part.iterrows():
            chance = not is_finite(row.get("difference"))
            center, low, high = ((row["a"] - CHANCE_AUC, row["a_lo"] - CHANCE_AUC, row["a_hi"] - CHANCE_AUC) if chance
                                 else (row["difference"], row["difference_lo"], row["difference_hi"]))
            color = VERDICT_COLORS.get(row["verdict"], "#252525")
            if chance:
                ax.fill_betweenx([y - 0.4, y + 0.4], -chance_margin, chance_margin, color="#bdbdbd", alpha=0.35, lw=0)
            ax.errorbar([center], [y], xerr=[[center - low], [high - center]], fmt="o", color=color, capsize=3,
                        lw=LINE_WIDTH)
            labels.append(_wrapped(f"{row['finding']} ({row['measure']}{', AUC - 0.5' if chance else ''})"))
        ax.axvline(0.0, color="#252525", lw=0.8, ls=":")
        ax.set_yticks(range(len(part)), labels, fontsize="small")
        ax.set_ylim(len(part) - 0.5, -0.5)
        ax.set_title(f"{model}, {dataset}", fontsize="medium")
        ax.set_xlabel("difference a - b, 95% interval (AUC; ROUGE-L for duplication)")
        ax.grid(axis="x", alpha=0.3)
    handles = {verdict: Line2D([], [], marker="o", ls="", color=color) for verdict, color in VERDICT_COLORS.items()}
    figure.suptitle("Findings of the studies on this sweep")
    _legend(figure, axes_grid, handles)
    return _save(figure, path)


def target_epsilon(trial: Trial) -> float | None:
    """A trial's DP-SGD target epsilon (train.dp.epsilon); None: trained without DP."""
    dp = trial.config.get("train", {}).get("dp")
    return float(dp["epsilon"]) if dp else None


def _mean_and_bar(values: list[float], intervals: list[tuple[float, float] | None]) -> tuple[float, float, float]:
    """(mean, lower, upper error) of the seeds' values: one trial's recorded 95% interval, or
    mean -/+ std over several seeds."""
    mean = float(np.mean(values))
    if len(values) == 1 and intervals[0] is not None:
        return mean, mean - intervals[0][0], intervals[0][1] - mean
    std = float(np.std(values)) if len(values) > 1 else 0.0
    return mean, std, std


def plot_privacy_utility(trials: list[Trial], labels: list[str], path: Path) -> Path | None:
    """What DP-SGD buys, per method against its target epsilon (no DP at the right): per
    (dataset, model) a panel per attack's AUC with its interval, one of epsilon (spent by the
    accountant: filled markers; the empirical lower bound: hollow markers, dotted lines) and one
    of validation perplexity, all at each trial's final epoch; several seeds: mean and std."""
    chosen = [t for t in trials if t.final and t.status == "success"]
    if not any(target_epsilon(t) is not None for t in chosen):
        return None
    targets = sorted({e for t in chosen if (e := target_epsilon(t)) is not None})
    positions = {**{e: i for i, e in enumerate(targets)}, None: len(targets)}
    ticks = [f"{e:g}" for e in targets] + ["no DP"]
    by_method: dict[str, list[Trial]] = defaultdict(list)
    for t in chosen:
        by_method[method_label(t.config)].append(t)
    pseudo = [Group(t[0].dataset, t[0].model, label, t[0].method, t) for label, t in by_method.items()]
    styles = method_styles(pseudo)
    kinds = [*(mia_key(label) for label in labels), "privacy/epsilon", "val/ppl"]
    cells = sorted({(t.dataset, t.model) for t in chosen})
    figure, axes = _grid(len(cells) * len(kinds), row=len(kinds))
    cols = len(axes[0])
    for index, ((dataset, model), kind) in enumerate((cell, kind) for cell in cells for kind in kinds):
        ax = axes[index // cols][index % cols]
        for label, members in by_method.items():
            style = styles[label]
            series = [("privacy/epsilon", style.line()), ("privacy/epsilon_lb", {**style.line(), "linestyle": ":",
                                                                               "markerfacecolor": "none"})] \
                if kind == "privacy/epsilon" else [(kind, style.line())]
            for key, line in series:
                points = []
                for target, position in positions.items():
                    seeds = [t for t in members if t.dataset == dataset and t.model == model and target_epsilon(t) == target
                             and is_finite(t.final.get(key))]
                    if not seeds:
                        continue
                    intervals = [(t.final[key + "_lo"], t.final[key + "_hi"])
                                 if is_finite(t.final.get(key + "_lo")) and is_finite(t.final.get(key + "_hi")) else None
                                 for t in seeds]
                    points.append((position, *_mean_and_bar([float(t.final[key]) for t in seeds], intervals)))
                if points:
                    x, y, low, high = (np.array(column) for column in zip(*points))
                    ax.errorbar(x, y, yerr=[low, high], capsize=3, **line)
        if is_mia_key(kind):
            ax.axhline(CHANCE_AUC, color="grey", linestyle=":", linewidth=1)
            title, ylabel = _attack_title(parse_mia_key(kind)[0]), "membership AUC-ROC"
        elif kind == "privacy/epsilon":
            ax.plot(range(len(targets)), targets, color="grey", linewidth=1, linestyle="--")
            title, ylabel = "epsilon: spent (filled), empirical bound (hollow)", "epsilon"
        else:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            title, ylabel = "validation perplexity", "val PPL (log scale)"
        ax.set_title(title if len(cells) == 1 else f"{dataset}, {model}: {title}", fontsize="medium")
        ax.set_ylabel(ylabel, fontsize="small")
        _ticks_at(ax.xaxis, list(range(len(ticks))), ticks)
        ax.set_xlabel("target epsilon (train.dp)", fontsize="small")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cells) * len(kinds):]:
        ax.set_visible(False)
    figure.suptitle("Privacy vs utility under DP-SGD, final epoch (grey dashes: the target epsilon)")
    _legend(figure, axes, {label: Line2D([], [], **styles[label].line()) for label in by_method})
    return _save(figure, path)


@dataclass
class FigureFile:
    path: Path
    caption: str


def make_figures(trials: list[Trial], groups: list[Group], labels: list[str], sizes: dict[str, dict[str, Any]],
                 figures_dir: Path) -> dict[str, FigureFile]:
    """Every figure the trials have data for, by key (the file's stem)."""
    variants = ordered_variants(groups)
    styles = method_styles(groups)
    models = sorted(sizes, key=lambda m: (sizes[m]["params"] or math.inf, m))
    recorded = [t for t in trials if t.epochs]
    datasets = sorted({t.dataset for t in recorded})
    figures: dict[str, FigureFile] = {}

    def add(stem: str, caption: str, path: Path | None) -> None:
        if path is not None:
            figures[stem] = FigureFile(path, caption)

    def file(stem: str) -> Path:
        return figures_dir / f"{stem}.png"

    if labels:
        for dataset in datasets:
            stem = f"auc_vs_epoch_{slug(dataset)}"
            add(stem, f"AUC vs epoch per method, {dataset}",
                plot_auc_vs_epoch(recorded, dataset, labels, sizes, styles, file(stem)))
        for dataset in sorted({g.dataset for g in groups if g.finished}):
            stem = f"auc_vs_model_size_{slug(dataset)}"
            add(stem, f"AUC vs model size, {dataset}",
                plot_auc_vs_model_size(groups, dataset, labels, sizes, styles, file(stem)))
        if any(is_finite(t.final.get("val/ppl")) for t in recorded):
            add("ppl_vs_auc", "Validation perplexity vs AUC, one point per trial",
                plot_ppl_vs_auc(recorded, labels, models, styles, file("ppl_vs_auc")))
        for method in axes_methods():
            stem = axes_figure_stem(method)
            add(stem, METHODS[method].config.report_title, plot_axes(groups, labels, method, file(stem)))
        for dataset in datasets:
            for model in models:
                stem = f"roc_{slug(dataset)}_{slug(model)}"
                add(stem, f"ROC curves (log-log), {dataset}, {model}; bars: TPR at 1% and 0.1% FPR with its "
                          "95% Clopper-Pearson interval",
                    plot_roc(recorded, dataset, model, variants, file(stem)))
    if labels:
        add("privacy_utility", "Privacy vs utility under DP-SGD: AUC (95% interval), spent and empirical epsilon, "
                               "validation perplexity against the target epsilon, per method",
            plot_privacy_utility(recorded, labels, file("privacy_utility")))
    for dataset in datasets:
        stem = f"duplication_{slug(dataset)}"
        add(stem, f"Memorization vs duplication, {dataset}", plot_duplication(recorded, dataset, styles, file(stem)))
    return figures
