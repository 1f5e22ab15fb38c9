"""A federated run's record, privacy card and HTML report, written to a run directory after ``DPFedAvg.start``.

``write_federated_run(run_dir, strategy, result, data="digits, Dirichlet 0.5", test_accuracy=...)`` writes
``federated_run.json`` (the record), ``privacy_card.json`` (validated against its schema when jsonschema is
installed) and ``report.html``; see ``dptrain.report.federated``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Result

from dptrain.federated.strategy import DPFedAvg
from dptrain.report.federated import build_federated_card, render_federated, validate_federated_card
from dptrain.rundir import software_versions, write_json, write_text


def federated_run_record(
    strategy: DPFedAvg,
    result: Result,
    *,
    name: str,
    data: str,
    started_at: str,
    test_accuracy: float | None = None,
) -> dict[str, Any]:
    """The JSON-ready record of a finished ``strategy.start`` (``result`` its return value)."""
    if strategy.delta is None:
        raise ValueError("the strategy has no delta: create DPFedAvg with delta= (or a ledger budget) to report it")
    arrays = result.arrays.to_numpy_ndarrays() if result.arrays else []
    ledger = None
    if strategy.ledger is not None:
        summary = strategy.ledger.summary(strategy.budget)
        ledger = {"path": str(strategy.ledger.path), "budget": strategy.budget, "cap_epsilon": summary.budget.epsilon,
                  "delta": summary.budget.delta, "spent_epsilon": summary.spent}  # fmt: skip
    planned = strategy.planned_rounds
    software = software_versions()
    software["flwr"] = metadata.version("flwr")
    return {
        "name": name,
        "status": "budget_exhausted" if strategy.rounds_run < planned else "completed",
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "federation": {
            "num_clients": strategy.num_clients,
            "data": data,
            "sampling": strategy.sampling,
            "sample_rate": strategy.sample_rate,
            "clients_per_round": strategy.sampler.sample_size,
            "mean_clients_per_round": float(np.mean([len(s) for s in strategy.sampled_by_round] or [0])),
            "clipping": strategy.clipping,
        },
        "privacy": {
            "epsilon": strategy.epsilon(),
            "delta": strategy.delta,
            "accountant": "rdp (replace-one)" if strategy.sampling == "fixed" else strategy.mechanism.accountant.kind,
            "noise_multiplier": strategy.noise_multiplier,
            "max_norm": strategy.max_norm,
            "rounds": strategy.rounds_run,
            "planned_rounds": planned,
            "epsilon_by_round": list(strategy.epsilon_by_round),
            "secure_mode": strategy.mechanism.secure_mode,
        },
        "model": {"architecture": f"{len(arrays)} arrays", "parameters": int(sum(a.size for a in arrays)) or 1},
        "results": {"test_accuracy": test_accuracy},
        "audit": strategy.audit_canaries(result.arrays).to_dict() if strategy.canaries is not None else None,
        "ledger": ledger,
        "software": software,
    }


def write_federated_run(run_dir: str | Path, strategy: DPFedAvg, result: Result, **record_options: Any) -> dict[str, Any]:
    """Write the record, privacy card and report of a finished run to ``run_dir``; returns the card."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = federated_run_record(strategy, result, **record_options)
    card = build_federated_card(record, str(run_dir))
    try:
        validate_federated_card(card)
    except ImportError:  # jsonschema is optional (the dev extra): validate when it is installed
        pass
    write_json(run_dir / "federated_run.json", record)
    write_json(run_dir / "privacy_card.json", card)
    write_text(run_dir / "report.html", render_federated(record, card))
    return card
