"""The demo: scikit-learn's handwritten digits (real data, shipped with scikit-learn), non-private and DP.

``make demo`` = ``dptrain demo`` = ``python -m dptrain demo`` runs :func:`run_demo`: a non-private reference and
DP-Adam at eps = 1, 3 and 8 (delta = 1e-5), each charged to a budget ledger in the output directory, each audited
with the loss-threshold membership attack, then one HTML report and a privacy card per model.

The training recipe lives in one place, the defaults of :func:`train_digits`; the demo, and anything else that
wants "the digits recipe", calls that function. The data: :mod:`dptrain.datasets`.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.markup import escape

from dptrain.app.config import AuditConfig, DatasetConfig, LedgerConfig, ModelConfig, PrivacyConfig, RunConfig, TrainingConfig
from dptrain.app.stopping import INTERRUPTED, RunDisplay, StopRequest, stop_on_signals
from dptrain.app.train import run_training, write_suite
from dptrain.report.console import RichDisplay, make_console, print_run_table

DEMO_EPSILONS = (1.0, 3.0, 8.0)
DEMO_DELTA = 1e-5
#: ``--quick``: the non-private reference and one DP run (same recipe). Fewer epochs would not help: most of a
#: run's time is noise calibration, which takes longer for shorter runs (smaller noise).
QUICK_EPSILONS = (3.0,)


def train_digits(
    target_epsilon: float | None = 3.0,
    delta: float = DEMO_DELTA,
    epochs: int = 100,
    batch_size: int = 719,
    lr: float = 0.02,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    hidden: tuple[int, ...] = (32,),
    activation: str = "tanh",
    optimizer: str = "adam",
    scale_to: tuple[float, float] = (-1.0, 1.0),
    *,
    name: str | None = None,
    output_dir: str | Path | None = None,
    ledger: LedgerConfig | None = None,
    display: RunDisplay | None = None,
    stop: StopRequest | None = None,
    audit: bool = True,
) -> dict[str, Any]:
    """THE digits recipe: an MLP trained with DP-Adam at ``target_epsilon`` (``None``: without DP, same recipe).

    The defaults of the recipe arguments (``delta`` .. ``scale_to``) are the demo's recipe, chosen on a validation
    split carved out of the training set (see ``benchmarks/utility.py``; the search is not charged to the budget):
    inputs centred to [-1, 1] by the known pixel range, MLP 64-32-10 with tanh, DP-Adam lr 0.02, q = 1/2, 200
    steps, C = 1. The data loader's
    ``batch_size`` sets the Poisson rate q = 1 / ceil(1437 / batch_size); ``scale_to`` maps the pixels, scaled to
    [0, 1] by their known maximum, onto [low, high] (``(-1, 1)`` centres them). The keyword-only
    arguments say where the run goes: ``output_dir`` writes a full run directory (checkpoint, report, privacy
    card; nothing is written without it), ``ledger`` charges a budget, ``display`` shows progress.

    Returns ``test_accuracy``, ``epsilon`` (inf without DP), ``delta``, ``noise_multiplier``, ``steps``,
    ``status``, ``run_dir`` and ``summary`` (the run's ``run.json`` content).
    """
    config = RunConfig(
        name=name or ("non-private" if target_epsilon is None else f"eps={target_epsilon:g}"),
        seed=seed,
        dataset=DatasetConfig(name="digits", scale_to=tuple(scale_to)),
        model=ModelConfig(hidden=tuple(hidden), activation=activation),
        training=TrainingConfig(
            epochs=epochs, batch_size=batch_size, max_grad_norm=max_grad_norm, optimizer=optimizer, lr=lr
        ),
        privacy=None if target_epsilon is None else PrivacyConfig(delta=delta, target_epsilon=target_epsilon),
        ledger=ledger,
        audit=AuditConfig(membership=audit),
    )
    result = run_training(
        config, output_dir=output_dir, display=display, stop=stop, write_files=output_dir is not None
    )
    privacy = result.summary["privacy"]
    return {
        "test_accuracy": result.summary["results"]["test_accuracy"],
        "epsilon": math.inf if privacy["epsilon"] is None else privacy["epsilon"],
        "delta": delta,
        "noise_multiplier": privacy["noise_multiplier"],
        "steps": privacy["steps"],
        "status": result.status,
        "run_dir": result.run_dir,
        "summary": result.summary,
    }


def _run_dir_name(epsilon: float | None) -> str:
    return "nonprivate" if epsilon is None else f"eps{epsilon:g}"


def run_demo(
    output_dir: str | Path | None = None,
    *,
    epsilons: tuple[float, ...] | None = None,
    delta: float = DEMO_DELTA,
    quick: bool = False,
    seed: int = 0,
    console: Any = None,
) -> dict[str, Any]:
    """Run the demo into ``output_dir`` (default ``runs/demo-<timestamp>``); returns paths and run summaries.

    ``epsilons`` default to 1, 3, 8 (``quick``: 3 only).
    Every DP run is charged to budget "digits" in ``OUTPUT_DIR/privacy.db`` (cap: 1.25 x the sum of the
    epsilons); the non-private reference is not (its epsilon is infinite: in a real deployment it would void any
    budget). Stops after the current run's clean shutdown on Ctrl-C (``status`` "interrupted").
    """
    console = console or make_console()
    epsilons = tuple(float(e) for e in (epsilons or (QUICK_EPSILONS if quick else DEMO_EPSILONS)))
    if not epsilons or any(not (e > 0 and math.isfinite(e)) for e in epsilons):
        raise ValueError(f"--epsilons must be finite numbers > 0, got {list(epsilons)}")
    out = Path(output_dir) if output_dir else Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} is not empty; choose another --output-dir or remove it")
    out.mkdir(parents=True, exist_ok=True)
    cap = float(math.ceil(1.25 * sum(epsilons)))
    ledger = LedgerConfig(path=str(out / "privacy.db"), budget="digits", cap=cap)
    start = time.perf_counter()
    console.print(
        "[bold]dptrain demo[/bold]: scikit-learn digits, non-private and DP at eps "
        f"{', '.join(f'{e:g}' for e in epsilons)}"
        f" (delta {delta:g}); budget 'digits' (cap eps {cap:g}) in {escape(ledger.path)}"
        + ("; --quick" if quick else ""), soft_wrap=True,
    )
    stop = StopRequest()
    runs, summaries = [], []
    with stop_on_signals(stop):  # Ctrl-C between two runs' training loops (e.g. during calibration) also stops cleanly
        for epsilon in (None, *epsilons):
            result = train_digits(
                epsilon, delta, seed=seed, output_dir=out / _run_dir_name(epsilon), stop=stop,
                ledger=None if epsilon is None else ledger, display=RichDisplay(console),
            )
            runs.append(_run_dir_name(epsilon))
            summaries.append(result["summary"])
            if stop:
                break
    seconds = time.perf_counter() - start
    interrupted = stop.reason == INTERRUPTED
    report = write_suite(
        out,
        "dptrain demo: private and non-private models on scikit-learn digits",
        runs,
        {"status": INTERRUPTED if interrupted else "completed", "seconds": round(seconds, 1), "quick": quick,
         "epsilons": list(epsilons), "delta": delta, "ledger": {"path": ledger.path, "budget": ledger.budget}},
    )
    print_run_table(console, summaries, title="dptrain demo: digits")
    last_ledger = next((s["ledger"] for s in reversed(summaries) if s.get("ledger")), None)
    if last_ledger:
        console.print(
            f"ledger {last_ledger['path']}: budget '{last_ledger['budget']}' spent eps "
            f"{last_ledger['spent_epsilon']:.3f} of {last_ledger['cap_epsilon']:g} at delta {last_ledger['delta']:g} "
            f"({last_ledger['entries']} entries, {last_ledger['reserved_entries']} still reserved; all DP runs "
            "composed with PLD, tighter than adding their epsilons)", soft_wrap=True, markup=False,
        )
    console.print(f"privacy cards: {out}/<run>/privacy_card.md (and .json)", soft_wrap=True, markup=False)
    console.print(f"finished in {seconds:.0f} s" + (" (interrupted)" if interrupted else ""))
    console.print(f"report: {report}", soft_wrap=True, markup=False)
    return {"report": report, "output_dir": out, "summaries": summaries, "interrupted": interrupted,
            "seconds": seconds}
