"""Per-layer rules of the fast engine: per-example gradient norms and clipped sums from one backward pass.

A rule sees one call of a layer: its input ``activation`` (batch first) and the gradient of the loss with respect
to its output ``output_grad`` (batch first, already scaled to per-example losses). Adding a layer type is adding a
module here that registers a ``LayerRule`` for it.

Numerical robustness. Rules compute in at least float32 (16-bit activations and output gradients are upcast). A
squared norm that is a signed sum (the ghost norm sum_{t,s} (a_t . a_s)(g_t . g_s), the token-equality Gram of an
embedding, cross terms of a shared parameter) can cancel: crafted inputs make it 0 or negative while the example's
gradient is large. Every such norm comes with an a-posteriori bound on its rounding error (``certified_gram_sum``),
and ``recheck_uncertain`` tests all of a step's bounds at once (one device synchronisation): an example whose bound
exceeds ``NORM_RTOL`` times its computed value is rechecked by its rule (``LayerRule.recheck``), first with the
tighter bound below (``refined_gram_sum``), and if that does not certify it either it is *flagged*: its gradient
is materialised in float64 (``ExactPart``), its norm is taken from that, and its part of the clipped sum is added
from that same tensor instead of the float32 matmul. So no negative or cancelled value reaches the clipping, and
the norm of an unflagged example is within ``NORM_RTOL`` (relative) of the exact norm of its gradient. Norms that
are sums of squares (materialised gradients, kept for the clipped sum so that what is released is what was
measured) carry a relative bound and are never tested. A non-finite norm is left to the optimizer, which refuses
the batch (``NonFiniteGradientError``).

The bound of a signed sum and its computation: ``dptrain.grad.layers.gram``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dptrain.grad.base import compute_dtype, per_example_squared_norms, per_example_weighted_sums
from dptrain.grad.layers.gram import _is_ids, certified_gram_sum, refined_gram_sum, rounding_factor

#: Relative error certified for the squared norm of every example that is not recomputed exactly: the norm used for
#: clipping is at least sqrt(1 - NORM_RTOL) (99.2%) of the exact one, so a clipped contribution is at most
#: C / sqrt(1 - NORM_RTOL) (about 1.008 C) (up to the rounding of the clipped sum itself).
NORM_RTOL = 2.0**-6
def uncertain(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Examples whose squared norm is not certified to ``NORM_RTOL``: error bound above NORM_RTOL times the value
    (every value <= 0 with a nonzero bound, every infinite bound). Non-finite values are left alone: the optimizer
    refuses them (``NonFiniteGradientError``)."""
    return bounds > NORM_RTOL * values


def absolute_bound(call: "LayerCall", name: str, value: torch.Tensor) -> torch.Tensor:
    """``call.bounds[name]`` as a tensor: a float there is a bound relative to the value (a sum of squares)."""
    bound = call.bounds[name]
    return value * bound if isinstance(bound, float) else bound


@dataclass
class ExactPart:
    """The examples of one parameter of one call whose gradients are handled exactly (in float64): the rule's fast
    clipped sum leaves them out, and ``add`` (None: they are added by another call of a shared parameter) adds
    sum_j weights[j] G_j for them."""

    index: torch.Tensor
    add: Callable[[torch.Tensor, torch.Tensor], None] | None


def dense_exact(index: torch.Tensor, grads: torch.Tensor) -> ExactPart:
    """An ``ExactPart`` from the float64 gradients (k, *param.shape) of the examples ``index``."""

    def add(weights: torch.Tensor, into: torch.Tensor) -> None:
        into.add_(torch.einsum("k,k...->...", weights.to(grads), grads).to(into.dtype))

    return ExactPart(index, add)


