"""Signed sums of Gram-matrix products (ghost norms, token-equality Grams, cross terms) and their rounding bounds.

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

import torch

from dptrain.grad.base import upcast

#: lambda of the probabilistic rounding bound (Higham & Mary 2019): failure probability about 2n exp(-50) per entry.
ROUNDING_LAMBDA = 10.0
#: Sequences at least this long have their ghost Gram matrices computed in symmetric blocks. Measured on 2 cores
#: (torch 2.13): at T = 32-64 the half-size products lose more to per-call overhead than the quarter of multiply-adds
#: saves (0.64 against 0.50 ms for B=16, T=64, d=128, p=384); from T = 128 the blocks win (3.7 against 7.2 ms at
#: T = 512).
SYMMETRIC_BLOCKS_FROM = 128


@functools.lru_cache(maxsize=4096)
def rounding_factor(n: int, dtype: torch.dtype) -> float:
    """gamma_n(lambda) = exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1: the relative error bound of a length-n inner
    product (or sum) computed in ``dtype``, relative to the sum of the absolute values of its terms."""
    u = torch.finfo(dtype).eps / 2
    return math.expm1(ROUNDING_LAMBDA * math.sqrt(n) * u + n * u * u / (1 - u))


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
