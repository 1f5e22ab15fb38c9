"""Flower strategies: seeded Poisson client sampling (``SampledFedAvg``) and client-level DP-FedAvg (``DPFedAvg``).

Flower gives each node a random id per run, so the strategies first ask every node its ``partition-id`` (a QUERY
message answered by :func:`dptrain.federated.client.register_partition_query`) and sample partitions 0..K-1, not
node ids: a seeded run then picks the same clients in Flower's simulation and on a real deployment. Both strategies
send no evaluation round to the clients (a client's metrics on its own data would leave it without DP); evaluate on
the server with ``evaluate_fn`` on held-out data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from dptrain.accounting import (
    calibrate_noise,
    check_delta,
    check_positive,
    fixed_size_epsilon,
    smallest_noise_multiplier,
)
from dptrain.audit.one_run import OneRunAuditResult
from dptrain.budget import BudgetLedger
from dptrain.federated.canaries import ClientCanaries
from dptrain.federated.mechanism import (
    Arrays,
    ClientLevelGaussian,
    ClientSampler,
    MalformedUpdate,
    check_floating,
    derive_seed,
    update_of,
)

log = logging.getLogger("dptrain.federated")

#: Config keys the strategies send with every training message (read by the client helpers and the clipping mod).
CLIP_NORM_KEY, CLIPPING_KEY, ROUND_KEY, SEED_KEY = "dptrain.clip-norm", "dptrain.clipping", "server-round", "dptrain.seed"
#: Metric key of a reply whose arrays are an update the client clipped itself (set by ``client_clipping_mod``).
CLIPPED_UPDATE_KEY = "dptrain.clipped-update"
PARTITION_QUERY = "dptrain.partition-id"


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(a)) for name, a in arrays.items()})


class SampledFedAvg(FedAvg):
    """FedAvg over K clients, each sampled independently with probability ``sample_rate`` per round (seeded; or
    ``clients_per_round`` drawn without replacement), the replies averaged weighted by their ``num-examples`` metric. Not private by itself: the base of :class:`DPFedAvg`
    and the strategy for clients that are private on their own (sample-level DP, ``dptrain_client_app``)."""

    def __init__(
        self,
        *,
        num_clients: int,
        sample_rate: float | None = None,
        clients_per_round: int | None = None,
        seed: int | None = None,
        node_timeout: float = 120.0,
    ) -> None:
        if sample_rate is None and clients_per_round is None:
            sample_rate = 1.0
        self.sampler = ClientSampler(num_clients, sample_rate, seed, sample_size=clients_per_round)
        self.num_clients, self.sample_rate = self.sampler.num_clients, self.sampler.sample_rate
        self.seed = seed
        self.node_timeout = node_timeout
        self.nodes: dict[int, int] = {}  # partition id -> node id, filled by start()
        self.rounds_run = 0
        self.sampled_by_round: list[list[int]] = []  # the partitions sampled in each round
        self._global: dict[str, np.ndarray] = {}
        super().__init__(fraction_train=self.sample_rate, fraction_evaluate=0.0, min_available_nodes=num_clients)

    # -- start: find the clients -------------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any) -> Result:
        check_floating(to_numpy(initial_arrays))
        self.nodes = self._map_partitions(grid)
        return super().start(grid, initial_arrays, num_rounds, **kwargs)

    def _map_partitions(self, grid: Grid) -> dict[int, int]:
        deadline = time.monotonic() + self.node_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(node_ids)} of the {self.num_clients} clients (num_clients) connected within "
                    f"{self.node_timeout} s"
                )
            time.sleep(0.1)
        query = RecordDict({"config": ConfigRecord({PARTITION_QUERY: 1})})
        replies = grid.send_and_receive(self._construct_messages(query, node_ids, MessageType.QUERY), timeout=self.node_timeout)
        nodes: dict[int, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error() or PARTITION_QUERY not in reply.content.get("config", {}):
                raise RuntimeError(
                    f"node {node} did not report its partition-id: its ClientApp needs "
                    "dptrain.federated.register_partition_query(app) (dptrain_client_app registers it)"
                )
            partition = int(reply.content["config"][PARTITION_QUERY])
            if partition in nodes:
                raise RuntimeError(
                    f"nodes {nodes[partition]} and {node} both report partition-id {partition}: each client needs "
                    "its own (node config partition-id)"
                )
            nodes[partition] = node
        if sorted(nodes) != list(range(self.num_clients)) or len(replies) != len(node_ids):
            raise RuntimeError(
                f"the nodes' partition-ids are {sorted(nodes)} from {len(replies)} replies; num_clients="
                f"{self.num_clients} needs each of 0..{self.num_clients - 1} exactly once (node-config partition-id)"
            )
        return nodes

    # -- rounds ----------------------------------------------------------------------------------------------------

    def sample_clients(self, server_round: int) -> list[int]:
        return self.sampler.sample()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = to_numpy(arrays)
        sampled = self.sample_clients(server_round)
        self.sampled_by_round.append(sampled)
        log.info("round %d: %d of %d clients sampled", server_round, len(sampled), self.num_clients)
        config = ConfigRecord({**dict(config), ROUND_KEY: server_round, **self.extra_config()})
        if self.seed is not None:  # for the clients' shuffling: derived, so it does not give away the server's noise
            config[SEED_KEY] = derive_seed(self.seed, "clients")
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, [self.nodes[p] for p in sampled], MessageType.TRAIN)

    def extra_config(self) -> dict[str, Any]:
        return {}

    def replies_by_client(self, replies: Iterable[Message]) -> tuple[dict[int, Message], dict[int, str]]:
        """This round's good replies by partition id, and the errors of the others."""
        partition_of = {node: p for p, node in self.nodes.items()}
        good, failed = {}, {}
        for reply in replies:
            client = partition_of.get(reply.metadata.src_node_id)
            if client is None:
                log.warning("a reply from node %s, which is no client of this run, is ignored", reply.metadata.src_node_id)
            elif reply.has_error():
                failed[client] = f"client error: {reply.error.reason}"
            elif self.arrayrecord_key not in reply.content:
                failed[client] = "the reply holds no arrays"
            else:
                good[client] = reply
        return good, failed

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, failed = self.replies_by_client(replies)
        for client, reason in failed.items():
            log.warning("round %d: client %d dropped (%s)", server_round, client, reason)
        weights, updates = [], []
        for client in sorted(good):
            content = good[client].content
            try:
                updates.append(update_of(to_numpy(content[self.arrayrecord_key]), self._global))
            except MalformedUpdate as e:
                log.warning("round %d: client %d dropped (%s)", server_round, client, e)
                continue
            weights.append(float(content.get("metrics", {}).get(self.weighted_by_key, 1.0)))
        self.rounds_run = server_round
        if not updates:
            return None, MetricRecord({"clients": 0})
        total = sum(weights)
        new = {
            name: (ref.astype(np.float64) + sum(w * u[name] for w, u in zip(weights, updates)) / total).astype(ref.dtype)
            for name, ref in self._global.items()
        }
        return to_record(new), MetricRecord({"clients": len(updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> list:
        return []  # clients' metrics on their own data are not private: evaluate on the server (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> None:
        return None


def calibrated_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    num_clients: int,
    sample_rate: float | None,
    clients_per_round: int | None,
    accountant: str,
) -> float:
    """The smallest sigma reaching ``target_epsilon`` over ``rounds``, for Poisson or for fixed-size sampling."""
    if clients_per_round is None:
        return calibrate_noise(target_epsilon, delta, sample_rate, rounds, accountant)
    check_positive(target_epsilon, "target_epsilon")

    def eps(sigma: float) -> float:
        return fixed_size_epsilon(num_clients, clients_per_round, sigma, rounds, delta)

    return smallest_noise_multiplier(eps, target_epsilon, 0.01)


class DPFedAvg(SampledFedAvg):
    """Client-level DP-FedAvg on Flower: Poisson client sampling at q, updates clipped to ``max_norm`` C over all
    arrays, N(0, (sigma C)^2) added once to the sum, divided by q K (see ``dptrain.federated.mechanism``).

    ``clipping="server"`` clips the raw updates here; ``"client"`` expects every client to clip its own update with
    :func:`dptrain.federated.client_clipping_mod` (the server never sees an unclipped update; it refuses replies that
    were not clipped to C). ``noise_multiplier``, or ``target_epsilon`` with ``delta`` and ``num_rounds`` to
    calibrate it. ``ledger``/``budget``: a client-level budget (``privacy_unit="client"``) charged one step per round:
    the rounds are reserved before round 1 (no more than the budget allows: the run stops there) and settled to the
    rounds run. ``delta``: the delta of the reported epsilon (the budget's by default).

    ``clients_per_round`` m instead of ``sample_rate``: fixed-size sampling (Flower's default), m clients without
    replacement, the sum divided by m, accounted by RDP for sampling without replacement under replace-one neighbours
    (``sampling == "fixed"``; never as Poisson). The ledger holds Poisson events only, so it refuses such a run.

    ``canaries=ClientCanaries(m)``: audit canary clients injected on the server (see ``dptrain.federated.canaries``);
    :meth:`audit_canaries` bounds epsilon from the final model.

    ``server_strategy``: any Flower strategy of the FedAvg family with a server optimizer (``FedAvgM``, ``FedAdam``,
    ``FedYogi``, ``FedAdagrad``, ...) to turn each round's noisy mean model into the next global model. It gets that
    model as the round's only reply (weight 1), never a client's: post-processing, at no privacy cost.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        max_norm: float,
        sample_rate: float | None = None,
        clients_per_round: int | None = None,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        num_rounds: int | None = None,
        clipping: str = "server",
        seed: int | None = None,
        secure_mode: bool = False,
        ledger: BudgetLedger | None = None,
        budget: str | None = None,
        accountant: str = "pld",
        node_timeout: float = 120.0,
        canaries: ClientCanaries | None = None,
        server_strategy: Strategy | None = None,
    ) -> None:
        if server_strategy is not None and num_clients < getattr(server_strategy, "min_available_nodes", 0):
            raise ValueError(
                f"server_strategy waits for min_available_nodes={server_strategy.min_available_nodes} nodes, more "
                f"than the {num_clients} clients: lower it"
            )
        if canaries is not None and clients_per_round is not None:
            raise ValueError("canary clients audit Poisson-sampled rounds: use sample_rate= with canaries=")
        if clipping not in ("server", "client"):
            raise ValueError(f"clipping must be 'server' or 'client' (who clips each update), got {clipping!r}")
        if (ledger is None) != (budget is None):
            raise ValueError("pass both ledger= and budget= (a client-level budget's name) to charge a budget, or neither")
        if ledger is not None and clients_per_round is not None:
            raise ValueError(
                "the ledger composes Poisson-sampled rounds (add/remove neighbours); fixed-size client sampling "
                "(clients_per_round=) is a replace-one guarantee it cannot hold: use sample_rate= to charge a budget"
            )
        if ledger is not None:
            owner = ledger.budget(budget)
            if owner.privacy_unit != "client":
                raise ValueError(f"budget {budget!r} protects {owner.privacy_unit}s; DP-FedAvg needs privacy_unit='client'")
            delta = owner.delta if delta is None else delta
        if delta is not None:
            check_delta(delta)
        if noise_multiplier is None:
            if target_epsilon is None or delta is None or num_rounds is None:
                raise ValueError("pass noise_multiplier=, or target_epsilon= with delta= and num_rounds= to calibrate it")
            noise_multiplier = calibrated_noise(
                target_epsilon, delta, num_rounds, num_clients, sample_rate, clients_per_round, accountant
            )
        elif target_epsilon is not None:
            raise ValueError("pass noise_multiplier= or target_epsilon=, not both")
        super().__init__(
            num_clients=num_clients,
            sample_rate=sample_rate,
            clients_per_round=clients_per_round,
            seed=seed,
            node_timeout=node_timeout,
        )
        self.mechanism = ClientLevelGaussian(
            num_clients=num_clients,
            sample_rate=sample_rate,
            clients_per_round=clients_per_round,
            noise_multiplier=noise_multiplier,
            max_norm=max_norm,
            seed=seed,
            secure_mode=secure_mode,
            accountant=accountant,
        )
        self.sampler = self.mechanism.sampler  # one sampler: the mechanism's, which records each round
        self.clipping, self.delta, self.ledger, self.budget = clipping, delta, ledger, budget
        self.canaries = canaries
        self.server_strategy = server_strategy
        self._initial: dict[str, np.ndarray] = {}
        self.planned_rounds = 0  # the rounds asked of start() (the budget may allow fewer: see rounds_run)
        self.epsilon_by_round: list[float] = []  # epsilon after each round, at ``delta`` (when there is one)

    @property
    def sampling(self) -> str:
        """"poisson" or "fixed" (``clients_per_round``): how the clients are drawn, and so how epsilon is accounted."""
        return self.mechanism.sampling

    @property
    def noise_multiplier(self) -> float:
        """sigma, fixed for the run (read-only: a noise or clipping norm changed mid-run would void the accounting)."""
        return self.mechanism.noise_multiplier

    @property
    def max_norm(self) -> float:
        """C, the clipping norm of every update, fixed for the run (read-only)."""
        return self.mechanism.max_norm

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run at most ``num_rounds`` rounds, fewer if the budget allows fewer (logged), charging the budget."""
        self._initial = to_numpy(initial_arrays)
        if self.ledger is None:
            self.planned_rounds = num_rounds
            return super().start(grid, initial_arrays, num_rounds, **kwargs)
        allowed = self.ledger.max_steps(self.budget, self.sample_rate, self.noise_multiplier, client_level=True)
        rounds = min(num_rounds, allowed)
        self.planned_rounds = num_rounds
        if rounds < num_rounds:
            log.warning("budget %r allows %d of the %d rounds asked: the run stops there", self.budget, rounds, num_rounds)
        entry = self.ledger.reserve(  # with no round left this raises BudgetExceededError naming cap and spend
            self.budget, self.sample_rate, self.noise_multiplier, max(rounds, 1), client_level=True,
            note=f"DP-FedAvg, K={self.num_clients}, {max(rounds, 1)} rounds reserved", seed=self.seed,
        )
        before = self.mechanism.rounds_aggregated  # a strategy may be started more than once
        try:
            return super().start(grid, initial_arrays, rounds, **kwargs)
        finally:
            self.ledger.settle(entry, self.mechanism.rounds_aggregated - before)

    def sample_clients(self, server_round: int) -> list[int]:
        return self.mechanism.sample(server_round)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.server_strategy is not None:  # it records the current model (FedOpt, FedAvgM); its messages go nowhere
            self.server_strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        return super().configure_train(server_round, arrays, config, grid)

    def _server_step(self, server_round: int, noisy: dict[str, np.ndarray]) -> ArrayRecord:
        """The server strategy's new model from the noisy mean model (post-processing: no privacy cost), handed to
        it as the one reply of the round."""
        request = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
        content = RecordDict({self.arrayrecord_key: to_record(noisy), "metrics": MetricRecord({"num-examples": 1})})
        arrays, _ = self.server_strategy.aggregate_train(server_round, [Message(content, reply_to=request)])
        if arrays is None:
            raise RuntimeError(f"server_strategy {type(self.server_strategy).__name__} returned no model")
        return arrays

    def extra_config(self) -> dict[str, Any]:
        return {CLIP_NORM_KEY: self.max_norm, CLIPPING_KEY: self.clipping}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good, failed = self.replies_by_client(replies)
        arrays: dict[int, Arrays] = {}
        for client, reply in good.items():
            clipped = bool(reply.content.get("metrics", {}).get(CLIPPED_UPDATE_KEY, 0))
            if clipped != (self.clipping == "client"):
                failed[client] = (
                    "the update was clipped by the client, but this run clips on the server" if clipped else
                    "the client did not clip its update: add dptrain.federated.client_clipping_mod to its ClientApp"
                )
            else:
                arrays[client] = to_numpy(reply.content[self.arrayrecord_key])
        canaries = [] if self.canaries is None else self.canaries.round_updates(self._global, self.sample_rate, self.max_norm)
        new = self.mechanism.aggregate(
            self._global, arrays, clipped_by_clients=self.clipping == "client", injected=canaries
        )
        record = self.mechanism.rounds[-1]
        failed.update(record.dropped)
        for client, reason in sorted(failed.items()):
            log.warning("round %d: client %d's contribution is absent (%s)", server_round, client, reason)
        self.rounds_run = server_round
        metrics = {"clients": len(record.contributed), "sampled": len(record.sampled)}
        if self.delta is not None:
            metrics["epsilon"] = self.mechanism.epsilon(self.delta)
            self.epsilon_by_round.append(metrics["epsilon"])
        model = to_record(new) if self.server_strategy is None else self._server_step(server_round, new)
        return model, MetricRecord(metrics)

    def epsilon(self, delta: float | None = None) -> float:
        """Client-level epsilon of the rounds run, at ``delta`` (default: the strategy's)."""
        delta = self.delta if delta is None else delta
        if delta is None:
            raise ValueError("pass delta= (none was given to the strategy and it charges no budget)")
        return self.mechanism.epsilon(delta)

    def audit_canaries(self, final_arrays: ArrayRecord, delta: float | None = None) -> OneRunAuditResult:
        """The one-run audit of this run's canary clients (``canaries=``) from its final model, against the
        epsilon it claims at ``delta`` (default: the strategy's)."""
        if self.canaries is None or not self._initial:
            raise RuntimeError("audit_canaries needs DPFedAvg(canaries=ClientCanaries(...)) and a run (start) first")
        delta = self.delta if delta is None else delta
        return self.canaries.audit(
            self._initial, to_numpy(final_arrays), claimed_epsilon=self.epsilon(delta), delta=delta
        )
