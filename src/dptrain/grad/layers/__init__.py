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

The bound. Entry (t, s) of a float32 Gram matrix, an inner product of length n, is within gamma_n |x_t| |y_s| of
the exact one (Higham & Mary 2019, Theorem 3.1: with gamma_n = exp(lambda sqrt(n) u + n u^2/(1-u)) - 1, each inner
product fails to meet it with probability at most 2n exp(-lambda^2 (1-u)^2 / 2), about 4e-22 n for lambda = 10;
the deterministic worst case is n u, sqrt(n)/lambda times more). Summing over (t, s) with Cauchy-Schwarz:
|error| <= gamma_r ||U|| ||U'|| ||C||_F + gamma_c ||V|| ||V'|| ||R||_F + gamma_T ||R||_F ||C||_F, where R and C are
the two Gram matrices (Frobenius norms) and ||U|| the factors' Frobenius norms; gamma_T covers summing the products
per row, then over the rows (then over the symmetric blocks). The quick form takes ||R||_F <= ||U|| ||U'|| (for a
ghost norm, the trace of the Gram matrix: no extra pass) and so costs nothing measurable; it is about (gamma_r +
gamma_c + gamma_T) S^2 >= the true error, with S^2 = ||U||^2 ||V||^2 >= (sum_t ||a_t|| ||g_t||)^2, which is about T
times the ghost norm of natural data. The refined form computes ||R||_F and ||C||_F, about sqrt(T) times smaller
on natural data, for the few examples the quick form leaves uncertain (long sequences).
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dptrain.grad.base import compute_dtype, per_example_squared_norms, per_example_weighted_sums, upcast

#: Relative error certified for the squared norm of every example that is not recomputed exactly: the norm used for
#: clipping is at least sqrt(1 - NORM_RTOL) (99.2%) of the exact one, so a clipped contribution is at most
#: C / sqrt(1 - NORM_RTOL) (about 1.008 C) (up to the rounding of the clipped sum itself).
NORM_RTOL = 2.0**-6
#: lambda of the probabilistic rounding bound (Higham & Mary 2019): failure probability about 2n exp(-50) per entry.
ROUNDING_LAMBDA = 10.0
#: Sequences at least this long have their ghost Gram matrices computed in symmetric blocks.
SYMMETRIC_BLOCKS_FROM = 32


@functools.lru_cache(maxsize=4096)
def rounding_factor(n: int, dtype: torch.dtype) -> float:
    """gamma_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1: the relative error bound of a length-n inner
    product (or sum) computed in ``dtype``, relative to the sum of the absolute values of its terms."""
    u = torch.finfo(dtype).eps / 2
    return math.expm1(ROUNDING_LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))


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


