"""Terminal output with rich: a live progress bar while a run trains, and summary tables.

On a terminal, :class:`RichDisplay` shows one progress bar per run (steps done, epoch, held-out loss and accuracy,
epsilon spent against the target, time elapsed and remaining) that updates every step and epoch; with a ledger it
first says how much of the budget is left after this run's reservation. When the output is not a terminal (a pipe, a
CI log) it prints one plain line per ~tenth of the run instead (with the estimated time left), so logs stay short.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def make_console(file: Any = None) -> Console:
    """A console on ``file`` (default: the current ``sys.stdout``); 120 columns when not a terminal."""
    file = file or sys.stdout
    console = Console(file=file, highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(file=file, highlight=False, width=120)
    return console


def _eps(value: float | None) -> str:
    if value is None:
        return "∞"
    return f"{value:.2f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RichDisplay:
    """Progress of one run (implements ``dptrain.app.RunDisplay``)."""

    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or make_console()
        self.live = self.console.is_terminal if live is None else live
        self.progress: Progress | None = None
        self.task: Any = None
        self.name = ""
        self.total = 0
        self.target: float | None = None
        self.epochs = 0
        self.dp = True
        self.last_printed = 0.0

    def start(self, name: str, total_steps: int, info: dict[str, Any]) -> None:
        privacy, dataset, ledger = info["privacy"], info["dataset"], info.get("ledger")
        self.name, self.total = name, total_steps
        self.target, self.epochs = privacy["target_epsilon"], privacy["epochs_planned"]
        self.dp = privacy["differentially_private"]
        line = (f"[bold]{escape(name)}[/bold]: {escape(dataset['name'])}, {dataset['num_train']} training / "
                f"{dataset['num_test']} held-out examples; {total_steps} steps ({self.epochs} epochs)")
        if self.dp:
            target = f"target ε {self.target:g}" if self.target else "fixed noise"
            line += (f"; DP: {target} at δ {privacy['delta']:g}, noise σ {privacy['noise_multiplier']:.3f}, "
                     f"sampling rate {privacy['sample_rate']:.3g} (expected batch "
                     f"{privacy['expected_batch_size']:.0f}), clip {privacy['max_grad_norm']:g}")
        else:
            line += "; [red]non-private reference (no DP)[/red]"
        self.console.print(line, soft_wrap=not self.live)
        if ledger:
            self.console.print(
                f"  ledger {ledger['path']}: budget '{ledger['budget']}' reserved for this run (entry "
                f"{ledger['entry_id']}); budget total with it ε {ledger['spent_epsilon']:.3f} of "
                f"{ledger['cap_epsilon']:g}: ε {ledger['remaining_epsilon']:.3f} left after this run",
                soft_wrap=not self.live, markup=False,
            )
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task(escape(name), total=total_steps, stats="")

    def advance(self, steps_done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=steps_done)

    def _stats(self, record: dict[str, Any]) -> str:
        text = (f"epoch {record['epoch']:g}/{self.epochs}  loss {record['test_loss']:.3f}  "
                f"acc {record['test_accuracy']:.1%}")
        if self.dp:
            text += f"  ε {_eps(record['epsilon'])}" + (f"/{self.target:g}" if self.target else "")
        return text

    def epoch(self, record: dict[str, Any]) -> None:
        stats = self._stats(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], stats=stats)
            return
        # Not a terminal: about ten lines per run, and always the last epoch.
        every = max(1, math.ceil(self.epochs / 10))
        if record["epoch"] >= self.epochs or record["epoch"] - self.last_printed >= every:
            self.last_printed = record["epoch"]
            line = f"  {self.name}: step {record['step']}/{self.total}  {stats}"
            if record["step"] < self.total and record.get("seconds") and record["step"]:
                line += f"  ETA {_duration(record['seconds'] / record['step'] * (self.total - record['step']))}"
            self.console.print(line, markup=False)
            getattr(self.console.file, "flush", lambda: None)()

    def message(self, text: str) -> None:
        style = "yellow" if text.startswith("interrupted") else "dim"
        self.console.print(f"[{style}]{escape(text)}[/{style}]", soft_wrap=not self.live)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def run_table(summaries: list[dict[str, Any]], title: str = "") -> Table:
    """One row per run: privacy, utility, audit and status."""
    deltas = sorted({s["privacy"]["delta"] for s in summaries if s["privacy"]["differentially_private"]})
    caption = f"δ = {', '.join(f'{d:g}' for d in deltas)}" if deltas else ""
    table = Table(title=" ".join(filter(None, [title, f"({caption})" if caption else ""])) or None,
                  title_justify="left")
    for header in ("run", "status", "steps", "ε", "noise σ", "test acc", "MIA AUC", "TPR@1%FPR", "MIA ε LB",
                   "verdict"):
        table.add_column(header, justify="left" if header in ("run", "status", "verdict") else "right", no_wrap=True)
    for s in summaries:
        p, a = s["privacy"], s.get("audit") or {}
        dp = p["differentially_private"]
        if a.get("violates_bound"):
            verdict = "[bold red]SUSPICIOUS[/bold red]"
        elif not a:
            verdict = "-"
        else:
            verdict = "ok" if dp else "[red]no DP[/red]"
        table.add_row(
            s["name"], s["status"], f"{p['steps']}/{p['planned_steps']}", _eps(p["epsilon"]) if dp else "∞",
            f"{p['noise_multiplier']:.3f}" if dp else "-", f"{s['results']['test_accuracy']:.1%}",
            f"{a['auc']:.3f}" if a else "-", f"{a['tpr_at_fpr']['0.01']:.3f}" if a else "-",
            f"{a['epsilon_lower_bound']:.2f}" if a else "-", verdict,
        )
    return table


def print_run_table(console: Console, summaries: list[dict[str, Any]], title: str = "") -> None:
    console.print(run_table(summaries, title))
