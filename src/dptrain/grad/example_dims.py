"""Which dimension of a rule layer's input carries the examples: the candidates a call's shape allows.

The fast engine knows the batch size; a layer's examples may sit on any leading dimension its rule treats alike (a
model may transpose batch-first data to (T, B, ...) inside ``forward``). One candidate decides; several (a
dimension equal to the batch size by chance) are settled by the layout learned at an earlier step or by a probe of
the forward pass (``probe_verdict``), never by a guess.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad.layers import LayerRule
from dptrain.grad.layers.embedding import EmbeddingRule
from dptrain.grad.layers.linear import LinearRule

#: Where a call's examples are, besides a dimension index: a leading 1 broadcast over the batch (GPT-2's position
#: ids), or (a learned layout only) a layer seen with its examples on different dimensions.
BROADCAST, CONFLICT = -1, -2


def leading_dims(rule: LayerRule, module: nn.Module, activation: torch.Tensor) -> int:
    """How many leading dimensions of a rule layer's input its rule treats alike, so that any one of them may carry
    the examples: those before the features (Linear, HF Conv1D), all of token ids (Embedding), those before
    ``normalized_shape`` (LayerNorm, RMSNorm); only dim 0 of a batched input for the others (convolutions,
    GroupNorm), whose other dimensions are channels and positions."""
    if isinstance(rule, LinearRule):
        return activation.dim() - 1
    if isinstance(rule, EmbeddingRule):
        return activation.dim()
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return activation.dim() - len(module.normalized_shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(activation.dim() == len(module.kernel_size) + 2)
    return int(activation.dim() >= 2)


def candidate_dims(activation: torch.Tensor, leading: int, batch_size: int) -> list[int]:
    """The leading dimensions of the batch size, and ``BROADCAST`` for a leading 1 in a batch of several."""
    shape = activation.shape
    dims = [d for d in range(leading) if shape[d] == batch_size]
    if batch_size > 1 and leading and shape[0] == 1:
        dims.append(BROADCAST)
    return dims


def probe_verdict(dims: list[int], grad: torch.Tensor | None) -> int | None:
    """The example dimension among ``dims`` from the gradient of one example's (example 0's) output with respect to
    the layer's output: entries of other examples get none, so the example dimension has it at index 0 only. A
    dimension with gradient at another index is refuted; the verdict is the one dimension not refuted (it must
    have gradient at 0), or ``BROADCAST`` when every dimension is refuted and a broadcast leading 1 fits. None:
    undecided."""
    if grad is None:
        return None
    used = grad != 0
    standing = []
    for d in dims:
        if d != BROADCAST:
            along = used.movedim(d, 0).flatten(1).any(1)
            if not along[1:].any():
                standing.append((d, bool(along[0])))
    if len(standing) == 1:
        return standing[0][0] if standing[0][1] else None
    return BROADCAST if not standing and BROADCAST in dims else None
