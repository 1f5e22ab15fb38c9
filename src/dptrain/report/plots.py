"""The report's figures, drawn with matplotlib's Agg renderer (no display needed) and returned as PNG bytes.

Each function takes run summaries (``run.json`` contents) and draws one figure:

- :func:`epsilon_vs_step`: privacy spent as training proceeds, with each run's target.
- :func:`privacy_utility`: held-out accuracy against epsilon: each run's path during training and the final
  models, with the non-private reference as a line.
- :func:`membership_roc`: the membership attack's ROC for each model with the DP bound its epsilon implies, on
  linear axes and on log-log axes (the low false-positive region is where privacy is decided).
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from dptrain.audit.roc import dp_tpr_bound

DPI = 110
NONPRIVATE_COLOUR = "#d62728"
GRID = {"color": "#dddddd", "linewidth": 0.6}


def _figure(width: float = 7.0, height: float = 4.2, ncols: int = 1) -> Any:
    from matplotlib.figure import Figure  # matplotlib (about a second): only when a report is drawn

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # (see _figure)

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def run_colours(runs: list[dict[str, Any]]) -> list[str]:
    """One colour per run, the same in every figure: DP runs take tab10 in order, the non-private one red."""
    colours, k = [], 0
    for run in runs:
        if run["privacy"]["differentially_private"]:
            colours.append(f"C{k if k < 3 else k + 1}")  # skip C3 (red), kept for the non-private run
            k += 1
        else:
            colours.append(NONPRIVATE_COLOUR)
    return colours


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#666666")
    ax.set_xticks([])
    ax.set_yticks([])


def _epsilon_axes(ax: Any, xlabel: str, ylabel: str) -> None:
    """Axes of an epsilon-over-time plot: from (0, 0), a grid, the legend top left."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(**GRID)
    ax.legend(loc="upper left", fontsize=8)


def epsilon_vs_step(runs: list[dict[str, Any]]) -> bytes:
    fig, ax = _figure()
    drawn = False
    for run, colour in zip(runs, run_colours(runs)):
        privacy = run["privacy"]
        if not privacy["differentially_private"]:
            continue
        steps = [0] + [h["step"] for h in run["history"]]
        eps = [0.0] + [h["epsilon"] for h in run["history"]]
        if privacy["epsilon"] is not None and steps[-1] == privacy["steps"]:
            eps[-1] = privacy["epsilon"]  # the final value from the engine's exact accountant
        ax.plot(steps, eps, color=colour, linewidth=2, marker="o" if len(steps) < 15 else None, markersize=3,
                label=f"{run['name']} (final ε = {eps[-1]:.2f})")
        if privacy["target_epsilon"]:
            ax.axhline(privacy["target_epsilon"], color=colour, linestyle="--", linewidth=1, alpha=0.7)
        if run["status"] != "completed":
            ax.plot([steps[-1]], [eps[-1]], marker="X", color=colour, markersize=10, linestyle="none")
        drawn = True
    if not drawn:
        _no_data(ax, "no differentially private run")
    else:
        delta = next(r["privacy"]["delta"] for r in runs if r["privacy"]["differentially_private"])
        _epsilon_axes(ax, "training step", f"ε spent (δ = {delta:g})")
    ax.set_title("Privacy spent during training (dashed: target ε; X: stopped early)", fontsize=10)
    return _png(fig)


def epsilon_vs_round(epsilons: list[float], delta: float, cap: float | None = None) -> bytes:
    """Client-level epsilon after each round of a federated run (dashed: the budget's cap, if any)."""
    fig, ax = _figure()
    rounds = list(range(len(epsilons) + 1))
    ax.plot(rounds, [0.0, *epsilons], color="#1f77b4", linewidth=2, marker="o" if len(rounds) < 30 else None,
            markersize=3, label=f"final ε = {epsilons[-1]:.2f}" if epsilons else "no round")
    if cap is not None:
        ax.axhline(cap, color="#b02a2a", linestyle="--", linewidth=1, label=f"budget cap ε = {cap:.3g}")
    ax.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole numbers
    _epsilon_axes(ax, "round", f"ε spent per client (δ = {delta:g})")
    ax.set_title("Client-level privacy spent during federated training", fontsize=10)
    return _png(fig)


