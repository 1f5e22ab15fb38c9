"""Issue #4, unit level: every layer rule of the fast engine against a brute-force per-example loop.

Each case wraps one layer (or a small composition) in a tiny model, backpropagates one batch loss through it with a
``FastGradSampler`` attached, and compares

- ``squared_norms()`` with the squared norms of per-example gradients computed one example at a time by autograd;
- ``weighted_sum(w)`` for random weights w with sum_i w_i g_i from the same loop;

to 1e-5 relative, in float64 so that the tolerance measures the method, not rounding. The per-example loss is
sum(sin(output) * R) for a fixed random R: non-linear, so that output gradients differ between examples (a rule
that mixed examples up would be caught), and a function of that example's output alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from dptrain.grad import FastGradSampler
from dptrain.grad.layers.embedding import EmbeddingRule
from dptrain.grad.layers.linear import SYMMETRIC_BLOCKS_FROM, LinearRule, ghost_is_cheaper, ghost_norms

DTYPE = torch.float64
REL_TOL = 1e-5
BATCH = 4


# --------------------------------------------------------------------------------------------------------------------
# Reference machinery
# --------------------------------------------------------------------------------------------------------------------


def _projection(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).to(dtype)


def per_example_losses(output: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """loss_i = sum(sin(out_i) * R): shape (batch,), each entry a function of its own example only."""
    out = output.movedim(batch_dim, 0)
    return (torch.sin(out) * _projection(out.shape[1:], out.dtype)).flatten(1).sum(1)


def _example(inputs: tuple, batch_dims: tuple[int, ...], i: int) -> tuple:
    return tuple(x.narrow(d, i, 1) for x, d in zip(inputs, batch_dims))


def brute_force(model: nn.Module, inputs: tuple, batch_dims: tuple[int, ...], out_dim: int, params: list) -> list:
    """Per-example gradients [example][param] by one autograd call per example."""
    batch = inputs[0].shape[batch_dims[0]]
    grads = []
    for i in range(batch):
        loss = per_example_losses(model(*_example(inputs, batch_dims, i)), out_dim)[0]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append([gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)])
    return grads


def fast_gradients(model, inputs, *, out_dim=0, loss_reduction="sum", batch_first=True, params=None):
    """The fast engine's per-example gradient record after one backward of the batch loss."""
    params = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    sampler = FastGradSampler(model, batch_first=batch_first, loss_reduction=loss_reduction)
    try:
        losses = per_example_losses(model(*inputs), out_dim)
        (losses.sum() if loss_reduction == "sum" else losses.mean()).backward()
        return sampler.collect(params)
    finally:
        sampler.detach()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float | None = None) -> None:
    """Relative closeness; ``scale`` (default: the largest |expected|) sets the absolute floor, so that a gradient
    that is exactly zero in theory (float64 rounding ~1e-16) is compared on the scale of the model's gradients."""
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=REL_TOL, atol=REL_TOL * max(scale, 1e-12), msg=lambda m: f"{what}: {m}"
    )


