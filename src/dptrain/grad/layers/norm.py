"""Normalisation layers (LayerNorm, GroupNorm, RMSNorm): per-example gradients are cheap to form directly.

With x_hat the normalised input, example i's gradients are weight: sum over positions of g * x_hat, bias: sum of g;
both are as small as the parameters, so they are materialised (in at least float32), and norms and clipped sums
both come from them: a norm is always that of what is released.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.base import upcast
from dptrain.grad.layers.rules import LayerCall, LayerRule, register_rule, trainable


class _AffineNormRule(LayerRule):
    def normalised(self, call: LayerCall) -> torch.Tensor:
        raise NotImplementedError

    def reduce_to_param(self, call: LayerCall, values: torch.Tensor) -> torch.Tensor:
        """Sum per-position values (batch, *input) down to (batch, *param.shape)."""
        raise NotImplementedError

    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        out = {}
        g = upcast(call.output_grad)
        if trainable(call.module, "weight"):
            out["weight"] = self.reduce_to_param(call, g * self.normalised(call))
        if trainable(call.module, "bias"):
            out["bias"] = self.reduce_to_param(call, g)
        return out


class _LastDimsNormRule(_AffineNormRule):
    """LayerNorm and RMSNorm: parameters cover the trailing ``normalized_shape`` dimensions."""

    def reduce_to_param(self, call: LayerCall, values: torch.Tensor) -> torch.Tensor:
        param_dims = len(call.module.normalized_shape)
        middle = tuple(range(1, values.dim() - param_dims))
        return values.sum(middle) if middle else values


@register_rule(nn.LayerNorm)
class LayerNormRule(_LastDimsNormRule):
    def normalised(self, call: LayerCall) -> torch.Tensor:
        m = call.module
        return F.layer_norm(upcast(call.activation), m.normalized_shape, None, None, m.eps)


@register_rule(nn.RMSNorm)
class RMSNormRule(_LastDimsNormRule):
    def normalised(self, call: LayerCall) -> torch.Tensor:
        m = call.module
        return F.rms_norm(upcast(call.activation), m.normalized_shape, None, m.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(_AffineNormRule):
    """GroupNorm's parameters are per channel (dim 1); sum over every spatial position."""

    def normalised(self, call: LayerCall) -> torch.Tensor:
        m = call.module
        return F.group_norm(upcast(call.activation), m.num_groups, None, None, m.eps)

    def reduce_to_param(self, call: LayerCall, values: torch.Tensor) -> torch.Tensor:
        return values.flatten(2).sum(2) if values.dim() > 2 else values
