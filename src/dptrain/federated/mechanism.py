"""Client-level DP-FedAvg (McMahan et al., ICLR 2018) without Flower: client sampling, clipping, noise, accounting.

One round: every client is sampled independently with probability q (Poisson: the number varies, zero included);
each sampled client's update (its returned weights minus the global weights) is clipped to L2 norm C over all its
arrays together; the clipped updates are summed, N(0, (sigma C)^2) is added once to every coordinate, and the sum is
divided by the expected number of clients q K. Neighbouring federations differ by one client's whole data, which
moves the sum by at most C whatever that client sends, so a round is a Poisson-sampled Gaussian mechanism at rate q
and noise multiplier sigma, composed over rounds by dptrain's accountant. A sampled client that sends nothing, or
is dropped for a malformed reply, contributes 0: still within the bound, so the accounting stays valid.

Everything is in float64 on the CPU (the arrays are the client's reply, numpy); the result is cast back to each
array's dtype. ``dptrain.federated.strategy`` puts this on Flower's ServerApp.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dptrain.accounting import Accountant, check_noise_multiplier, check_positive, fixed_size_epsilon
from dptrain.randomness import RandomSource

Arrays = Mapping[str, np.ndarray]
#: Relative slack on a client-clipped update's norm: the client computes it in float64 too, so only rounding remains.
CLIENT_CLIP_TOLERANCE = 1e-9


class MalformedUpdate(ValueError):
    """A client's reply cannot be aggregated: other array names or shapes than the global model's, or NaN/inf."""


def check_client_sample_rate(sample_rate: float) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"client sample rate q must be in (0, 1], got {sample_rate!r}")


def check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, numbers.Integral) or num_clients < 1:
        raise ValueError(f"num_clients (K, the clients of the federation) must be an integer >= 1, got {num_clients!r}")


def update_of(reply: Arrays, global_arrays: Arrays, is_update: bool = False) -> dict[str, np.ndarray]:
    """``reply - global_arrays`` per array in float64 (``reply`` itself if ``is_update``: the client sent its update),
    after checking the reply has the global model's arrays and only finite values."""
    if set(reply) != set(global_arrays):
        missing, extra = sorted(set(global_arrays) - set(reply)), sorted(set(reply) - set(global_arrays))
        raise MalformedUpdate(f"the reply's arrays differ from the global model's: missing {missing}, extra {extra}")
    update = {}
    for name, reference in global_arrays.items():
        value = np.asarray(reply[name])
        if value.shape != reference.shape:
            raise MalformedUpdate(f"array {name!r} has shape {value.shape}, the global model's is {reference.shape}")
        value = value.astype(np.float64)
        if not np.isfinite(value).all():
            raise MalformedUpdate(f"array {name!r} holds NaN or inf")
        update[name] = value if is_update else value - reference.astype(np.float64)
    return update


def update_norm(update: Arrays) -> float:
    """The L2 norm of all arrays of ``update`` together (float64)."""
    return math.sqrt(sum(float(np.dot(a.ravel(), a.ravel())) for a in update.values()))


