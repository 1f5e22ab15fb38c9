"""nn.Embedding: example i's gradient scatters its output-gradient rows into the rows of its token ids.

||G_i||^2 = sum_{t,s : id_t = id_s} g_t . g_s, from token-id equality in O(T^2 d) without a (vocab x d) tensor;
when no id repeats within an example (position ids) it is sum_t ||g_t||^2.
Positions holding ``padding_idx`` get no gradient, as in nn.Embedding's own backward.
"""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad.layers import LayerCall, LayerRule, register_rule, trainable


def _ids_and_grads(call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    batch = call.batch_size
    ids = call.activation.reshape(batch, -1)
    g = call.output_grad.reshape(batch, ids.shape[1], -1)
    padding_idx = call.module.padding_idx
    if padding_idx is not None:
        g = g * (ids != padding_idx).unsqueeze(-1).to(g.dtype)
    return ids, g


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
            return {"weight": g.pow(2).sum((1, 2))}
        same_id = (ids[:, :, None] == ids[:, None, :]).to(g.dtype)
        return {"weight": (same_id * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))}

    def weighted_sum(self, call: LayerCall, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        if not trainable(call.module, "weight"):
            return {}
        ids, g = _ids_and_grads(call)
        weighted = (g * weights.to(g.dtype)[:, None, None]).reshape(-1, g.shape[-1])
        total = g.new_zeros(call.module.num_embeddings, g.shape[-1])
        return {"weight": total.index_add_(0, ids.flatten(), weighted)}


register_rule(nn.Embedding)(EmbeddingRule)
