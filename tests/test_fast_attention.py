"""Issue #4: native nn.MultiheadAttention in the fast engine, decomposed into its projections.

Two things must hold. The decomposed forward (``attention_forward``) computes what the module's own forward computes,
for every input pattern, mask and output option; and the per-example norms and clipped sums it leads to equal a
brute-force per-example loop (the machinery of test_fast_layers.py, float64, 1e-5 relative). Configurations the
decomposition does not cover (kdim/vdim, bias_k/bias_v, add_zero_attn) stay on the exact torch.func fallback.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dptrain.grad import FastGradSampler
from dptrain.grad.layers.attention import attention_forward, can_decompose
from test_fast_layers import BATCH, check_against_brute_force

EMBED, HEADS, TARGET, SOURCE = 8, 2, 3, 5


def plain_linear(rule, module, x, weight, bias):
    return F.linear(x, weight, bias)


def _masks(kind: str, batch: int, target: int) -> dict:
    """Keyword arguments for one mask pattern (target length ``target``, source length SOURCE)."""
    generator = torch.Generator().manual_seed(3)
    padding = torch.zeros(batch, SOURCE, dtype=torch.bool)
    padding[:, -1] = True
    padding[0, -2] = True  # examples differ; no row is fully masked
    causal = torch.triu(torch.ones(target, SOURCE, dtype=torch.bool), diagonal=1)
    if kind == "none":
        return {}
    if kind == "padding_bool":
        return {"key_padding_mask": padding}
    if kind == "padding_float":
        return {"key_padding_mask": torch.randn(batch, SOURCE, generator=generator, dtype=torch.float64)}
    if kind == "attn_2d_bool":
        return {"attn_mask": causal}
    if kind == "attn_3d_float":
        return {"attn_mask": torch.randn(batch * HEADS, target, SOURCE, generator=generator, dtype=torch.float64)}
    if kind == "both_bool":
        return {"attn_mask": causal, "key_padding_mask": padding}
    if kind == "causal_hint":
        return {"attn_mask": causal, "is_causal": True}
    if kind == "causal_hint_with_padding":
        return {"attn_mask": causal, "is_causal": True, "key_padding_mask": padding}
    raise ValueError(kind)


MASKS = (
    "none", "padding_bool", "padding_float", "attn_2d_bool", "attn_3d_float", "both_bool", "causal_hint",
    "causal_hint_with_padding",
)  # fmt: skip


def _inputs(pattern: str, batch_first: bool, batch: int = BATCH) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)

    def sequence(length: int) -> torch.Tensor:
        x = torch.randn(batch, length, EMBED, generator=generator, dtype=torch.float64)
        return x if batch_first else x.transpose(0, 1).contiguous()

    if pattern == "self":
        x = sequence(SOURCE)
        return x, x, x
    query, key = sequence(TARGET), sequence(SOURCE)
    return (query, key, key) if pattern == "shared_key_value" else (query, key, sequence(SOURCE))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("pattern", ["self", "shared_key_value", "distinct"])
@pytest.mark.parametrize("mask", MASKS)
def test_decomposed_forward_equals_the_module_forward(batch_first, pattern, mask):
    torch.manual_seed(5)
    module = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first, dtype=torch.float64)
    query, key, value = _inputs(pattern, batch_first)
    kwargs = _masks(mask, BATCH, SOURCE if pattern == "self" else TARGET)
    for need_weights, average in itertools.product([False, True], [True, False]):
        if not need_weights and not average:
            continue
        options = dict(kwargs, need_weights=need_weights, average_attn_weights=average)
        expected, expected_weights = module(query, key, value, **options)
        output, weights = attention_forward(module, plain_linear, query, key, value, **options)
        torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
        else:
            assert weights is None and expected_weights is None


def test_decomposed_forward_without_bias_and_in_eval_mode_with_dropout():
    torch.manual_seed(6)
    module = nn.MultiheadAttention(EMBED, HEADS, bias=False, dropout=0.5, batch_first=True, dtype=torch.float64)
    module.eval()  # dropout is off in eval mode, in both forwards
    query, key, value = _inputs("distinct", True)
    expected, _ = module(query, key, value, need_weights=False)
    output, _ = attention_forward(module, plain_linear, query, key, value, need_weights=False)
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-12)


def test_causal_hint_without_a_mask_is_refused_like_the_module():
    module = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(2, 3, EMBED)
    with pytest.raises(RuntimeError, match="attn_mask"):
        module(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask"):
        attention_forward(module, plain_linear, x, x, x, is_causal=True)


def test_wrong_mask_shapes_are_refused():
    module = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    x = torch.randn(2, 3, EMBED)
    with pytest.raises(RuntimeError, match="attn_mask of shape"):
        attention_forward(module, plain_linear, x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="key_padding_mask of shape"):
        attention_forward(module, plain_linear, x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------------------
# Per-example gradients through the decomposition, against brute force
# --------------------------------------------------------------------------------------------------------------------


class Attending(nn.Module):
    """Attention over the inputs in one of three patterns, with optional masks; the loss sees the output and, with
    ``need_weights``, the attention weights."""

    def __init__(self, pattern: str, batch_first: bool, need_weights: bool, bias: bool = True, **options) -> None:
        super().__init__()
        self.pattern, self.batch_first, self.need_weights = pattern, batch_first, need_weights
        self.attn = nn.MultiheadAttention(EMBED, HEADS, bias=bias, batch_first=batch_first, **options)
        self.head = nn.Linear(EMBED, 3)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, padding: torch.Tensor):
        if self.pattern == "self":
            key = value = query
        elif self.pattern == "shared_key_value":
            value = key
        out, weights = self.attn(query, key, value, key_padding_mask=padding, need_weights=self.need_weights)
        out = self.head(out)
        if weights is not None:  # (B, L, S): fold into the output so that the loss depends on the weights
            summary = weights.sum(-1, keepdim=True)[..., :1] * weights[..., :1]
            out = out + (summary if self.batch_first else summary.transpose(0, 1))
        return out


def _padding(batch: int, length: int) -> torch.Tensor:
    pad = torch.zeros(batch, length, dtype=torch.bool)
    for i in range(batch):
        pad[i, length - (i % 3) :] = True  # example i ignores its last i % 3 keys (never all of them)
    return pad


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("pattern", ["self", "shared_key_value", "distinct"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_decomposed_attention_matches_brute_force(pattern, batch_first, need_weights, loss_reduction):
    torch.manual_seed(7)
    model = Attending(pattern, batch_first, need_weights)
    query, key, value = (x.float() for x in _inputs(pattern, batch_first))
    if pattern == "self":
        query = key = value = _inputs("self", batch_first)[0].float()
    dim = 0 if batch_first else 1
    grads = check_against_brute_force(
        model,
        (query, key, value, _padding(BATCH, SOURCE)),
        batch_dims=(dim, dim, dim, 0),
        out_dim=dim,
        loss_reduction=loss_reduction,
        batch_first=batch_first,
    )
    assert grads.fallback is None  # no torch.func: the projections went through the Linear rule
    recorded = {call.module for _, call in grads.calls}
    assert recorded == {model.attn, model.attn.out_proj, model.head}


def test_decomposed_attention_without_bias_matches_brute_force():
    torch.manual_seed(8)
    model = Attending("distinct", True, need_weights=False, bias=False)
    query, key, value = (x.float() for x in _inputs("distinct", True))
    check_against_brute_force(model, (query, key, value, _padding(BATCH, SOURCE)))


@pytest.mark.parametrize(
    "options", [{"kdim": 6, "vdim": 7}, {"add_bias_kv": True}, {"add_zero_attn": True}], ids=["kdim", "bias_kv", "zero"]
)
def test_attention_configurations_outside_the_decomposition_use_the_exact_fallback(options):
    torch.manual_seed(9)
    model = Attending("distinct", True, need_weights=False, **options)
    assert not can_decompose(model.attn)
    query = torch.randn(BATCH, TARGET, EMBED)
    key = torch.randn(BATCH, SOURCE, options.get("kdim", EMBED))
    value = torch.randn(BATCH, SOURCE, options.get("vdim", EMBED))
    grads = check_against_brute_force(model, (query, key, value, _padding(BATCH, SOURCE)))
    assert grads.fallback is not None


class SharedPrototypes(nn.Module):
    """Attention among learned prototypes (an unbatched (S, E) input) added to every example: the attention's
    output gradient is summed over examples by broadcasting, so only a replay of the whole model attributes it."""

    def __init__(self) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(SOURCE, EMBED))
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
        self.head = nn.Linear(EMBED, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.attn(self.prototypes, self.prototypes, self.prototypes, need_weights=False)[0]
        return self.head(x + shared.mean(0))


def test_attention_applied_to_an_unbatched_input_is_replayed_exactly():
    torch.manual_seed(10)
    check_against_brute_force(SharedPrototypes(), (torch.randn(BATCH, 4, EMBED),))


def test_transformer_decoder_layer_matches_brute_force():
    """Self-attention under a causal mask and cross-attention to a memory, both decomposed."""

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerDecoderLayer(EMBED, HEADS, dim_feedforward=16, dropout=0.0, batch_first=True)

        def forward(self, target: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(target.shape[1], dtype=target.dtype)
            return self.layer(target, memory, tgt_mask=mask, tgt_is_causal=True)

    torch.manual_seed(11)
    model = Decoder()
    grads = check_against_brute_force(model, (torch.randn(BATCH, TARGET, EMBED), torch.randn(BATCH, SOURCE, EMBED)))
    assert grads.fallback is None


def test_detach_restores_the_module_forward_and_a_copy_uses_its_own_weights():
    torch.manual_seed(12)
    model = Attending("self", True, need_weights=False)
    x = torch.randn(BATCH, SOURCE, EMBED)
    padding = _padding(BATCH, SOURCE)
    sampler = FastGradSampler(model)
    assert "forward" in vars(model.attn)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(2.0)
        expected = Attending("self", True, need_weights=False)
        expected.load_state_dict(clone.state_dict())
        torch.testing.assert_close(clone(x, x, x, padding), expected(x, x, x, padding))
    sampler.detach()
    assert "forward" not in vars(model.attn)