def check_against_brute_force(
    model: nn.Module,
    inputs: tuple,
    *,
    batch_dims: tuple[int, ...] | None = None,
    out_dim: int = 0,
    loss_reduction: str = "sum",
    batch_first: bool = True,
):
    """Compare squared norms and a random weighted sum with the per-example loop; return the engine's record."""
    torch.manual_seed(0)
    model = model.to(DTYPE)
    with torch.no_grad():  # move parameters off their special initial values (LayerNorm's ones and zeros)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inputs = tuple(x.to(DTYPE) if x.is_floating_point() else x for x in inputs)
    batch_dims = batch_dims or (0,) * len(inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = brute_force(model, inputs, batch_dims, out_dim, params)
    batch = len(expected)

    grads = fast_gradients(
        model, inputs, out_dim=out_dim, loss_reduction=loss_reduction, batch_first=batch_first, params=params
    )
    assert grads is not None
    assert grads.batch_size == batch
    expected_norms = torch.stack([sum(g.pow(2).sum() for g in per_param) for per_param in expected])
    norms = grads.squared_norms()
    assert norms.shape == (batch,)
    assert_rel_close(norms, expected_norms, "squared norms")

    weights = torch.rand(batch, dtype=DTYPE) + 0.1
    summed = grads.weighted_sum(weights)
    wanted = [sum(weights[i] * expected[i][k] for i in range(batch)) for k in range(len(params))]
    model_scale = max(w.abs().max().item() for w in wanted if w.numel())
    for k, p in enumerate(params):
        want = wanted[k]
        got = summed.get(p)
        if got is None:  # allowed only for a parameter no example's loss touched (the optimizer uses zeros)
            assert not want.any(), f"weighted_sum has no entry for a used parameter of shape {tuple(p.shape)}"
            continue
        assert got.shape == p.shape
        assert_rel_close(got, want, f"weighted sum of parameter {k} {tuple(p.shape)}", max(want.abs().max().item(), 1e-6 * model_scale))
    return grads


# --------------------------------------------------------------------------------------------------------------------
# Linear and Hugging Face Conv1D, ghost and materialise paths
# --------------------------------------------------------------------------------------------------------------------

LINEAR_CASES = {
    # name: (layer factory, input shape, expected path: True ghost, False materialise, None single step)
    "2d": (lambda: nn.Linear(5, 3), (BATCH, 5), None),
    "3d_ghost": (lambda: nn.Linear(16, 16), (BATCH, 3, 16), True),
    "3d_ghost_long_symmetric_blocks": (lambda: nn.Linear(80, 80), (BATCH, 33, 80), True),
    "3d_materialise": (lambda: nn.Linear(3, 4), (BATCH, 20, 3), False),
    "4d_ghost": (lambda: nn.Linear(12, 10), (BATCH, 2, 2, 12), True),
    "4d_materialise": (lambda: nn.Linear(3, 2), (BATCH, 3, 4, 3), False),
    "3d_ghost_no_bias": (lambda: nn.Linear(16, 12, bias=False), (BATCH, 3, 16), True),
    "3d_materialise_no_bias": (lambda: nn.Linear(3, 4, bias=False), (BATCH, 20, 3), False),
    "hf_conv1d_2d": (lambda: Conv1D(4, 6), (BATCH, 6), None),
    "hf_conv1d_ghost": (lambda: Conv1D(16, 16), (BATCH, 3, 16), True),
    "hf_conv1d_materialise": (lambda: Conv1D(4, 3), (BATCH, 20, 3), False),
}


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", LINEAR_CASES)
def test_linear_rules_match_brute_force(case, loss_reduction):
    factory, shape, ghost = LINEAR_CASES[case]
    torch.manual_seed(1)
    layer = factory()
    d_in = shape[-1]
    d_out = layer.nf if isinstance(layer, Conv1D) else layer.out_features
    steps = math.prod(shape[1:-1])
    if ghost is None:
        assert steps == 1
    else:  # the case really exercises the path it is named after
        assert ghost_is_cheaper(steps, d_in, d_out) == ghost
    check_against_brute_force(layer, (torch.randn(shape),), loss_reduction=loss_reduction)


@pytest.mark.parametrize("steps", [SYMMETRIC_BLOCKS_FROM - 1, SYMMETRIC_BLOCKS_FROM, SYMMETRIC_BLOCKS_FROM + 1, 64])
def test_ghost_norms_in_symmetric_blocks_equal_the_full_gram_sum(steps):
    generator = torch.Generator().manual_seed(steps)
    a = torch.randn(3, 2, steps, 5, generator=generator, dtype=DTYPE)
    g = torch.randn(3, 2, steps, 7, generator=generator, dtype=DTYPE)
    full = torch.einsum("...td,...sd,...tp,...sp->...", a, a, g, g)
    assert_rel_close(ghost_norms(a, g), full, "ghost norms")


def test_ghost_path_does_not_materialise_per_example_gradients(monkeypatch):
    """The ghost norm and the book-keeping sum never form a (batch, out, in) tensor."""

    def forbidden(*args, **kwargs):
        raise AssertionError("per-example weight gradients were materialised on the ghost path")

    monkeypatch.setattr(LinearRule, "_weight_grads", forbidden)
    monkeypatch.setattr(LinearRule, "per_example", forbidden)
    torch.manual_seed(2)
    assert ghost_is_cheaper(3, 16, 16)
    check_against_brute_force(nn.Linear(16, 16), (torch.randn(BATCH, 3, 16),))


# --------------------------------------------------------------------------------------------------------------------
# Conv1d / Conv2d
# --------------------------------------------------------------------------------------------------------------------

CONV_CASES = {
    # name: (layer factory, input shape, expected path)
    "2d_materialise": (lambda: nn.Conv2d(2, 3, 3, padding=1), (BATCH, 2, 6, 6), False),
    "2d_ghost": (lambda: nn.Conv2d(8, 16, 3), (BATCH, 8, 4, 4), True),
    "2d_stride_dilation_groups_no_bias": (
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2, bias=False),
        (BATCH, 4, 7, 6),
        False,
    ),
    "2d_same_even_kernel_reflect": (
        lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect"),
        (BATCH, 3, 6, 5),
        False,
    ),
    "2d_circular_depthwise": (
        lambda: nn.Conv2d(3, 3, 3, padding=2, padding_mode="circular", groups=3),
        (BATCH, 3, 5, 5),
        False,
    ),
    "2d_ghost_groups_stride": (lambda: nn.Conv2d(8, 16, 3, stride=2, groups=2), (BATCH, 8, 5, 5), True),
    "2d_ghost_dilation_padding": (
        lambda: nn.Conv2d(8, 16, (2, 3), stride=(1, 2), dilation=(2, 1), padding=1), (BATCH, 8, 3, 5), True,
    ),
    "1d_ghost_dilation_replicate": (
        lambda: nn.Conv1d(16, 16, 3, dilation=2, padding=2, padding_mode="replicate"), (BATCH, 16, 4), True,
    ),
    "1d_stride_dilation": (lambda: nn.Conv1d(3, 5, 3, stride=2, dilation=2), (BATCH, 3, 11), False),
    "1d_same_circular_groups_no_bias": (
        lambda: nn.Conv1d(4, 4, 2, padding="same", padding_mode="circular", groups=2, bias=False),
        (BATCH, 4, 7),
        False,
    ),
    "1d_reflect": (lambda: nn.Conv1d(2, 3, 5, padding=2, padding_mode="reflect"), (BATCH, 2, 9), False),
    "1d_ghost": (lambda: nn.Conv1d(8, 16, 3), (BATCH, 8, 5), True),
}


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_rules_match_brute_force(case, loss_reduction):
    factory, shape, ghost = CONV_CASES[case]
    torch.manual_seed(3)
    conv = factory()
    x = torch.randn(shape)
    with torch.no_grad():
        out = conv(x)
    positions = math.prod(out.shape[2:])
    d_in = conv.in_channels // conv.groups * math.prod(conv.kernel_size)
    d_out = conv.out_channels // conv.groups
    assert ghost_is_cheaper(positions, d_in, d_out) == ghost
    check_against_brute_force(conv, (x,), loss_reduction=loss_reduction)


