"""Linear layers (nn.Linear, Hugging Face GPT-2's Conv1D): ghost norm or materialisation, whichever is cheaper.

Input a (B, T, d), output gradient g (B, T, p): example i's weight gradient is G_i = sum_t g_it a_it^T.
||G_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is) costs O(T^2 (d + p)) per example (ghost norm, Li et al. 2022);
materialising G_i costs O(T d p). The clipped sum sum_i c_i G_i = (c * g)^T a needs neither (book-keeping).

Both the ghost norm and a norm of G_i materialised here are computed apart from the clipped sum, so each comes with
a rounding bound (``dptrain.grad.layers``); an example whose norm it does not certify has its G_i formed in float64,
for its norm and its part of the clipped sum alike.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad.base import compute_dtype, upcast
from dptrain.grad.layers.rules import (
    LayerCall,
    LayerRule,
    add_exact,
    _recomputed,
    dense_exact,
    fast_weights,
    register_rule,
    register_rule_by_name,
    trainable,
    uncertain,
)
from dptrain.grad.layers.gram import SYMMETRIC_BLOCKS_FROM, certified_gram_sum, refined_gram_sum, rounding_factor

__all__ = ["SYMMETRIC_BLOCKS_FROM", "LinearRule", "ghost_is_cheaper", "ghost_norms"]


def _as_sequence(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation (B, T, d) and output gradient (B, T, p) in at least float32, every middle dimension folded into T."""
    batch = call.batch_size
    a = upcast(call.activation.reshape(batch, -1, call.activation.shape[-1]))
    g = upcast(call.output_grad.reshape(batch, -1, call.output_grad.shape[-1]))
    return a, g


