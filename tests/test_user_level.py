"""User-level privacy: users Poisson-sampled with all their examples, each user's gradient clipped as one unit."""

from __future__ import annotations

import copy

import dp_accounting
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.accounting import epsilon_of_event
from dptrain.randomness import RandomSource
from dptrain.sampling import UserPoissonBatchSampler

LR = 1.0


def _data(users: list[int], seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    n = len(users)
    return TensorDataset(torch.randn(n, 5, generator=generator), torch.randint(0, 3, (n,), generator=generator))


def _private(model, dataset, users, *, sigma=0.0, clip=0.1, batches=1, reduction="sum", mode="auto", chunk=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=len(dataset) // batches),
        noise_multiplier=sigma, max_grad_norm=clip, privacy_unit="user", user_ids=users, user_reduction=reduction,
        grad_sample_mode=mode, max_physical_batch_size=chunk, noise_generator=torch.Generator().manual_seed(0),
    )
    return engine, model, optimizer, loader


def _brute_force_user_sum(model, dataset, users, clip, reduction):
    """sum over users of clip(sum or mean of the user's per-example gradients), by a plain loop."""
    x, y = dataset.tensors
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for user in sorted(set(users)):
        rows = [i for i, u in enumerate(users) if u == user]
        grads = [torch.zeros_like(p) for p in params]
        for i in rows:
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
            for g, p in zip(grads, params):
                g += p.grad / (len(rows) if reduction == "mean" else 1)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for t, g in zip(total, grads):
            t += g * min(1.0, clip / norm.item())
    return total


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_full_batch_user_step_equals_brute_force(mode, reduction):
    users = [7, 7, 7, 7, 7, 7, 3, 3, 9, 1, 1, 1]  # user 7 holds many examples
    dataset = _data(users)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    reference = copy.deepcopy(model)
    expected = _brute_force_user_sum(copy.deepcopy(model), dataset, users, 0.1, reduction)
    # One step per epoch samples every user (q = 1); chunks of 5 split user 7 across physical batches.
    engine, model, optimizer, loader = _private(model, dataset, users, reduction=reduction, mode=mode, chunk=5)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert optimizer.steps_taken == 1
    num_users = 4
    for p, r, e in zip(model.parameters(), reference.parameters(), expected):
        torch.testing.assert_close(p.detach(), r.detach() - LR * e / num_users, rtol=1e-5, atol=1e-6)


def test_one_user_moves_the_noiseless_sum_by_at_most_the_clipping_norm():
    users = [0] * 40  # one user holding 40 examples with huge gradients
    dataset = _data(users, seed=1)
    dataset.tensors[0].mul_(50)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    clip = 0.05
    engine, model, optimizer, loader = _private(model, dataset, users, clip=clip)
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    moved = torch.sqrt(sum((p - b).pow(2).sum() for p, b in zip(model.parameters(), before)))
    # One user, q = 1: the update is LR * clip(sum of 40 gradients) / 1, of norm exactly C when clipped.
    assert moved.item() == pytest.approx(LR * clip, rel=1e-5)


def test_user_sampling_includes_all_of_a_users_examples_at_rate_q():
    users = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5])
    sampler = UserPoissonBatchSampler(users, 0.3, 3000, RandomSource(generator=torch.Generator().manual_seed(0)))
    included = torch.zeros(6)
    for batch in sampler:
        batch_users = users[batch]
        for u in batch_users.unique().tolist():
            assert (batch_users == u).sum() == (users == u).sum()  # a sampled user brings all its examples
        included[batch_users.unique()] += 1
    # Binomial(3000, 0.3): std of the frequency 0.0084; 5 std = 0.042.
    assert (included / 3000 - 0.3).abs().max() < 0.042


def test_user_sampling_across_ranks_keeps_each_user_on_one_rank_at_rate_q():
    """Two ranks: every user (all its examples) is sampled by exactly one rank, at rate q; rank 2 of 2 is refused."""
    users = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6, 7, 7])
    samplers = [
        UserPoissonBatchSampler(users, 0.3, 3000, RandomSource(generator=torch.Generator().manual_seed(r)), r, 2)
        for r in range(2)
    ]
    included = torch.zeros(2, 8)
    for batches in zip(*samplers):
        for rank, batch in enumerate(batches):
            batch_users = users[batch].unique()
            for u in batch_users.tolist():
                assert (users[batch] == u).sum() == (users == u).sum()
            included[rank, batch_users] += 1
    owners = (included > 0).sum(0)
    assert (owners == 1).all()  # no user on two ranks, none on neither
    # Binomial(3000, 0.3): std of the frequency 0.0084; 5 std = 0.042.
    assert (included.sum(0) / 3000 - 0.3).abs().max() < 0.042
    with pytest.raises(ValueError, match="rank"):
        UserPoissonBatchSampler(users, 0.3, 10, rank=2, world_size=2)


def test_user_level_epsilon_matches_dp_accounting():
    users = [i // 4 for i in range(200)]  # 50 users of 4 examples
    dataset = _data(users)
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    engine, model, optimizer, loader = _private(model, dataset, users, sigma=1.0, batches=5)
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert engine.privacy_unit == "user"
    assert optimizer.expected_batch_size == pytest.approx(50 / 5)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)), optimizer.steps_taken
    )
    assert engine.get_epsilon(1e-5) == pytest.approx(epsilon_of_event(event, 1e-5, "pld"), rel=1e-9)


def test_user_level_bad_input():
    users = [0, 1, 2, 3]
    dataset = _data(users)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(dataset, batch_size=2)
    kwargs = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="user_ids"):
        PrivacyEngine().make_private(**kwargs, privacy_unit="user")
    with pytest.raises(ValueError, match="one per example"):
        PrivacyEngine().make_private(**kwargs, privacy_unit="user", user_ids=[0, 1])
    with pytest.raises(ValueError, match="privacy_unit"):
        PrivacyEngine().make_private(**kwargs, privacy_unit="household", user_ids=users)
    with pytest.raises(ValueError, match="user_reduction"):
        PrivacyEngine().make_private(**kwargs, privacy_unit="user", user_ids=users, user_reduction="max")
    with pytest.raises(ValueError, match="poisson"):
        PrivacyEngine().make_private(**kwargs, privacy_unit="user", user_ids=users, poisson_sampling=False)


def test_a_user_level_logical_step_left_unfinished_leaves_no_user_sum_behind():
    """The loop leaves the loader after the first chunk of a logical batch: the per-user sums of that chunk must not
    reach the next step, which must equal the step of an engine that never saw the unfinished batch."""
    users = [7, 7, 7, 7, 7, 7, 3, 3, 9, 1, 1, 1]
    dataset = _data(users)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

    def run(leave_first_pass_early: bool):
        # A clipping norm no user reaches: a user's sum counted twice would not be normalised away by clipping.
        _, trained, optimizer, loader = _private(copy.deepcopy(model), dataset, users, clip=100.0, chunk=5)
        for unfinished in ([True] if leave_first_pass_early else []) + [False]:
            for x, y in loader:
                optimizer.zero_grad()
                nn.functional.cross_entropy(trained(x), y).backward()
                optimizer.step()
                if unfinished:
                    break
        return trained, optimizer

    unfinished_then_full, optimizer = run(True)
    only_full, _ = run(False)
    assert optimizer.steps_taken == 1
    for a, b in zip(unfinished_then_full.parameters(), only_full.parameters()):
        torch.testing.assert_close(a, b)
