"""Client-level epsilon of the same DP-FedAvg run: dptrain's accounting against Flower's own DP wrappers'.

dptrain: Poisson client sampling at q, each round a Poisson-sampled Gaussian (PLD, dp_accounting).
Flower 1.42 (DifferentialPrivacyServerSideFixedClipping with its accountant): m = q K clients per round, and its
accountant (flwr.supercore.privacy_accounting.RdpAccountant) accepts only sampling_method="no-amplification" for
these wrappers, so each round is charged as an unsampled Gaussian of the same noise multiplier.

    python benchmarks/federated_accounting.py
"""

from __future__ import annotations

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from dptrain.accounting import compute_epsilon

#: (clients K, sample rate q, noise multiplier sigma, rounds, delta): the README example and larger federations.
SETTINGS = [
    (20, 0.25, 1.5, 10, 1e-3),
    (50, 0.2, 1.0, 30, 1e-5),
    (1000, 0.01, 1.0, 100, 1e-5),
    (1000, 0.05, 1.5, 300, 1e-5),
]


def flower_epsilon(num_clients: int, sample_rate: float, sigma: float, rounds: int, delta: float) -> float:
    config = PrivacyConfig(
        target_delta=delta,
        population_size=num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    accountant = RdpAccountant(config)
    m = round(sample_rate * num_clients)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier=sigma, sample_size=m, population_size=num_clients), rounds)
    return accountant.get_epsilon(delta)


def main() -> None:
    print(f"{'K':>5} {'q':>5} {'sigma':>5} {'rounds':>6} {'delta':>6} | {'dptrain eps':>11} {'Flower eps':>10} {'ratio':>6}")
    for k, q, sigma, rounds, delta in SETTINGS:
        ours = compute_epsilon(q, sigma, rounds, delta)
        theirs = flower_epsilon(k, q, sigma, rounds, delta)
        print(f"{k:>5} {q:>5} {sigma:>5} {rounds:>6} {delta:>6.0e} | {ours:>11.2f} {theirs:>10.2f} {theirs / ours:>6.1f}")


if __name__ == "__main__":
    main()
