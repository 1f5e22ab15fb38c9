"""Per-layer rules of the fast engine: per-example gradient norms and clipped sums from one backward pass.

A rule sees one call of a layer: its input ``activation`` (batch first) and the gradient of the loss with respect
to its output ``output_grad`` (batch first, already scaled to per-example losses). Adding a layer type is adding a
module here that registers a ``LayerRule`` for it.

Numerical robustness. Rules compute in at least float32 (16-bit activations and output gradients are upcast). A
squared norm that is a signed sum (the ghost norm sum_{t,s} (a_t . a_s)(g_t . g_s), the token-equality Gram of an
embedding, cross terms of a shared parameter) can cancel: crafted inputs make it 0 or negative while the example's
gradient is large. Every such norm comes with an a-posteriori bound on its rounding error (``certified_gram_sum``);
an example whose bound exceeds ``NORM_RTOL`` times its computed value is *flagged*: its gradient is materialised in
float64 (``ExactPart``), its norm is taken from that, and its part of the clipped sum is added from that same tensor
instead of the float32 matmul. So no negative or cancelled value reaches the clipping, and the norm of an unflagged
example is within ``NORM_RTOL`` (relative) of the exact norm of its squared gradient.

The bound. Entry (t, s) of a float32 Gram matrix, an inner product of length n, is within gamma_n |x_t| |y_s| of
the exact one (Higham & Mary 2019, Theorem 3.1: with gamma_n = exp(lambda sqrt(n) u + n u^2/(1-u)) - 1, each inner
product fails to meet it with probability at most 2n exp(-lambda^2 (1-u)^2 / 2), about 4e-22 n for lambda = 10;
the deterministic worst case is n u, sqrt(n)/lambda times more). Summing over (t, s) with Cauchy-Schwarz:
|error| <= gamma_r ||U|| ||U'|| ||C||_F + gamma_c ||V|| ||V'|| ||R||_F + gamma_T ||R||_F ||C||_F, where R and C are
the two Gram matrices (Frobenius norms, one extra read of each) and ||U|| the factors' Frobenius norms; the products
are summed per row in float32 (gamma_T) and over rows in float64. This is never more than (gamma_r + gamma_c +
gamma_T) S^2 with S = sum_t ||a_t|| ||g_t|| (the triangle-inequality bound on the norm), but it is about sqrt(T)
times smaller on natural data, whose ghost norm is only about S^2 / T: a threshold tau S^2 alone would flag natural
long sequences.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dptrain.grad.base import per_example_squared_norms, per_example_weighted_sums

#: Relative error certified for the squared norm of every example that is not recomputed exactly: the norm used for
#: clipping is at least sqrt(1 - NORM_RTOL) (99.2%) of the exact one, so a clipped contribution is at most
#: C / sqrt(1 - NORM_RTOL) (about 1.008 C) (up to the rounding of the clipped sum itself).
NORM_RTOL = 2.0**-6
#: lambda of the probabilistic rounding bound (Higham & Mary 2019): failure probability about 2n exp(-50) per entry.
ROUNDING_LAMBDA = 10.0
#: Sequences at least this long have their ghost Gram matrices computed in symmetric blocks.
SYMMETRIC_BLOCKS_FROM = 32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype rules compute in: at least float32 (bfloat16 / float16 Gram matrices and sums lose the norm)."""
    return torch.promote_types(dtype, torch.float32)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in ``compute_dtype`` (unchanged for float32 / float64 and for integer token ids)."""
    return t.to(compute_dtype(t.dtype)) if t.is_floating_point() else t


def rounding_factor(n: int, dtype: torch.dtype) -> float:
    """gamma_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1: the relative error bound of a length-n inner
    product (or sum) computed in ``dtype``, relative to the sum of the absolute values of its terms."""
    u = torch.finfo(dtype).eps / 2
    return math.expm1(ROUNDING_LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))


def uncertain(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Examples whose squared norm is not certified to ``NORM_RTOL``: error bound above NORM_RTOL times the value
    (every value <= 0 with a nonzero bound, every overflow). NaN values are left alone: the optimizer refuses them."""
    return (~(bounds <= NORM_RTOL * values) | values.isinf()) & ~values.isnan()


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
    #: Set by ``squared_norms``: the rounding-error bound of each returned squared norm, name -> (batch,).
    bounds: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: Set by ``squared_norms``: the examples handled exactly, name -> ExactPart (see ``fast_weights``).
    exact: dict[str, ExactPart] = field(default_factory=dict, repr=False)
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = self.output_grad.shape[0]

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
        bound in ``call.bounds``. Override when cheaper. Materialised gradients are released as they are: their
        norm is a sum of squares (relative error gamma_n), never cancelled."""
        norms = per_example_squared_norms(self.materialised(call))
        for name, sq in norms.items():
            numel = call.materialised[name][0].numel()
            call.bounds[name] = sq * rounding_factor(max(numel, 1), sq.dtype)
        return norms

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """sum_i weights[i] * g_i for each parameter, name -> param.shape. Override when cheaper."""
        return per_example_weighted_sums(self.materialised(call), weights)

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        """``into[name] += sum_i weights[i] * g_i`` for the parameters named in ``into``. Override to accumulate
        in place without a parameter-sized temporary."""
        for name, g in self.weighted_sum(call, weights).items():
            if name in into:
                into[name].add_(g.to(into[name].dtype))


def _is_ids(t: torch.Tensor) -> bool:
    return not t.is_floating_point()


def _steps(t: torch.Tensor, steps: slice) -> torch.Tensor:
    """Positions ``steps`` of a factor: (..., T) token ids or (..., T, features)."""
    return t[..., steps] if _is_ids(t) else t[..., steps, :]


def _pair_products(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., T1, T2) products x_t . y_s of two factors; integer factors are token ids (one-hot rows)."""
    if _is_ids(x) and _is_ids(y):
        return (x[..., :, None] == y[..., None, :]).to(dtype)
    if _is_ids(x):  # one-hot(id_t) . y_s = y_s[id_t]
        index = x[..., None, :].expand(*y.shape[:-1], x.shape[-1])
        return torch.gather(y, -1, index).transpose(-1, -2)
    if _is_ids(y):
        return _pair_products(y, x, dtype).transpose(-1, -2)
    return torch.bmm(x, y.transpose(1, 2)) if x.dim() == 3 else torch.matmul(x, y.transpose(-1, -2))