def ghost_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(g_t . g_s) per example, for a (..., T, d) and g (..., T, p) (without its bound)."""
    return certified_gram_sum((a, g), (a, g), same=True)[0].to(compute_dtype(a.dtype))


def ghost_is_cheaper(steps: int, d_in: int, d_out: int) -> bool:
    """Whether the ghost norm takes fewer multiply-adds than materialising: T^2 (d + p) (three quarters of it in
    symmetric blocks) against T d p."""
    ghost = steps * steps * (d_in + d_out)
    if steps >= SYMMETRIC_BLOCKS_FROM:
        ghost = ghost * 3 // 4
    return ghost < steps * d_in * d_out


class LinearRule(LayerRule):
    """y = a W^T + b with W (out, in); ``transposed`` for Conv1D's W (in, out).

    ``weight`` and ``bias`` name the layer's parameters (nn.MultiheadAttention's in-projection is a linear layer
    with ``in_proj_weight`` and ``in_proj_bias``).
    """

    transposed = False

    def __init__(self, weight: str = "weight", bias: str = "bias") -> None:
        self.weight, self.bias = weight, bias

    def _weight_grads(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        pattern = "btd,btp->bdp" if self.transposed else "btp,btd->bpd"
        return torch.einsum(pattern, a, g) if self.transposed else torch.einsum(pattern, g, a)

    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        a, g = _as_sequence(call)
        out = {}
        if trainable(call.module, self.weight):
            out[self.weight] = self._weight_grads(a, g)
        if trainable(call.module, self.bias):
            out[self.bias] = g.sum(1)
        return out

    def materialises(self, call: LayerCall) -> bool:
        a, g = _as_sequence(call)
        steps = a.shape[1]
        return trainable(call.module, self.weight) and steps > 1 and not ghost_is_cheaper(steps, a.shape[2], g.shape[2])

    def factors(self, call: LayerCall, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, g = _as_sequence(call)
        if name == self.weight:
            return (a, g) if self.transposed else (g, a)
        if name == self.bias:
            return g, g.new_ones(*g.shape[:2], 1)
        return None

    def _weight_norms(self, call: LayerCall, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Squared weight-gradient norms and their rounding bounds (a float: relative), by whichever of the three
        forms is cheapest."""
        steps, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if steps == 1:  # a product of two sums of squares: nothing cancels
            sq = a[:, 0].square().sum(1) * g[:, 0].square().sum(1)
            return sq, 2.1 * (rounding_factor(d_in, sq.dtype) + rounding_factor(d_out, sq.dtype))
        if ghost_is_cheaper(steps, d_in, d_out):
            value, bound = certified_gram_sum((a, g), (a, g), same=True)
            return value.to(a.dtype), bound
        # Materialised here, the per-example gradients are kept for the clipped sum: what is released is what was
        # measured, and its norm is a sum of squares (no bound to test). In this regime (T d p <= T^2 (d + p))
        # they are no larger than the activation and the output gradient.
        grads = call.kept[self.weight] = self._weight_grads(a, g)
        return grads.flatten(1).square().sum(1), rounding_factor(d_in * d_out, a.dtype)

    def _exact_weight_grads(self, call: LayerCall, a: torch.Tensor, g: torch.Tensor, index: torch.Tensor):
        """The weight gradients (k, *weight.shape) of the examples ``index`` in float64."""
        return self._weight_grads(a[index].to(torch.float64), g[index].to(torch.float64))

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        a, g = _as_sequence(call)
        out = {}
        if trainable(call.module, self.weight):
            out[self.weight], call.bounds[self.weight] = self._weight_norms(call, a, g)
        if trainable(call.module, self.bias):
            # The clipped sum adds this same float32 sum_t g_t: the norm is that of what is released.
            grads = call.kept[self.bias] = g.sum(1)
            sq = grads.square().sum(1)
            out[self.bias] = sq
            call.bounds[self.bias] = rounding_factor(g.shape[2], sq.dtype)
        return out

    def recheck(self, call: LayerCall, name: str, index: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        a, g = _as_sequence(call)
        if name == self.bias:
            return _recomputed(call, name, index, sq, g[index].sum(1).double().square().sum(1))
        steps, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if steps > 1 and ghost_is_cheaper(steps, d_in, d_out):  # the ghost norm's tighter bound first
            value, bound = refined_gram_sum((a, g), (a, g), True, index)
            sq = _recomputed(call, name, index, sq, value, bound)
            index = index[uncertain(sq[index], bound)]
            if not len(index):
                return sq
        grads = self._exact_weight_grads(call, a, g, index)
        call.exact[self.weight] = dense_exact(index, grads)
        return _recomputed(call, name, index, sq, grads.flatten(1).square().sum(1))

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        self._add_fast(call, weights, into)
        if call.exact:
            for name, total in into.items():
                add_exact(call, name, weights.to(total.device), total)

    def _add_fast(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        """The clipped sum of the examples not handled exactly."""
        a, g = _as_sequence(call)
        weights = weights.to(g.dtype)
        if self.bias in into:
            bias_grads = call.kept[self.bias] if self.bias in call.kept else g.sum(1)  # (B, p), the norm's sum
            total = into[self.bias]
            total.add_((fast_weights(call, self.bias, weights) @ bias_grads).to(total.dtype))
        weight = into.get(self.weight)
        if weight is not None:
            w = fast_weights(call, self.weight, weights)
            kept = call.kept.get(self.weight)
            if kept is not None:  # the per-example gradients the norms were taken of: sum_i w_i G_i
                if weight.dtype == kept.dtype and weight.is_contiguous():
                    weight.view(-1).addmv_(kept.flatten(1).T, w)
                else:
                    weight.add_(torch.tensordot(w.to(kept.dtype), kept, dims=1).to(weight.dtype))
                return
            # sum_i w_i g_i^T a_i: scale whichever of a and g has fewer features, then one matmul over all rows.
            if a.shape[-1] <= g.shape[-1]:
                a = a * w[:, None, None]
            else:
                g = g * w[:, None, None]
            flat_a, flat_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            first, second = (flat_a.T, flat_g) if self.transposed else (flat_g.T, flat_a)
            if weight.dtype == first.dtype:
                weight.addmm_(first, second)  # straight into the accumulator: no parameter-sized temporary
            else:
                weight.add_((first @ second).to(weight.dtype))


register_rule(nn.Linear)(LinearRule)


class TransposedLinearRule(LinearRule):
    transposed = True


register_rule_by_name("transformers.pytorch_utils.Conv1D", TransposedLinearRule())


class RowBlockLinearRule(LinearRule):
    """A linear map by rows ``rows`` of a larger weight (and bias): attention's query or key/value projection when
    the three inputs differ. Per-example gradients and sums are full-shape, zero outside the block (exactly handled
    examples' gradients are the block's: ``add_weighted_sum`` adds them into views of the block)."""

    def __init__(self, rows: slice, weight: str, bias: str) -> None:
        super().__init__(weight, bias)
        self.rows = rows

    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        out = {}
        for name, block in super().per_example(call).items():
            out[name] = block.new_zeros((call.batch_size, *getattr(call.module, name).shape))
            out[name][:, self.rows] = block
        return out

    def materialises(self, call: LayerCall) -> bool:
        return False  # its per-example gradients are full-size (zero outside the block): never kept early

    def factors(self, call: LayerCall, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        block = super().factors(call, name)
        if block is None:
            return None
        rows, columns = block
        full = rows.new_zeros(*rows.shape[:-1], getattr(call.module, name).shape[0])
        full[..., self.rows] = rows
        return full, columns

    def _exact_weight_grads(self, call: LayerCall, a: torch.Tensor, g: torch.Tensor, index: torch.Tensor):
        block = super()._exact_weight_grads(call, a, g, index)
        full = block.new_zeros((len(index), *getattr(call.module, self.weight).shape))
        full[:, self.rows] = block
        return full

    def _add_fast(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        super()._add_fast(call, weights, {n: t[self.rows] for n, t in into.items()})  # views of the block