@pytest.mark.parametrize(
    "factory, shape, released",
    [
        (lambda: nn.Conv2d(1, 4, 5, stride=2), (BATCH, 1, 12, 12), True),  # 104 per example < 208 kept
        (lambda: nn.Conv2d(16, 64, 3, padding=1), (BATCH, 16, 8, 8), False),  # 9280 per example > 5120 kept
        (lambda: nn.Linear(3, 4), (BATCH, 20, 3), True),  # materialise path: 16 < 140
        (lambda: nn.Linear(16, 16), (BATCH, 3, 16), False),  # ghost path: never materialised
        (lambda: nn.LayerNorm(6), (BATCH, 5, 6), True),
    ],
    ids=["conv_small_gradient", "conv_large_gradient", "linear_materialise", "linear_ghost", "layernorm"],
)
def test_per_example_gradients_are_formed_in_the_backward_pass_only_when_no_larger(factory, shape, released):
    """A call whose norms come from materialised per-example gradients that are no larger than its activation and
    output gradient has them formed in the backward pass and its tensors dropped; results stay exact."""
    torch.manual_seed(21)
    layer = factory()
    grads = check_against_brute_force(layer, (torch.randn(shape),))
    [(_, call)] = grads.calls
    assert call.released == released
    if released:
        assert call.activation is None and set(call.materialised) == {n for n, _ in layer.named_parameters()}


