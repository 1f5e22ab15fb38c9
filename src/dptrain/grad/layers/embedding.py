"""nn.Embedding: example i's gradient scatters its output-gradient rows into the rows of its token ids.

||G_i||^2 = sum_{t,s : id_t = id_s} g_t . g_s, from token-id equality in O(T^2 d) without a (vocab x d) tensor;
when no id repeats within an example (position ids) it is sum_t ||g_t||^2.
Positions holding ``padding_idx`` get no gradient, as in nn.Embedding's own backward.

The token-equality sum is signed (two occurrences of a token with opposite gradients cancel), and computed apart
from the clipped sum (a scatter-add), so it carries a rounding bound (``dptrain.grad.layers``): an example it does
not certify has its gradient's rows for its own tokens formed in float64, for its norm and its clipped sum alike.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad.base import upcast
from dptrain.grad.layers.rules import (
    ExactPart,
    LayerCall,
    LayerRule,
    _recomputed,
    add_exact,
    fast_weights,
    register_rule,
    trainable,
    uncertain,
)
from dptrain.grad.layers.gram import certified_gram_sum, refined_gram_sum, rounding_factor


def _ids_and_grads(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    batch = call.batch_size
    ids = call.activation.reshape(batch, -1)
    g = upcast(call.output_grad.reshape(batch, ids.shape[1], -1))
    padding_idx = call.module.padding_idx
    if padding_idx is not None:
        g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


def _exact_rows(ids: torch.Tensor, g: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ExactPart]:
    """Squared norms (float64) of the examples ``index`` and their exact part, each example's gradient kept as the
    float64 rows of its distinct tokens only (a vocabulary-sized tensor per example would not fit)."""
    rows = []
    for i in index.tolist():
        tokens, inverse = torch.unique(ids[i], return_inverse=True)
        summed = g.new_zeros(len(tokens), g.shape[-1], dtype=torch.float64).index_add_(0, inverse, g[i].double())
        rows.append((tokens, summed))
    norms = torch.stack([summed.square().sum() for _, summed in rows])

    def add(weights: torch.Tensor, into: torch.Tensor) -> None:
        for weight, (tokens, summed) in zip(weights.tolist(), rows):
            into.index_add_(0, tokens, (weight * summed).to(into.dtype))

    return norms, ExactPart(index, add)


class EmbeddingRule(LayerRule):
    def per_example(self, call: LayerCall) -> dict[str, torch.Tensor]:
        if not trainable(call.module, "weight"):
            return {}
        ids, g = _ids_and_grads(call)
        batch, vocab = ids.shape[0], call.module.num_embeddings
        flat_index = (ids + vocab * torch.arange(batch, device=ids.device)[:, None]).flatten()
        grads = g.new_zeros(batch * vocab, g.shape[-1]).index_add_(0, flat_index, g.reshape(-1, g.shape[-1]))
        return {"weight": grads.view(batch, vocab, -1)}

    def materialises(self, call: LayerCall) -> bool:
        return False  # norms from token-id equality; per-example gradients are vocabulary-sized

    def factors(self, call: LayerCall, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return _ids_and_grads(call) if name == "weight" else None

    def squared_norms(self, call: LayerCall) -> dict[str, torch.Tensor]:
        if not trainable(call.module, "weight"):
            return {}
        ids, g = _ids_and_grads(call)
        if bool((ids.sort(dim=1).values.diff(dim=1) != 0).all()):  # no id twice in an example (position ids)
            sq = g.square().sum((1, 2))  # a sum of squares, and each row is released as it is
            call.bounds["weight"] = rounding_factor(g[0].numel(), sq.dtype)
            return {"weight": sq}
        value, call.bounds["weight"] = certified_gram_sum((ids, g), (ids, g), same=True)
        return {"weight": value.to(g.dtype)}

    def recheck(self, call: LayerCall, name: str, index: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        ids, g = _ids_and_grads(call)
        value, bound = refined_gram_sum((ids, g), (ids, g), True, index)  # the tighter bound first
        sq = _recomputed(call, name, index, sq, value, bound)
        index = index[uncertain(sq[index], bound)]
        if not len(index):
            return sq
        norms, call.exact["weight"] = _exact_rows(ids, g, index)
        return _recomputed(call, name, index, sq, norms)

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if not trainable(call.module, "weight"):
            return {}
        ids, g = _ids_and_grads(call)
        weights = weights.to(g.dtype)
        weighted = (g * fast_weights(call, "weight", weights)[:, None, None]).reshape(-1, g.shape[-1])
        total = g.new_zeros(call.module.num_embeddings, g.shape[-1])
        total.index_add_(0, ids.flatten(), weighted)
        add_exact(call, "weight", weights, total)
        return {"weight": total}


register_rule(nn.Embedding)(EmbeddingRule)
