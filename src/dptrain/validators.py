"""Find layers that break per-example privacy, and replace the ones that have a drop-in fix."""

from __future__ import annotations

import copy
import math

from torch import nn
from torch.ao.quantization import FakeQuantizeBase, ObserverBase
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm


class UnsupportedModuleError(ValueError):
    """A layer that would void the per-example guarantee; ``path`` is its name in the model."""

    def __init__(self, path: str, module: nn.Module, reason: str, fix: str) -> None:
        self.path = path or "<root>"
        self.module_type = type(module).__name__
        self.reason = reason
        self.fix = fix
        super().__init__(f"{self.path} ({self.module_type}): {reason}. Fix: {fix}")
        self.errors: list[UnsupportedModuleError] = [self]

    @classmethod
    def of(cls, errors: list["UnsupportedModuleError"]) -> "UnsupportedModuleError":
        """One error for a whole model (what ``make_private`` raises, as Opacus does): the first layer's fields,
        every layer in the message and in ``errors``."""
        first = errors[0]
        combined = cls(first.path, nn.Module(), first.reason, first.fix)
        combined.module_type, combined.errors = first.module_type, list(errors)
        details = "\n  ".join(str(e) for e in errors)
        combined.args = (f"the model has layers that break per-example privacy:\n  {details}",)
        return combined


def _group_norm_for(bn: _BatchNorm) -> nn.GroupNorm:
    """GroupNorm(gcd(32, C), C) for 2-D/3-D BatchNorm; GroupNorm(1, C) for BatchNorm1d.

    BatchNorm1d often normalises plain (N, C) features: there a group of one channel has a single value per example
    and would normalise it to a constant, so all channels form one group instead.
    """
    channels = bn.num_features
    groups = 1 if isinstance(bn, nn.BatchNorm1d) else math.gcd(32, channels)
    return nn.GroupNorm(groups, channels, eps=bn.eps, affine=bn.affine)


def _training_state(module: nn.Module) -> tuple[str, str] | None:
    """(reason, fix) for a layer that changes its own state in a training forward pass (refused then by the
    engine's ``StateGuard``), as far as its type and configuration tell; None otherwise."""
    if isinstance(module, (ObserverBase, FakeQuantizeBase)):
        return (
            "a quantization observer records statistics of the data (running min/max) in its buffers during "
            "training, saved with the model without noise",
            "train without observers (quantization-aware training is not supported under DP) and quantize afterwards",
        )
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return (
            "a lazy module creates its parameters at its first forward pass, after make_private has planned them",
            "run one forward pass on dummy data (or build the layer with explicit sizes) before make_private",
        )
    if any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values()) or isinstance(
        module, _SpectralNorm
    ):
        return (
            "spectral normalisation updates its power-iteration vectors in buffers at every training forward pass",
            "remove spectral_norm, or constrain the weights after optimizer.step() instead",
        )
    return None


class ModuleValidator:
    """Checks a model for layers that mix examples or learn from the batch outside the DP mechanism."""

    @staticmethod
    def validate(module: nn.Module, strict: bool = False) -> list[UnsupportedModuleError]:
        """Every offending layer as an error naming its module path; raise the first if ``strict``."""
        errors = []
        for path, sub in module.named_modules():
            if isinstance(sub, _BatchNorm):
                errors.append(
                    UnsupportedModuleError(
                        path,
                        sub,
                        "BatchNorm normalises with statistics of the whole batch, so each example's gradient depends "
                        "on the others and its running statistics are released without noise",
                        "ModuleValidator.fix(model) replaces it with GroupNorm; or use LayerNorm",
                    )
                )
            elif isinstance(sub, _InstanceNorm) and sub.track_running_stats:
                errors.append(
                    UnsupportedModuleError(
                        path,
                        sub,
                        "InstanceNorm with track_running_stats=True releases running statistics of the data without noise",
                        "construct it with track_running_stats=False",
                    )
                )
            else:
                stateful = _training_state(sub)
                if stateful is not None:
                    errors.append(UnsupportedModuleError(path, sub, *stateful))
        if strict and errors:
            raise errors[0]
        return errors

    @staticmethod
    def is_valid(module: nn.Module) -> bool:
        return not ModuleValidator.validate(module)

    @staticmethod
    def fix_and_validate(module: nn.Module) -> nn.Module:
        """``fix`` then ``validate(strict=True)``: the fixed copy, or UnsupportedModuleError for a layer with no
        drop-in fix (Opacus' name for the same call)."""
        fixed = ModuleValidator.fix(module)
        errors = ModuleValidator.validate(fixed)
        if errors:
            raise UnsupportedModuleError.of(errors)
        return fixed

    @staticmethod
    def fix(module: nn.Module) -> nn.Module:
        """A copy of ``module`` with every BatchNorm replaced by GroupNorm (see ``_group_norm_for``); the input is
        untouched."""
        fixed = copy.deepcopy(module)
        if isinstance(fixed, _BatchNorm):
            return _group_norm_for(fixed)
        for path, sub in list(fixed.named_modules()):
            for name, child in list(sub.named_children()):
                if isinstance(child, _BatchNorm):
                    setattr(sub, name, _group_norm_for(child))
        return fixed
