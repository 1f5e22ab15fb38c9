"""Issue #2: ModuleValidator finds layers that break per-example privacy, fixes BatchNorm, and make_private
refuses a model that still has one."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from models import train_one_epoch
from dptrain.validators import ModuleValidator, UnsupportedModuleError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict(block=Block(), pool=nn.AdaptiveAvgPool2d(2)))
        self.inorm = nn.InstanceNorm2d(8, track_running_stats=True)
        self.inorm_ok = nn.InstanceNorm2d(8)  # no running statistics: per-example, allowed
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))
        self.ln = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = self.inorm_ok(self.inorm(h))
        return self.ln(self.head(h))


def test_validate_lists_every_offending_layer_with_its_path() -> None:
    errors = ModuleValidator.validate(Net())
    assert all(isinstance(e, UnsupportedModuleError) for e in errors)
    assert [e.path for e in errors] == ["features.block.norm", "inorm", "head.2"]
    assert [e.module_type for e in errors] == ["BatchNorm2d", "InstanceNorm2d", "BatchNorm1d"]
    messages = [str(e) for e in errors]
    assert "features.block.norm" in messages[0] and "ModuleValidator.fix" in messages[0]
    assert "head.2" in messages[2] and "BatchNorm1d" in messages[2]
    assert "track_running_stats=False" in messages[1]
    assert not ModuleValidator.is_valid(Net())


def test_validate_strict_raises_first_error() -> None:
    with pytest.raises(UnsupportedModuleError, match="features.block.norm"):
        ModuleValidator.validate(Net(), strict=True)
    assert ModuleValidator.validate(nn.Linear(2, 2), strict=True) == []


def test_validate_clean_model() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LayerNorm(4 * 6 * 6))
    assert ModuleValidator.validate(model) == []
    assert ModuleValidator.is_valid(model)


def test_validate_batchnorm_at_root() -> None:
    errors = ModuleValidator.validate(nn.BatchNorm1d(4))
    assert len(errors) == 1 and errors[0].path == "<root>"


def test_fix_returns_copy_with_groupnorm() -> None:
    torch.manual_seed(0)
    original = Net()
    # Remove the InstanceNorm with running stats (fix does not claim to handle it) to check the fixed copy is clean.
    original.inorm = nn.InstanceNorm2d(8)
    original.head[2] = nn.BatchNorm1d(64, affine=False)
    fixed = ModuleValidator.fix(original)

    assert fixed is not original
    # The original is untouched.
    assert isinstance(original.features.block.norm, nn.BatchNorm2d)
    assert isinstance(original.head[2], nn.BatchNorm1d)
    # The copy validates clean and has GroupNorm with the same number of channels and affine setting.
    assert ModuleValidator.validate(fixed) == []
    gn = fixed.features.block.norm
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == 8 and gn.affine
    assert 8 % gn.num_groups == 0
    gn1 = fixed.head[2]
    assert isinstance(gn1, nn.GroupNorm) and gn1.num_channels == 64 and not gn1.affine
    # Other layers are copies with the same weights, not shared objects.
    assert fixed.features.block.conv is not original.features.block.conv
    assert torch.equal(fixed.features.block.conv.weight, original.features.block.conv.weight)
    # The fixed model runs, including on a batch of one (BatchNorm could not train on that).
    fixed.train()
    assert fixed(torch.randn(1, 3, 6, 6)).shape == (1, 3)


def test_fix_batchnorm_at_root_and_3d() -> None:
    gn = ModuleValidator.fix(nn.BatchNorm3d(12))
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == 12
    model = nn.Sequential(nn.Conv3d(1, 6, 1), nn.BatchNorm3d(6))
    fixed = ModuleValidator.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_channels == 6
    assert ModuleValidator.is_valid(fixed)


@pytest.mark.parametrize("channels", [16, 32, 64])
def test_fixed_batchnorm1d_on_features_keeps_information(channels: int) -> None:
    # BatchNorm1d on (N, C) features is the usual MLP case. Its replacement must not normalise groups of a single
    # feature: (x - mean)/std of one number is 0, so the layer would output its bias whatever the input and the
    # model could learn nothing through it. Two different inputs must give different outputs.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, channels), nn.BatchNorm1d(channels))
    fixed = ModuleValidator.fix(model).eval()
    out = fixed(torch.randn(4, 5))
    spread = (out - out.mean(dim=0)).abs().max().item()
    assert spread > 0.1, f"GroupNorm({fixed[1].num_groups}, {channels}) on (N, C) input outputs a constant"


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(20, 3, 6, 6, generator=g), torch.zeros(20, dtype=torch.long)), batch_size=5)


def test_make_private_refuses_batchnorm_naming_path_and_fix() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UnsupportedModuleError, match=r"features\.block\.norm") as info:  # a ValueError (Opacus)
        PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0
        )
    message = str(info.value)
    assert "ModuleValidator.fix" in message
    assert "head.2" in message and "inorm" in message  # every offending layer, not only the first
    assert isinstance(info.value, ValueError) and info.value.path == "features.block.norm"
    assert [e.path for e in info.value.errors] == [e.path for e in ModuleValidator.validate(model)]
    assert len(model._forward_hooks) == 0


def test_make_private_with_epsilon_refuses_batchnorm() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"2 \(BatchNorm1d\).*ModuleValidator\.fix"):
        PrivacyEngine(accountant="rdp").make_private_with_epsilon(
            module=model,
            optimizer=opt,
            data_loader=_loader(),
            target_epsilon=2.0,
            target_delta=1e-3,
            epochs=1,
            max_grad_norm=1.0,
        )


def test_make_private_accepts_fixed_model() -> None:
    model = ModuleValidator.fix(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model2, _, _ = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=_loader(), noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert model2 is model


def test_fix_and_validate_returns_the_fixed_copy_or_refuses_what_has_no_fix() -> None:
    """Opacus' ModuleValidator.fix_and_validate: BatchNorm is replaced; a layer with no drop-in fix is refused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    fixed = ModuleValidator.fix_and_validate(model)
    assert fixed is not model and ModuleValidator.is_valid(fixed) and isinstance(model[1], nn.BatchNorm2d)
    unfixable = nn.Sequential(nn.Linear(4, 4), nn.InstanceNorm1d(4, track_running_stats=True))
    with pytest.raises(UnsupportedModuleError, match=r"1 \(InstanceNorm1d\)"):
        ModuleValidator.fix_and_validate(unfixable)


