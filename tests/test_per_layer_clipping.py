"""Issue #10, item 2: Opacus' ``clipping="per_layer"``: ``max_grad_norm`` is a list, one norm per trainable
parameter of the optimizer (in its order); each parameter's per-example gradient is clipped to its own norm, so an
example's whole contribution is within their L2 total, which the noise is scaled to.

One noiseless step equals a brute-force per-example, per-parameter loop (both engines, float64, 1e-6 relative); the
noise's standard deviation is sigma times the L2 total (statistical, seeded: 20000 draws, within 3%); bad lists are
refused before anything is attached.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine

LR = 0.5


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()


def _private(model, x, y, norms, noise=0.0, mode="auto", **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=norms,
            poisson_sampling=False, clipping="per_layer", grad_sample_mode=mode, **options,
        )  # fmt: skip


def _brute_force(model: nn.Module, x, y, norms: list[float]) -> list[torch.Tensor]:
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for t, p, c in zip(total, params, norms):
            t += p.grad * min(1.0, c / float(p.grad.norm()))
    return [p.detach() - LR * t / len(x) for p, t in zip(params, total)]


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_each_parameter_is_clipped_to_its_own_norm(mode):
    torch.manual_seed(0)
    model = _model()
    x, y = torch.randn(10, 6, dtype=torch.float64) * 3, torch.randint(0, 3, (10,))
    norms = [0.05, 0.5, 0.02, 1.0, 0.01, 0.2]  # some clip, some do not
    expected = _brute_force(copy.deepcopy(model), x, y, norms)
    private, optimizer, loader = _private(model, x, y, norms, mode=mode)
    assert optimizer.max_grad_norms == norms
    assert optimizer.max_grad_norm == pytest.approx(math.sqrt(sum(c * c for c in norms)))
    for xb, yb in loader:
        F.cross_entropy(private(xb), yb).backward()
        optimizer.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))


def test_the_noise_is_scaled_to_the_l2_total_of_the_norms():
    torch.manual_seed(1)
    model = nn.Linear(100, 200)  # 20200 coordinates of noise
    x, y = torch.randn(4, 100), torch.randn(4, 200)
    norms, sigma = [3.0, 4.0], 0.7
    private, optimizer, loader = _private(model, x, y, norms, noise=sigma, noise_generator=torch.Generator().manual_seed(2))
    before = [p.detach().clone() for p in model.parameters()]
    for xb, _ in loader:
        (0.0 * private(xb).sum()).backward()  # no gradient: the update is the noise alone
        optimizer.step()
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]) * 4 / LR
    assert float(noise.std()) == pytest.approx(sigma * 5.0, rel=0.03)


@pytest.mark.parametrize(
    "norms, clipping, message",
    [
        ([1.0, 1.0], "flat", "per_layer"),
        (1.0, "per_layer", "list of norms"),
        ([1.0, 1.0], "per_layer", "holds 6, 2 norms"),
        ([1.0, -1.0, 1.0, 1.0, 1.0, 1.0], "per_layer", "per-layer max_grad_norm"),
        (1.0, "automatic", "not supported"),
    ],
)
def test_bad_norm_lists_are_refused_before_anything_is_attached(norms, clipping, message):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.randn(4, 6), torch.randint(0, 3, (4,))), batch_size=2)
    with pytest.raises(ValueError, match=message):
        PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=norms,
            clipping=clipping,
        )  # fmt: skip
    assert not model._forward_hooks  # nothing attached


def test_make_private_with_epsilon_takes_per_layer_norms():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))), batch_size=8)
    _, dp_optimizer, _ = PrivacyEngine().make_private_with_epsilon(
        module=model, optimizer=optimizer, data_loader=loader, target_epsilon=5.0, target_delta=1e-3, epochs=2,
        max_grad_norm=[0.5] * 6, clipping="per_layer",
    )  # fmt: skip
    assert dp_optimizer.max_grad_norm == pytest.approx(0.5 * math.sqrt(6))
