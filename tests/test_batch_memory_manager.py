"""Opacus' BatchMemoryManager pattern runs unchanged: the same chunks and the same steps as make_private's own
``max_physical_batch_size``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


def test_signal_skip_step_is_a_no_op_within_a_logical_batch_and_refused_at_its_end():
    """Opacus' ``optimizer.signal_skip_step()``: within a logical batch the step only accumulates anyway; before
    the last chunk's step it would merge two Poisson batches into one charged step: refused."""
    torch.manual_seed(3)
    model = nn.Linear(4, 2)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=DataLoader(data, batch_size=32),
        noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=4,
    )  # fmt: skip
    refused = 0
    for x, y in loader:
        optimizer.zero_grad()
        if len(x):
            F.cross_entropy(model(x), y).backward()
        optimizer.signal_skip_step(do_skip=True)
        if loader.signal.is_last_chunk:
            with pytest.raises(RuntimeError, match="two Poisson batches into one step"):
                optimizer.step()
            refused += 1
        else:
            optimizer.step()
    assert refused == 2 and engine.accountant.steps == 0  # no step was taken or charged


class _WithLSTM(nn.Module):
    """A rule layer after a torch.func fallback layer: both engines' records count."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(5, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lstm(x.unsqueeze(1))[0][:, -1])


@pytest.mark.parametrize("mode", ["auto", "vmap"])
@pytest.mark.parametrize("with_lstm", [False, True])
def test_accumulated_iterations_counts_the_passes_waiting_for_step(mode, with_lstm):
    """Opacus' ``optimizer.accumulated_iterations``: 0 after step/zero_grad, 1 after a forward and backward pass;
    two loss terms on one forward pass are one iteration; a second batch's pass reads 2 and is refused at step()."""
    torch.manual_seed(0)
    model = _WithLSTM() if with_lstm else nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    data = DataLoader(TensorDataset(torch.randn(60, 5), torch.randint(0, 3, (60,))), batch_size=20)
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5), data_loader=data, noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode,
    )  # fmt: skip
    batches = iter(loader)
    x, y = next(batches)
    assert optimizer.accumulated_iterations == 0
    out = model(x)
    F.cross_entropy(out, y).backward(retain_graph=True)
    assert optimizer.accumulated_iterations == 1
    out.square().mean().backward()  # a second loss term on the same forward pass
    assert optimizer.accumulated_iterations == 1
    optimizer.step()
    assert optimizer.accumulated_iterations == 0
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()
    optimizer.zero_grad()
    assert optimizer.accumulated_iterations == 0
    F.cross_entropy(model(x), y).backward()
    x, y = next(batches)
    F.cross_entropy(model(x), y).backward()  # gradient accumulation over two batches
    assert optimizer.accumulated_iterations == 2
    with pytest.raises(RuntimeError, match="several different batches .*max_physical_batch_size"):
        optimizer.step()
