"""Flower ClientApps for dptrain's strategies: local training, sample-level DP inside a client, client-side clipping.

``dptrain_client_app(model_fn, data_fn, ...)`` builds a ClientApp that loads the global arrays into ``model_fn()``,
trains ``local_epochs`` on the client's partition (``data_fn(partition_id, num_partitions)``, both from the node's
config) and replies with its arrays. With ``sample_level=SampleLevelDP(...)`` the local training is DP-SGD
through dptrain's PrivacyEngine, charged to the client's own budget in its own ledger file: the client's epsilon is
cumulative over every round it took part in, and a client whose budget cannot pay for another round declines it
(the server then has no reply from it: its contribution is absent) and says so.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dptrain.accounting import check_delta, check_positive
from dptrain.budget import BudgetLedger, ReusedSeedWarning, UnknownBudgetError
from dptrain.engine import PrivacyEngine
from dptrain.federated.mechanism import MalformedUpdate, clip_update, derive_seed, update_of
from dptrain.federated.strategy import (
    CLIP_NORM_KEY,
    CLIPPED_UPDATE_KEY,
    CLIPPING_KEY,
    PARTITION_QUERY,
    ROUND_KEY,
    SEED_KEY,
    to_numpy,
    to_record,
)

log = logging.getLogger("dptrain.federated")
ModelFn = Callable[[], nn.Module]
DataFn = Callable[[int, int], Dataset]  # (partition_id, num_partitions) -> the client's data


def partition_id(context: Context) -> int:
    """The node's ``partition-id`` (its node config: ``--node-config "partition-id=3"``, or the simulation's)."""
    if "partition-id" not in context.node_config:
        raise ValueError("the node has no partition-id in its node config: start it with --node-config 'partition-id=N'")
    return int(context.node_config["partition-id"])


def register_partition_query(app: ClientApp) -> None:
    """Answer the strategies' QUERY for this node's partition-id (how they sample partitions, not random node ids)."""

    @app.query()
    def _partition(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"config": ConfigRecord({PARTITION_QUERY: partition_id(context)})}), reply_to=msg)


def client_clipping_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """A Flower mod that clips the client's update before it leaves: the reply's arrays become the update (reply
    minus the global arrays received, float64) clipped to the norm the DPFedAvg strategy sends. Only for
    ``DPFedAvg(clipping="client")``; training messages without a clipping norm pass through untouched."""
    config = msg.content.get("config", {}) if msg.metadata.message_type == "train" else {}
    if CLIP_NORM_KEY not in config or config.get(CLIPPING_KEY) != "client":
        return call_next(msg, context)
    max_norm = float(config[CLIP_NORM_KEY])
    global_arrays = to_numpy(msg.content["arrays"])
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content:
        return reply
    try:
        update = update_of(to_numpy(reply.content["arrays"]), global_arrays)
    except MalformedUpdate as e:  # nothing unclipped leaves: the reply carries no arrays
        log.error("client_clipping_mod: not sending a malformed update (%s)", e)
        return Message(RecordDict({"metrics": MetricRecord({CLIPPED_UPDATE_KEY: 0})}), reply_to=msg)
    clipped, _ = clip_update(update, max_norm)
    metrics = dict(reply.content.get("metrics", {}))
    content = RecordDict({"arrays": to_record(clipped), "metrics": MetricRecord({**metrics, CLIPPED_UPDATE_KEY: 1})})
    return Message(content, reply_to=msg)


@dataclass(frozen=True)
class SampleLevelDP:
    """DP-SGD inside every client: each example of a client's data is protected at (``epsilon``, ``delta``) over all
    rounds, charged to ``ledger_dir/client-<partition-id>.db`` (on the client's machine).

    Local steps use Poisson sampling at ``1 / ceil(n / batch_size)`` with noise ``noise_multiplier`` and clipping norm
    ``max_grad_norm``. Their randomness comes from the OS; ``seed`` (the client's own, never the server's) makes
    it reproducible, one stream per (seed, client, round), and a round whose stream was already used (a server
    replaying a round) is refused: the client declines it.
    """

    noise_multiplier: float
    max_grad_norm: float
    epsilon: float
    delta: float
    ledger_dir: str
    seed: int | None = None

    def __post_init__(self) -> None:
        check_positive(self.noise_multiplier, "noise_multiplier")
        check_positive(self.max_grad_norm, "max_grad_norm")
        check_positive(self.epsilon, "epsilon")
        check_delta(self.delta)

    def ledger(self, client: int) -> tuple[BudgetLedger, str]:
        Path(self.ledger_dir).mkdir(parents=True, exist_ok=True)
        ledger, name = BudgetLedger(Path(self.ledger_dir) / f"client-{client}.db"), f"client-{client}"
        try:
            ledger.budget(name)
        except UnknownBudgetError:
            ledger.create(name, self.epsilon, self.delta)
        return ledger, name


def round_generator(seed: int | None, client: int, server_round: int) -> torch.Generator | None:
    """A generator for this client and round from ``seed`` (None without one: seeded from the OS). Every (seed,
    client, round) gets its own stream: no client replays another's or an earlier round's draws."""
    if seed is None:
        return None
    return torch.Generator().manual_seed(derive_seed(int(seed), client, int(server_round)))


def local_generator(config: ConfigRecord, client: int, sample_level: SampleLevelDP | None) -> torch.Generator | None:
    """The randomness of a round's local training. Plain SGD may follow the server's seed (reproducible runs: only
    the shuffling depends on it). DP-SGD's noise and sampling never do (a server that knew them could remove the
    noise): they come from the OS, or from the client's own seed (``SampleLevelDP.seed``)."""
    seed = config.get(SEED_KEY) if sample_level is None else sample_level.seed
    return round_generator(seed, client, int(config.get(ROUND_KEY, 0)))


