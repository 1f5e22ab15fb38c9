"""Linear layers (nn.Linear, Hugging Face GPT-2's Conv1D): ghost norm or materialisation, whichever is cheaper.

Input a (B, T, d), output gradient g (B, T, p): example i's weight gradient is G_i = sum_t g_it a_it^T.
||G_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is) costs O(T^2 (d + p)) per example (ghost norm, Li et al. 2022);
materialising G_i costs O(T d p). The clipped sum sum_i c_i G_i = (c * g)^T a needs neither (book-keeping).
"""

from __future__ import annotations

import torch

from dptrain.grad.layers import LayerCall, LayerRule, register_rule, register_rule_by_name, trainable
from torch import nn


def _as_sequence(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation (B, T, d) and output gradient (B, T, p), with every middle dimension folded into T."""
    batch = call.batch_size
    a = call.activation.reshape(batch, -1, call.activation.shape[-1])
    g = call.output_grad.reshape(batch, -1, call.output_grad.shape[-1])
    return a, g


#: Sequences at least this long have their ghost Gram matrices computed in symmetric blocks.
SYMMETRIC_BLOCKS_FROM = 32


def ghost_norms(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_{t,s} (a_t . a_s)(g_t . g_s) per example, for a (..., T, d) and g (..., T, p).

    Both Gram matrices are symmetric, so for long sequences the sum is taken over the two diagonal blocks plus twice
    one off-diagonal block: three quarters of the multiply-adds of the full Grams.
    """
    steps = a.shape[-2]

    def block(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (torch.matmul(x, y.transpose(-1, -2)) * torch.matmul(u, v.transpose(-1, -2))).sum((-1, -2))

    if steps < SYMMETRIC_BLOCKS_FROM:
        return block(a, a, g, g)
    half = steps // 2
    a1, a2, g1, g2 = a[..., :half, :], a[..., half:, :], g[..., :half, :], g[..., half:, :]
    return block(a1, a1, g1, g1) + block(a2, a2, g2, g2) + 2 * block(a1, a2, g1, g2)


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

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        a, g = _as_sequence(call)
        out = {}
        if trainable(call.module, self.weight):
            steps, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
            if steps == 1:
                out[self.weight] = a[:, 0].pow(2).sum(1) * g[:, 0].pow(2).sum(1)
            elif ghost_is_cheaper(steps, d_in, d_out):
                out[self.weight] = ghost_norms(a, g)
            else:
                out[self.weight] = self._weight_grads(a, g).flatten(1).pow(2).sum(1)
        if trainable(call.module, self.bias):
            out[self.bias] = g.sum(1).pow(2).sum(1)
        return out

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        a, g = _as_sequence(call)
        weights = weights.to(g.dtype)
        weight = into.get(self.weight)
        if weight is not None:
            # sum_i w_i g_i^T a_i: scale whichever of a and g has fewer features, then one matmul over all rows.
            if a.shape[-1] <= g.shape[-1]:
                a = a * weights[:, None, None]
            else:
                g = g * weights[:, None, None]
            flat_a, flat_g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            first, second = (flat_a.T, flat_g) if self.transposed else (flat_g.T, flat_a)
            if weight.dtype == first.dtype:
                weight.addmm_(first, second)  # straight into the accumulator: no parameter-sized temporary
            else:
                weight.add_((first @ second).to(weight.dtype))
        if self.bias in into:
            bias_grads = call.output_grad.reshape(call.batch_size, -1, g.shape[-1]).sum(1)  # (B, p), unweighted
            into[self.bias].add_((weights @ bias_grads).to(into[self.bias].dtype))


register_rule(nn.Linear)(LinearRule)


class TransposedLinearRule(LinearRule):
    transposed = True


register_rule_by_name("transformers.pytorch_utils.Conv1D", TransposedLinearRule())


class RowBlockLinearRule(LinearRule):
    """A linear map by rows ``rows`` of a larger weight (and bias): attention's query or key/value projection when
    the three inputs differ. Per-example gradients and sums are full-shape, zero outside the block."""

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

    def add_weighted_sum(self, call: LayerCall, weights: torch.Tensor, into: dict[str, torch.Tensor]) -> None:
        super().add_weighted_sum(call, weights, {n: t[self.rows] for n, t in into.items()})  # views of the block
