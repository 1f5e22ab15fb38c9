"""Ordinary training code that used to void the guarantee silently is refused, or handled exactly and charged.

Each test names what it protects; each failed on the engine before these checks (raw gradients reached the
optimizer, steps were charged at a rate that was not the mechanism's, noise repeated after a resume, ...).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from dptrain import NonFiniteGradientError, PrivacyEngine

N, FEATURES, CLASSES = 60, 5, 3


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, FEATURES, generator=g)
    return TensorDataset(x, torch.randint(0, CLASSES, (n,), generator=g))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


def _private(model=None, *, optimizer=None, loader=None, engine=None, **overrides):
    model = model if model is not None else _model()
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    kwargs = dict(
        module=model,
        optimizer=optimizer,
        data_loader=loader or DataLoader(_data(), batch_size=10),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    kwargs.update(overrides)
    engine = engine or PrivacyEngine()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="poisson_sampling=False")
        model, optimizer, loader = engine.make_private(**kwargs)
    return engine, model, optimizer, loader


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# 1. Parameters that change after make_private ---------------------------------------------------------------------


def test_a_layer_unfrozen_after_make_private_is_refused_before_its_raw_gradient_is_applied():
    model = _model()
    model[0].requires_grad_(False)  # gradual unfreezing: the first layer starts frozen
    _, model, optimizer, loader = _private(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    model[0].requires_grad_(True)
    before = _snapshot(model)
    x, y = next(iter(loader))
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="became trainable .* after make_private"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_unfreezing_works_through_detach_and_make_private_again_on_the_same_engine():
    model = _model()
    model[0].requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine, model, dp_optimizer, loader = _private(model, optimizer=optimizer)
    for x, y in loader:
        dp_optimizer.zero_grad()
        _loss(model, x, y).backward()
        dp_optimizer.step()
        break
    engine.detach()
    with pytest.raises(RuntimeError, match="detached"):
        dp_optimizer.step()
    model[0].requires_grad_(True)
    first = model[0].weight.detach().clone()
    _, model, dp_optimizer, loader = _private(model, optimizer=optimizer, engine=engine)
    for x, y in loader:
        dp_optimizer.zero_grad()
        _loss(model, x, y).backward()
        dp_optimizer.step()
        break
    assert not torch.equal(first, model[0].weight)  # now privatised and trained
    assert engine.accountant.steps == 2  # one engine, one history


def test_a_parameter_frozen_after_make_private_stays_bit_identical_even_with_a_stale_gradient():
    model = nn.ModuleDict({"net": _model(), "unused": nn.Linear(FEATURES, 2)})
    model.forward = lambda x: model["net"](x)
    stale = model["unused"]  # a frozen module of the model with a gradient left from earlier training
    stale(torch.randn(2, FEATURES)).sum().backward()
    stale.requires_grad_(False)
    _, model, optimizer, loader = _private(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    model["net"][2].requires_grad_(False)  # frozen after make_private
    frozen = [p.detach().clone() for p in (*stale.parameters(), *model["net"][2].parameters())]
    for x, y in loader:
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        optimizer.step()
    after = [*stale.parameters(), *model["net"][2].parameters()]
    assert all(torch.equal(a, b) for a, b in zip(frozen, after))
    assert optimizer.steps_taken == len(loader)


def test_a_parameter_added_to_the_optimizer_behind_its_back_is_refused():
    extra = nn.Parameter(torch.zeros(3))
    _, model, optimizer, loader = _private()
    optimizer.param_groups[0]["params"].append(extra)
    x, y = next(iter(loader))
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="became trainable \\(or was added to the optimizer\\)"):
        optimizer.step()


# 2. Gradient accumulation across batches ----------------------------------------------------------------------


def test_backward_on_two_batches_before_one_step_is_refused():
    # Same-size batches: only the batch tags can tell them apart (their rows would be paired and clipped together).
    _, model, optimizer, loader = _private(poisson_sampling=False)
    batches = iter(loader)
    optimizer.zero_grad()
    for _ in range(2):  # the accumulation loop: fetch, forward, backward; fetch, forward, backward; one step
        x, y = next(batches)
        _loss(model, x, y).backward()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="several different batches .*max_physical_batch_size"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.steps_taken == 0


def test_two_loss_terms_on_one_batch_are_allowed_and_exact():
    """Two backward passes over the same batch sum each example's gradients before clipping: the same step as one
    backward of the summed loss."""

    def run(split: bool) -> list[torch.Tensor]:
        _, model, optimizer, loader = _private(
            poisson_sampling=False, noise_multiplier=0.0, max_grad_norm=0.1, loss_reduction="sum"
        )
        x, y = next(iter(loader))
        optimizer.zero_grad()
        first = nn.functional.cross_entropy(model(x), y, reduction="sum")
        second = model(x).pow(2).sum()
        if split:
            first.backward()
            second.backward()
        else:
            (first + second).backward()
        optimizer.step()
        return _snapshot(model)

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# 3. Steps must come from the private loader ---------------------------------------------------------------------


def test_training_with_the_original_loader_after_make_private_is_refused():
    original = DataLoader(_data(), batch_size=10)
    _, model, optimizer, _ = _private(loader=original)
    x, y = next(iter(original))
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="before any batch of the private data loader"):
        optimizer.step()
    assert optimizer.steps_taken == 0


def test_several_steps_on_one_poisson_batch_are_refused():
    engine, model, optimizer, loader = _private()
    x, y = next(iter(loader))
    for attempt in range(3):
        optimizer.zero_grad()
        _loss(model, x, y).backward()
        if attempt == 0:
            optimizer.step()
        else:
            with pytest.raises(RuntimeError, match="again without a new batch"):
                optimizer.step()
    assert optimizer.steps_taken == 1 and engine.accountant.steps == 1


def test_gradients_of_another_batch_than_the_loaders_current_one_are_refused():
    _, model, optimizer, loader = _private(poisson_sampling=False)
    x, y = next(iter(loader))
    _loss(model, x[:4], y[:4]).backward()  # a batch the loader did not hand out
    with pytest.raises(RuntimeError, match="batch of 4 examples, but the private data loader's current batch has 10"):
        optimizer.step()


def test_a_physical_chunk_left_out_of_its_logical_step_is_refused():
    _, model, optimizer, loader = _private(poisson_sampling=False, max_physical_batch_size=4)
    chunks = iter(loader)  # logical batches of 10 in chunks of 4, 4, 2
    x, y = next(chunks)
    _loss(model, x, y).backward()
    optimizer.step()
    next(chunks)  # the second chunk is never stepped
    x, y = next(chunks)
    optimizer.zero_grad()
    _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="not called for every physical chunk"):
        optimizer.step()
    assert optimizer.steps_taken == 0


# 7. Errors mid-step ---------------------------------------------------------------------------------------------


def test_a_caught_non_finite_gradient_skips_its_whole_logical_batch_and_charges_it():
    """One bad example in the middle chunk: neither the first chunk (already accumulated) nor the last (still to
    come) may be released without it; the batch is skipped whole and the step is charged and counted."""
    engine, model, optimizer, loader = _private(poisson_sampling=False, max_physical_batch_size=4)
    before = _snapshot(model)
    skipped_errors = 0
    for k, (x, y) in enumerate(loader):
        if k == 3:
            break  # one logical batch of 3 chunks
        optimizer.zero_grad()
        if k == 1:
            x = x.clone()
            x[0, 0] = math.nan
        _loss(model, x, y).backward()
        try:
            optimizer.step()
        except NonFiniteGradientError as error:
            skipped_errors += 1
            assert "skipped as a whole" in "".join(error.__notes__)
    assert skipped_errors == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing released
    assert optimizer.steps_taken == 1 and optimizer.steps_skipped == 1 and engine.accountant.steps == 1


# 8. Fresh randomness after a resume -------------------------------------------------------------------------------


def _noise_of_steps(engine_state=None, steps: int = 2, **overrides) -> tuple[list[torch.Tensor], dict, list]:
    """Noise-only updates (zero learning signal: clip 1e-12) of ``steps`` steps after ``torch.manual_seed(0)``, the
    engine state after them, and the batches drawn."""
    torch.manual_seed(0)
    engine = PrivacyEngine()
    if engine_state is not None:
        engine.load_state_dict(engine_state)
    engine, model, optimizer, loader = _private(engine=engine, max_grad_norm=1e-12, noise_multiplier=1e12, **overrides)
    updates, batches = [], []
    for x, y in loader:
        before = _snapshot(model)
        optimizer.zero_grad()
        if len(x):
            _loss(model, x, y).backward()
        optimizer.step()
        updates.append(torch.cat([(a - b).flatten() for a, b in zip(before, model.parameters())]))
        batches.append(x)
        if len(updates) == steps:
            break  # before the loader draws another batch
    return updates, engine.state_dict(), batches


def test_a_resumed_run_does_not_repeat_the_noise_or_batches_of_the_first():
    first, state, first_batches = _noise_of_steps()
    resumed, _, resumed_batches = _noise_of_steps(state)
    fresh, _, _ = _noise_of_steps()  # the same script run again from scratch: new noise too
    for a in first:
        for b in (*resumed, *fresh):
            assert not torch.allclose(a, b)
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(first_batches, resumed_batches))


def test_loading_the_state_continues_the_noise_and_sampling_streams_exactly():
    seed = dict(noise_generator=torch.Generator().manual_seed(7))
    continuous, _, continuous_batches = _noise_of_steps(steps=4, **seed)
    first, state, first_batches = _noise_of_steps(steps=2, noise_generator=torch.Generator().manual_seed(7))
    resumed, _, resumed_batches = _noise_of_steps(state, steps=2, noise_generator=torch.Generator().manual_seed(7))
    for a, b in zip(continuous, first + resumed):
        torch.testing.assert_close(a, b)
    for a, b in zip(continuous_batches, first_batches + resumed_batches):
        assert torch.equal(a, b)
    assert set(state["optimizers"][0]["streams"][0]) == {"noise", "sampling"}


def test_default_streams_are_saved_and_continued_too():
    """Without a user generator the engine's OS-seeded generators are saved, so a resume continues them."""
    _, state, _ = _noise_of_steps()
    streams = state["optimizers"][0]["streams"][0]
    assert streams["noise"]["generator"] is not None and streams["sampling"]["generator"] is not None


