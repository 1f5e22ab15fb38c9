"""Opacus' BatchMemoryManager pattern runs unchanged: the same chunks and the same steps as make_private's own
``max_physical_batch_size``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.utils.batch_memory_manager import BatchMemoryManager


def _private(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(60, 5), torch.randint(0, 3, (60,))), batch_size=20)
    return PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=data, noise_multiplier=1.0,
        max_grad_norm=1.0, noise_generator=torch.Generator().manual_seed(1), **kwargs,
    )  # fmt: skip


def _train(model, optimizer, loader) -> list[int]:
    sizes = []
    for x, y in loader:
        sizes.append(len(y))
        optimizer.zero_grad()
        if len(y):
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return sizes


def test_batch_memory_manager_gives_the_chunks_and_steps_of_max_physical_batch_size():
    model, optimizer, loader = _private()
    loader.batch_sampler.random.generator.manual_seed(3)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=4, optimizer=optimizer) as chunks:
        sizes = _train(model, optimizer, chunks)
    assert max(sizes) <= 4 and loader.max_physical_batch_size is None  # restored after the block
    reference, ref_optimizer, ref_loader = _private(max_physical_batch_size=4)
    ref_loader.batch_sampler.random.generator.manual_seed(3)
    assert _train(reference, ref_optimizer, ref_loader) == sizes
    assert optimizer.steps_taken == ref_optimizer.steps_taken == 3  # one real step per logical batch
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_batch_memory_manager_refuses_a_loader_that_is_not_private():
    plain = DataLoader(TensorDataset(torch.randn(4, 5)), batch_size=2)
    with pytest.raises(ValueError, match="the data loader that make_private returned"):
        BatchMemoryManager(data_loader=plain, max_physical_batch_size=2, optimizer=None)
    _, _, loader = _private()
    with pytest.raises(ValueError, match="positive integer"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=0)
