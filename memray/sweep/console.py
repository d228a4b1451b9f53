"""What `memray run / resume` show while a sweep runs (`SweepScreen`), fed by the Tune
callback of `ray_tune` with each trial's start, epochs and end. No Ray here.

- On a terminal: one live table, redrawn in place (rich's `Live`): trial, state, epoch of
  epochs, validation perplexity, the headline AUC (the trial's first attack), elapsed
  time; a failure adds one line with its reason above the table.
- Anywhere else (a pipe, a log file, CI, a Ray job): one line per trial and epoch and one
  per change of a trial's state, so the whole sweep holds at most
  `2 + trials x (epochs + 2)` lines: the sweep's first and last line, and per trial its
  epochs 0..E, `running` and its end.

Ray Tune's own status tables and result boxes, and what the trials' processes print, are
shown with `memray run -v` alone (then this screen stays silent: `ray_tune` decides).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

from memray.config import TrialConfig
from memray.metric_keys import is_auc_key, mia_key
from memray.metrics import below_chance_note

#: A trial's states as the screen shows them: memray's (`memray.results`), and `pending`
#: for a trial that has not started; the order of the summary's counts.
STATES = ("running", "pending", "success", "failed", "interrupted", "lost")
STATE_STYLES = {"running": "cyan", "pending": "dim", "success": "green", "failed": "bold red",
                "interrupted": "yellow", "lost": "red"}
REFRESH_PER_SECOND = 1  # the elapsed column ticks; events redraw at once


def headline_label(config: TrialConfig) -> str | None:
    """The attack whose AUC the screen shows: the trial's first attack (None for a
    reference model of lira / rmia, which is scored by its target, not attacked)."""
    if config.reference is not None or not config.attacks:
        return None
    return config.attacks[0].labels[0]


def elapsed_text(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h01m`; `-` for none."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _number(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


@dataclass
class TrialRow:
    """One trial as the screen shows it."""

    name: str
    epochs: int  # planned training epochs (epoch 0 is the one before training)
    headline: str | None  # attack label of the AUC column
    state: str = "pending"
    epoch: int | None = None  # last reported epoch
    val_ppl: float | None = None
    auc: float | None = None
    started: float | None = None  # time.monotonic() of this driver's start of it
    ended: float | None = None

    def record(self, metrics: Mapping[str, Any]) -> None:
        self.epoch = int(metrics["epoch"])
        self.val_ppl = metrics.get("val/ppl")
        if self.headline is not None:
            self.auc = metrics.get(mia_key(self.headline))

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.ended if self.ended is not None else now) - self.started

    def epoch_text(self) -> str:
        return f"{'-' if self.epoch is None else self.epoch}/{self.epochs}"


class SweepScreen:
    """The sweep's console: a live table on a terminal, else lines (see the module).

    names: cell index -> trial name; configs: cell index -> its TrialConfig; known: cell
    index -> the result.json a trial already has (a resumed sweep: its state and last epoch
    are shown, no line is printed for them); stream: where it writes (stdout); live: the
    table (True) or lines (False), by default whether `stream` is a terminal.
    """

    def __init__(self, sweep: str, names: Mapping[int, str], configs: Mapping[int, TrialConfig],
                 known: Mapping[int, Mapping[str, Any]] | None = None, stream: TextIO | None = None,
                 live: bool | None = None) -> None:
        self.sweep = sweep
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.rows = {index: TrialRow(names[index], configs[index].train.epochs, headline_label(configs[index]))
                     for index in sorted(names)}
        for index, result in (known or {}).items():
            row = self.rows[index]
            row.state = result.get("status") or "pending"
            if row.state == "running":  # no process runs it before this driver starts it again
                row.state = "lost"
            if result.get("epochs"):
                row.record(result["epochs"][-1])
        headlines = {row.headline for row in self.rows.values() if row.headline}
        self.auc_header = f"{headlines.pop()} AUC" if len(headlines) == 1 else "AUC"
        self.begun = time.monotonic()
        self._lock = threading.Lock()
        self._live: Any = None

    # -- events (the Tune callback's thread) -----------------------------------------

    def start(self) -> "SweepScreen":
        """Begin showing (the live table on a terminal; nothing to print for lines)."""
        if self.live:
            from rich.console import Console
            from rich.live import Live

            # what Python prints meanwhile (memray's other lines, warnings) goes above the table
            console = Console(file=self.stream, force_terminal=True)
            self._live = Live(get_renderable=self.table, console=console, refresh_per_second=REFRESH_PER_SECOND,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.start()
        return self

    def started(self, index: int) -> None:
        """Trial `index` runs (a first start, a retry or a resume)."""
        with self._lock:
            row = self.rows[index]
            if row.state == "running":
                return
            row.state, row.started, row.ended = "running", time.monotonic(), None
            self._line(row, "running" + (f" (from epoch {row.epoch})" if row.epoch else ""))

    def epoch(self, index: int, metrics: Mapping[str, Any]) -> None:
        """Trial `index` reported an epoch's metrics."""
        if "epoch" not in metrics:
            return
        with self._lock:
            row = self.rows[index]
            row.record(metrics)
            if row.state != "running":
                row.state, row.started = "running", row.started or time.monotonic()
            self._line(row, epoch_text(row, metrics))

    def ended(self, index: int, state: str, reason: str | None = None) -> None:
        """Trial `index` ended in `state` (a failure with its reason; `retrying`: failed,
        and Tune starts it again)."""
        with self._lock:
            row = self.rows[index]
            row.state, row.ended = ("failed" if state == "retrying" else state), time.monotonic()
            text = state if state != "retrying" else "failed, retrying"
            if reason:
                text += f": {reason}"
            if self.live:
                if state != "success":  # a line above the table, which keeps the rest
                    from rich.text import Text

                    self._live.console.print(Text(f"[memray] {row.name}: {text}", style=STATE_STYLES[row.state]),
                                             soft_wrap=True)
                self._live.refresh()
            else:
                self._print(f"[memray] {row.name}: {text}")

    def stop(self) -> None:
        """Stop the live table (its last state stays on the terminal)."""
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    # -- what is shown ---------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Trials per state, in STATES order, states with none left out."""
        found = [row.state for row in self.rows.values()]
        return {state: found.count(state) for state in dict.fromkeys([*STATES, *found]) if found.count(state)}

    def summary(self) -> str:
        counts = ", ".join(f"{count} {state}" for state, count in self.counts().items())
        return f"sweep {self.sweep}: {len(self.rows)} trials: {counts}; {elapsed_text(time.monotonic() - self.begun)}"

    def table(self) -> Any:
        """The live table (a rich Table) of every trial; its cells are Text, never markup."""
        from rich.table import Table
        from rich.text import Text

        now = time.monotonic()
        table = Table(title=self.summary(), title_justify="left", expand=False, box=None, pad_edge=False,
                      header_style="bold")
        for column, justify in (("trial", "left"), ("state", "left"), ("epoch", "right"), ("val ppl", "right"),
                                (self.auc_header, "right"), ("elapsed", "right")):
            table.add_column(column, justify=justify, no_wrap=True)
        for row in self.rows.values():
            auc = _number(row.auc, 3)
            if row.headline and self.auc_header == "AUC" and row.auc is not None:
                auc = f"{row.headline} {auc}"
            table.add_row(Text(row.name), Text(row.state, style=STATE_STYLES.get(row.state, "")), Text(row.epoch_text()),
                          Text(_number(row.val_ppl, 2)), Text(auc), Text(elapsed_text(row.elapsed(now))))
        return table

    def _line(self, row: TrialRow, text: str) -> None:
        if self.live:
            self._live.refresh()
        else:
            self._print(f"[memray] {row.name}: {text}")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def epoch_text(row: TrialRow, metrics: Mapping[str, Any]) -> str:
    """An epoch in one line: `epoch 2/3 | train loss 2.31 | val ppl 10.2 | loss AUC 0.612`,
    then the other attacks' AUCs."""
    parts = [f"epoch {row.epoch_text()}"]
    for key, name, digits in (("train/loss", "train loss", 4), ("val/ppl", "val ppl", 2)):
        if metrics.get(key) is not None:
            parts.append(f"{name} {_number(metrics[key], digits)}")
    aucs = [key for key in metrics if is_auc_key(key)]
    if row.headline:
        aucs.sort(key=lambda key: key != mia_key(row.headline))
    parts += [f"{key.split('/')[1]} AUC {_number(metrics[key], 3)}" for key in aucs]
    flag = below_chance_note(metrics)  # with the split audit's overlap beside it
    return " | ".join(parts + ([flag] if flag else []))