def clip_update(update: Arrays, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to L2 norm at most ``max_norm`` (untouched if within it), and its norm before clipping."""
    norm = update_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {name: a * scale for name, a in update.items()}, norm


def check_floating(global_arrays: Arrays) -> None:
    """Every array of the model must be floating-point: integer arrays (a BatchNorm's step counter) cannot be noised."""
    for name, array in global_arrays.items():
        if not np.issubdtype(np.asarray(array).dtype, np.floating):
            raise ValueError(
                f"array {name!r} has dtype {np.asarray(array).dtype}: client-level DP noises every array the clients "
                "send, so send only floating-point arrays (e.g. the model's parameters, not its integer buffers)"
            )


@dataclass
class RoundRecord:
    """What one round did: the clients sampled and heard from, each contribution's norm before clipping."""

    round: int
    sampled: list[int]
    contributed: list[int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    canaries: int = 0  # audit canary clients whose updates were injected
    aggregated: bool = False


def derive_seed(*parts: object) -> int:
    """A seed (63 bits) derived from ``parts`` by SHA-256: knowing it reveals nothing of the seeds it comes from."""
    key = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def _seeded(seed: int | None, stream: int) -> torch.Generator | None:
    """Generator ``stream`` of ``seed`` (None: let RandomSource seed from the OS). Separate streams keep which clients
    are sampled from predicting the noise."""
    return None if seed is None else torch.Generator().manual_seed((int(seed) * 2 + stream) % 2**63)


class ClientSampler:
    """Clients 0..K-1 for each round: Poisson sampling (each independently with probability ``sample_rate``), or,
    with ``sample_size`` m, m distinct clients uniformly without replacement (fixed-size, Flower's default)."""

    def __init__(
        self,
        num_clients: int,
        sample_rate: float | None = None,
        seed: int | None = None,
        secure_mode: bool = False,
        sample_size: int | None = None,
    ) -> None:
        check_num_clients(num_clients)
        if (sample_rate is None) == (sample_size is None):
            raise ValueError("pass sample_rate= (Poisson sampling) or clients_per_round= (fixed size), one of them")
        if sample_size is not None:
            if isinstance(sample_size, bool) or not isinstance(sample_size, numbers.Integral) or not 1 <= sample_size <= num_clients:
                raise ValueError(f"clients_per_round must be an integer in [1, {num_clients}], got {sample_size!r}")
            sample_rate = sample_size / num_clients
        check_client_sample_rate(sample_rate)
        if secure_mode and seed is not None:
            raise ValueError("secure_mode draws from the OS CSPRNG and cannot be seeded; pass seed= or secure_mode=True")
        self.num_clients = int(num_clients)
        self.sample_rate = float(sample_rate)
        self.sample_size = None if sample_size is None else int(sample_size)
        self.sampling = "poisson" if sample_size is None else "fixed"
        self._random = RandomSource(secure_mode, _seeded(seed, 0))

    def sample(self) -> list[int]:
        if self.sample_rate == 1.0:
            return list(range(self.num_clients))
        draws = self._random.uniform(self.num_clients)
        if self.sample_size is not None:  # the m smallest of K uniforms: a uniformly random m-subset
            return sorted(int(i) for i in torch.argsort(draws)[: self.sample_size])
        return [i for i in range(self.num_clients) if float(draws[i]) < self.sample_rate]


class ClientLevelGaussian:
    """The DP-FedAvg mechanism: Poisson client sampling at ``sample_rate`` over ``num_clients`` clients, clipping to
    ``max_norm``, Gaussian noise of std ``noise_multiplier * max_norm`` on the sum, division by ``q K``.

    ``seed`` makes the client sampling and the noise reproducible (tests, simulation vs deployment); without it both
    come from generators seeded by the OS, and ``secure_mode`` draws them from the OS CSPRNG. The accountant records
    one Poisson-sampled Gaussian event per :meth:`aggregate`. With ``clients_per_round`` m instead of ``sample_rate``,
    m clients are drawn without replacement, the sum is divided by m, and epsilon is the RDP bound for sampling
    without replacement under replace-one neighbours (:func:`dptrain.accounting.fixed_size_epsilon`), never Poisson's.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        sample_rate: float | None = None,
        clients_per_round: int | None = None,
        noise_multiplier: float,
        max_norm: float,
        seed: int | None = None,
        secure_mode: bool = False,
        accountant: str = "pld",
    ) -> None:
        check_noise_multiplier(noise_multiplier)
        check_positive(max_norm, "max_norm (the clipping norm C)")
        self.sampler = ClientSampler(num_clients, sample_rate, seed, secure_mode, clients_per_round)
        self.num_clients, self.sample_rate = self.sampler.num_clients, self.sampler.sample_rate
        self.sampling = self.sampler.sampling
        self.noise_multiplier = float(noise_multiplier)
        self.max_norm = float(max_norm)
        self.secure_mode = bool(secure_mode)
        self._noise = RandomSource(secure_mode, _seeded(seed, 1))
        # Poisson rounds go to an accountant (PLD or RDP); fixed-size rounds have their own RDP bound (epsilon()).
        self.accountant = Accountant(accountant) if self.sampling == "poisson" else None
        self.rounds: list[RoundRecord] = []

    @property
    def expected_clients(self) -> float:
        """The divisor of the noisy sum: q K (Poisson), or m, the clients drawn (fixed size)."""
        return float(self.sampler.sample_size) if self.sampling == "fixed" else self.sample_rate * self.num_clients

    def sample(self, round_number: int) -> list[int]:
        """The clients (0..K-1) taking part in round ``round_number``, each independently with probability q."""
        sampled = self.sampler.sample()
        self.rounds.append(RoundRecord(round_number, sampled))
        return sampled

    def aggregate(
        self,
        global_arrays: Arrays,
        replies: Mapping[int, Arrays],
        *,
        clipped_by_clients: bool = False,
        injected: Sequence[Arrays] = (),
    ) -> dict[str, np.ndarray]:
        """The new global arrays from this round's ``replies`` (client id -> its returned arrays).

        Called once per round after :meth:`sample`, also when no client replied (the noise is released all the
        same, and the round is charged). A reply from a client that was not sampled is refused; a malformed one is
        dropped (recorded in the round's ``dropped``) and contributes nothing. ``clipped_by_clients``: the replies
        are updates the clients clipped themselves (``client_clipping_mod``); one whose norm exceeds C (beyond
        float rounding) was clipped to another norm and is dropped. Every update is clipped here in any case.
        ``injected``: updates of audit canary clients (``ClientCanaries``), clipped and summed like the others.
        """
        if not self.rounds or self.rounds[-1].aggregated:
            raise RuntimeError("aggregate() follows sample(), once per round")
        record = self.rounds[-1]
        unexpected = sorted(set(replies) - set(record.sampled))
        if unexpected:
            raise ValueError(f"replies from clients {unexpected} that were not sampled in round {record.round}")
        check_floating(global_arrays)
        total = {name: np.zeros(np.shape(a), dtype=np.float64) for name, a in global_arrays.items()}
        for client in sorted(replies):
            try:
                update = update_of(replies[client], global_arrays, is_update=clipped_by_clients)
            except MalformedUpdate as e:
                record.dropped[client] = str(e)
                continue
            clipped, norm = clip_update(update, self.max_norm)
            if clipped_by_clients and norm > self.max_norm * (1 + CLIENT_CLIP_TOLERANCE):
                record.dropped[client] = f"update of norm {norm:.6g} was not clipped to C = {self.max_norm:g}"
                continue
            record.contributed.append(client)
            record.norms.append(norm)
            for name, value in clipped.items():
                total[name] += value
        for update in injected:
            for name, value in clip_update(update_of(update, global_arrays, is_update=True), self.max_norm)[0].items():
                total[name] += value
        record.canaries = len(injected)
        std = self.noise_multiplier * self.max_norm
        result = {}
        for name, reference in global_arrays.items():
            noise = self._noise.normal(torch.Size(total[name].shape), torch.float64, torch.device("cpu")).numpy()
            mean_update = (total[name] + std * noise) / self.expected_clients
            result[name] = (np.asarray(reference, dtype=np.float64) + mean_update).astype(np.asarray(reference).dtype)
        if self.accountant is not None:
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        record.aggregated = True
        return result

    def epsilon(self, delta: float) -> float:
        """Epsilon of the rounds aggregated so far, at ``delta`` (over clients; replace-one for fixed-size sampling)."""
        if self.accountant is None:
            size = self.sampler.sample_size
            return fixed_size_epsilon(self.num_clients, size, self.noise_multiplier, self.rounds_aggregated, delta)
        return self.accountant.get_epsilon(delta)

    @property
    def rounds_aggregated(self) -> int:
        return sum(r.aggregated for r in self.rounds)
