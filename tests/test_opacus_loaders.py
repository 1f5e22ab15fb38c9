"""Issue #10, item 2: Opacus' loader names. ``DPDataLoader.from_data_loader`` and
``utils.uniform_sampler.UniformWithReplacementSampler`` give Poisson batches (statistical, seeded: 400 batches of
a 200-example dataset at q = 0.1, mean batch size within 4 standard errors of 20, every batch distinct examples),
and a loader from ``from_data_loader`` given to ``make_private`` is charged at the same rate 1 / len(loader).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from models import train_one_epoch
from dptrain.data_loader import DPDataLoader
from dptrain.utils.uniform_sampler import UniformWithReplacementSampler

N, Q = 200, 0.1


def _check_poisson(batches: list[list[int]]) -> None:
    sizes = [len(b) for b in batches]
    mean, stderr = sum(sizes) / len(sizes), math.sqrt(N * Q * (1 - Q) / len(sizes))
    assert abs(mean - N * Q) <= 4 * stderr
    assert all(len(set(b)) == len(b) and all(0 <= i < N for i in b) for b in batches)
    assert min(sizes) < max(sizes)  # the size varies


def test_the_uniform_sampler_is_poisson_sampling():
    sampler = UniformWithReplacementSampler(num_samples=N, sample_rate=Q, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == 10
    _check_poisson([b for _ in range(40) for b in sampler])


def test_from_data_loader_gives_poisson_batches_of_the_dataset():
    data = TensorDataset(torch.arange(N))
    loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=20), generator=torch.Generator().manual_seed(1))
    assert len(loader) == 10 and loader.sample_rate == pytest.approx(Q)
    _check_poisson([batch[0].tolist() for _ in range(40) for batch in loader])


def test_make_private_on_a_from_data_loader_loader_charges_its_rate():
    model = nn.Linear(3, 2)
    data = TensorDataset(torch.randn(N, 3), torch.randint(0, 2, (N,)))
    dp_loader = DPDataLoader.from_data_loader(DataLoader(data, batch_size=20))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=dp_loader,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    train_one_epoch(model, optimizer, loader)
    assert engine.accountant.history == [(1.0, pytest.approx(Q), 10)]


def test_distributed_from_data_loader_is_refused():
    with pytest.raises(ValueError, match="distributed=True"):
        DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.arange(4)), batch_size=2), distributed=True)