def dptrain_client_app(
    model_fn: ModelFn,
    data_fn: DataFn,
    *,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.1,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    sample_level: SampleLevelDP | None = None,
    mods: list | None = None,
) -> ClientApp:
    """A ClientApp training ``model_fn()`` with SGD on ``data_fn(partition_id, num_partitions)`` when sampled.

    Replies carry the model's arrays and ``num-examples`` (1 under ``sample_level``: the true count is not protected
    by sample-level DP and would leave the client through FedAvg's weighting). ``mods``: Flower mods, e.g.
    ``[client_clipping_mod]`` for ``DPFedAvg(clipping="client")``. The node's partition-id query is answered.
    """
    app = ClientApp(mods=mods or [])
    register_partition_query(app)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        client = partition_id(context)
        config = msg.content.get("config", ConfigRecord())
        model = model_fn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        data = data_fn(client, int(context.node_config.get("num-partitions", 0)))
        generator = local_generator(config, client, sample_level)
        if sample_level is None:
            train_locally(model, data, local_epochs, batch_size, lr, loss_fn, generator)
            metrics = {"num-examples": len(data)}
        else:
            epsilon = train_privately(model, data, client, sample_level, local_epochs, batch_size, lr, loss_fn, generator)
            if epsilon is None:
                return Message(RecordDict({"metrics": MetricRecord({"dptrain.declined": 1})}), reply_to=msg)
            metrics = {"num-examples": 1}
        arrays = to_record({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def train_locally(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    batch_size: int,
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
) -> None:
    """Plain (non-private) local SGD: ``epochs`` shuffled passes."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run_epochs(model, optimizer, DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator), epochs, loss_fn)


def run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    epochs: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()


def train_privately(
    model: nn.Module,
    data: Dataset,
    client: int,
    privacy: SampleLevelDP,
    epochs: int,
    batch_size: int,
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
) -> float | None:
    """DP-SGD for ``epochs`` on the client's data, charged to its ledger; the client's cumulative epsilon after it
    (its accountant over every round it took part in), or None (nothing trained, nothing charged) when its budget
    cannot pay for the round or the round's randomness was already used."""
    ledger, budget = privacy.ledger(client)
    loader = DataLoader(data, batch_size=batch_size)
    # The engine samples at 1 / len(loader) (Opacus' convention), len(loader) steps an epoch: check that cost.
    if ledger.max_steps(budget, 1 / len(loader), privacy.noise_multiplier) < epochs * len(loader):
        log.warning("client %d: its privacy budget cannot pay for another round; it takes no further part", client)
        return None
    engine = PrivacyEngine(ledger=ledger, budget=budget, ledger_note=f"federated client {client}")
    # The client's accountant carries every earlier round (from its ledger, reservations counted in full): one
    # cumulative account over the whole federation, whichever process runs this round.
    earlier = [entry.record() for entry in ledger.history(budget)]
    engine.accountant.load_state_dict(
        {"kind": engine.accountant.kind, "history": [(r.sample_rate, r.noise_multiplier, r.count) for r in earlier]}
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ReusedSeedWarning)  # refused inside the ledger's transaction: no charge
            private_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                noise_generator=generator,
            )
    except ReusedSeedWarning:
        log.error("client %d: this round's randomness was already used (a replayed round?): declining it", client)
        return None
    try:
        run_epochs(private_model, optimizer, loader, epochs, loss_fn)
    finally:
        engine.close()
    epsilon = engine.get_epsilon(privacy.delta)
    log.info("client %d: epsilon %.4g over every round it took part in (budget %.4g, ledger total %.4g)", client,
             epsilon, privacy.epsilon, ledger.spent(budget))  # fmt: skip
    return epsilon
