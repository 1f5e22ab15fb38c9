"""Issue #10, item 3: bf16 and fp16 autocast, and models held in bf16.

Under ``torch.autocast`` the layers run in 16 bits; the engine upcasts what it keeps, so per-example norms and the
clipped sum are computed in float32 from the very tensors of the forward and backward passes. Checked on Linear,
Conv2d, Embedding + LayerNorm, attention (nn.TransformerEncoderLayer) and a small GPT (tests/nanogpt.py):
- one example's clipped contribution never exceeds C * (1 + 1e-6) (a batch of one example, noise 0, so the DP
  gradient ``.grad`` after the step is that contribution);
- one noiseless step matches a float64 brute-force per-example loop of the same model without autocast within
  the 16-bit format's tolerance (5e-2 relative to the step's norm: a few roundings of 2^-8 through the network).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from nanogpt import GPT, GPTConfig

BATCH = 8
CLASSES = 3


class GPTClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = GPT(GPTConfig(block_size=6, vocab_size=20, n_layer=1, n_head=2, n_embd=16))

    def forward(self, x):
        logits, _ = self.gpt(x, x)
        return logits[:, -1, :CLASSES]


MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, CLASSES)), lambda n: torch.randn(n, 8)),
    "conv": (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, CLASSES)),
        lambda n: torch.randn(n, 1, 8, 8),
    ),
    "embedding_layernorm": (
        lambda: nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Flatten(), nn.Linear(40, CLASSES)),
        lambda n: torch.randint(0, 20, (n, 5)),
    ),
    "attention": (
        lambda: nn.Sequential(
            nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(), nn.Linear(40, CLASSES)
        ),
        lambda n: torch.randn(n, 5, 8),
    ),
    "gpt": (GPTClassifier, lambda n: torch.randint(0, 20, (n, 6))),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _private(model, x, y, batch, max_grad_norm, lr):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
            max_grad_norm=max_grad_norm, poisson_sampling=False,
        )  # fmt: skip


def _autocast_step(model, optimizer, x, y, dtype) -> None:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    F.cross_entropy(out.float(), y).backward()
    optimizer.step()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_clipped_contribution_under_autocast_stays_within_c(name, dtype):
    make, data = MODELS[name]
    torch.manual_seed(5)
    model, max_grad_norm = make(), 1e-3  # every example is clipped
    x, y = data(4), torch.randint(0, CLASSES, (4,))
    model, optimizer, loader = _private(model, x, y, 1, max_grad_norm, lr=1.0)
    for xb, yb in loader:  # one example per step: the DP gradient (.grad after step) is its clipped contribution
        _autocast_step(model, optimizer, xb, yb, DTYPES[dtype])
        released = torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))
        assert float(released) <= max_grad_norm * (1 + 1e-6)
        assert float(released) >= max_grad_norm * 0.99  # clipped to C, not lost


def _float64_brute_force(model: nn.Module, x, y, max_grad_norm: float) -> list[torch.Tensor]:
    reference = copy.deepcopy(model).double()
    params = list(reference.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        reference.zero_grad()
        xi = x[i : i + 1].double() if x.is_floating_point() else x[i : i + 1]
        F.cross_entropy(reference(xi), y[i : i + 1]).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        factor = min(1.0, max_grad_norm / float(torch.sqrt(sum(g.square().sum() for g in grads))))
        for t, g in zip(total, grads):
            t += factor * g
    return [t / len(x) for t in total]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_a_noiseless_step_under_autocast_matches_a_float64_brute_force(name, dtype):
    make, data = MODELS[name]
    torch.manual_seed(6)
    model = make()
    x, y = data(BATCH), torch.randint(0, CLASSES, (BATCH,))
    max_grad_norm = 0.05
    expected = _float64_brute_force(model, x, y, max_grad_norm)
    before = [p.detach().clone() for p in model.parameters()]
    model, optimizer, loader = _private(model, x, y, BATCH, max_grad_norm, lr=1.0)
    for xb, yb in loader:
        _autocast_step(model, optimizer, xb, yb, DTYPES[dtype])
    step = [b.double() - p.detach().double() for b, p in zip(before, model.parameters())]
    error = torch.sqrt(sum((s - e).square().sum() for s, e in zip(step, expected)))
    size = torch.sqrt(sum(e.square().sum() for e in expected))
    assert float(error) <= 5e-2 * float(size)