def test_secure_mode_never_repeats_noise():
    torch.manual_seed(0)
    first, _, _ = _noise_of_steps(steps=1, engine_state=None)
    torch.manual_seed(0)
    engine = PrivacyEngine(secure_mode=True)
    _, model, optimizer, loader = _private(engine=engine, max_grad_norm=1e-12, noise_multiplier=1e12)
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        before = _snapshot(model)
        x, y = next(iter(loader))
        optimizer.zero_grad()
        if len(x):
            _loss(model, x, y).backward()
        optimizer.step()
        updates.append(torch.cat([(a - b).flatten() for a, b in zip(before, model.parameters())]))
    assert not torch.allclose(updates[0], updates[1]) and not torch.allclose(updates[0], first[0])


# Also fix: the loader's own sampler; detach ------------------------------------------------------------------------


def test_a_subset_sampler_is_honoured_held_out_examples_are_never_sampled():
    train = list(range(0, N, 2))  # the even examples; the odd ones are held out
    loader = DataLoader(_data(), batch_size=5, sampler=SubsetRandomSampler(train))
    engine, model, optimizer, private_loader = _private(loader=loader)
    seen: set[int] = set()
    for _ in range(20):
        for indices in private_loader.batch_sampler:
            seen.update(indices)
    assert seen <= set(train) and len(seen) > len(train) // 2
    assert engine.dataset_size == len(train)
    assert optimizer.expected_batch_size == pytest.approx(len(train) / len(loader))


def test_a_weighted_sampler_is_refused():
    loader = DataLoader(_data(), batch_size=5, sampler=WeightedRandomSampler(torch.ones(N), N))
    with pytest.raises(ValueError, match="with replacement or by weight"):
        _private(loader=loader)


def test_detach_removes_every_hook_and_allows_make_private_again():
    model = _model()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    engine, model, optimizer, loader = _private(model)
    engine.detach()
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks_after == hooks_before
    # A plain backward works as without dptrain, and the model can be made private again.
    x, y = _data()[:4]
    _loss(model, x, y).backward()
    assert all(p.grad is not None for p in model.parameters())
    _private(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_ddp_with_a_static_graph_is_refused(tmp_path):
    """static_graph=True cannot run with DDP's own gradient synchronisation off, which the DP reduction needs."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="static_graph"):
            _private(DistributedDataParallel(_model(), static_graph=True))
    finally:
        dist.destroy_process_group()
