"""A small Flower app on dptrain.federated: digits split among K clients, an MLP, DP-FedAvg or sample-level DP.

The same module runs in Flower's simulation (tests build the apps with ``build_apps(settings)``) and on a real
deployment (``flwr run`` of this directory: the module-level ``server_app``/``client_app`` read the run config).
The server writes what it saw to ``settings["out"]`` (JSON), so a test can compare runs.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvgM
from torch import nn

from dptrain.budget import BudgetLedger
from dptrain.federated import (
    ClientCanaries,
    DPFedAvg,
    SampledFedAvg,
    SampleLevelDP,
    client_clipping_mod,
    digits_clients,
    dptrain_client_app,
    write_federated_run,
)

DEFAULTS: dict[str, Any] = {
    "num-clients": 4,
    "num-rounds": 3,
    "sample-rate": 0.5,
    "noise-multiplier": 1.0,
    "max-norm": 1.0,
    "clipping": "server",  # "server", "client", or "none" (SampledFedAvg: no client-level DP)
    "seed": 7,
    "delta": 1e-3,
    "ledger": "",  # a client-level budget "federation" in this ledger file, if given
    "sample-level-dir": "",  # sample-level DP inside clients, their ledgers here, if given
    "sample-level-epsilon": 20.0,  # each client's own cap (delta 1e-3)
    "canaries": 0,  # audit canary clients (ClientCanaries, seeded with "seed") injected by DPFedAvg
    "server-lr": 0.0,  # > 0: DPFedAvg's noisy mean goes through Flower's FedAvgM with this server learning rate
    "report-dir": "",  # write the run's record, privacy card and report.html there (DPFedAvg runs)
    "out": "",
}


def model_fn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


#: The seed of the digits split and of the Dirichlet partition (fixed: the run's seed drives sampling and noise).
DATA_SEED = 0


def data_fn(partition: int, num_partitions: int):
    clients, _ = digits_clients(num_partitions, alpha=0.5, seed=DATA_SEED)
    return clients[partition]


def build_apps(overrides: dict[str, Any] | None = None):
    """(server_app, client_app) for ``DEFAULTS`` updated by the run config, then by ``overrides``."""

    def settings(context: Context) -> dict[str, Any]:
        return {**DEFAULTS, **dict(context.run_config), **(overrides or {})}

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings(context)
        if s["clipping"] == "none":
            strategy = SampledFedAvg(num_clients=s["num-clients"], sample_rate=s["sample-rate"], seed=s["seed"])
        else:
            ledger = BudgetLedger(s["ledger"]) if s["ledger"] else None
            strategy = DPFedAvg(
                num_clients=s["num-clients"],
                sample_rate=s["sample-rate"],
                noise_multiplier=s["noise-multiplier"],
                max_norm=s["max-norm"],
                clipping=s["clipping"],
                seed=s["seed"],
                delta=None if ledger else s["delta"],
                ledger=ledger,
                budget="federation" if ledger else None,
                canaries=ClientCanaries(s["canaries"], seed=s["seed"]) if s["canaries"] else None,
                server_strategy=FedAvgM(server_learning_rate=s["server-lr"]) if s["server-lr"] else None,
            )
        _, test = digits_clients(s["num-clients"], seed=DATA_SEED)
        model = model_fn()
        initial = ArrayRecord(model.state_dict())
        globals_by_round: list[dict[str, list]] = []

        def record(server_round: int, arrays: ArrayRecord) -> None:  # the global arrays after each round
            globals_by_round.append({k: v.numpy().tolist() for k, v in arrays.items()})

        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=s["num-rounds"], evaluate_fn=record)
        final = {name: array.numpy() for name, array in result.arrays.items()} if result.arrays else {}
        report = {
            "final": {k: v.tolist() for k, v in final.items()},
            "globals": globals_by_round,
            "rounds_run": strategy.rounds_run,
            "sampled": strategy.sampled_by_round,
            "train_metrics": {str(k): dict(v) for k, v in result.train_metrics_clientapp.items()},
        }
        if isinstance(strategy, DPFedAvg):
            report["rounds"] = [
                {"sampled": r.sampled, "contributed": r.contributed, "norms": r.norms, "dropped": r.dropped,
                 "canaries": r.canaries}
                for r in strategy.mechanism.rounds
            ]
            report["epsilon"] = strategy.epsilon() if strategy.delta else None
            report["noise_multiplier"] = strategy.noise_multiplier
            if strategy.canaries is not None:
                report["audit"] = strategy.audit_canaries(result.arrays).to_dict()
        if final:
            model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in final.items()})
            with torch.no_grad():
                x, y = test.tensors
                report["accuracy"] = float((model(x).argmax(1) == y).float().mean())
        if s["report-dir"]:
            write_federated_run(s["report-dir"], strategy, result, name="digits federation", started_at=started,
                                data=f"digits, Dirichlet 0.5 over {s['num-clients']} clients",
                                test_accuracy=report.get("accuracy"))  # fmt: skip
        if s["out"]:
            with open(s["out"], "w") as f:
                json.dump(report, f)

    client_options: dict[str, Any] = {}
    client_overrides = overrides or {}
    if client_overrides.get("sample-level-dir"):
        client_options["sample_level"] = SampleLevelDP(
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            epsilon=float(client_overrides.get("sample-level-epsilon", DEFAULTS["sample-level-epsilon"])),
            delta=1e-3,
            ledger_dir=client_overrides["sample-level-dir"],
        )
    # The mod clips only when the strategy asks for client-side clipping; otherwise replies pass through untouched.
    client_app = dptrain_client_app(model_fn, data_fn, mods=[client_clipping_mod], **client_options)
    return server_app, client_app


server_app, client_app = build_apps()
