"""Ordinary misuses of a model made private with the fast engine, each handled exactly or refused at once:
a parameter used outside its layer from a later step on, deep copies of the private model, 0-dim parameters;
and the batch tags the optimizer uses to refuse gradient accumulation across batches.

Exactness is against the brute-force per-example loop, in float64, to 1e-5 relative (test_example_dimension.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.grad import FastGradSampler
from models import make_case
from test_example_dimension import assert_sums_equal, clipped_sums_of_each_step

# --------------------------------------------------------------------------------------------------------------------
# A rule layer's parameter used outside the layer, from a later step on
# --------------------------------------------------------------------------------------------------------------------


class LateOutsideUse(nn.Module):
    """From ``outside = True`` on, the parent also uses ``hidden.weight`` directly (not through ``hidden``)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)
        self.outside = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(x))
        out = self.head(h)
        return out + F.linear(h, self.hidden.weight)[:, :3] if self.outside else out


def _private(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
            poisson_sampling=False,
        )


def test_outside_use_starting_at_step_3_is_refused_at_that_step_and_nothing_is_applied():
    torch.manual_seed(0)
    model, optimizer, loader = _private(LateOutsideUse(), torch.randn(16, 6), torch.randint(0, 3, (16,)), 4)
    for step, (x, y) in enumerate(loader, start=1):
        model.outside = step == 3
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if step != 3:
            optimizer.step()
            continue
        with pytest.raises(RuntimeError, match=r"hidden\.weight receives gradient outside its layer"):
            optimizer.step()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert optimizer.steps_taken == 3  # steps 1, 2 and 4: the model is back to in-layer uses only at step 4


class TiedWithCustomHead(nn.Module):
    """An Embedding's table reused by a custom layer (no rule: the per-layer fallback) as the output head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.head = _WeightHead(self.embed.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)).mean(1))


class _WeightHead(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class SharedQueries(nn.Module):
    """A Linear applied to a buffer shared by all examples: its gradients come from the whole-model replay."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("queries", torch.randn(3, 6))
        self.query_proj = nn.Linear(6, 6)
        self.key_proj = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("qd,bd->bq", self.query_proj(self.queries), self.key_proj(x))


@pytest.mark.parametrize("name", ["tied_with_fallback", "shared_input_replayed"])
def test_parameters_legitimately_used_beyond_rule_calls_are_not_refused_at_later_steps(name):
    """Uses the engine attributes another way (a fallback layer's own forward, the whole-model replay) are not
    outside uses: three steps, each equal to brute force."""
    torch.manual_seed(1)
    if name == "tied_with_fallback":
        model, inputs = TiedWithCustomHead().double(), torch.randint(0, 3, (12, 5))
    else:
        model, inputs = SharedQueries().double(), torch.randn(12, 6, dtype=torch.float64)
    results = clipped_sums_of_each_step(model, inputs, torch.randint(0, 3, (12,)), 4, max_grad_norm=0.05)
    assert len(results) == 3
    for applied, expected in results:
        assert_sums_equal(applied, expected)


# --------------------------------------------------------------------------------------------------------------------
# Deep copies of the private model
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ["mlp", "transformer", "lstm"])
def test_deep_copy_of_the_private_model_is_a_plain_trainable_model(architecture):
    """After two steps, and between a forward pass and its step: the copy's parameters require grad, it trains like
    the model it copies, and its passes record nothing into the private model's engine."""
    model, inputs, labels = make_case(architecture, 8)
    model, optimizer, loader = _private(model, inputs, labels, 4)
    x, y = next(iter(loader))  # the first of the two batches of 4
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    plain = copy.deepcopy(make_case(architecture, 8)[0])
    plain.load_state_dict(model.state_dict())

    copied = copy.deepcopy(model)
    assert all(p.requires_grad for p in copied.parameters())
    F.cross_entropy(copied(x), y).backward()
    F.cross_entropy(plain(x), y).backward()
    assert all(p.requires_grad for p in copied.parameters())
    for a, b in zip(copied.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert optimizer.grad_sampler.collect(optimizer.params) is None  # the copy's passes reached no engine hook

    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    between = copy.deepcopy(model)
    loss.backward()
    assert all(p.requires_grad for p in between.parameters())
    F.cross_entropy(between(x), y).backward()
    assert all(p.grad is not None for p in between.parameters())
    grads = optimizer.grad_sampler.collect(optimizer.params)
    assert grads is not None and grads.batch_size == len(x)  # the model's own pass alone, not also the copy's


# --------------------------------------------------------------------------------------------------------------------
# 0-dim parameters
# --------------------------------------------------------------------------------------------------------------------


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h * self.gain)


