"""Running tests/fl_app on Flower's simulation runtime, and redoing a client's local training outside Flower."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from dptrain.federated.client import round_generator, train_locally
from dptrain.federated.mechanism import derive_seed

APP_DIR = Path(__file__).parent / "fl_app"
SEED = 7
# Flower's simulation: Ray with the machine's 2 cores, one virtual client per core at a time.
BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "include_dashboard": False}}


def load_app():
    spec = importlib.util.spec_from_file_location("fedapp", APP_DIR / "fedapp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def simulate(tmp_path: Path, name: str, **settings) -> dict:
    """Run the app in Flower's simulation with ``settings``; the ServerApp's report."""
    from flwr.simulation import run_simulation

    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    out = tmp_path / f"{name}.json"
    server_app, client_app = load_app().build_apps({"out": str(out), **settings})
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=settings["num-clients"], backend_config=BACKEND)
    return json.loads(out.read_text())


def arrays(report_arrays: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.float32) for k, v in report_arrays.items()}


def local_update(
    global_arrays: dict[str, np.ndarray], client: int, server_round: int, num_clients: int
) -> dict[str, np.ndarray]:
    """What client ``client`` sends in ``server_round`` minus the global arrays, computed here (float64)."""
    app = load_app()
    model = app.model_fn()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_arrays.items()})
    data = app.data_fn(client, num_clients)
    generator = round_generator(derive_seed(SEED, "clients"), client, server_round)  # the seed the server sends
    train_locally(model, data, 1, 32, 0.1, torch.nn.functional.cross_entropy, generator)
    return {k: v.detach().numpy().astype(np.float64) - global_arrays[k] for k, v in model.state_dict().items()}


def norm(update: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in update.values()))




#: The run both the hand computation (tests/test_federated.py) and the deployment test check: 3 clients, two rounds
#: without noise, updates clipped by the clients (clipping binds: C is below every update's norm), the mean model
#: passed through Flower's FedAvgM at server learning rate 0.5.
CLIPPED_RUN = {"num-clients": 3, "sample-rate": 0.7, "num-rounds": 2, "noise-multiplier": 0.0, "max-norm": 0.05,
               "clipping": "client", "seed": SEED, "server-lr": 0.5}
