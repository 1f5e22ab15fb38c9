"""Conv1d / Conv2d: weight gradients from the convolution's own backward kernel, or from patches where ghost is cheaper.

Example i's weight gradient is the weight gradient of the convolution applied to example i alone. Folding the batch
into the channels, (B, C, ...) -> (1, B*C, ...), turns the batch into B independent groups of one grouped convolution,
whose weight gradient (one ``aten.convolution_backward``, the kernel autograd uses) is the stack of every example's
weight gradient: per-example gradients without unfolding the input into patches. The clipped sum
sum_i c_i G_i is the plain weight gradient for the output gradient scaled by c (book-keeping), one more such call.

Squared norms either materialise per-example gradients that way, or use the ghost form over positions: with patches
a (B, L, D) and output gradient g (B, P, L) per group, ||G_i||^2 = sum_{l,m} (a_il . a_im)(g_il . g_im), which needs
the input unfolded into patches once, in ``squared_norms`` only. The ghost form is used where it takes fewer multiply-adds,
as for nn.Linear. (Measured on CPU for Opacus' MNIST CNN's second conv, where the two are within 15% in
multiply-adds, ghost with its unfold and materialisation by the grouped kernel run equally fast.)

Norms computed apart from the clipped sum (the ghost form, and per-example gradients materialised in
``squared_norms`` only) carry a rounding bound (``dptrain.grad.layers``); an example it does not certify has its
weight gradient formed in float64, for its norm and its part of the clipped sum alike. Everything is computed in at
least float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.base import upcast
from dptrain.grad.layers.rules import (
    LayerCall,
    LayerRule,
    _recomputed,
    add_exact,
    dense_exact,
    fast_weights,
    register_rule,
    trainable,
    uncertain,
)
from dptrain.grad.layers.gram import certified_gram_sum, refined_gram_sum, rounding_factor
from dptrain.grad.layers.linear import ghost_is_cheaper


def _padded_input(call: LayerCall) -> tuple[torch.Tensor, list[int]]:
    """The input and the zero padding to pass to the convolution kernel: the layer's padding when it is zero padding
    on both sides alike, else the input padded here (reflect, replicate, circular, 'same' with an even kernel)."""
    m = call.module
    x = upcast(call.activation)
    pads = m._reversed_padding_repeated_twice  # (last dim left, right, previous dim left, right, ...)
    if m.padding_mode == "zeros" and all(pads[k] == pads[k + 1] for k in range(0, len(pads), 2)):
        return x, list(reversed(pads[0::2]))
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    return F.pad(x, pads, mode=mode), [0] * (x.dim() - 2)


def _weight_grad(call: LayerCall, x: torch.Tensor, padding: list[int], g: torch.Tensor, per_example: bool):
    """Weight gradient of the layer for output gradient g: summed over the batch, or per example (B, *weight.shape)."""
    m = call.module
    weight = x.new_empty(1).expand(m.weight.shape)  # only its shape is read
    groups = m.groups
    if per_example:
        batch = x.shape[0]
        x = x.reshape(1, batch * x.shape[1], *x.shape[2:])
        g = g.reshape(1, batch * g.shape[1], *g.shape[2:])
        weight = weight.new_empty(1).expand(batch * weight.shape[0], *weight.shape[1:])
        groups = batch * groups
    grad = torch.ops.aten.convolution_backward(
        g,
        x,
        weight,
        None,
        list(m.stride),
        padding,
        list(m.dilation),
        False,
        [0] * len(padding),
        groups,
        [False, True, False],
    )[1]
    return grad.view(-1, *m.weight.shape) if per_example else grad


def _patches_and_grads(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches (B, groups, L, D) and output gradients (B, groups, P, L), for the ghost form.

    The patches are sliding-window views of the padded input (Tensor.unfold) copied once into (L, D) order, which
    is faster on CPU than F.unfold's im2col; D is ordered (channel, kernel offsets), like the weight.
    """
    m = call.module
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = F.pad(upcast(call.activation), m._reversed_padding_repeated_twice, mode=mode)
    spatial = x.dim() - 2
    for k in range(spatial):  # appends one window dimension per spatial dimension
        x = x.unfold(2 + k, m.dilation[k] * (m.kernel_size[k] - 1) + 1, m.stride[k])
    x = x[(..., *(slice(None, None, d) for d in m.dilation))]  # (B, C, *positions, *kernel)
    batch, groups = x.shape[0], m.groups
    x = x.unflatten(1, (groups, -1))  # (B, G, C/G, *positions, *kernel)
    positions = range(3, 3 + spatial)
    patches = x.permute(0, 1, *positions, 2, *range(3 + spatial, 3 + 2 * spatial))
    patches = patches.reshape(batch, groups, math.prod(x.shape[3 : 3 + spatial]), -1)
    g = upcast(call.output_grad).reshape(batch, groups, m.out_channels // groups, -1)
    return patches, g


def _bias_grads(call: LayerCall) -> torch.Tensor:
    """Per-example bias gradients (B, out_channels)."""
    return upcast(call.output_grad).flatten(2).sum(-1)


def _spread(call: LayerCall, x: torch.Tensor, padding: list[int]) -> torch.Tensor:
    """S_i = sum over groups and positions of ||patch|| ||output gradient||, per example: the patches' squared
    norms are one convolution of x^2 with a kernel of ones, one output channel per group."""
    m = call.module
    ones = x.new_ones(m.groups, x.shape[1] // m.groups, *m.kernel_size)
    patch_sq = torch.ops.aten.convolution(
        x.square(), ones, None, list(m.stride), padding, list(m.dilation), False, [0] * len(padding), m.groups
    )
    batch = x.shape[0]
    g = upcast(call.output_grad).reshape(batch, m.groups, m.out_channels // m.groups, -1)
    return (patch_sq.reshape(batch, m.groups, -1).clamp(min=0).sqrt() * g.norm(dim=2)).sum((1, 2))


class ConvRule(LayerRule):
    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        out = {}
        if trainable(call.module, "weight"):
            x, padding = _padded_input(call)
            out["weight"] = _weight_grad(call, x, padding, upcast(call.output_grad), per_example=True)
        if trainable(call.module, "bias"):
            out["bias"] = _bias_grads(call)
        return out

    def _ghost(self, call: LayerCall) -> bool:
        m = call.module
        positions = call.output_grad[0, 0].numel()
        return ghost_is_cheaper(positions, m.weight[0].numel(), m.out_channels // m.groups)

    def materialises(self, call: LayerCall) -> bool:
        return trainable(call.module, "weight") and not self._ghost(call)

    def _weight_norms(self, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared weight-gradient norms and their rounding bounds."""
        if self._ghost(call):
            patches, g = _patches_and_grads(call)
            value, bound = certified_gram_sum((patches, g.transpose(-1, -2)), (patches, g.transpose(-1, -2)), True)
            return value.sum(1).to(patches.dtype), bound.sum(1)
        x, padding = _padded_input(call)
        grads = _weight_grad(call, x, padding, upcast(call.output_grad), per_example=True).flatten(1)
        sq = torch.linalg.vecdot(grads, grads)
        # Formed over P positions, each gradient is within gamma_P S_i of the exact one; the clipped sum forms it anew.
        spread = rounding_factor(call.output_grad[0, 0].numel(), sq.dtype) * _spread(call, x, padding)
        return sq, 2 * spread * sq.sqrt() + spread.square() + sq * rounding_factor(grads.shape[1], sq.dtype)

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        m = call.module
        out = {}
        if trainable(m, "weight"):
            out["weight"], call.bounds["weight"] = self._weight_norms(call)
        if trainable(m, "bias"):
            # The clipped sum uses this same float32 sum over positions: the norm is that of what is released.
            sq = _bias_grads(call).square().sum(1)
            out["bias"] = sq
            call.bounds["bias"] = rounding_factor(m.out_channels, sq.dtype)
        return out

    def recheck(self, call: LayerCall, name: str, index: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        if name == "bias":
            return _recomputed(call, name, index, sq, _bias_grads(call)[index].double().square().sum(1))
        if self._ghost(call):  # the ghost norm's tighter bound first
            patches, g = _patches_and_grads(call)
            factors = (patches, g.transpose(-1, -2))
            value, bound = refined_gram_sum(factors, factors, True, index)
            value, bound = value.sum(1), bound.sum(1)
            sq = _recomputed(call, name, index, sq, value, bound)
            index = index[uncertain(sq[index], bound)]
            if not len(index):
                return sq
        x, padding = _padded_input(call)
        g = upcast(call.output_grad)[index].to(torch.float64)
        grads = _weight_grad(call, x[index].to(torch.float64), padding, g, per_example=True)
        call.exact["weight"] = dense_exact(index, grads)
        return _recomputed(call, name, index, sq, grads.flatten(1).square().sum(1))

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        g = upcast(call.output_grad)
        weights = weights.to(g.dtype)
        out = {}
        if trainable(call.module, "weight"):
            w = fast_weights(call, "weight", weights)
            x, padding = _padded_input(call)
            out["weight"] = _weight_grad(call, x, padding, g * w.view(-1, *([1] * (g.dim() - 1))), per_example=False)
            add_exact(call, "weight", weights, out["weight"])
        if trainable(call.module, "bias"):
            out["bias"] = fast_weights(call, "bias", weights) @ _bias_grads(call)
        return out


register_rule(nn.Conv1d, nn.Conv2d)(ConvRule)