# --------------------------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize(
    "padding_idx, ids_shape", [(None, (BATCH, 8)), (0, (BATCH, 8)), (None, (BATCH, 2, 3)), (2, (BATCH,))]
)
def test_embedding_with_repeated_ids_and_padding_matches_brute_force(padding_idx, ids_shape, loss_reduction):
    torch.manual_seed(4)
    embedding = nn.Embedding(5, 4, padding_idx=padding_idx)
    ids = torch.randint(0, 5, ids_shape)  # a vocabulary of 5: every example repeats ids
    if padding_idx is not None:
        ids.view(-1)[::3] = padding_idx
    check_against_brute_force(embedding, (ids,), loss_reduction=loss_reduction)


def test_embedding_of_a_batch_whose_ids_happen_to_be_arange():
    """A batch of single ids [0, 1, ..., B-1] (user ids, class ids) is a batch, not shared position ids."""
    torch.manual_seed(4)
    check_against_brute_force(nn.Embedding(10, 3), (torch.arange(BATCH),))


@pytest.mark.parametrize("distinct", [True, False])
def test_embedding_norm_with_and_without_repeated_ids_in_an_example(distinct, monkeypatch):
    """Ids that never repeat within an example (each example a different permutation) take the sum-of-squares
    path, one repeat anywhere the token-equality path; both exact."""
    torch.manual_seed(16)
    ids = torch.stack([torch.randperm(9)[:6] for _ in range(BATCH)])
    if not distinct:
        ids[2, 5] = ids[2, 0]
    calls = []
    monkeypatch.setattr(torch, "bmm", lambda *args: calls.append(args) or torch.matmul(*args))
    check_against_brute_force(nn.Embedding(9, 3), (ids,))
    assert bool(calls) != distinct  # the (T x T) Gram is formed only when an id repeats


def test_embedding_scale_grad_by_freq_is_exact_or_refused():
    """With scale_grad_by_freq, nn.Embedding divides by the id's frequency in the batch; an example's own gradient
    divides by its frequency in that example. The engine must give the latter or refuse, never a third thing."""
    torch.manual_seed(5)
    embedding = nn.Embedding(5, 3, scale_grad_by_freq=True)
    ids = torch.randint(0, 5, (BATCH, 6))
    try:
        check_against_brute_force(embedding, (ids,))
    except (RuntimeError, ValueError, NotImplementedError) as err:
        assert "scale_grad_by_freq" in str(err)


# --------------------------------------------------------------------------------------------------------------------
# Normalisation layers
# --------------------------------------------------------------------------------------------------------------------