def _inner_rounding(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[float, torch.Tensor | float]:
    """(gamma of the Gram entries x_t . y_s, ||x||_F ||y||_F per example): token ids pick entries exactly (0)."""
    if _is_ids(x) or _is_ids(y):
        return 0.0, 0.0
    norms = torch.linalg.vector_norm(x, dim=(-2, -1)) * torch.linalg.vector_norm(y, dim=(-2, -1))
    return rounding_factor(x.shape[-1], dtype), norms.to(torch.float64)


def certified_gram_sum(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], same: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_{t,s} (u_t . u'_s)(v_t . v'_s) per example and a bound on its rounding error, both float64, for factors
    ``first`` = (u, v) and ``second`` = (u', v') of shapes (..., T, features) (u may be token ids (..., T)).

    That is <G, H> for G = sum_t u_t v_t^T and H = sum_s u'_s v'_s^T: the squared ghost norm when ``same`` (then
    the symmetric Gram matrices of long sequences are computed in blocks: two diagonal blocks plus twice one
    off-diagonal block, three quarters of the multiply-adds). See the module docstring for the bound.
    """
    (u, v), (u2, v2) = [tuple(upcast(t) for t in pair) for pair in (first, second)]
    dtype = next(t.dtype for t in (u, v, u2, v2) if t.is_floating_point())
    steps, steps2 = u.shape[-1] if _is_ids(u) else u.shape[-2], u2.shape[-1] if _is_ids(u2) else u2.shape[-2]
    if same and steps >= SYMMETRIC_BLOCKS_FROM:
        first_half, second_half = slice(0, steps // 2), slice(steps // 2, None)
        blocks = [(first_half, first_half, 1.0), (second_half, second_half, 1.0), (first_half, second_half, 2.0)]
    else:
        blocks = [(slice(None), slice(None), 1.0)]
    value = rows_fro = columns_fro = 0.0
    for mine, theirs, weight in blocks:
        rows = _pair_products(_steps(u, mine), _steps(u2, theirs), dtype)
        columns = _pair_products(_steps(v, mine), _steps(v2, theirs), dtype)
        # Each row's products summed in the compute dtype, the rows in float64: a rounding of gamma_T, not T^2.
        value = value + weight * (rows * columns).sum(-1).sum(-1, dtype=torch.float64)
        rows_fro = rows_fro + weight * torch.linalg.vector_norm(rows, dim=(-2, -1)).to(torch.float64).square()
        columns_fro = columns_fro + weight * torch.linalg.vector_norm(columns, dim=(-2, -1)).to(torch.float64).square()
    rows_fro, columns_fro = rows_fro.sqrt(), columns_fro.sqrt()
    rows_gamma, u_norms = _inner_rounding(u, u2, dtype)
    columns_gamma, v_norms = _inner_rounding(v, v2, dtype)
    sum_gamma = rounding_factor(steps2 + 1, dtype)
    bound = (
        rows_gamma * u_norms * columns_fro
        + columns_gamma * v_norms * (rows_fro + rows_gamma * u_norms)
        + sum_gamma * rows_fro * columns_fro
    )
    return value, bound


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


def shared_squared_norms(parts: list[tuple["LayerRule", LayerCall, str]], own: list[torch.Tensor]) -> torch.Tensor:
    """Squared norm per example of one parameter used by several calls, ||sum_k G_k||^2: the calls' own terms
    ``own`` (``rule.squared_norms(call)[name]`` of each part, computed before: their bounds are on the calls) plus
    twice every cross term, certified like a ghost norm. The total can cancel where the calls' gradients do (a
    tied embedding and output head, a Linear applied twice): flagged examples, and those a part already handles
    exactly, get sum_k G_k in float64 from the factors; the first part's clipped sum adds it, the others leave
    those examples out. Every part must have a factored form (``LayerRule.factors``)."""
    factors = [rule.factors(call, name) for rule, call, name in parts]
    value = sum(term.to(torch.float64) for term in own)
    bound = sum(call.bounds[name].to(torch.float64) for _, call, name in parts)
    for k, first in enumerate(factors):
        for second in factors[k + 1 :]:
            cross, cross_bound = certified_gram_sum(first, second)
            value, bound = value + 2 * cross, bound + 2 * cross_bound
    flagged = uncertain(value, bound)
    for _, call, name in parts:
        if name in call.exact:
            flagged[call.exact[name].index] = True
    if bool(flagged.any()):
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


from dptrain.grad.layers import conv, embedding, linear, norm  # noqa: E402,F401  (registration)
