"""nn.MultiheadAttention for the fast engine: the module's forward computed from its pieces, so that its in- and
out-projections are linear layers whose inputs and output gradients the engine can keep.

The module's own forward hands its weights to F.multi_head_attention_forward, where no hook sees the projections,
so the fast engine runs ``attention_forward`` instead for every module that ``can_decompose`` accepts (packed
in-projection, no bias_k/bias_v, no add_zero_attn; others fall back to torch.func). It is the same computation
(masks, causal hint, dropout, attention weights), checked against the module's own forward in the tests. With one
input for query, key and value the in-projection is a single linear layer with weight ``in_proj_weight``;
otherwise each of the query and key/value projections is a block of rows of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad.layers.rules import LayerRule
from dptrain.grad.layers.linear import LinearRule, RowBlockLinearRule

#: (rule, module, input, weight, bias) -> output: the engine's linear map that records the call for its rule.
RecordedLinear = Callable[[LayerRule, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

IN_PROJECTION = LinearRule("in_proj_weight", "in_proj_bias")
OUT_PROJECTION = LinearRule()


def can_decompose(module: nn.MultiheadAttention) -> bool:
    return (
        module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def _block(module: nn.MultiheadAttention, first: int, last: int) -> tuple[LayerRule, slice]:
    rows = slice(first * module.embed_dim, last * module.embed_dim)
    return RowBlockLinearRule(rows, "in_proj_weight", "in_proj_bias"), rows


def _project(
    module: nn.MultiheadAttention, linear: RecordedLinear, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    weight, bias = module.in_proj_weight, module.in_proj_bias
    if query is key and key is value:
        q, k, v = linear(IN_PROJECTION, module, query, weight, bias).chunk(3, dim=-1)
        return q, k, v
    blocks = [(query, 0, 1), (key, 1, 3)] if key is value else [(query, 0, 1), (key, 1, 2), (value, 2, 3)]
    outputs = []
    for x, first, last in blocks:
        rule, rows = _block(module, first, last)
        outputs.append(linear(rule, module, x, weight[rows], bias[rows] if bias is not None else None))
    if key is value:
        k, v = outputs[1].chunk(2, dim=-1)
        return outputs[0], k, v
    return outputs[0], outputs[1], outputs[2]


def attention_forward(
    module: nn.MultiheadAttention,
    linear: RecordedLinear,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``module(query, key, value, ...)`` for batched (3-D) inputs, with the projections made by ``linear``."""
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint (nn.MultiheadAttention); you may use "
            "nn.Transformer.generate_square_subsequent_mask to create this mask"
        )
    causal_hint = is_causal and key_padding_mask is None and not need_weights
    attn_mask = None if causal_hint else F._canonical_mask(
        mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype, check_other=False
    )
    if not module.batch_first:  # to (B, L, E), keeping which inputs are the same tensor
        same_qk, same_kv = query is key, key is value
        query = query.transpose(0, 1)
        key = query if same_qk else key.transpose(0, 1)
        value = key if same_kv else value.transpose(0, 1)
    batch, target_len, embed_dim = query.shape
    source_len, heads = key.shape[1], module.num_heads
    q, k, v = _project(module, linear, query, key, value)
    q, k, v = (t.unflatten(-1, (heads, embed_dim // heads)).transpose(1, 2) for t in (q, k, v))  # (B, H, L, d)

    mask = None
    if attn_mask is not None:
        expected = (target_len, source_len) if attn_mask.dim() == 2 else (batch * heads, target_len, source_len)
        if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape) != expected:
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)}; expected {expected}")
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, heads, target_len, source_len)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, source_len):
            raise RuntimeError(
                f"key_padding_mask of shape {tuple(key_padding_mask.shape)}; expected {(batch, source_len)}"
            )
        padding = key_padding_mask.view(batch, 1, 1, source_len)
        mask = padding if mask is None else mask + padding
    dropout = module.dropout if module.training else 0.0

    weights = None
    if need_weights:
        scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-2, -1))
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        attended = torch.matmul(weights, v)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal_hint)
    attended = attended.transpose(1, 2).reshape(batch, target_len, embed_dim)
    out_proj = module.out_proj
    output = linear(OUT_PROJECTION, out_proj, attended, out_proj.weight, out_proj.bias)
    return (output if module.batch_first else output.transpose(0, 1)), weights