NORM_CASES = {
    "layernorm_3d": (lambda: nn.LayerNorm(6), (BATCH, 3, 6)),
    "layernorm_2d": (lambda: nn.LayerNorm(6), (BATCH, 6)),
    "layernorm_multidim_no_bias": (lambda: nn.LayerNorm((3, 4), bias=False), (BATCH, 5, 3, 4)),
    "groupnorm_3d": (lambda: nn.GroupNorm(2, 6), (BATCH, 6, 5)),
    "groupnorm_4d": (lambda: nn.GroupNorm(3, 6), (BATCH, 6, 3, 4)),
    "rmsnorm_3d": (lambda: nn.RMSNorm(6), (BATCH, 3, 6)),
    "rmsnorm_multidim_eps": (lambda: nn.RMSNorm((3, 4), eps=1e-3), (BATCH, 2, 3, 4)),
}


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", NORM_CASES)
def test_norm_rules_match_brute_force(case, loss_reduction):
    factory, shape = NORM_CASES[case]
    torch.manual_seed(6)
    check_against_brute_force(factory(), (torch.randn(shape),), loss_reduction=loss_reduction)


def test_groupnorm_on_2d_input_matches_brute_force():
    """nn.GroupNorm accepts (N, C) inputs (no spatial dimensions)."""
    torch.manual_seed(7)
    check_against_brute_force(nn.GroupNorm(3, 6), (torch.randn(BATCH, 6),))


# --------------------------------------------------------------------------------------------------------------------
# Parameters used more than once
# --------------------------------------------------------------------------------------------------------------------


class LinearTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.tanh(self.layer(x)))


class TiedLM(nn.Module):
    """GPT-2 style: the output head's weight is the embedding's weight (one Parameter, two layers)."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("shape", [(BATCH, 6), (BATCH, 3, 6)])
def test_linear_applied_twice_matches_brute_force(shape, loss_reduction):
    torch.manual_seed(8)
    check_against_brute_force(LinearTwice(), (torch.randn(shape),), loss_reduction=loss_reduction)


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_tied_embedding_and_head_match_brute_force_without_materialising(padding_idx, loss_reduction, monkeypatch):
    """The tied parameter's norm is the two layers' own terms plus their cross term: nothing per example."""
    torch.manual_seed(9)
    model = TiedLM()
    model.embed.padding_idx = padding_idx

    for rule in (LinearRule, EmbeddingRule):
        original = rule.per_example

        def guarded(self, call, original=original):
            assert call.module not in (model.embed, model.head), "the tied parameter was materialised"
            return original(self, call)

        monkeypatch.setattr(rule, "per_example", guarded)
    # 3 positions: the head (8 -> 11) is on the ghost path, so nothing would materialise it in the backward pass
    grads = check_against_brute_force(model, (torch.randint(0, 11, (BATCH, 3)),), loss_reduction=loss_reduction)
    assert set(grads.factored) == {model.embed.weight} and grads.shared == {}


class TwoInputsOneTable(nn.Module):
    """One embedding table looked up for two id sequences (a question and an answer), plus a shared Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 16)
        self.mix = nn.Linear(16, 16)  # on the ghost path for 3 and 4 positions: factored, not materialised

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.mix(self.embed(first)).sum(1) * torch.tanh(self.mix(self.embed(second))).sum(1)


def test_embedding_and_linear_used_for_two_inputs_match_brute_force():
    torch.manual_seed(19)
    model = TwoInputsOneTable()
    grads = check_against_brute_force(model, (torch.randint(0, 6, (BATCH, 4)), torch.randint(0, 6, (BATCH, 3))))
    assert set(grads.factored) == {model.embed.weight, model.mix.weight, model.mix.bias}


class ConvTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 3, 2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.tanh(self.conv(x)))


def test_layer_without_a_factored_form_applied_twice_is_materialised_exactly():
    torch.manual_seed(20)
    model = ConvTwice()
    grads = check_against_brute_force(model, (torch.randn(BATCH, 3, 4),))
    assert set(grads.shared) == {model.conv.weight, model.conv.bias}


