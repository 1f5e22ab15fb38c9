"""One-run audit of client-level DP (Steinke, Nasr, Jagielski 2023) with canary clients.

m canary clients join the federation, each with probability 1/2 (secret, from ``seed``). A canary's update is a fixed
crafted direction: C times a unit vector u_i over all the model's arrays, drawn from its own seed, the strongest update
a client can send. Every round, each included canary is sampled like a real client (Poisson, rate q) and its update
enters the clipped sum with the real clients' (the strategy injects it on the server: the canaries need no node).
After the run, each canary's score is the final model's movement along its direction, <final - initial, u_i>;
guess "in" for the k+ highest scores and "out" for the k- lowest, and bound epsilon with the one-run theorem
(``dptrain.audit.one_run.one_run_audit``): a bound above the claimed epsilon means the run leaks more than its
accounting says (noise or clipping not as charged).

The real clients' updates and the other canaries project onto each direction too (random directions in d
dimensions overlap by about 1/sqrt(d)): they weaken the audit, never invalidate it.
"""

from __future__ import annotations

import numpy as np

from dptrain.audit.one_run import OneRunAuditResult, one_run_audit
from dptrain.federated.mechanism import Arrays, update_of

#: ``OneRunAuditResult.audit`` of this audit.
AUDIT_NAME = "client-level canary clients"


class ClientCanaries:
    """``num_canaries`` canary clients for a :class:`dptrain.federated.DPFedAvg` run (``canaries=``)."""

    def __init__(self, num_canaries: int = 200, *, seed: int = 0) -> None:
        if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
            raise ValueError(f"num_canaries must be an integer >= 2, got {num_canaries!r}")
        self.num_canaries, self.seed = num_canaries, seed
        rng = np.random.default_rng([seed, 0])
        self.included = rng.random(num_canaries) < 0.5
        self._sampling = np.random.default_rng([seed, 1])
        self.rounds = 0
        self.participations = np.zeros(num_canaries, dtype=np.int64)

    def direction(self, canary: int, template: Arrays) -> dict[str, np.ndarray]:
        """Canary ``canary``'s unit direction, shaped as the arrays of ``template`` (float64)."""
        rng = np.random.default_rng([self.seed, 2, canary])
        raw = {name: rng.standard_normal(np.shape(a)) for name, a in template.items()}
        norm = np.sqrt(sum(float((v**2).sum()) for v in raw.values()))
        return {name: v / norm for name, v in raw.items()}

    def round_updates(self, global_arrays: Arrays, sample_rate: float, max_norm: float) -> list[dict[str, np.ndarray]]:
        """This round's updates of the included canaries that Poisson sampling at ``sample_rate`` picks."""
        self.rounds += 1
        picked = (self._sampling.random(self.num_canaries) < sample_rate) & self.included
        self.participations += picked
        return [
            {name: max_norm * v for name, v in self.direction(int(i), global_arrays).items()}
            for i in np.flatnonzero(picked)
        ]

    def scores(self, initial: Arrays, final: Arrays) -> np.ndarray:
        """Each canary's score: the model's movement along its direction."""
        movement = update_of(final, initial)
        return np.array([
            sum(float(np.vdot(movement[name], u)) for name, u in self.direction(i, initial).items())
            for i in range(self.num_canaries)
        ])  # fmt: skip

    def audit(
        self,
        initial: Arrays,
        final: Arrays,
        *,
        claimed_epsilon: float,
        delta: float,
        guesses: int | None = None,
        significance: float = 0.05,
    ) -> OneRunAuditResult:
        """Guess each canary's inclusion from the final model and bound epsilon; ``guesses`` in each direction
        (k+ = k-, default m / 10) is fixed before looking at the scores."""
        k = max(1, self.num_canaries // 10) if guesses is None else guesses
        return one_run_audit(
            self.scores(initial, final),
            self.included,
            num_positive_guesses=k,
            num_negative_guesses=k,
            delta=delta,
            claimed_epsilon=claimed_epsilon,
            significance=significance,
            score="movement along the canary's direction",
            seed=self.seed,
            audit=AUDIT_NAME,
        )
