"""DPFedAvg's Flower messages, built and read with Flower's own Message types outside a runtime: what the clients
are told (never the server's noise seed), what local training draws its randomness from, and which replies count."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dptrain.federated import DPFedAvg, SampleLevelDP
from dptrain.federated.client import local_generator
from dptrain.federated.mechanism import derive_seed
from dptrain.federated.strategy import CLIPPED_UPDATE_KEY, ROUND_KEY, SEED_KEY, to_record

SEED = 5


@pytest.fixture
def flower_task():
    """Flower's task identity, as a ServerApp process has it (Message needs a run id); restored afterwards."""
    saved = TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _strategy(**kwargs) -> DPFedAvg:
    strategy = DPFedAvg(num_clients=4, sample_rate=1.0, max_norm=1.0, noise_multiplier=0.0, delta=1e-5, seed=SEED,
                        **kwargs)  # fmt: skip
    strategy.nodes = {p: 100 + p for p in range(4)}  # partition -> node, as start() maps them
    return strategy


def _reply(request: Message, arrays: dict[str, np.ndarray], clipped: bool) -> Message:
    metrics = MetricRecord({CLIPPED_UPDATE_KEY: 1} if clipped else {"num-examples": 10})
    reply = Message(RecordDict({"arrays": to_record(arrays), "metrics": metrics}), reply_to=request)
    return reply


def test_clients_are_told_a_derived_seed_never_the_one_of_the_servers_noise(flower_task):
    strategy = _strategy()
    messages = list(strategy.configure_train(1, to_record({"w": np.zeros(3)}), ConfigRecord(), None))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102, 103]
    sent = {m.content["config"][SEED_KEY] for m in messages}
    # With SEED the clients could regenerate the server's noise stream and subtract it from the global model.
    assert sent == {derive_seed(SEED, "clients")} and SEED not in sent and 2 * SEED + 1 not in sent
    assert all(m.content["config"][ROUND_KEY] == 1 for m in messages)
    assert strategy.sampler is strategy.mechanism.sampler and strategy.sampling == "poisson"


def test_dp_local_training_never_takes_its_randomness_from_the_server():
    config = ConfigRecord({SEED_KEY: 123, ROUND_KEY: 2})
    plain = local_generator(config, 0, None)
    assert plain is not None and plain.initial_seed() == derive_seed(123, 0, 2)
    private = SampleLevelDP(1.0, 1.0, 3.0, 1e-5, "unused")
    assert local_generator(config, 0, private) is None  # the OS's randomness, whatever the server sends
    own = local_generator(config, 0, SampleLevelDP(1.0, 1.0, 3.0, 1e-5, "unused", seed=7))
    assert own.initial_seed() == derive_seed(7, 0, 2) != derive_seed(123, 0, 2)


def test_only_replies_clipped_as_the_run_asks_are_aggregated(flower_task):
    strategy = _strategy(clipping="client")
    messages = list(strategy.configure_train(1, to_record({"w": np.zeros(2)}), ConfigRecord(), None))
    replies = [
        _reply(messages[0], {"w": np.array([0.6, 0.8])}, clipped=True),
        _reply(messages[1], {"w": np.array([0.0, 0.5])}, clipped=True),
        _reply(messages[2], {"w": np.array([30.0, 40.0])}, clipped=False),  # no clipping mod: dropped
        _reply(messages[3], {"w": np.array([3.0, 4.0])}, clipped=True),  # "clipped" to another norm: dropped
    ]
    model, metrics = strategy.aggregate_train(1, replies)
    record = strategy.mechanism.rounds[-1]
    assert record.contributed == [0, 1] and set(record.dropped) == {3}
    assert metrics["clients"] == 2 and metrics["sampled"] == 4
    np.testing.assert_allclose(model["w"].numpy(), [0.6 / 4, 1.3 / 4])  # divided by q K = 4
