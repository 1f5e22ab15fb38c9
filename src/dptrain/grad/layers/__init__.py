"""Per-layer rules of the fast engine: per-example gradient norms and clipped sums from one backward pass.

A rule sees one call of a layer: its input ``activation`` (batch first) and the gradient of the loss with respect
to its output ``output_grad`` (batch first, already scaled to per-example losses). Adding a layer type is adding a
module here that registers a ``LayerRule`` for it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dptrain.grad.base import per_example_squared_norms, per_example_weighted_sums


@dataclass
class LayerCall:
    """One forward call of a layer and the output gradient its backward produced.

    When the per-example gradients are formed during the backward pass (``materialised``), the activation and the
    output gradient are dropped (None): the per-example gradients are all that is needed afterwards.
    """

    module: nn.Module
    activation: torch.Tensor | None
    output_grad: torch.Tensor | None
    #: Per-example gradients once a rule has materialised them (norms and sums then reuse them).
    materialised: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = self.output_grad.shape[0]

    @property
    def released(self) -> bool:
        return self.output_grad is None

    @property
    def device(self) -> torch.device:
        return next(iter(self.materialised.values())).device if self.released else self.output_grad.device


class LayerRule(ABC):
    """Exact per-example quantities of one layer type, for the layer's own (direct) parameters."""

    @abstractmethod
    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        """Materialised per-example gradients, name -> (batch, *param.shape)."""

    def materialised(self, call: LayerCall) -> dict[str, torch.Tensor]:
        """``per_example(call)``, computed once per call."""
        if call.materialised is None:
            call.materialised = self.per_example(call)
        return call.materialised

    def materialises(self, call: LayerCall) -> bool:
        """Whether this call's norms come from materialised per-example gradients (rather than a ghost form); the
        engine may then form them during the backward pass and drop the call's tensors."""
        return True

    def factors(self, call: LayerCall, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Parameter ``name``'s per-example gradient as a sum of outer products, G_i = sum_t u_it v_it^T over the
        parameter's (rows, columns): (u, v) of shapes (B, T, rows) and (B, T, columns), where u may instead be
        token ids (B, T) standing for one-hot rows. None when the layer has no such form. Used for parameters
        shared by several calls (tied embeddings): the cross terms <G_k, G_l> then need no per-example gradient."""
        return None

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        """Per-example squared gradient norm of each parameter, name -> (batch,). Override when cheaper."""
        return per_example_squared_norms(self.materialised(call))

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """sum_i weights[i] * g_i for each parameter, name -> param.shape. Override when cheaper."""
        return per_example_weighted_sums(self.materialised(call), weights)

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        """``into[name] += sum_i weights[i] * g_i`` for the parameters named in ``into``. Override to accumulate
        in place without a parameter-sized temporary."""
        for name, g in self.weighted_sum(call, weights).items():
            if name in into:
                into[name].add_(g.to(into[name].dtype))


def _pair_products(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, T1, T2) products x_t . y_s of two factors; integer factors are token ids (one-hot rows)."""
    x_ids, y_ids = not x.is_floating_point(), not y.is_floating_point()
    if x_ids and y_ids:
        return (x[:, :, None] == y[:, None, :]).to(dtype)
    if x_ids:  # one-hot(id_t) . y_s = y_s[id_t]
        return torch.gather(y, 2, x[:, None, :].expand(-1, y.shape[1], -1)).transpose(1, 2)
    if y_ids:
        return _pair_products(y, x, dtype).transpose(1, 2)
    return torch.matmul(x, y.transpose(1, 2))


def cross_term(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """<G_i, H_i> per example for two factored gradients of one parameter: sum_{t,s} (u_t . u'_s)(v_t . v'_s)."""
    dtype = next(t.dtype for t in (*first, *second) if t.is_floating_point())
    rows = _pair_products(first[0], second[0], dtype)
    columns = _pair_products(first[1], second[1], dtype)
    return (rows * columns).sum((1, 2))


class _MaterialisedRule(LayerRule):
    """The rule of a call whose per-example gradients were formed during the backward pass (its activation and
    output gradient freed): norms and sums come from those, through the base class."""

    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        return call.materialised


MATERIALISED = _MaterialisedRule()

RULES: dict[type[nn.Module], LayerRule] = {}
_NAMED_RULES: dict[str, LayerRule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[type[LayerRule]], type[LayerRule]]:
    """Class decorator: use this rule for exactly these module types (not subclasses, which may change forward)."""

    def register(rule_class: type[LayerRule]) -> type[LayerRule]:
        for module_type in module_types:
            RULES[module_type] = rule_class()
        return rule_class

    return register


def register_rule_by_name(qualified_name: str, rule: LayerRule) -> None:
    """Rule for a class from an optional dependency, matched by ``module.qualname`` without importing it."""
    _NAMED_RULES[qualified_name] = rule


def rule_for(module: nn.Module) -> LayerRule | None:
    cls = type(module)
    return RULES.get(cls) or _NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")


def trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


from dptrain.grad.layers import conv, embedding, linear, norm  # noqa: E402,F401  (registration)
