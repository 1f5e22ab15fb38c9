"""Issue #2: invalid arguments raise a ValueError naming the argument and its allowed range; a weak delta warns;
a non-finite per-example gradient raises an error naming the step; misuse of the engine is refused."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from dptrain import PrivacyEngine
from dptrain.optim import NonFiniteGradientError

N = 100


def _data(n: int = N) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _parts(n: int = N, batch_size: int = 10):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_data(n), batch_size=batch_size)


def _make_private(**overrides):
    model, opt, loader = _parts()
    kwargs = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    kwargs.update(overrides)
    return PrivacyEngine().make_private(**kwargs)


def _with_epsilon(engine: PrivacyEngine | None = None, **overrides):
    model, opt, loader = _parts()
    kwargs = dict(
        module=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=3.0,
        target_delta=1e-3,
        epochs=2,
        max_grad_norm=1.0,
    )
    kwargs.update(overrides)
    return (engine or PrivacyEngine()).make_private_with_epsilon(**kwargs)


@pytest.mark.parametrize("value", [-1.0, -1e-9, math.nan, math.inf, "1.0", None])
def test_noise_multiplier_invalid(value) -> None:
    with pytest.raises(ValueError, match=r"noise_multiplier.*>= 0"):
        _make_private(noise_multiplier=value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf, True, None])
def test_max_grad_norm_invalid(value) -> None:
    with pytest.raises(ValueError, match=r"max_grad_norm.*> 0"):
        _make_private(max_grad_norm=value)
    with pytest.raises(ValueError, match=r"max_grad_norm.*> 0"):
        _with_epsilon(max_grad_norm=value)


@pytest.mark.parametrize("value", [0, 0.0, -2.0, math.nan, math.inf])
def test_target_epsilon_invalid(value) -> None:
    with pytest.raises(ValueError, match=r"target_epsilon.*> 0"):
        _with_epsilon(target_epsilon=value)


@pytest.mark.parametrize("value", [0, 0.0, -1e-5, 1, 1.0, 1.5, math.nan, None])
def test_target_delta_outside_open_unit_interval(value) -> None:
    with pytest.raises(ValueError, match=r"target_delta.*\(0, 1\)"):
        _with_epsilon(target_delta=value)


@pytest.mark.parametrize("value", [0, 1.0, -1.0, 2.0, math.nan])
def test_get_epsilon_delta_invalid(value) -> None:
    engine = PrivacyEngine()
    with pytest.raises(ValueError, match=r"delta.*\(0, 1\)"):
        engine.get_epsilon(delta=value)


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True])
def test_epochs_invalid(value) -> None:
    with pytest.raises(ValueError, match=r"epochs.*positive"):
        _with_epsilon(epochs=value)


class _Stream(IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(50):
            yield torch.randn(4, generator=g), torch.tensor(0)


def test_data_loader_without_length_refused() -> None:
    model, opt, _ = _parts()
    loader = DataLoader(_Stream(), batch_size=10)
    with pytest.raises(ValueError, match=r"data_loader.*length"):
        PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
    model, opt, _ = _parts()
    with pytest.raises(ValueError, match=r"data_loader.*length"):
        PrivacyEngine().make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=loader,
            target_epsilon=1.0,
            target_delta=1e-5,
            epochs=1,
            max_grad_norm=1.0,
        )


def test_invalid_accountant_refused() -> None:
    with pytest.raises(ValueError, match="accountant"):
        PrivacyEngine(accountant="gdp-typo")


def test_loss_reduction_invalid_refused() -> None:
    with pytest.raises(ValueError, match=r"loss_reduction.*'mean'"):
        _make_private(loss_reduction="none")


def test_grad_sample_mode_invalid_refused() -> None:
    with pytest.raises(ValueError, match="grad_sample_mode"):
        _make_private(grad_sample_mode="hooks-typo")


def test_weak_delta_warns_with_reason() -> None:
    # N = 100: delta >= 1/N = 0.01 is weak (releasing one example in full satisfies it).
    # (RDP only because its calibration is ~20x faster than PLD's; the warning does not depend on it.)
    engine = PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match=r"delta=0\.02 >= 1/N.*weak"):
        _with_epsilon(engine, target_delta=0.02)
    with pytest.warns(UserWarning, match=r"1/N.*weak"):  # the boundary delta = 1/N itself
        _with_epsilon(PrivacyEngine(accountant="rdp"), target_delta=1 / N)
    with pytest.warns(UserWarning, match=r"1/N.*weak"):
        engine.get_epsilon(delta=0.5)


def test_strong_delta_does_not_warn() -> None:
    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _with_epsilon(engine, target_delta=1e-3)
        engine.get_epsilon(delta=1e-3)


def test_non_finite_gradient_raises_naming_step() -> None:
    model, opt, loader = _parts()
    engine = PrivacyEngine()
    with pytest.warns(UserWarning, match="poisson_sampling=False"):
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(0),
        )
    batches = iter(loader)
    for _ in range(2):
        x, y = next(batches)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.steps_taken == 2
    before = [p.detach().clone() for p in model.parameters()]
    x, y = next(batches)
    bad = x.clone()
    bad[3, 1] = math.nan
    opt.zero_grad()
    nn.functional.cross_entropy(model(bad), y).backward()
    with pytest.raises(NonFiniteGradientError, match=r"step 3") as info:
        opt.step()
    assert "[3]" in str(info.value)  # names the offending example of the batch
    assert "charged as one step" in "".join(getattr(info.value, "__notes__", []))
    # Nothing was released: no parameter moved. The skipped batch is charged (the skip depends on the data).
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
    assert opt.steps_taken == 3 and opt.steps_skipped == 1 and engine.accountant.steps == 3


def test_infinite_gradient_raises() -> None:
    model, opt, loader = _make_private()
    x, _ = next(iter(loader))
    x = x.clone()
    x[0, 0] = math.inf
    opt.zero_grad()
    (model(x) ** 2).sum().backward()
    with pytest.raises(NonFiniteGradientError, match=r"step 1"):
        opt.step()


def test_optimizer_with_foreign_parameter_refused() -> None:
    model, _, loader = _parts()
    stranger = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    with pytest.raises(ValueError, match="not in the private module"):
        PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )


def test_optimizer_without_trainable_parameters_refused() -> None:
    model, _, loader = _parts()
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )


def test_make_private_twice_on_same_module_refused() -> None:
    model, opt, loader = _parts()
    PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    hooks = len(model._forward_hooks) + len(model._forward_pre_hooks)
    assert hooks > 0
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    for engine in (PrivacyEngine(), PrivacyEngine(accountant="rdp")):
        with pytest.raises(ValueError, match="already private"):
            engine.make_private(
                module=model, optimizer=opt2, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
            )
    # The refused calls attached nothing more.
    assert len(model._forward_hooks) + len(model._forward_pre_hooks) == hooks


def test_refused_make_private_leaves_module_usable() -> None:
    # A call refused for a bad argument must neither attach hooks nor mark the module as private.
    model, opt, loader = _parts()
    with pytest.raises(ValueError):
        PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=-1.0, max_grad_norm=1.0
        )
    with pytest.raises(ValueError):
        PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            max_physical_batch_size=0,
        )
    assert len(model._forward_hooks) + len(model._forward_pre_hooks) == 0
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert len(model._forward_hooks) > 0


def test_add_param_group_refused() -> None:
    _, opt, _ = _make_private()
    with pytest.raises(RuntimeError, match="add them before make_private"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


def test_step_without_backward_refused() -> None:
    _, opt, loader = _make_private(noise_generator=torch.Generator().manual_seed(0))
    x, _ = next(iter(loader))
    assert len(x) > 0  # q = 0.1 of 100 examples: seeded, and empty with probability 0.9^100 anyway
    opt.zero_grad()
    # A non-empty chunk and no backward pass: step() must not silently release pure noise as a gradient.
    with pytest.raises(RuntimeError, match="backward"):
        opt.step()
    assert opt.steps_taken == 0


def test_numpy_scalars_are_valid_arguments() -> None:
    # Values computed with numpy (sweeps, configs) are valid numbers: np.float32 / np.int64 are not subclasses of
    # Python float / int, but they are numbers.Real / numbers.Integral and must not be refused as "not > 0".
    _, opt, _ = _with_epsilon(
        PrivacyEngine(accountant="rdp"),
        target_epsilon=np.float32(3.0),
        target_delta=np.float32(1e-3),
        epochs=np.int64(2),
        max_grad_norm=np.float32(1.0),
    )
    assert opt.noise_multiplier > 0
    _make_private(noise_multiplier=np.float32(1.0), max_grad_norm=np.float32(0.5))
    assert PrivacyEngine().get_epsilon(delta=np.float32(1e-5)) == 0.0
