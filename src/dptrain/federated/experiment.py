"""``dptrain experiment federated``: FedAvg on digits split among K = 50 non-IID clients, without DP, with client-level
DP at several epsilons, and with sample-level DP inside the clients, on Flower's simulation runtime.

Every setting runs as a Flower strategy on the same simulated federation (one ServerApp running the settings one
after the other; the sample-level setting in a second simulation, its clients training with DP-SGD). Accuracy is on
the held-out 20% of digits, evaluated on the server. Delta is 1e-5 over clients (far below 1/K = 0.02, so no
replication of the federation is needed for it to mean something); over examples for the sample-level row.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from torch import nn

from dptrain.accounting import calibrate_noise
from dptrain.budget import BudgetLedger
from dptrain.federated.client import SampleLevelDP, dptrain_client_app
from dptrain.federated.partition import digits_clients
from dptrain.federated.strategy import DPFedAvg, SampledFedAvg


@dataclass(frozen=True)
class FederatedConfig:
    num_clients: int = 50
    alpha: float = 0.5
    rounds: int = 40
    sample_rate: float = 0.2
    max_norm: float = 0.5
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    sample_level_epsilon: float = 3.0
    sample_level_clip: float = 1.0
    delta: float = 1e-5
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.3
    seed: int = 0


#: ``--quick``: fewer rounds (about 2 minutes on 2 CPU cores).
QUICK = replace(FederatedConfig(), rounds=10)


def model_fn() -> nn.Module:
    """The clients' model: an MLP on the 64 pixels (the same initial weights in every setting)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _accuracy(arrays: ArrayRecord, test: Any) -> float:
    model = model_fn()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        x, y = test.tensors
        return float((model(x).argmax(1) == y).float().mean())


def _simulate(server_app: ServerApp, client_app: Any, num_clients: int) -> None:
    from flwr.simulation import run_simulation  # Flower's simulation runtime (Ray): dptrain[fl-simulation]

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"include_dashboard": False}},
    )


def _run(
    name: str, unit: str, strategy: SampledFedAvg, grid: Grid, rounds: int, test: Any, epsilon: Callable[[], float]
) -> dict[str, Any]:
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model_fn().state_dict()), num_rounds=rounds)
    return {
        "setting": name,
        "privacy_unit": unit,
        "epsilon": epsilon(),
        "rounds": strategy.rounds_run,
        "accuracy": _accuracy(result.arrays, test),
        "sampling": strategy.sampler.sampling,
        "clients_per_round": float(np.mean([len(s) for s in strategy.sampled_by_round])),
        "seconds": time.perf_counter() - start,
    }


def sample_level_noise(config: FederatedConfig, sizes: list[int]) -> tuple[float, int]:
    """sigma giving every client <= ``sample_level_epsilon`` over the rounds it is expected to take part in (q R
    plus 3 standard deviations), and that number of rounds; a client sampled more often declines the extra rounds."""
    q, rounds = config.sample_rate, config.rounds
    participations = min(rounds, math.ceil(q * rounds + 3 * math.sqrt(q * (1 - q) * rounds)))
    sigmas = []
    for steps in sorted({math.ceil(n / config.batch_size) for n in sizes}):
        total = participations * config.local_epochs * steps
        sigmas.append(calibrate_noise(config.sample_level_epsilon, config.delta, 1 / steps, total))
    return max(sigmas), participations


def run_federated_experiment(config: FederatedConfig = FederatedConfig(), log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every setting; a JSON-ready dict with ``config``, ``rows`` (one per setting) and ``seconds``."""
    say = log or (lambda message: None)
    start = time.perf_counter()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # Flower's per-round log and deprecation notes
    clients, test = digits_clients(config.num_clients, config.alpha, config.seed)

    def data_fn(partition: int, num_partitions: int) -> Any:
        return clients[partition]

    rows: list[dict[str, Any]] = []
    k, q, delta = config.num_clients, config.sample_rate, config.delta
    central = ServerApp()

    @central.main()
    def _central(grid: Grid, context: Context) -> None:
        plain = SampledFedAvg(num_clients=k, sample_rate=q, seed=config.seed)
        rows.append(_run("non-private FedAvg", "none", plain, grid, config.rounds, test, lambda: math.inf))
        say(f"non-private: accuracy {rows[-1]['accuracy']:.3f}")
        for i, eps in enumerate(config.epsilons):
            strategy = DPFedAvg(num_clients=k, sample_rate=q, max_norm=config.max_norm, target_epsilon=eps,
                                delta=delta, num_rounds=config.rounds, seed=config.seed + 1 + i)  # fmt: skip
            row = _run(f"client-level DP, eps {eps:g}", "client", strategy, grid, config.rounds, test, strategy.epsilon)
            rows.append({**row, "noise_multiplier": strategy.noise_multiplier})
            say(f"client-level eps {eps:g}: sigma {strategy.noise_multiplier:.3f}, accuracy {row['accuracy']:.3f}")

    local = dict(local_epochs=config.local_epochs, batch_size=config.batch_size, lr=config.lr)
    _simulate(central, dptrain_client_app(model_fn, data_fn, **local), k)

    sigma, participations = sample_level_noise(config, [len(c) for c in clients])
    with tempfile.TemporaryDirectory() as ledgers:
        privacy = SampleLevelDP(sigma, config.sample_level_clip, config.sample_level_epsilon, delta, ledgers)
        per_client = ServerApp()

        @per_client.main()
        def _per_client(grid: Grid, context: Context) -> None:
            strategy = SampledFedAvg(num_clients=k, sample_rate=q, seed=config.seed)

            def spent() -> float:  # the largest client's epsilon (each client's ledger lives on its machine)
                paths = [Path(ledgers) / f"client-{c}.db" for c in range(k)]
                return max(BudgetLedger(p).spent(f"client-{c}") for c, p in enumerate(paths) if p.exists())

            name = f"sample-level DP in clients, eps {config.sample_level_epsilon:g}"
            rows.append({**_run(name, "example", strategy, grid, config.rounds, test, spent), "noise_multiplier": sigma,
                         "participations_budgeted": participations})  # fmt: skip
            say(f"sample-level: sigma {sigma:.3f}, accuracy {rows[-1]['accuracy']:.3f}")

        _simulate(per_client, dptrain_client_app(model_fn, data_fn, sample_level=privacy, **local), k)
    for row in rows:
        row["delta"] = None if row["privacy_unit"] == "none" else delta
        if math.isinf(row["epsilon"]):
            row["epsilon"] = None
    return {"config": asdict(config), "rows": rows, "seconds": time.perf_counter() - start}
