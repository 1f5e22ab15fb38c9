"""Issue #2: the Gaussian noise of a DP step.

The update handed to the wrapped optimizer is (sum_i clip(g_i) + N(0, (sigma*C)^2 I)) / expected_batch_size, with
expected_batch_size = q*N = N / len(data_loader) under Poisson sampling and the loader's batch size otherwise.
To see the noise alone, the tests use a loss multiplied by zero: every per-example gradient is exactly zero, so
after ``optimizer.step()`` each coordinate of ``p.grad`` is pure noise N(0, (sigma*C/B)^2).

Statistical tolerances: for n i.i.d. normal samples with standard deviation s, the sample mean has standard error
s/sqrt(n) and the sample standard deviation has standard error ~ s/sqrt(2n). With the Linear(1000, 100) layer below
(n = 100,100 coordinates) the relative standard error of the std is 0.22%; every check allows 6 standard errors
(two-sided normal tail 2e-9), far below the sqrt(3) = +73% a per-chunk noise bug or the 30/25 = +20% a wrong
divisor would produce. Seeded tests are deterministic anyway; the secure-mode tests draw from os.urandom, so their
6-SE bounds are what makes a spurious failure negligible.

The noise of all parameters is one flat draw (fewer calls for models with many small parameters), cut into a view
per parameter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.randomness import RandomSource, secure_normal, secure_uniform

IN, OUT = 1000, 100
N_COORDS = IN * OUT + OUT
SIGMA, C = 1.3, 0.7
SE_MULT = 6.0


def _zero_loss(output: torch.Tensor) -> torch.Tensor:
    # The per-example gradients of this loss are identically zero: p.grad after step() is noise / B only.
    return (output * 0.0).sum()


def _dataset(n: int, d: int = IN, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 2, (n,), generator=g))


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _check_std(noise: torch.Tensor, expected_std: float) -> None:
    n = noise.numel()
    mean, std = noise.double().mean().item(), noise.double().std().item()
    assert abs(mean) < SE_MULT * expected_std / math.sqrt(n), (mean, expected_std)
    assert abs(std / expected_std - 1) < SE_MULT / math.sqrt(2 * n), (std, expected_std)


def _one_noise_step(engine: PrivacyEngine, loader: DataLoader, **kwargs) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = nn.Linear(IN, OUT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=SIGMA, max_grad_norm=C, **kwargs
    )
    x, _ = next(iter(loader))
    opt.zero_grad()
    _zero_loss(model(x)).backward()
    opt.step()
    return model, opt


def test_noise_std_is_sigma_c_over_expected_batch_size_poisson() -> None:
    # N=100, batch_size=30 -> len(loader)=4, q=1/4, expected batch size q*N = 25 (not the loader's 30).
    loader = DataLoader(_dataset(100), batch_size=30)
    model, opt = _one_noise_step(PrivacyEngine(), loader, noise_generator=torch.Generator().manual_seed(1))
    assert opt.expected_batch_size == pytest.approx(25.0)
    expected = SIGMA * C / 25.0
    _check_std(model.weight.grad.flatten(), expected)
    _check_std(_flat_grad(model), expected)
    # The bias has only 100 coordinates: only a loose check (6 SE = 6/sqrt(200) = 42%).
    assert abs(model.bias.grad.std().item() / expected - 1) < SE_MULT / math.sqrt(2 * OUT)


def test_noise_std_uses_batch_size_without_poisson_sampling() -> None:
    loader = DataLoader(_dataset(100), batch_size=30)
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, opt = _one_noise_step(
            PrivacyEngine(), loader, poisson_sampling=False, noise_generator=torch.Generator().manual_seed(2)
        )
    assert opt.expected_batch_size == pytest.approx(30.0)
    _check_std(_flat_grad(model), SIGMA * C / 30.0)


def test_noise_added_once_per_logical_batch_not_per_chunk() -> None:
    # batch_size=N -> len(loader)=1 -> q=1: every example is in the one logical batch of 30, split into 3 chunks
    # of 10. Noise once: std sigma*C/30; noise per chunk would give sqrt(3) times that (+73%, ~300 SE away).
    n = 30
    torch.manual_seed(0)
    model = nn.Linear(IN, OUT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(_dataset(n), batch_size=n),
        noise_multiplier=SIGMA,
        max_grad_norm=C,
        max_physical_batch_size=10,
        noise_generator=torch.Generator().manual_seed(3),
    )
    before = copy.deepcopy(model.state_dict())
    results, sizes = [], []
    for x, _ in loader:
        sizes.append(len(x))

        def closure(x=x):
            opt.zero_grad()
            loss = _zero_loss(model(x))
            loss.backward()
            return loss

        results.append(opt.step(closure))
        if len(results) < 3:
            # A non-final chunk: step() returns None and the parameters do not move.
            assert torch.equal(model.weight, before["weight"]) and torch.equal(model.bias, before["bias"])
    assert sizes == [10, 10, 10]
    assert results[0] is None and results[1] is None and results[2] is not None
    assert opt.steps_taken == 1 and engine.accountant.steps == 1
    _check_std(_flat_grad(model), SIGMA * C / n)
    assert not torch.equal(model.weight, before["weight"])


def _train_steps(seed: int | None, global_seed: int, steps: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    torch.manual_seed(global_seed)  # must not matter when a noise_generator is given
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model, opt, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(_dataset(64, d=8), batch_size=16),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=gen,
    )
    loss_fn = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(loader):
        if i == steps:
            break
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_identical_update_different_seed_different() -> None:
    a = _train_steps(seed=7, global_seed=0)
    b = _train_steps(seed=7, global_seed=99)
    c = _train_steps(seed=8, global_seed=0)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)
    # Every parameter tensor differs under a different seed (each gets its own noise).
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_secure_mode_noise_has_correct_std() -> None:
    loader = DataLoader(_dataset(100), batch_size=30)
    engine = PrivacyEngine(secure_mode=True)
    model, opt = _one_noise_step(engine, loader)
    assert opt.random.secure
    _check_std(_flat_grad(model), SIGMA * C / 25.0)
    # The noise does not come from torch's generator: a second run from the same torch seed draws other noise.
    model2, _ = _one_noise_step(PrivacyEngine(secure_mode=True), loader)
    assert not torch.equal(model.weight.grad, model2.weight.grad)


def test_secure_mode_samples_with_os_randomness() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    _, opt, loader = PrivacyEngine(secure_mode=True).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(40, d=4), batch_size=10),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert loader.batch_sampler.random.secure
    # Two passes with torch's global seed reset in between still differ: sampling does not use torch's RNG.
    # (Two independent Poisson passes of 4 steps over 40 examples coincide with probability < 1e-9.)
    torch.manual_seed(0)
    first = list(loader.batch_sampler)
    torch.manual_seed(0)
    second = list(loader.batch_sampler)
    assert first != second


def test_secure_mode_refuses_noise_generator() -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="secure_mode"):
        PrivacyEngine(secure_mode=True).make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_dataset(40, d=4), batch_size=10),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(0),
        )
    with pytest.raises(ValueError, match="secure_mode"):
        RandomSource(secure=True, generator=torch.Generator())


def test_secure_normal_is_standard_normal() -> None:
    import scipy.stats as scipy_stats
    n = 200_000
    x = secure_normal(n)
    assert x.shape == (n,) and x.dtype == torch.float64
    assert torch.isfinite(x).all()
    # mean: SE 1/sqrt(n); variance: SE sqrt(2/n) for a normal; 6 SE each.
    assert abs(x.mean().item()) < SE_MULT / math.sqrt(n)
    assert abs(x.var().item() - 1) < SE_MULT * math.sqrt(2 / n)
    # Fourth moment 3 (kurtosis of a normal): SE sqrt(96/n) (var of x^4 is 105 - 9 = 96).
    assert abs((x**4).mean().item() - 3) < SE_MULT * math.sqrt(96 / n)
    # KS against N(0, 1): a correct sampler gives a uniform p-value; p < 1e-6 would be a one-in-a-million event.
    assert scipy_stats.kstest(x.numpy(), "norm").pvalue > 1e-6
    # Odd sizes are handled (Box-Muller makes pairs).
    assert secure_normal(7).shape == (7,)
    assert secure_normal(1).shape == (1,)


def test_secure_uniform_range_and_moments() -> None:
    n = 100_000
    u = secure_uniform(n)
    assert u.dtype == torch.float64 and u.shape == (n,)
    assert (u >= 0).all() and (u < 1).all()
    # Uniform(0,1): mean 1/2, sd 1/sqrt(12); 6 SE.
    assert abs(u.mean().item() - 0.5) < SE_MULT / math.sqrt(12 * n)
    # Not all the same draw twice.
    assert not torch.equal(secure_uniform(16), secure_uniform(16))


def test_random_source_normal_is_seedable() -> None:
    a = RandomSource(generator=torch.Generator().manual_seed(5)).normal(torch.Size([3, 4]), torch.float32, "cpu")
    b = RandomSource(generator=torch.Generator().manual_seed(5)).normal(torch.Size([3, 4]), torch.float32, "cpu")
    c = RandomSource(generator=torch.Generator().manual_seed(6)).normal(torch.Size([3, 4]), torch.float32, "cpu")
    assert torch.equal(a, b) and not torch.equal(a, c)


def _private_linear(noise_multiplier: float, generator: torch.Generator):
    """nn.Linear(IN, OUT) (seed 0) made private over 100 examples, expected batch 25."""
    torch.manual_seed(0)
    model = nn.Linear(IN, OUT)
    return PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_dataset(100), batch_size=30),
        noise_multiplier=noise_multiplier,
        max_grad_norm=C,
        noise_generator=generator,
    )


def test_noise_is_one_flat_draw_for_all_parameters() -> None:
    # Linear(1000, 100): 100,100 noise coordinates (weight and bias) drawn as one flat buffer.
    gen = torch.Generator().manual_seed(1)
    model, opt, loader = _private_linear(SIGMA, gen)
    x, _ = next(iter(loader))
    opt.zero_grad()
    _zero_loss(model(x)).backward()
    before_noise = gen.get_state()
    opt.step()
    assert opt.expected_batch_size == pytest.approx(25.0)
    expected = SIGMA * C / 25.0
    _check_std(_flat_grad(model), expected)
    _check_std(model.weight.grad.flatten(), expected)
    assert model.weight.grad.shape == model.weight.shape and model.bias.grad.shape == model.bias.shape
    # The gradient is exactly that flat draw, in parameter order, times sigma*C / B.
    replay = torch.Generator()
    replay.set_state(before_noise)
    flat = RandomSource(generator=replay).normal(torch.Size([N_COORDS]), torch.float32, "cpu")
    assert torch.equal(_flat_grad(model), flat.mul(SIGMA * C).div(25.0))


def test_noise_adds_to_the_clipped_sum_per_parameter() -> None:
    # With a real loss the gradient is (clipped sum + noise) / B; noise_multiplier 0 gives the clipped sum alone, so
    # the difference of the two runs from one seed is the noise alone, with the right std. The small sigma makes the
    # clipped sum (std ~ C*sqrt(B/d) per coordinate before / B, about 3x the noise here) dominate: had it been dropped
    # or added twice, the difference would have sqrt(1 + 3^2) ~ 3 times the expected std, hundreds of SE away.
    sigma = 0.005

    def grads(noise_multiplier: float) -> torch.Tensor:
        model, opt, loader = _private_linear(noise_multiplier, torch.Generator().manual_seed(3))
        x, y = next(iter(loader))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        return _flat_grad(model)

    clipped, noisy = grads(0.0), grads(sigma)
    assert clipped.std() > 2 * sigma * C / 25.0  # a real gradient, larger than the noise
    _check_std(noisy - clipped, sigma * C / 25.0)