_HALF = (torch.float16, torch.bfloat16)


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
    #: Set by ``squared_norms``: the rounding-error bound of each returned squared norm, name -> (batch,), or a
    #: float: a bound relative to the value (sums of squares, which never cancel: nothing to test).
    bounds: dict[str, torch.Tensor | float] = field(default_factory=dict, repr=False)
    #: Set by ``squared_norms``: per-example gradients of some parameters, formed there for the norms and reused by
    #: the clipped sum (so that what is released is what was measured), name -> (batch, *shape).
    kept: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: Set by ``squared_norms``: the examples handled exactly, name -> ExactPart (see ``fast_weights``).
    exact: dict[str, ExactPart] = field(default_factory=dict, repr=False)
    batch_size: int = field(init=False)
    #: Whether the call ran in 16 bits (bf16/fp16 autocast or model): autograd's own gradients then carry 16-bit
    #: rounding, which the first step's attribution check allows for.
    half: bool = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = self.output_grad.shape[0]
        self.half = self.output_grad.dtype in _HALF or (self.activation is not None and self.activation.dtype in _HALF)

    @property
    def released(self) -> bool:
        return self.output_grad is None

    @property
    def device(self) -> torch.device:
        return next(iter(self.materialised.values())).device if self.released else self.output_grad.device


def fast_weights(call: LayerCall, name: str, weights: torch.Tensor) -> torch.Tensor:
    """The clip weights for parameter ``name``'s fast clipped sum: zero for the examples handled exactly."""
    part = call.exact.get(name)
    if part is None:
        return weights
    weights = weights.clone()
    weights[part.index.to(weights.device)] = 0
    return weights


