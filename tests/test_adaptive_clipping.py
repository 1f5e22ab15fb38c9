"""Issue #10, item 2: Opacus' ``clipping="adaptive"`` (Andrew et al. 2021): the bound tracks a quantile of the
per-example norms through a noisy count, which the accounting pays for.

- Exactness: with (almost) no count noise, each step clips at the bound the formula gives from the previous step's
  brute-force norms, and the update equals a brute-force per-example loop at that bound (float64, 1e-6 relative).
- Tracking: on a fixed batch, after 300 steps the fraction of examples within the bound is the target quantile
  (within 0.1; 40 examples).
- Accounting: the gradient noise is raised to z_g = (z^-2 - sigma_b^-2)^-1/2 (statistical: 20200 draws, 3%), and
  epsilon is that of noise multiplier z: the count and the sum together are one Gaussian mechanism at z.
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
OPTIONS = dict(target_unclipped_quantile=0.5, clipbound_learning_rate=0.2, max_clipbound=10.0, min_clipbound=1e-4)


def _private(model, x, y, noise, sigma_b, batch=None, engine=None, **options):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch or len(x))
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        return (engine or PrivacyEngine()).make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise, max_grad_norm=0.3,
            poisson_sampling=False, clipping="adaptive", unclipped_num_std=sigma_b, **{**OPTIONS, **options},
        )  # fmt: skip


def _norms_and_clipped_step(model, x, y, bound):
    params = list(model.parameters())
    total, norms = [torch.zeros_like(p) for p in params], []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        norm = float(torch.sqrt(sum(p.grad.square().sum() for p in params)))
        norms.append(norm)
        for t, p in zip(total, params):
            t += p.grad * min(1.0, bound / norm)
    return norms, [p.detach() - LR * t / len(x) for p, t in zip(params, total)]


def test_each_step_clips_at_the_bound_the_previous_count_gives():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    x, y = torch.randn(12, 5, dtype=torch.float64) * 2, torch.randint(0, 3, (12,))
    private, optimizer, loader = _private(model, x, y, noise=0.0, sigma_b=1e-12)
    bound = 0.3
    for _ in range(4):
        norms, expected = _norms_and_clipped_step(reference, x, y, bound)
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(private(xb), yb).backward()
            optimizer.step()
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-6 * float(e.abs().max()))
        fraction = sum(n <= bound for n in norms) / len(x)
        bound = min(max(bound * math.exp(-0.2 * (fraction - 0.5)), 1e-4), 10.0)
        assert optimizer.max_grad_norm == pytest.approx(bound, rel=1e-9)
        with torch.no_grad():
            for r, p in zip(reference.parameters(), model.parameters()):
                r.copy_(p)


def test_the_bound_tracks_the_target_quantile():
    torch.manual_seed(1)
    model = nn.Linear(6, 3)
    x, y = torch.randn(40, 6) * torch.linspace(0.1, 3, 40)[:, None], torch.randint(0, 3, (40,))
    private, optimizer, loader = _private(model, x, y, noise=0.5, sigma_b=5.0, target_unclipped_quantile=0.3,
                                          clipbound_learning_rate=0.5, noise_generator=torch.Generator().manual_seed(3))
    # a fixed model (lr 0) so that the norms stay put
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for _ in range(300):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(private(xb), yb).backward()
            optimizer.step()
    plain, norms = copy.deepcopy(model), []  # a copy: the engine's hooks leave it alone
    for i in range(len(x)):
        plain.zero_grad()
        F.cross_entropy(plain(x[i : i + 1]), y[i : i + 1]).backward()
        norms.append(float(torch.sqrt(sum(p.grad.square().sum() for p in plain.parameters()))))
    fraction = sum(n <= optimizer.max_grad_norm for n in norms) / len(norms)
    assert abs(fraction - 0.3) <= 0.1


def test_the_gradient_noise_pays_for_the_count_and_epsilon_is_the_combined_mechanisms():
    torch.manual_seed(2)
    model = nn.Linear(100, 200)
    x, y = torch.randn(4, 100), torch.randn(4, 200)
    z, sigma_b = 1.0, 2.0
    engine = PrivacyEngine()
    private, optimizer, loader = _private(model, x, y, noise=z, sigma_b=sigma_b, engine=engine,
                                          noise_generator=torch.Generator().manual_seed(4))
    before = [p.detach().clone() for p in model.parameters()]
    for xb, _ in loader:
        (0.0 * private(xb).sum()).backward()
        optimizer.step()
    noise = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())]) * 4 / LR
    z_g = (z**-2 - sigma_b**-2) ** -0.5
    assert float(noise.std()) == pytest.approx(z_g * 0.3, rel=0.03)
    assert engine.accountant.history == [(z, 1.0, 1)]  # charged at z, the sum and the count together


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(unclipped_num_std=0.5), "leaves no privacy for the gradient"),
        (dict(unclipped_num_std=2.0, target_unclipped_quantile=1.5), "target_unclipped_quantile"),
        (dict(unclipped_num_std=2.0, min_clipbound=20.0), "above max_clipbound"),
    ],
)
def test_bad_adaptive_options_are_refused(options, message):
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match=message):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4), noise_multiplier=1.0,
            max_grad_norm=1.0, clipping="adaptive", **{**OPTIONS, **options},
        )  # fmt: skip
    assert not model._forward_hooks


def test_adaptive_options_need_adaptive_clipping_and_all_of_them():
    model = nn.Linear(4, 2)
    common = dict(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                  data_loader=DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4), noise_multiplier=1.0,
                  max_grad_norm=1.0)  # fmt: skip
    with pytest.raises(ValueError, match='options of clipping="adaptive" only'):
        PrivacyEngine().make_private(**common, target_unclipped_quantile=0.5)
    with pytest.raises(ValueError, match="needs clipbound_learning_rate"):
        PrivacyEngine().make_private(**common, clipping="adaptive", target_unclipped_quantile=0.5)
    with pytest.raises(TypeError, match="unexpected keyword arguments clip_rate"):
        PrivacyEngine().make_private(**common, clip_rate=0.5)


def test_a_resumed_run_goes_on_from_the_bound_it_reached():
    torch.manual_seed(5)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    model = nn.Linear(5, 3)
    engine = PrivacyEngine()
    private, optimizer, loader = _private(model, x, y, noise=0.5, sigma_b=5.0, engine=engine)
    for _ in range(3):
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(private(xb), yb).backward()
            optimizer.step()
    reached, state = optimizer.max_grad_norm, engine.state_dict()
    assert reached != 0.3
    resumed = PrivacyEngine()
    resumed.load_state_dict(state)
    _, optimizer2, _ = _private(nn.Linear(5, 3), x, y, noise=0.5, sigma_b=5.0, engine=resumed)
    assert optimizer2.max_grad_norm == reached
