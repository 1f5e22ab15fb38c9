"""Config-driven training runs: ``dptrain train CONFIG.toml`` and the demo.

A run is described by a :class:`RunConfig` (read from TOML by :func:`load_config`, which validates every key and
reports all problems at once) and executed by :func:`run_training`, which

1. loads the dataset (scikit-learn's digits, or a CSV file whose features are scaled by *declared* ranges, never by
   statistics of the private data),
2. builds an MLP and trains it with DP-SGD/DP-Adam through :class:`dptrain.engine.PrivacyEngine`, optionally
   charging a budget ledger (reserve before the first step, settle after the last),
3. reports progress once per epoch (loss and accuracy on the *held-out* split, epsilon spent),
4. stops cleanly on Ctrl-C (SIGINT) or SIGTERM: the current step finishes, a checkpoint is written, the ledger
   reservation is settled to the steps actually taken, and a partial report and privacy card marked
   "interrupted" are produced,
5. audits the model with the loss-threshold membership attack (training set vs held-out set) when ``[audit]
   membership = true`` (off by default: it is computed from the training data without noise, so its figures are
   outside the guarantee, for reviewers; the card says so),
6. writes ``run.json`` (everything below is derived from it), ``metrics.jsonl``, ``model.pt`` (the weights: the DP
   release), ``checkpoint.pt`` (for resuming: it also holds the noise generator's state, so it is as private as the
   data), ``report.html`` and ``privacy_card.json`` / ``privacy_card.md`` to the run directory.

Why held-out metrics only: the training loss is a statistic of the private data computed without noise; showing it
would release information outside the guarantee. The held-out split is not protected by the guarantee either (it
is evaluated without noise), which the privacy card states.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dptrain.accounting import COARSE_PLD_VALUE_DISCRETIZATION, composed_epsilon
from dptrain.app.config import ConfigError, LedgerConfig, RunConfig
from dptrain.app.data import LoadedData, fingerprint, load_dataset
from dptrain.app.models import build_model, describe_model, evaluate
from dptrain.app.stopping import BUDGET_EXHAUSTED, COMPLETED, INTERRUPTED, RunDisplay, StopRequest, _NoDisplay, stop_on_signals
from dptrain.audit.mia import loss_threshold_attack
from dptrain.budget import BudgetLedger, UnknownBudgetError
from dptrain.engine import PrivacyEngine
from dptrain.optim import BudgetExhausted
from dptrain.report import write_run_report, write_suite_report
from dptrain.rundir import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_FORMAT,
    RUN_FILE,
    RUN_FORMAT,
    SUITE_FILE,
    SUITE_FORMAT,
    json_number,
    now,
    software_versions,
    write_atomically,
    write_json,
)

@dataclass
class RunResult:
    """The outcome of :func:`run_training`: ``summary`` is the content of ``run.json``."""
    status: str
    summary: dict[str, Any]
    run_dir: Path | None
    model: Any = field(repr=False, default=None)
    signal_number: int | None = None

    @property
    def exit_code(self) -> int:
        if self.status == INTERRUPTED:
            return 128 + (self.signal_number or signal.SIGINT)
        audit = self.summary.get("audit") or {}
        return 3 if audit.get("violates_bound") else 0


def default_output_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _check_output_dir(path: Path) -> None:
    if (path / RUN_FILE).exists() or (path / SUITE_FILE).exists():
        raise ConfigError([f"output directory {path} already holds a run; choose another output_dir or remove it"],
                          str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError([f"output_dir {path} exists and is not a directory"], str(path))


def _open_ledger(config: LedgerConfig, delta: float, create: bool = True) -> Any:
    """The ledger with the budget checked (created if ``cap`` is given and it does not exist). ``create=False``
    checks only: nothing is created (None when the ledger does not exist yet and ``cap`` would create it)."""
    path = Path(config.path)
    missing = ConfigError(
        [f"[ledger] no budget {config.budget!r} in {path}: create it (dptrain budget create {config.budget} "
         f"--epsilon CAP --delta {delta:g} --ledger {path}) or set cap = CAP to create it"], str(path)
    )  # fmt: skip
    if not create and not path.exists():
        if config.cap is None:
            raise missing
        return None
    if create and not path.exists() and config.cap is None:
        raise missing  # before creating anything: a refused run leaves no ledger file behind
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    ledger = BudgetLedger(path, create=create)
    try:
        budget = ledger.budget(config.budget)
    except UnknownBudgetError:
        if config.cap is None:
            raise missing from None
        if not create:
            return ledger
        budget = ledger.create(config.budget, config.cap, delta)
    problems = []
    if config.cap is not None and budget.epsilon != config.cap:
        problems.append(f"[ledger] cap = {config.cap:g} but budget {config.budget!r} exists with cap {budget.epsilon:g}"
                        "; remove cap or make it match")
    if budget.delta != delta:
        problems.append(f"[privacy] delta = {delta:g} but budget {config.budget!r} is set at delta {budget.delta:g}")
    if budget.privacy_unit != "example":
        problems.append(f"[ledger] budget {config.budget!r} protects users; dptrain train samples examples and "
                        "accounts per example, so it cannot charge a user-level budget")
    if problems:
        raise ConfigError(problems, str(path))
    return ledger


def _refuse_weak_delta(config: RunConfig, num_train: int) -> None:
    """ConfigError for a delta >= 1/N unless ``[privacy] allow_weak_delta = true`` (the privacy settings then flag
    it for the card)."""
    pc = config.privacy
    if pc is not None and pc.delta >= 1.0 / num_train and not pc.allow_weak_delta:
        raise ConfigError([
            f"[privacy] delta = {pc.delta:g} >= 1/N = {1.0 / num_train:.3g} ({num_train} training examples): a "
            "mechanism that publishes one random example in full satisfies it; choose delta well below 1/N (e.g. "
            f"{num_train ** -1.1:.1g}), or set allow_weak_delta = true (the privacy card then says so)"
        ], "config")  # fmt: skip


def check_run(config: RunConfig) -> LoadedData:
    """What :func:`run_training` checks before its first step, without training or writing any file: the data
    (loaded and validated), delta against the number of training examples, and the ledger (read, never created)."""
    data = load_dataset(config.dataset)
    _refuse_weak_delta(config, len(data.train))
    if config.ledger is not None and config.privacy is not None:
        _open_ledger(config.ledger, config.privacy.delta, create=False)
    return data


def _ledger_info(ledger: Any, budget_name: str, entry_id: int | None) -> dict[str, Any]:
    summary = ledger.summary(budget_name)
    entries = ledger.history(budget_name)
    entry = next((e for e in entries if e.id == entry_id), None)
    return {
        "path": str(Path(ledger.path).resolve()),  # absolute: the card is read from anywhere
        "budget": budget_name,
        "cap_epsilon": summary.budget.epsilon,
        "delta": summary.budget.delta,
        "privacy_unit": summary.budget.privacy_unit,
        "spent_epsilon": summary.spent,
        "remaining_epsilon": summary.remaining,
        "entries": summary.entries,
        "reserved_entries": summary.reserved,
        "entry_id": entry_id,
        "entry_status": entry.status if entry else None,
        "entry_steps": entry.steps if entry else None,
        "entry_epsilon": composed_epsilon([entry.record()], summary.budget.delta, COARSE_PLD_VALUE_DISCRETIZATION)
        if entry else None,
        "history": [
            {"id": e.id, "status": e.status, "sample_rate": e.sample_rate, "noise_multiplier": e.noise_multiplier,
             "steps": e.steps, "planned_steps": e.planned_steps, "created_at": e.created_at, "note": e.note}
            for e in entries
        ],
    }


def run_training(
    config: RunConfig,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    display: RunDisplay | None = None,
    stop: StopRequest | None = None,
    handle_signals: bool = True,
    write_files: bool = True,
) -> RunResult:
    """Train ``config`` and (with ``write_files``) write the run directory; see the module docstring.

    ``output_dir`` overrides ``config.output_dir`` (default ``runs/<name>-<timestamp>``). ``stop`` ends training
    after the current step when set (SIGINT and SIGTERM set it when ``handle_signals`` and on the main thread).
    Raises :class:`ConfigError` for a bad dataset or ledger setting (delta >= 1/N included, unless allowed) and
    ``BudgetExceededError`` when the budget cannot hold the planned run (nothing is trained or recorded then).
    """
    with warnings.catch_warnings():
        if config.privacy is not None and config.privacy.allow_weak_delta:
            # Allowed by the config and stated on the privacy card: not repeated as a warning at every epsilon.
            warnings.filterwarnings("ignore", message=r"delta=.* >= 1/N")
        return _run_training(config, output_dir, display, stop, handle_signals, write_files)


def _run_training(config: RunConfig, output_dir: str | os.PathLike[str] | None, display: RunDisplay | None,
                  stop: StopRequest | None, handle_signals: bool, write_files: bool) -> RunResult:
    display = display or _NoDisplay()
    stop = stop if stop is not None else StopRequest()
    run_dir: Path | None = None
    if write_files:
        run_dir = Path(output_dir or config.output_dir or default_output_dir(config.name))
        _check_output_dir(run_dir)
    started, clock = now(), time.perf_counter()
    data = load_dataset(config.dataset)
    info = data.info
    _refuse_weak_delta(config, len(data.train))
    tc, pc = config.training, config.privacy
    torch.manual_seed(config.seed)
    model = build_model(info["num_features"], info["num_classes"], config.model)
    params = [p for p in model.parameters()]
    if tc.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=tc.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum)

    ledger, engine = None, None
    steps_per_epoch = math.ceil(len(data.train) / tc.batch_size)
    planned_steps = tc.epochs * steps_per_epoch

    def budget_exhausted(engine: Any) -> None:
        # Called after the last step the ledger allows; that is the natural end when the whole run was reserved.
        if engine.optimizers[-1].steps_taken < planned_steps:
            stop.set(BUDGET_EXHAUSTED)

    if pc is None:
        loader = DataLoader(data.train, batch_size=tc.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(config.seed))
    else:
        if config.ledger is not None:
            ledger = _open_ledger(config.ledger, pc.delta)
        engine = PrivacyEngine(
            accountant=pc.accountant, secure_mode=pc.secure_mode, ledger=ledger,
            budget=config.ledger.budget if ledger else None, on_budget_exhausted=budget_exhausted,
            ledger_note=f"{config.name} ({run_dir})" if run_dir is not None else config.name,
        )
        private = dict(
            module=model, optimizer=optimizer, data_loader=DataLoader(data.train, batch_size=tc.batch_size),
            max_grad_norm=tc.max_grad_norm,
            noise_generator=None if pc.secure_mode else torch.Generator().manual_seed(config.seed),
        )
        if pc.target_epsilon is not None:
            display.message(f"{config.name}: calibrating the noise for epsilon {pc.target_epsilon:g} over "
                            f"{planned_steps} steps ...")
            model, optimizer, loader = engine.make_private_with_epsilon(
                target_epsilon=pc.target_epsilon, target_delta=pc.delta, epochs=tc.epochs, **private
            )
        else:
            model, optimizer, loader = engine.make_private(noise_multiplier=pc.noise_multiplier, **private)
    entry_id = next(iter(engine.ledger_entries), None) if engine is not None else None
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS_FILE).write_text("", encoding="utf-8")

    privacy = _privacy_settings(config, engine, optimizer, len(data.train), steps_per_epoch, planned_steps)
    ledger_before = _ledger_info(ledger, config.ledger.budget, entry_id) if ledger is not None else None
    history: list[dict[str, Any]] = []
    loss_fn = nn.CrossEntropyLoss()
    steps = 0

    def epsilon_now() -> float | None:
        if engine is None:
            return None
        if not engine.accountant.records:
            return 0.0
        if engine.accountant.kind == "rdp":
            return engine.accountant.get_epsilon(pc.delta)

        # Coarse PLD (pessimistic: never below the exact value) keeps per-epoch accounting to milliseconds.
        return composed_epsilon(engine.accountant.records, pc.delta, COARSE_PLD_VALUE_DISCRETIZATION)

    display.start(config.name, planned_steps, {"privacy": privacy, "dataset": info, "ledger": ledger_before})
    try:
        with stop_on_signals(stop, handle_signals):
            try:
                model.train()
                for _ in range(tc.epochs):
                    if stop:
                        break
                    for x, y in loader:
                        optimizer.zero_grad()
                        if len(y):
                            loss_fn(model(x), y).backward()
                        optimizer.step()  # an empty Poisson batch still takes its (noise-only) step
                        steps += 1
                        display.advance(steps)
                        if stop:
                            break
                    test_loss, test_acc = evaluate(model, data.test)
                    # Under Poisson sampling an epoch is a number of steps (1 / q), not a pass over the data.
                    record = {"epoch": round(steps / steps_per_epoch, 4), "step": steps, "epsilon": epsilon_now(),
                              "test_loss": test_loss, "test_accuracy": test_acc,
                              "seconds": round(time.perf_counter() - clock, 3)}
                    history.append(record)
                    display.epoch(record)
                    if run_dir is not None:
                        with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                            f.write(json.dumps(record) + "\n")
            except BudgetExhausted:
                stop.set(BUDGET_EXHAUSTED)
            status = stop.reason or COMPLETED
            if status == INTERRUPTED:
                display.message(
                    "interrupted: stopped after the current step; writing the checkpoint, settling the ledger and "
                    "the partial report (Ctrl-C again aborts at once, leaving the ledger's whole reservation)"
                )
            # A clean stop: every step taken is accounted for, so settling to the steps taken is exact. (On any
            # other exception the reservation stays in full: the ledger never under-counts.)
            if engine is not None:
                engine.close()
            summary = _finish(config, data, model, optimizer, engine, ledger, entry_id, privacy, history, status,
                              steps, steps_per_epoch, started, clock, run_dir)
    except KeyboardInterrupt as e:  # a second Ctrl-C: no clean shutdown
        if entry_id is not None:
            e.add_note(f"ledger entry {entry_id} of budget '{config.ledger.budget}' in {config.ledger.path} keeps "
                       "the run's whole reservation (it never under-counts)")
        raise
    finally:
        display.stop()
    return RunResult(status, summary, run_dir, model, stop.signal_number)


def _finish(config: RunConfig, data: LoadedData, model: Any, optimizer: Any, engine: Any, ledger: Any,
            entry_id: int | None, privacy: dict[str, Any], history: list[dict[str, Any]], status: str, steps: int,
            steps_per_epoch: int, started: str, clock: float, run_dir: Path | None) -> dict[str, Any]:
    """Evaluate, checkpoint, audit and write ``run.json`` and the reports; returns the run summary."""
    pc, tc, info = config.privacy, config.training, data.info
    model.eval()
    test_loss, test_acc = evaluate(model, data.test)
    epsilon = engine.get_epsilon(pc.delta) if engine is not None else math.inf
    if run_dir is not None:
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "privacy": engine.state_dict() if engine is not None else None,
            "steps": steps, "status": status, "config": config.to_dict(),
        }
        release = {
            "format": MODEL_FORMAT, "state_dict": model.state_dict(), "num_features": info["num_features"],
            "num_classes": info["num_classes"], "model": asdict(config.model),
            "preprocessing": info["preprocessing"],
        }  # fmt: skip
        for name, content in ((MODEL_FILE, release), (CHECKPOINT_FILE, checkpoint)):
            write_atomically(run_dir / name, functools.partial(torch.save, content))
    audit = None
    if config.audit.membership:
        result = loss_threshold_attack(
            model, data.train, data.test, claimed_epsilon=epsilon, delta=pc.delta if pc else 1e-5
        )
        audit = result.to_dict(curves=True)
        audit["roc"] = _thin_roc(audit["roc"])
        audit["covered_by_the_guarantee"] = False  # computed from the training data without noise
    privacy = dict(privacy, epsilon=json_number(epsilon) if engine is not None else None, steps=steps,
                   epochs_completed=round(steps / steps_per_epoch, 4))
    summary = {
        "format": RUN_FORMAT,
        "name": config.name,
        "status": status,
        "started_at": started,
        "finished_at": now(),
        "seconds": round(time.perf_counter() - clock, 2),
        "config": config.to_dict(),
        # The key stays in run.json (private, like the seed); the card shows only the keyed fingerprint.
        "dataset": dict(info, fingerprint=fingerprint(data.train, key := os.urandom(32)), fingerprint_key=key.hex()),
        "model": {
            "architecture": describe_model(info["num_features"], info["num_classes"], config.model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "optimizer": tc.optimizer,
            "learning_rate": tc.lr,
        },
        "privacy": privacy,
        "results": {"test_accuracy": test_acc, "test_loss": test_loss},
        "history": history,
        "audit": audit,
        "ledger": _ledger_info(ledger, config.ledger.budget, entry_id) if ledger is not None else None,
        "software": software_versions(),
        "files": ({"model": MODEL_FILE, "checkpoint": CHECKPOINT_FILE, "metrics": METRICS_FILE}
                  if run_dir is not None else {}),
    }
    if run_dir is not None:
        write_json(run_dir / RUN_FILE, summary)

        write_run_report(run_dir)
    return summary


def _thin_roc(roc: dict[str, list[float]], max_points: int = 400) -> dict[str, list[float]]:
    """At most ``max_points`` ROC points for the report (evenly spaced, always the first and last)."""
    n = len(roc["fpr"])
    if n <= max_points:
        return roc
    keep = sorted({round(i * (n - 1) / (max_points - 1)) for i in range(max_points)})
    return {k: [v[i] for i in keep] for k, v in roc.items()}


def _privacy_settings(
    config: RunConfig, engine: Any, optimizer: Any, num_train: int, steps_per_epoch: int, planned_steps: int
) -> dict[str, Any]:
    pc, tc = config.privacy, config.training
    if pc is None:
        return {
            "differentially_private": False, "epsilon": None, "delta": None, "target_epsilon": None,
            "accountant": None, "sampling": "shuffled fixed-size batches", "sample_rate": None,
            "expected_batch_size": tc.batch_size, "noise_multiplier": None, "max_grad_norm": None,
            "steps": 0, "planned_steps": planned_steps, "steps_per_epoch": steps_per_epoch,
            "epochs_planned": tc.epochs, "epochs_completed": 0, "secure_mode": False, "weak_delta": False,
            "privacy_unit": "example", "neighbouring_relation": None,
        }
    q = optimizer.sample_rate
    allowance = getattr(optimizer, "step_allowance", None)
    return {
        "differentially_private": True, "epsilon": None, "delta": pc.delta, "target_epsilon": pc.target_epsilon,
        "accountant": pc.accountant, "sampling": "poisson", "sample_rate": q, "expected_batch_size": q * num_train,
        "noise_multiplier": optimizer.noise_multiplier, "max_grad_norm": tc.max_grad_norm, "steps": 0,
        "planned_steps": planned_steps, "steps_per_epoch": steps_per_epoch, "epochs_planned": tc.epochs,
        "epochs_completed": 0, "secure_mode": pc.secure_mode, "budget_step_allowance": allowance,
        "weak_delta": pc.delta >= 1.0 / num_train,
        "privacy_unit": "example", "neighbouring_relation": "add or remove one example",
    }


# -- suites (several runs sharing one report, e.g. the demo) --------------------------------------------------------


def write_suite(directory: str | os.PathLike[str], title: str, runs: list[str], extra: dict[str, Any]) -> Path:
    """Record ``runs`` (sub-directories of ``directory``) as one suite and write its report; returns report path."""
    directory = Path(directory)
    write_json(directory / SUITE_FILE, {"format": SUITE_FORMAT, "title": title, "runs": runs, "created_at": now(),
                                        **extra})
    return write_suite_report(directory)