def test_the_accountant_names_its_mechanism_and_counts_its_records() -> None:
    from dptrain.accounting import Accountant

    accountant = Accountant("rdp")
    assert accountant.mechanism() == "rdp" and len(accountant) == 0
    accountant.step(0.1, 1.0, 5)
    accountant.step(0.1, 1.0, 5)  # merged with the previous record
    accountant.step(0.2, 1.0, 1)
    assert len(accountant) == 2 and accountant.steps == 11 and Accountant().mechanism() == "pld"


def test_opacus_accountant_names_prv_is_computed_with_pld_and_gdp_is_refused() -> None:
    from dptrain.accounting import compute_epsilon

    model = nn.Linear(3, 2)
    data = DataLoader(TensorDataset(torch.randn(40, 3), torch.zeros(40, dtype=torch.long)), batch_size=8)
    engine = PrivacyEngine(accountant="prv")
    _, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=data,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )  # fmt: skip
    train_one_epoch(model, optimizer, loader)
    assert engine.accountant.mechanism() == "pld"
    assert engine.get_epsilon(1e-5) == pytest.approx(compute_epsilon(0.2, 1.0, 5, 1e-5, "pld"))
    with pytest.raises(ValueError, match="can under-state epsilon"):
        PrivacyEngine(accountant="gdp")
    with pytest.raises(ValueError, match="accountant must be one of"):
        PrivacyEngine(accountant="moments")