class TiedHeadModule(nn.Module):
    """A custom output layer (no rule: handled by the fallback) that reuses an embedding's Parameter."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class TiedAcrossRuleAndFallback(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = TiedHeadModule(self.embed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def test_parameter_tied_between_a_rule_layer_and_a_fallback_layer_matches_brute_force():
    torch.manual_seed(10)
    check_against_brute_force(TiedAcrossRuleAndFallback(), (torch.randint(0, 7, (BATCH, 3)),))


class FunctionalTiedHead(nn.Module):
    """The head uses the embedding's weight directly in the parent's forward (``h @ E^T``), not through a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.embed(ids)), self.embed.weight)


def test_parameter_also_used_outside_its_layer_is_exact_or_refused():
    """Part of the weight's gradient does not pass through any hooked call: the engine must not silently drop it."""
    torch.manual_seed(11)
    try:
        check_against_brute_force(FunctionalTiedHead(), (torch.randint(0, 7, (BATCH, 3)),))
    except RuntimeError as err:
        assert "vmap" in str(err)


# --------------------------------------------------------------------------------------------------------------------
# Layers without a rule: the per-layer torch.func fallback
# --------------------------------------------------------------------------------------------------------------------


class ScaleThenLinear(nn.Module):
    """A custom layer owning a Parameter used in its forward, followed by a rule layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sin(x * self.scale) + x)


class GRUModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


class SeqFirstLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=False)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", ["custom_parameter", "gru", "lstm_seq_first"])
def test_layers_without_a_rule_go_through_the_exact_fallback(case, loss_reduction):
    torch.manual_seed(12)
    if case == "custom_parameter":
        model, inputs, dims, seq_first = ScaleThenLinear(), (torch.randn(BATCH, 2, 5),), None, False
    elif case == "gru":
        model, inputs, dims, seq_first = GRUModel(), (torch.randn(BATCH, 4, 3),), None, False
    else:
        model, inputs, dims, seq_first = SeqFirstLSTM(), (torch.randn(5, BATCH, 3),), (1,), True
    grads = check_against_brute_force(
        model,
        inputs,
        batch_dims=dims,
        out_dim=1 if seq_first else 0,
        loss_reduction=loss_reduction,
        batch_first=not seq_first,
    )
    assert grads.fallback is not None  # the case really went through the fallback


class GRUWithInitialState(nn.Module):
    """An encoder-decoder pattern: the GRU's initial state h0 (num_layers, B, H) is computed from the example."""

    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(3, 5)
        self.rnn = nn.GRU(3, 5, num_layers=2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.init(x[:, 0])).unsqueeze(0).expand(2, -1, -1).contiguous()
        return self.rnn(x, h0)[0]


def test_fallback_gru_with_an_initial_state_matches_brute_force():
    """batch_first=True does not apply to h0, whose batch dimension is always 1."""
    torch.manual_seed(13)
    check_against_brute_force(GRUWithInitialState(), (torch.randn(BATCH, 4, 3),))


class CausalAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        mask = torch.triu(torch.full((steps, steps), float("-inf"), dtype=x.dtype), diagonal=1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


@pytest.mark.parametrize("steps", [3, BATCH])
def test_attention_mask_shared_by_all_examples(steps):
    """The (T, T) mask is the same for every example, also when T happens to equal the batch size."""
    torch.manual_seed(14)
    check_against_brute_force(CausalAttention(), (torch.randn(BATCH, steps, 4),))


# --------------------------------------------------------------------------------------------------------------------
# Batch edge cases, unused and frozen parameters, dtype
# --------------------------------------------------------------------------------------------------------------------

EMPTY_CASES = {
    "linear_3d": (lambda: nn.Linear(4, 3), lambda b: (torch.randn(b, 2, 4),)),
    "linear_2d": (lambda: nn.Linear(4, 3), lambda b: (torch.randn(b, 4),)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3), lambda b: (torch.randn(b, 2, 5, 5),)),
    "embedding": (lambda: nn.Embedding(5, 3), lambda b: (torch.randint(0, 5, (b, 4)),)),
    "layernorm": (lambda: nn.LayerNorm(4), lambda b: (torch.randn(b, 2, 4),)),
    "fallback": (ScaleThenLinear, lambda b: (torch.randn(b, 2, 5),)),
}


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_batch_gives_zero_size_norms_and_zero_sums(case, loss_reduction):
    factory, make_inputs = EMPTY_CASES[case]
    torch.manual_seed(15)
    model = factory().to(DTYPE)
    inputs = tuple(x.to(DTYPE) if x.is_floating_point() else x for x in make_inputs(0))
    grads = fast_gradients(model, inputs, loss_reduction=loss_reduction)
    assert grads is not None
    assert grads.batch_size == 0
    norms = grads.squared_norms()
    assert norms.shape == (0,)
    summed = grads.weighted_sum(torch.zeros(0, dtype=DTYPE))
    for p in model.parameters():
        total = summed.get(p, torch.zeros_like(p))
        assert total.shape == p.shape
        assert not total.any()


