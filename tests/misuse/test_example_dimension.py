"""The batch dimension is the example dimension: a model that moves batch-first data to (T, B, ...) inside its forward
is clipped per example, exactly, by the fast engine, also at steps where T == B (never by guess).

Each noiseless DP-SGD step's clipped sum, read back from the update, is compared with a brute-force per-example loop
(tests/models.py), to 1e-5 relative, in float64 (so that reading the sum back from the update loses nothing).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from models import brute_force_clipped_sum

LR = 0.5
REL_TOL = 1e-5


class TransposedSequence(nn.Module):
    """Batch-first (B, T, 6) inputs, worked on as (T, B, ...): Linear and LayerNorm see the examples on dim 1."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.norm(torch.tanh(self.inp(x.transpose(0, 1)))))
        return self.out(h).mean(0)


class TransposedTokens(nn.Module):
    """Batch-first (B, T) token ids looked up as (T, B): the Embedding's examples are on dim 1 of its ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(tokens.t()))).mean(0)


class BroadcastPositions(nn.Module):
    """Batch-first throughout, with position ids (1, T) broadcast over the batch (as in GPT-2)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.position = nn.Embedding(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])[None, :]
        return self.out(torch.tanh(self.embed(tokens) + self.position(positions))).mean(1)


def _case(name: str, examples: int, steps: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    labels = torch.randint(0, 3, (examples,))
    if name == "sequence":
        return TransposedSequence().double(), torch.randn(examples, steps, 6, dtype=torch.float64), labels
    model = TransposedTokens() if name == "tokens" else BroadcastPositions()
    return model.double(), torch.randint(0, 30, (examples, steps)), labels


def clipped_sums_of_each_step(model, inputs, labels, batch_size, max_grad_norm, mode="auto"):
    """Noiseless private steps over the batches in order: (the clipped sum each step applied, the brute-force one)."""
    twin = copy.deepcopy(model)  # a plain copy for the reference loop, given the private model's weights each step
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=max_grad_norm, poisson_sampling=False, grad_sample_mode=mode,
        )
    results = []
    for x, y in loader:
        twin.load_state_dict(model.state_dict())
        expected = brute_force_clipped_sum(twin, x, y, max_grad_norm)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        # p <- p - LR * clipped_sum / expected_batch_size (the loader's batch_size without Poisson sampling)
        applied = [(b - p.detach()) * batch_size / LR for b, p in zip(before, model.parameters())]
        results.append((applied, expected))
    return results


def assert_sums_equal(applied, expected):
    for got, want in zip(applied, expected):
        torch.testing.assert_close(got, want, rtol=REL_TOL, atol=REL_TOL * max(want.abs().max().item(), 1e-6))


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("steps", [5, 8], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("name", ["sequence", "tokens"])
def test_model_transposing_to_sequence_first_matches_brute_force(name, steps, mode):
    """Batch of 8; with T == 8 two dimensions of every layer input fit the batch size at the first step."""
    model, inputs, labels = _case(name, 8, steps)
    [(applied, expected)] = clipped_sums_of_each_step(model, inputs, labels, 8, max_grad_norm=0.05, mode=mode)
    assert_sums_equal(applied, expected)


@pytest.mark.parametrize("steps", [5, 8], ids=["T!=B", "T==B"])
def test_one_example_contributes_at_most_the_clipping_norm(steps):
    """Example 0 has a huge gradient; the clipped sum minus the brute-force sum of the other examples (example 0's
    contribution as the engine applied it) has norm at most C. Clipping per position let it contribute 3.65 C."""
    model, inputs, labels = _case("sequence", 8, steps, seed=1)
    inputs[0] *= 50
    max_grad_norm = 0.05
    others = brute_force_clipped_sum(copy.deepcopy(model), inputs[1:], labels[1:], max_grad_norm)
    [(applied, expected)] = clipped_sums_of_each_step(model, inputs, labels, 8, max_grad_norm)
    contribution = torch.sqrt(sum((a - o).pow(2).sum() for a, o in zip(applied, others)))
    assert contribution.item() <= max_grad_norm * (1 + 1e-4), f"{contribution.item() / max_grad_norm:.2f} C"
    assert_sums_equal(applied, expected)


def test_layout_learned_at_an_unambiguous_step_is_used_when_T_equals_B():
    """Batches of 8 then 5 with T = 5: the second step has T == B, resolved by the first step's layout."""
    model, inputs, labels = _case("sequence", 13, 5, seed=2)
    results = clipped_sums_of_each_step(model, inputs, labels, 8, max_grad_norm=0.05)
    assert len(results) == 2
    for applied, expected in results:
        assert_sums_equal(applied, expected)


@pytest.mark.parametrize("name", ["sequence", "tokens", "positions"])
def test_every_step_with_T_equal_to_B_matches_brute_force(name):
    """Fixed batches of 8 with T = 8: no step has only one fitting dimension. The first step's gradients of the
    ambiguous layers come from the whole-model replay, which also tells their layout for the next steps (a layout
    learned wrong would show as a mismatch at step 2 or 3)."""
    model, inputs, labels = _case(name, 24, 8, seed=3)
    results = clipped_sums_of_each_step(model, inputs, labels, 8, max_grad_norm=0.05)
    assert len(results) == 3
    for applied, expected in results:
        assert_sums_equal(applied, expected)


def test_layout_is_found_under_dropout_without_touching_the_random_stream():
    """T == B at the first step, with dropout: the layout cannot come from a replay (it would draw other masks);
    the forward pass probed to find it forks the generators, so the user's dropout masks are unchanged. The
    second step (eval mode, so that brute force can reproduce it) uses the layout found: it must be right."""
    torch.manual_seed(4)
    model = TransposedSequence(dropout=0.5).double()
    inputs, labels = torch.randn(16, 8, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=8)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.05,
            poisson_sampling=False,
        )
    batches = iter(loader)
    x, y = next(batches)
    torch.manual_seed(5)
    out = model(x)
    after_private = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(out, twin(x)) and torch.equal(after_private, torch.rand(3))
    nn.functional.cross_entropy(out, y).backward()
    optimizer.step()

    model.eval()
    x, y = next(batches)
    twin.load_state_dict(model.state_dict())
    expected = brute_force_clipped_sum(twin.eval(), x, y, 0.05)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert_sums_equal([(b - p.detach()) * 8 / LR for b, p in zip(before, model.parameters())], expected)