def _frobenius(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """||x||_F per example of a factor (..., T, features) in ``dtype``; token ids stand for one-hot rows: sqrt(T)."""
    if _is_ids(x):
        return torch.full(x.shape[:-1], math.sqrt(x.shape[-1]), dtype=dtype, device=x.device)
    return torch.linalg.vector_norm(x, dim=(-2, -1)).to(dtype)


_WHOLE = ((None, None, 1.0),)


def _gram_sum(u, v, u2, v2, same: bool, rows_norm: bool = False, columns_norm: bool = False, traces: bool = False):
    """sum_{t,s} (u_t . u'_s)(v_t . v'_s) per example in the compute dtype (each row's products summed, then the
    rows), and what is asked for: the Frobenius norms of the row and the column Gram matrices (float64), the product
    of their traces (``same`` only: ||U||_F^2 ||V||_F^2, from the diagonals already computed); None otherwise.
    Symmetric Grams of long sequences are computed in blocks (two diagonal, twice one off-diagonal)."""
    dtype = v.dtype if v.is_floating_point() else u.dtype
    steps = u.shape[-1] if _is_ids(u) else u.shape[-2]
    if same and steps >= SYMMETRIC_BLOCKS_FROM:
        first_half, second_half = slice(0, steps // 2), slice(steps // 2, None)
        blocks = ((first_half, first_half, 1.0), (second_half, second_half, 1.0), (first_half, second_half, 2.0))
    else:
        blocks = _WHOLE
    value = rows_trace = columns_trace = None
    rows_norms: list[tuple[float, torch.Tensor]] = []
    columns_norms: list[tuple[float, torch.Tensor]] = []
    for mine, theirs, weight in blocks:
        if mine is None:
            pieces = (u, u2, v, v2)
        else:
            pieces = (_steps(u, mine), _steps(u2, theirs), _steps(v, mine), _steps(v2, theirs))
        rows = _pair_products(pieces[0], pieces[1], dtype)
        columns = _pair_products(pieces[2], pieces[3], dtype)
        block = (rows * columns).sum(-1).sum(-1)
        value = _plus(value, block if weight == 1.0 else weight * block)
        if rows_norm:
            rows_norms.append((weight, torch.linalg.vector_norm(rows, dim=(-2, -1))))
        if columns_norm:
            columns_norms.append((weight, torch.linalg.vector_norm(columns, dim=(-2, -1))))
        if traces and mine == theirs:
            rows_trace = _plus(rows_trace, rows.diagonal(0, -2, -1).sum(-1))
            columns_trace = _plus(columns_trace, columns.diagonal(0, -2, -1).sum(-1))
    return (
        value,
        _combined(rows_norms) if rows_norm else None,
        _combined(columns_norms) if columns_norm else None,
        rows_trace * columns_trace if traces else None,
    )


def _combined(norms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """The Frobenius norm of a Gram matrix from its blocks' (weight, norm) (in the compute dtype: an overflow is
    inf, so uncertain)."""
    if len(norms) == 1:
        return norms[0][1]
    return sum(weight * norm.to(torch.float64).square() for weight, norm in norms).sqrt().to(norms[0][1].dtype)


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


def _features(t: torch.Tensor) -> int:
    """The inner-product length of a factor's Gram entries; 0 for token ids (entries picked exactly)."""
    return 0 if _is_ids(t) else t.shape[-1]


def _steps_of(t: torch.Tensor) -> int:
    return t.shape[-1] if _is_ids(t) else t.shape[-2]


@functools.lru_cache(maxsize=4096)
def _gammas(rows: int, columns: int, steps: int, steps2: int, dtype: torch.dtype) -> tuple[float, float, float]:
    """Rounding factors of the row Gram entries (inner products of length ``rows``; 0: token ids, exact), of the
    column Gram entries and of the sum of their products (each row of ``steps2``, then ``steps`` rows, then the
    blocks)."""
    rows_gamma = rounding_factor(rows, dtype) if rows else 0.0
    columns_gamma = rounding_factor(columns, dtype) if columns else 0.0
    summing = rounding_factor(steps2, dtype) + rounding_factor(steps, dtype) + rounding_factor(4, dtype)
    return rows_gamma, columns_gamma, summing


def _bound(gammas, u_norms, v_norms, rows_fro, columns_fro) -> torch.Tensor:
    """The module docstring's rounding bound from the factors' norms ||U|| ||U'||, ||V|| ||V'|| and the Gram
    matrices' Frobenius norms (or upper bounds on them)."""
    rows_gamma, columns_gamma, sum_gamma = gammas
    return (
        rows_gamma * u_norms * columns_fro
        + columns_gamma * v_norms * (rows_fro + rows_gamma * u_norms)
        + sum_gamma * rows_fro * columns_fro
    )


#: Relative margin on a bound computed in the compute dtype, for the rounding of the bound itself.
_MARGIN = 1 + 1e-3


def certified_gram_sum(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], same: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_{t,s} (u_t . u'_s)(v_t . v'_s) per example and a bound on its rounding error, both in the compute dtype,
    for factors ``first`` = (u, v) and ``second`` = (u', v') of shapes (..., T, features) (u may be token ids).

    That is <G, H> for G = sum_t u_t v_t^T and H = sum_s u'_s v'_s^T: the squared ghost norm when ``same`` (then
    the symmetric Gram matrices of long sequences are computed in blocks: two diagonal blocks plus twice one
    off-diagonal block, three quarters of the multiply-adds). The bound is the module docstring's with
    ||U U'^T||_F <= ||U||_F ||U'||_F (no pass over the Gram matrices beyond the sum itself), except that a Gram
    matrix of token ids (a gather) has its norm taken; it carries a relative margin of 1e-3 for its own rounding
    (an overflow makes it inf: uncertain). ``refined_gram_sum`` computes every Frobenius norm for the examples this
    bound does not certify (``LayerRule.recheck``).
    """
    u, v, u2, v2 = upcast(first[0]), upcast(first[1]), upcast(second[0]), upcast(second[1])
    ids = _is_ids(u) or _is_ids(u2)
    rows_gamma, columns_gamma, sum_gamma = _gammas(
        0 if ids else u.shape[-1], v.shape[-1], _steps_of(u), _steps_of(u2), v.dtype
    )
    # ``_bound`` with ||V V'^T||_F <= ||V|| ||V'|| and, unless it was computed, ||U U'^T||_F <= ||U|| ||U'||.
    if same:  # ||U U^T||_F <= ||U||_F^2 = tr(U U^T): the traces of the Gram matrices (rows_gamma 0 for token ids)
        value, _, _, traces = _gram_sum(u, v, u2, v2, same, traces=True)
        return value, traces * ((rows_gamma + columns_gamma + sum_gamma + rows_gamma * columns_gamma) * _MARGIN)
    dtype = v.dtype
    value, rows_fro, _, _ = _gram_sum(u, v, u2, v2, same, rows_norm=ids)
    v_norms = _frobenius(v, dtype) * _frobenius(v2, dtype)
    if ids:  # rows_gamma is 0; the norm of a gathered Gram matrix is taken (far below ||U|| ||U'|| for a large vocabulary)
        return value, rows_fro.to(dtype) * v_norms * ((columns_gamma + sum_gamma) * _MARGIN)
    u_norms = _frobenius(u, dtype) * _frobenius(u2, dtype)
    return value, u_norms * v_norms * ((rows_gamma + columns_gamma + sum_gamma + rows_gamma * columns_gamma) * _MARGIN)


def refined_gram_sum(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], same: bool, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``certified_gram_sum`` of the examples ``index`` only, with the bound of the module docstring (the Gram
    matrices' Frobenius norms computed, the bound in float64): about sqrt(T) times tighter on natural data."""
    u, v, u2, v2 = (upcast(t)[index] for t in (*first, *second))
    value, rows_fro, columns_fro, _ = _gram_sum(u, v, u2, v2, same, rows_norm=True, columns_norm=True)
    rows_fro, columns_fro = rows_fro.to(torch.float64) * _MARGIN, columns_fro.to(torch.float64) * _MARGIN
    u_norms = _frobenius(u, torch.float64) * _frobenius(u2, torch.float64)
    v_norms = _frobenius(v, torch.float64) * _frobenius(v2, torch.float64)
    gammas = _gammas(_features(u) and _features(u2), _features(v), _steps_of(u), _steps_of(u2), v.dtype)
    return value, _bound(gammas, u_norms, v_norms, rows_fro, columns_fro)


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


from dptrain.grad.layers import conv, embedding, linear, norm  # noqa: E402,F401  (registration)