def add_exact(call: LayerCall, name: str, weights: torch.Tensor, into: torch.Tensor) -> None:
    """``into += sum_j weights[j] G_j`` over the examples of ``name`` handled exactly (nothing if none)."""
    part = call.exact.get(name)
    if part is not None and part.add is not None:
        part.add(weights[part.index.to(weights.device)], into)


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
        """Per-example squared gradient norm of each parameter, name -> (batch,), recording each one's rounding
        bound in ``call.bounds`` (tested later, for every call at once, by ``recheck_uncertain``). Override when
        cheaper. Materialised gradients are released as they are: their norm is a sum of squares (relative error
        gamma_n), never cancelled."""
        norms = per_example_squared_norms(self.materialised(call))
        for name, sq in norms.items():
            call.bounds[name] = rounding_factor(max(math.prod(call.materialised[name].shape[1:]), 1), sq.dtype)
        return norms

    def recheck(self, call: LayerCall, name: str, index: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        """``sq`` (this call's squared norms of ``name``) with the examples ``index``, which their bound in
        ``call.bounds`` does not certify, recomputed so that it does; called by ``recheck_uncertain``. Here: from
        the materialised gradients in float64 (a sum of squares, uncertain only where float32 overflowed); rules
        whose norms are signed sums override it (a tighter bound first, then float64 gradients in ``call.exact``)."""
        grads = self.materialised(call)[name][index]
        return _recomputed(call, name, index, sq, grads.flatten(1).double().square().sum(1))

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """sum_i weights[i] * g_i for each parameter, name -> param.shape. Override when cheaper."""
        return per_example_weighted_sums(self.materialised(call), weights)

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        """``into[name] += sum_i weights[i] * g_i`` for the parameters named in ``into``. Override to accumulate
        in place without a parameter-sized temporary."""
        for name, g in self.weighted_sum(call, weights).items():
            if name in into:
                into[name].add_(g.to(into[name].dtype))


def _recomputed(
    call: LayerCall, name: str, index: torch.Tensor, sq: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """``sq`` with the examples ``index`` set to ``exact`` (their norms now certified to ``bound``, in
    ``call.bounds``)."""
    sq, bounds = sq.clone(), absolute_bound(call, name, sq).clone()
    sq[index] = exact.to(sq.dtype)
    bounds[index] = bound if isinstance(bound, float) else bound.to(bounds.dtype)
    call.bounds[name] = bounds
    return sq


def recheck_uncertain(terms: list[tuple["LayerRule", "LayerCall", str, torch.Tensor]]) -> list[torch.Tensor]:
    """The squared norms of ``terms`` (rule, call, parameter name, value; its bound in ``call.bounds``), every
    example its bound does not certify rechecked by its rule (``LayerRule.recheck``). One test and one device
    synchronisation for all the terms on a device: flagged examples are rare, a synchronisation per layer is not."""
    values = [sq for *_, sq in terms]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, call, name, sq) in enumerate(terms):
        relative = call.bounds[name]
        if not isinstance(relative, float) or relative > NORM_RTOL:  # a relative bound is certified as it is
            by_device.setdefault(sq.device, []).append(i)
    for rows in by_device.values():
        flagged = uncertain(
            torch.stack([values[i] for i in rows]),
            torch.stack([absolute_bound(terms[i][1], terms[i][2], values[i]) for i in rows]),
        )
        if not bool(flagged.any()):
            continue
        for i, mask in zip(rows, flagged):
            if bool(mask.any()):
                rule, call, name, sq = terms[i]
                values[i] = rule.recheck(call, name, mask.nonzero().flatten(), sq)
    return values


def _materialise_factors(factors: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, shape: torch.Size):
    """G_i = sum_t u_it v_it^T in float64 for the examples ``index``, shaped (k, *shape)."""
    u, v = factors
    u, v = u[index], v[index].to(torch.float64)
    if _is_ids(u):
        count, vocab = u.shape[0], shape[0]
        flat = (u + vocab * torch.arange(count, device=u.device)[:, None]).flatten()
        grads = v.new_zeros(count * vocab, v.shape[-1]).index_add_(0, flat, v.reshape(-1, v.shape[-1]))
    else:
        grads = torch.einsum("ktr,ktc->krc", u.to(torch.float64), v)
    return grads.reshape(len(index), *shape)


def shared_squared_norms(
    parts: list[tuple["LayerRule", LayerCall, str]],
    own: list[torch.Tensor],
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Squared norm per example of one parameter used by several calls, ||sum_k G_k||^2: the calls' own terms
    ``own`` (``rule.squared_norms(call)[name]`` of each part, computed before: their bounds are on the calls) plus
    twice every cross term, certified like a ghost norm. The total can cancel where the calls' gradients do (a
    tied embedding and output head, a Linear applied twice): flagged examples, and those a part already handles
    exactly, get sum_k G_k in float64 from the factors; the first part's clipped sum adds it, the others leave
    those examples out. Every part must have a factored form (``LayerRule.factors``; ``factors``: those forms,
    when the caller has them already)."""
    if factors is None or len(factors) != len(parts):
        factors = [rule.factors(call, name) for rule, call, name in parts]
    pairs = [(first, second) for k, first in enumerate(factors) for second in factors[k + 1 :]]
    value = sum(term.to(torch.float64) for term in own)
    bound = sum(absolute_bound(call, name, sq).to(torch.float64) for (_, call, name), sq in zip(parts, own))
    for first, second in pairs:
        cross, cross_bound = certified_gram_sum(first, second)
        value, bound = value + 2 * cross, bound + 2 * cross_bound
    flagged = uncertain(value, bound)
    handled = [call.exact[name].index for _, call, name in parts if name in call.exact]
    refined = bool(flagged.any())
    if refined:  # the cross terms' bounds with their Gram matrices' norms, for these examples
        index = flagged.nonzero().flatten()
        value, bound = value.clone(), bound.clone()
        value[index] = sum(term[index].to(torch.float64) for term in own)
        bound[index] = sum(
            absolute_bound(call, name, sq)[index].to(torch.float64) for (_, call, name), sq in zip(parts, own)
        )
        for first, second in pairs:
            cross, cross_bound = refined_gram_sum(first, second, False, index)
            value[index] += 2 * cross
            bound[index] += 2 * cross_bound
        flagged = uncertain(value, bound)
    for index in handled:
        flagged[index] = True
    if (refined or handled) and bool(flagged.any()):
        index = flagged.nonzero().flatten()
        _, call, name = parts[0]
        shape = getattr(call.module, name).shape
        grads = sum(_materialise_factors(f, index, shape) for f in factors)
        value[index] = grads.flatten(1).square().sum(1)
        for k, (_, call, name) in enumerate(parts):
            call.exact[name] = dense_exact(index, grads) if k == 0 else ExactPart(index, None)
    return value.to(compute_dtype(own[0].dtype))


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