def privacy_utility(runs: list[dict[str, Any]]) -> bytes:
    fig, ax = _figure()
    finals = []
    for run, colour in zip(runs, run_colours(runs)):
        accuracy = run["results"]["test_accuracy"]
        if not run["privacy"]["differentially_private"]:
            ax.axhline(100 * accuracy, color=colour, linestyle="--", linewidth=1.5,
                       label=f"{run['name']} (no DP): {accuracy:.1%}")
            continue
        path = [(h["epsilon"], 100 * h["test_accuracy"]) for h in run["history"] if h["epsilon"]]
        if path:
            ax.plot(*zip(*path), color=colour, linewidth=1, alpha=0.45)
        eps = run["privacy"]["epsilon"]
        if eps:
            finals.append((eps, 100 * accuracy))
            ax.plot([eps], [100 * accuracy], marker="o", markersize=9, color=colour, linestyle="none",
                    label=f"{run['name']}: {accuracy:.1%} at ε = {eps:.2f}")
    if finals:
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator  # (see _figure)

        finals.sort()
        if len(finals) > 1:
            ax.plot(*zip(*finals), color="#333333", linewidth=1.5, zorder=0)
        ax.set_xscale("log")
        seen = [h["epsilon"] for r in runs for h in r["history"] if h["epsilon"]] + [e for e, _ in finals]
        low, high = min(seen) / 1.3, max(seen) * 1.5
        ax.set_xlim(low, high)
        ticks = [t for t in (0.01, 0.03, 0.1, 0.2, 0.5, 1, 2, 3, 5, 8, 10, 20, 30, 50, 100) if low <= t <= high]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(lambda value, _pos: f"{value:g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("ε (log scale); thin lines: each run during training")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(which="both", **GRID)
        ax.legend(loc="lower right", fontsize=8)
    elif not runs or all(not r["privacy"]["differentially_private"] for r in runs):
        ax.set_ylabel("held-out accuracy (%)")
        ax.set_xticks([])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Privacy-utility: accuracy against ε", fontsize=10)
    return _png(fig)


def membership_roc(runs: list[dict[str, Any]]) -> bytes:
    fig, (linear, loglog) = _figure(width=10.0, height=4.4, ncols=2)
    audited = [(r, c) for r, c in zip(runs, run_colours(runs)) if r.get("audit")]
    floor = 1.0
    for run, colour in audited:
        audit = run["audit"]
        fpr, tpr = np.asarray(audit["roc"]["fpr"]), np.asarray(audit["roc"]["tpr"])
        floor = min(floor, 0.5 / audit["num_nonmembers"])
        label = f"{run['name']}: attack (AUC {audit['auc']:.3f})"
        for ax in (linear, loglog):
            ax.plot(fpr, tpr, color=colour, linewidth=1.8, label=label if ax is linear else None)
        if audit["bound_epsilon"] is not None:
            grid = np.concatenate([[0.0], np.logspace(-5, 0, 400)])
            bound = dp_tpr_bound(grid, audit["bound_epsilon"], audit["bound_delta"])
            for ax in (linear, loglog):
                ax.plot(grid, bound, color=colour, linewidth=1.2, linestyle="--",
                        label=f"{run['name']}: DP bound (ε' = {audit['bound_epsilon']:.2f})" if ax is linear else None)
    if not audited:
        _no_data(linear, "no membership audit")
        _no_data(loglog, "no membership audit")
        return _png(fig)
    chance = np.logspace(math.log10(floor), 0, 50)
    for ax in (linear, loglog):
        ax.plot(chance, chance, color="#888888", linestyle=":", linewidth=1, label="guessing" if ax is linear else None)
        ax.set_xlabel("false-positive rate (non-members called members)")
        ax.set_ylabel("true-positive rate (members found)")
        ax.grid(**GRID)
    linear.set_xlim(0, 1)
    linear.set_ylim(0, 1.01)
    linear.set_title("Membership attack ROC (dashed: most any attack can do under DP)", fontsize=10)
    linear.legend(loc="lower right", fontsize=7)
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    loglog.set_xlim(floor, 1)
    loglog.set_ylim(floor, 1.05)
    loglog.set_title("The same, log-log: the low false-positive region", fontsize=10)
    return _png(fig)
