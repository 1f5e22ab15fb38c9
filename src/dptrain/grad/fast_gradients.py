"""The per-example gradients of one physical batch as the fast engine holds them: layer calls, not tensors.

``FastGradients`` answers DP-SGD's two questions from the calls its sampler recorded: each example's squared
gradient norm (``squared_norms``: the layer rules' norms with their rounding bounds tested at once, plus certified
cross terms for a parameter several calls share) and the clipped sum (``add_weighted_sum``: each call's part formed
from its kept tensors with the clip factors). Parameters of layers without a rule come from a fallback's
materialised per-example gradients.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from dptrain.grad.base import (
    MaterializedGradients,
    PerExampleGradients,
    per_example_squared_norms,
    per_example_weighted_sums,
)
from dptrain.grad.layers import LayerCall, LayerRule, recheck_uncertain, shared_squared_norms


def per_example(rule: LayerRule, call: LayerCall) -> dict[str, torch.Tensor]:
    return call.materialised if call.materialised is not None else rule.per_example(call)


class FastGradients(PerExampleGradients):
    """Per-example norms and weighted sums over layer calls; a parameter used by several calls gets cross terms
    between the calls' factored gradients, or (layers without a factored form) materialised per-example gradients."""

    def __init__(
        self,
        calls: list[tuple[LayerRule, LayerCall]],
        owned: list[dict[str, nn.Parameter]],
        fallback: MaterializedGradients | None,
        batch_size: int,
        scale: float = 1.0,
        tags: frozenset = frozenset(),
    ) -> None:
        """``owned``: each call's privatised parameters by name. ``scale`` multiplies the rule layers' output
        gradients (the batch size under a mean loss), applied to the results instead of the kept tensors. ``tags``:
        the batch tags of the calls' forward passes (the fallback's are added)."""
        self.scale = scale
        self.calls = calls
        self.fallback = fallback
        self.batch_size = batch_size
        self.tags = tags | fallback.tags if fallback is not None else tags
        self.owned = owned
        uses = Counter(p for owned in self.owned for p in owned.values())
        fallback_params = set(fallback.per_param) if fallback is not None else set()
        uses.update(list(fallback_params))
        # A parameter used by several rule calls that all have a factored form (tied embedding and output head, a
        # Linear applied twice): its norm is the sum of each call's own term plus cross terms, nothing materialised.
        factored: dict[nn.Parameter, list] = {}
        for (rule, call), owned in zip(calls, self.owned):
            for name, p in owned.items():
                if uses[p] > 1 and p not in fallback_params:
                    factored.setdefault(p, []).append(rule.factors(call, name))
        self.factored = {p: fs for p, fs in factored.items() if all(f is not None for f in fs)}
        # Any other parameter used more than once has its per-example gradients materialised and summed (exact).
        self.shared: dict[nn.Parameter, torch.Tensor] = {}
        for (rule, call), owned in zip(calls, self.owned):
            if any(uses[p] > 1 and p not in self.factored for p in owned.values()):
                for name, g in per_example(rule, call).items():
                    p = owned.get(name)
                    if p is not None and uses[p] > 1 and p not in self.factored:
                        g = g * scale
                        self.shared[p] = self.shared[p] + g if p in self.shared else g
        if fallback is not None:
            # A parameter used both by a rule layer and a fallback layer: sum its per-example gradients (exact).
            for p, g in fallback.per_param.items():
                if uses[p] > 1:
                    self.shared[p] = self.shared[p] + g
            rest = {p: g for p, g in fallback.per_param.items() if uses[p] == 1}
            self.fallback = MaterializedGradients(rest, fallback.batch_size) if rest else None

    def squared_norms(self) -> torch.Tensor:
        rule_terms: list[torch.Tensor] = []
        parts: dict[nn.Parameter, list] = {p: [] for p in self.factored}
        own: dict[nn.Parameter, list[torch.Tensor]] = {p: [] for p in self.factored}
        records: list[tuple] = []
        owners: list[nn.Parameter] = []
        for (rule, call), owned in zip(self.calls, self.owned):
            for name, sq in rule.squared_norms(call).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    records.append((rule, call, name, sq))
                    owners.append(p)
        # Every bound tested at once; examples not certified are rechecked (a tighter bound, then float64).
        for (rule, call, name, _), p, sq in zip(records, owners, recheck_uncertain(records)):
            if p in self.factored:  # own term and the call, for the certified total over the calls
                parts[p].append((rule, call, name))
                own[p].append(sq)
            else:
                rule_terms.append(sq)
        # Own terms plus twice the cross terms, certified: flagged examples are summed over the calls in float64.
        rule_terms += [shared_squared_norms(parts[p], own[p], self.factored[p]) for p in self.factored if parts[p]]
        other_terms = list(per_example_squared_norms(self.shared).values())
        if self.fallback is not None:
            other_terms.append(self.fallback.squared_norms())
        terms = rule_terms + other_terms
        if not terms:
            return torch.zeros(self.batch_size)
        device, dtype = terms[0].device, torch.promote_types(torch.float32, terms[0].dtype)

        def total(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([t.to(device, dtype) for t in tensors]).sum(0)

        norms = total(rule_terms) * self.scale**2 if rule_terms else torch.zeros(self.batch_size, device=device, dtype=dtype)
        return norms + total(other_terms) if other_terms else norms

    def _accumulate(self, weights: torch.Tensor, into: dict[nn.Parameter, torch.Tensor], release: bool) -> None:
        """``into[p] += sum_i weights[i] g_i``, call by call; with ``release`` each call's tensors are dropped as
        soon as its part is added (the record cannot be used again)."""
        scaled: dict[torch.device, torch.Tensor] = {}  # the weights times the output-gradient scale, per device
        for (rule, call), owned in zip(self.calls, self.owned):
            targets = {name: into[p] for name, p in owned.items() if p not in self.shared}
            if targets:
                if call.device not in scaled:
                    scaled[call.device] = weights.to(call.device) * self.scale
                rule.add_weighted_sum(call, scaled[call.device], targets)
            if release:
                call.activation = call.output_grad = call.materialised = None
                call.kept = {}
        for p, g in per_example_weighted_sums(self.shared, weights).items():
            into[p].add_(g.to(into[p].dtype))
        if self.fallback is not None:
            self.fallback.add_weighted_sum(weights, into)

    def weighted_sum(self, weights: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        params = {p for owned in self.owned for p in owned.values()} | set(self.shared)
        if self.fallback is not None:
            params |= set(self.fallback.per_param)
        out = {p: torch.zeros_like(p) for p in params}
        self._accumulate(weights, out, release=False)
        return out

    def add_weighted_sum(self, weights: torch.Tensor, into: dict[nn.Parameter, torch.Tensor]) -> None:
        """Add each layer's part to ``into`` as soon as it is formed (in place where the rule can), dropping that
        layer's kept tensors: the sums never exist next to all the activations and output gradients."""
        self._accumulate(weights, into, release=True)

    def materialize(self) -> dict[nn.Parameter, torch.Tensor]:
        out: dict[nn.Parameter, torch.Tensor] = dict(self.shared)
        for (rule, call), owned in zip(self.calls, self.owned):
            for name, g in per_example(rule, call).items():
                p = owned.get(name)
                if p is not None and p not in self.shared:
                    out[p] = out[p] + g * self.scale if p in out else g * self.scale
        if self.fallback is not None:
            out.update(self.fallback.per_param)
        return out