class LearnedTemperature(nn.Module):
    """0-dim Parameters: a learned temperature owned by the model itself, and a gain in a child layer."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 6)
        self.scale = _Scale()
        self.head = nn.Linear(6, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(self.hidden(x))) / self.temperature


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_zero_dim_parameters_match_brute_force(mode):
    """Batches of 8 then 5: the second step also runs with autograd's weight gradients of rule layers suspended."""
    torch.manual_seed(2)
    model, inputs = LearnedTemperature().double(), torch.randn(13, 5, dtype=torch.float64)
    results = clipped_sums_of_each_step(model, inputs, torch.randint(0, 3, (13,)), 8, max_grad_norm=0.05, mode=mode)
    assert len(results) == 2
    for applied, expected in results:
        assert_sums_equal(applied, expected)


# --------------------------------------------------------------------------------------------------------------------
# Batch tags
# --------------------------------------------------------------------------------------------------------------------


class ScaleThenHead(nn.Module):
    """``head=False`` runs the custom layer (the torch.func fallback) alone, without the rule layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = _Scale()
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, head: bool = True) -> torch.Tensor:
        h = self.scale(x)
        return self.out(h) if head else h


def test_batch_tags_are_those_of_the_forward_passes():
    model = ScaleThenHead()
    sampler = FastGradSampler(model, loss_reduction="sum")
    params = list(model.parameters())
    current = ["a"]
    sampler.batch_tag = lambda: current[0]
    x = torch.randn(4, 4)
    try:
        model(x).sum().backward()
        current[0] = "b"
        model(x, head=False).sum().backward()  # only the fallback layer records this pass
        assert sampler.collect(params).tags == {"a", "b"}

        current[0] = "c"
        out = model(x)
        current[0] = "d"  # the tag of a pass is the one at its forward, not at its backward
        out.pow(2).sum().backward(retain_graph=True)
        out.sum().backward()  # two loss terms of one forward pass: one tag
        assert sampler.collect(params).tags == {"c"}

        sampler.batch_tag = None
        model(x).sum().backward()
        assert sampler.collect(params).tags == frozenset()
    finally:
        sampler.detach()


# --------------------------------------------------------------------------------------------------------------------
# The whole-model replay starting in the second of two forward passes before one collect
# --------------------------------------------------------------------------------------------------------------------


class TiedLateSharedInput(nn.Module):
    """``key`` and ``query`` share their weight; ``query`` (only with ``pool``) is applied to a shared buffer, so
    its parameters are replayed from the pass that first calls it on."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Linear(6, 6)
        self.query = nn.Linear(6, 6)
        self.query.weight = self.key.weight
        self.register_buffer("queries", torch.randn(3, 6))

    def forward(self, x: torch.Tensor, pool: bool = False) -> torch.Tensor:
        k = torch.tanh(self.key(x))
        return torch.einsum("qd,bd->bq", self.query(self.queries), k) if pool else k


def test_replay_starting_in_a_later_forward_pass_keeps_the_earlier_pass_exact():
    """Two forward passes, one backward of their summed losses: the first pass's calls of ``key`` give the tied
    weight's gradient for that pass, the replay gives it for the second (no part counted twice or lost)."""
    torch.manual_seed(3)
    model = TiedLateSharedInput().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    r1, r2 = torch.randn(6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    params = list(model.parameters())

    def losses(inputs: torch.Tensor) -> torch.Tensor:
        return (torch.sin(model(inputs)) @ r1) + (torch.sin(model(inputs, pool=True)) @ r2)

    expected = [torch.autograd.grad(losses(x[i : i + 1]).sum(), params) for i in range(len(x))]
    sampler = FastGradSampler(model, loss_reduction="sum")
    try:
        losses(x).sum().backward()
        grads = sampler.collect(params)
    finally:
        sampler.detach()
    norms = torch.stack([sum(g.pow(2).sum() for g in per_example) for per_example in expected])
    torch.testing.assert_close(grads.squared_norms(), norms, rtol=1e-10, atol=0.0)
    weights = torch.rand(len(x), dtype=torch.float64)
    summed = grads.weighted_sum(weights)
    for k, p in enumerate(params):
        torch.testing.assert_close(summed[p], sum(w * e[k] for w, e in zip(weights, expected)), rtol=1e-10, atol=1e-12)
