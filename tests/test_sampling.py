"""Issue #2: Poisson sampling, empty batches and physical batching.

Statistical tolerances (all draws seeded, so the tests are deterministic; the bounds say why a correct sampler
passes with overwhelming probability for any seed):
- per-index inclusion count over S steps is Binomial(S, q); the bounds use its exact quantiles at a family-wise
  level of 1e-6 (Bonferroni over indices / pairs), computed with scipy;
- means of many draws are checked to 6 standard errors (two-sided normal tail 2e-9).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine, compute_epsilon
from dptrain.randomness import RandomSource
from dptrain.sampling import DPDataLoader, PoissonBatchSampler

import scipy.stats as stats

SE_MULT = 6.0
FAMILY_LEVEL = 1e-6


def _binomial_bounds(trials: int, p: float, tests: int) -> tuple[int, int]:
    """[lo, hi] containing a Binomial(trials, p) count for all ``tests`` counts with probability >= 1 - 1e-6."""
    alpha = FAMILY_LEVEL / tests / 2
    return int(stats.binom.ppf(alpha, trials, p)), int(stats.binom.isf(alpha, trials, p))


def _inclusion_matrix(n: int, q: float, steps: int, seed: int) -> torch.Tensor:
    sampler = PoissonBatchSampler(n, q, steps, RandomSource(generator=torch.Generator().manual_seed(seed)))
    assert len(sampler) == steps
    m = torch.zeros(steps, n, dtype=torch.float64)
    batches = list(sampler)
    assert len(batches) == steps
    for t, batch in enumerate(batches):
        assert len(set(batch)) == len(batch), "an index appears twice in one batch"
        assert all(0 <= i < n for i in batch)
        m[t, batch] = 1.0
    return m


def test_poisson_inclusion_frequency_per_index() -> None:
    n, q, steps = 200, 0.1, 3000
    m = _inclusion_matrix(n, q, steps, seed=0)
    counts = m.sum(dim=0)
    # Overall frequency: Binomial(n*steps, q) / (n*steps), SE sqrt(q(1-q)/(n*steps)) = 3.9e-4.
    overall = counts.sum().item() / (n * steps)
    assert abs(overall - q) < SE_MULT * math.sqrt(q * (1 - q) / (n * steps))
    # Every index: count ~ Binomial(3000, 0.1) (mean 300, sd 16.4); exact bounds at family level 1e-6 over 200.
    lo, hi = _binomial_bounds(steps, q, n)
    assert lo <= counts.min().item() and counts.max().item() <= hi, (counts.min(), counts.max(), lo, hi)
    # A sampler that included a fixed subset (or cycled through the data) would leave some index far off q.
    assert (counts > 0).all()


def test_poisson_batch_sizes_vary_with_mean_qn() -> None:
    n, q, steps = 200, 0.1, 3000
    sizes = _inclusion_matrix(n, q, steps, seed=1).sum(dim=1)
    # Batch size ~ Binomial(200, 0.1): mean 20, variance 18.
    mean_b, var_b = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean_b) < SE_MULT * math.sqrt(var_b / steps)
    # Sample variance: SE ~ var * sqrt(2/(steps-1)) (normal approximation; binomial excess kurtosis is small here).
    assert abs(sizes.var().item() - var_b) < SE_MULT * var_b * math.sqrt(2 / (steps - 1))
    assert len(set(sizes.tolist())) >= 10


def test_poisson_inclusions_independent() -> None:
    n, q, steps = 60, 0.2, 3000
    m = _inclusion_matrix(n, q, steps, seed=2)
    # Pairwise co-inclusion of i != j in a step: Binomial(steps, q^2) under independence (mean 120, sd 10.7);
    # exact bounds at family level 1e-6 over the 1770 pairs.
    co = (m.T @ m)
    iu = torch.triu_indices(n, n, offset=1)
    pair_counts = co[iu[0], iu[1]]
    lo, hi = _binomial_bounds(steps, q * q, pair_counts.numel())
    assert lo <= pair_counts.min().item() and pair_counts.max().item() <= hi, (pair_counts.min(), pair_counts.max())
    # Mean co-inclusion frequency over pairs = E[b(b-1)] / (n(n-1)) = q^2. Its SE (b ~ Binomial(n, q), averaging
    # over steps) is sd(b(b-1))/(n(n-1) sqrt(steps)); sd(b(b-1)) is computed exactly from the binomial pmf.
    b = torch.arange(n + 1, dtype=torch.float64)
    pmf = torch.tensor(stats.binom.pmf(b.numpy(), n, q))
    f = b * (b - 1)
    sd_f = math.sqrt(float((pmf * f**2).sum() - (pmf * f).sum() ** 2))
    mean_co = pair_counts.mean().item() / steps
    assert abs(mean_co - q * q) < SE_MULT * sd_f / (n * (n - 1) * math.sqrt(steps))
    # Across steps: an index's inclusions at steps t and t+1 are independent, so P(both) = q^2. The (steps-1)*n
    # products m[t,i]*m[t+1,i] have variance v = q^2(1-q^2); neighbours along t share a factor, covariance
    # c = q^3 - q^4, so Var(sum) = n((steps-1)v + 2(steps-2)c).
    consecutive = (m[1:] * m[:-1]).sum().item()
    v, c = q * q * (1 - q * q), q**3 - q**4
    sd_sum = math.sqrt(n * ((steps - 1) * v + 2 * (steps - 2) * c))
    assert abs(consecutive - (steps - 1) * n * q * q) < SE_MULT * sd_sum


def test_poisson_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(10, 0.0, 5)
    with pytest.raises(ValueError, match="sample_rate"):
        PoissonBatchSampler(10, 1.5, 5)
    with pytest.raises(ValueError, match="num_samples"):
        PoissonBatchSampler(0, 0.5, 5)
    with pytest.raises(ValueError, match="steps"):
        PoissonBatchSampler(10, 0.5, 0)


def _data(n: int, d: int = 5, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _private(model: nn.Module, loader: DataLoader, sigma: float = 1.0, seed: int = 0, engine=None, lr=0.1, **kw):
    engine = engine or PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(seed),
        **kw,
    )
    return engine, model, opt, loader


def test_make_private_loader_is_poisson_with_variable_batch_sizes() -> None:
    n, batch = 300, 30
    torch.manual_seed(0)
    engine, model, opt, loader = _private(nn.Linear(5, 2), DataLoader(_data(n), batch_size=batch, shuffle=True))
    assert isinstance(loader, DPDataLoader)
    assert isinstance(loader.batch_sampler, PoissonBatchSampler)
    assert len(loader) == math.ceil(n / batch) == 10
    assert loader.batch_sampler.sample_rate == pytest.approx(1 / 10)
    assert opt.expected_batch_size == pytest.approx(30.0)
    sizes = []
    for _ in range(20):
        sizes += [len(x) for x, _ in loader]
    assert len(sizes) == 200
    # Batch size ~ Binomial(300, 0.1): mean 30, sd 5.2; 200 batches -> SE of the mean 0.37; 6 SE.
    assert len(set(sizes)) >= 8
    assert abs(sum(sizes) / len(sizes) - 30) < SE_MULT * math.sqrt(27 / 200)
    # The original loader's data and collate are used: batches are (x, y) with the dataset's shapes.
    x, y = next(iter(loader))
    assert x.shape[1:] == (5,) and y.dtype == torch.long


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_empty_batches_still_step_with_noise_and_are_accounted(mode: str) -> None:
    # N=20, batch_size=1 -> 20 steps per epoch, q=1/20: P(empty) = 0.95^20 = 0.36, so an epoch has empty batches.
    n = 20
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    engine, model, opt, loader = _private(
        model, DataLoader(_data(n), batch_size=1), sigma=1.0, seed=4, grad_sample_mode=mode
    )
    loss_fn = nn.CrossEntropyLoss()
    empty_steps = 0
    for x, y in loader:
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss = loss_fn(model(x), y)  # NaN for an empty batch (mean over nothing): the DP step must not care
        loss.backward()
        opt.step()
        for b, p in zip(before, model.parameters()):
            assert torch.isfinite(p).all()
            assert not torch.equal(b, p)  # every step moves every parameter: noise is always added
        if len(x) == 0:
            empty_steps += 1
            assert x.shape == (0, 5) and y.shape == (0,)
    assert empty_steps >= 1
    assert opt.steps_taken == n
    assert engine.accountant.steps == n
    delta = 1e-3
    assert engine.get_epsilon(delta) == pytest.approx(compute_epsilon(1 / n, 1.0, n, delta), rel=1e-9)


def test_empty_batch_without_forward_pass_steps_with_noise() -> None:
    # A user loop that skips forward/backward on an empty batch and just calls step(): noise-only step.
    n = 20
    torch.manual_seed(0)
    engine, model, opt, loader = _private(nn.Linear(5, 2), DataLoader(_data(n), batch_size=1), sigma=1.0, seed=4)
    seen_empty = False
    for x, y in loader:
        before = model.weight.detach().clone()
        opt.zero_grad()
        if len(x) > 0:
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            seen_empty = True
        opt.step()
        assert not torch.equal(before, model.weight)
    assert seen_empty
    assert engine.accountant.steps == opt.steps_taken == n


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_empty_batch_with_zero_noise_leaves_parameters_unchanged(mode: str) -> None:
    # Noise 0: the update of an empty batch is exactly zero (nothing else is added).
    n = 20
    torch.manual_seed(0)
    engine, model, opt, loader = _private(
        nn.Linear(5, 2), DataLoader(_data(n), batch_size=1), sigma=0.0, seed=4, grad_sample_mode=mode
    )
    seen_empty = False
    for x, y in loader:
        before = model.weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if len(x) == 0:
            seen_empty = True
            assert torch.equal(before, model.weight)
    assert seen_empty
    assert opt.steps_taken == n


def _train(max_physical: int | None, mode: str = "auto", steps_epochs: int = 2) -> tuple[dict, object, int]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    engine, model, opt, loader = _private(
        model,
        DataLoader(_data(120), batch_size=40),
        sigma=0.0,
        seed=11,
        lr=0.5,
        max_physical_batch_size=max_physical,
        grad_sample_mode=mode,
    )
    loss_fn = nn.CrossEntropyLoss()
    chunks = 0
    for _ in range(steps_epochs):
        for x, y in loader:
            if max_physical is not None:
                assert len(x) <= max_physical
            chunks += 1
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}, (engine, opt), chunks


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_physical_batching_equals_logical_batch_update(mode: str) -> None:
    # Same generator seed -> same Poisson batches; noise 0 -> the updates must agree up to float rounding.
    full, (engine_full, opt_full), chunks_full = _train(None, mode)
    split, (engine_split, opt_split), chunks_split = _train(7, mode)
    for k in full:
        torch.testing.assert_close(split[k], full[k], rtol=1e-5, atol=1e-6)
    # 3 logical batches per epoch (len(loader) = 120/40), 2 epochs.
    assert opt_full.steps_taken == opt_split.steps_taken == 6
    assert engine_full.accountant.steps == engine_split.accountant.steps == 6
    assert chunks_full == 6
    assert chunks_split > 6  # batches of ~40 were really split into chunks of <= 7


def test_physical_batching_steps_once_per_logical_batch() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 2)
    engine, model, opt, loader = _private(
        model, DataLoader(_data(60), batch_size=60), sigma=1.0, seed=3, max_physical_batch_size=25
    )
    # q = 1: the logical batch is all 60 examples -> chunks of 25, 25, 10.
    sizes, changed = [], []
    for x, y in loader:
        before = model.weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sizes.append(len(x))
        changed.append(not torch.equal(before, model.weight))
    assert sizes == [25, 25, 10]
    assert changed == [False, False, True]
    assert opt.steps_taken == 1 and engine.accountant.steps == 1


def test_max_physical_batch_size_validated() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_physical_batch_size"):
            _private(nn.Linear(5, 2), DataLoader(_data(20), batch_size=5), max_physical_batch_size=bad)


def test_empty_logical_batch_with_physical_batching() -> None:
    # An empty Poisson batch is one empty chunk that ends its logical batch: it still steps (noise only).
    n = 20
    torch.manual_seed(0)
    engine, model, opt, loader = _private(
        nn.Linear(5, 2), DataLoader(_data(n), batch_size=1), sigma=1.0, seed=4, max_physical_batch_size=2
    )
    empty = 0
    for x, y in loader:
        before = model.weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if len(x) == 0:
            empty += 1
            assert not torch.equal(before, model.weight)
    assert empty >= 1
    assert opt.steps_taken == engine.accountant.steps == n


def test_the_private_loader_reports_the_sample_rate_the_accountant_records():
    """Opacus' ``data_loader.sample_rate``: the Poisson rate of each logical batch, equal to the optimizer's."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from dptrain import PrivacyEngine

    model = nn.Linear(3, 2)
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.zeros(40, dtype=torch.long)), batch_size=8)
    _, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    assert loader.sample_rate == optimizer.sample_rate == 1 / len(data) == 0.2
