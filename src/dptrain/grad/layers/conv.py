"""Conv1d / Conv2d: unfolding the input into patches turns a convolution into a linear layer over positions.

With patches a (B, D, L) and output gradient g (B, P, L) per group, the weight gradient of example i is
g_i a_i^T; its squared norm is computed either by the ghost form over positions or by materialising, whichever is
cheaper, exactly as for nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.layers import LayerCall, LayerRule, register_rule, trainable
from dptrain.grad.layers.linear import ghost_is_cheaper


def _patches_and_grads(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches (B, groups, D, L) and output gradients (B, groups, P, L)."""
    m = call.module
    x = call.activation
    mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
    x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
    kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
    if isinstance(m, nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, kernel[0]), (1, stride[0]), (1, dilation[0])
    patches = F.unfold(x, kernel, dilation=dilation, padding=0, stride=stride)
    batch, groups = x.shape[0], m.groups
    patches = patches.view(batch, groups, -1, patches.shape[-1])
    g = call.output_grad.reshape(batch, groups, m.out_channels // groups, -1)
    return patches, g


class ConvRule(LayerRule):
    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        patches, g = _patches_and_grads(call)
        out = {}
        if trainable(call.module, "weight"):
            grads = torch.einsum("bgpl,bgdl->bgpd", g, patches)
            out["weight"] = grads.reshape(g.shape[0], *call.module.weight.shape)
        if trainable(call.module, "bias"):
            out["bias"] = g.sum(-1).flatten(1)
        return out

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        patches, g = _patches_and_grads(call)
        out = {}
        if trainable(call.module, "weight"):
            positions, d_in, d_out = patches.shape[-1], patches.shape[2], g.shape[2]
            if ghost_is_cheaper(positions, d_in, d_out):
                patch_gram = torch.einsum("bgdl,bgdm->bglm", patches, patches)
                grad_gram = torch.einsum("bgpl,bgpm->bglm", g, g)
                out["weight"] = (patch_gram * grad_gram).sum((1, 2, 3))
            else:
                out["weight"] = torch.einsum("bgpl,bgdl->bgpd", g, patches).flatten(1).pow(2).sum(1)
        if trainable(call.module, "bias"):
            out["bias"] = g.sum(-1).flatten(1).pow(2).sum(1)
        return out

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        patches, g = _patches_and_grads(call)
        weighted = g * weights.to(g.dtype)[:, None, None, None]
        out = {}
        if trainable(call.module, "weight"):
            out["weight"] = torch.einsum("bgpl,bgdl->gpd", weighted, patches).reshape(call.module.weight.shape)
        if trainable(call.module, "bias"):
            out["bias"] = weighted.sum((0, 3)).flatten()
        return out


register_rule(nn.Conv1d, nn.Conv2d)(ConvRule)