class PartlyUsed(nn.Module):
    """``unused`` is never called; ``dead`` runs but its output does not reach the loss; ``spare`` is a fallback
    layer that is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.dead = nn.Linear(4, 3)
        self.spare = ScaleThenLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.dead(x)
        return self.used(x)


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_layers_unused_in_the_forward_get_a_zero_clipped_sum(loss_reduction):
    torch.manual_seed(16)
    model = PartlyUsed()
    grads = check_against_brute_force(model, (torch.randn(BATCH, 4),), loss_reduction=loss_reduction)
    summed = grads.weighted_sum(torch.ones(BATCH, dtype=DTYPE))
    for module in (model.unused, model.dead, model.spare):
        for p in module.parameters():
            assert not summed.get(p, torch.zeros_like(p)).any()


def test_frozen_parameters_are_not_in_the_record():
    torch.manual_seed(17)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(27, 4))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    grads = check_against_brute_force(model, (torch.randn(BATCH, 2, 5, 5),))
    summed = grads.weighted_sum(torch.ones(BATCH, dtype=DTYPE))
    assert set(summed) == {model[0].bias, model[2].weight}


def test_float64_model_gets_float64_norms():
    """A float64 model's norms keep float64 precision (they feed the clip factors of every example)."""
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(DTYPE)
    x = torch.randn(BATCH, 5, dtype=DTYPE)
    params = list(model.parameters())
    expected = brute_force(model, (x,), (0,), 0, params)
    norms = fast_gradients(model, (x,)).squared_norms()
    assert norms.dtype == DTYPE
    expected_norms = torch.stack([sum(g.pow(2).sum() for g in per_param) for per_param in expected])
    torch.testing.assert_close(norms, expected_norms, rtol=1e-12, atol=0.0)


class LearnedQueryPooling(nn.Module):
    """A Linear applied to a tensor shared by all examples (a fixed query bank, no batch dimension), then used with
    its own shape (Q, d) against the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("queries", torch.randn(3, 6))
        self.query_proj = nn.Linear(6, 5)
        self.key_proj = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_proj(self.queries)
        scores = torch.einsum("qd,bsd->bqs", q, self.key_proj(x))
        return torch.softmax(scores, dim=-1) @ x


def test_linear_applied_to_an_input_shared_by_all_examples():
    """The layer's output keeps its shape (Q, d) for the code that uses it; per-example gradients stay exact."""
    torch.manual_seed(19)
    check_against_brute_force(LearnedQueryPooling(), (torch.randn(BATCH, 7, 5),))


class BroadcastPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.position = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1])[None, :]  # (1, T): broadcast over the batch, as in HF GPT-2
        return self.out(x + self.position(positions))


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_embedding_of_broadcast_position_ids(loss_reduction):
    torch.manual_seed(20)
    check_against_brute_force(BroadcastPositions(), (torch.randn(BATCH, 5, 4),), loss_reduction=loss_reduction)
