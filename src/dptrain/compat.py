"""Opacus' names and call patterns on dptrain's engine, where its design allows them (issue #10's Opacus surface).

``accountant="prv"`` is computed with PLD, ``"gdp"`` refused; ``clipping="flat"`` or ``"per_layer"``; ghost clipping's
``criterion=`` comes back in Opacus' four-tuple, unchanged; ``save_checkpoint`` / ``load_checkpoint`` write and
restore the module, the optimizer and the engine's state. ``PrivacyEngine`` mixes in :class:`OpacusMethods` (with ``get_compatible_module``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dptrain.accounting import check_accountant, check_positive
from dptrain.adaptive_clipping import AdaptiveClipping
from dptrain.validators import ModuleValidator


def check_opacus_options(clipping: str, grad_sample_mode: str, criterion: Any) -> None:
    """Opacus' arguments dptrain takes, checked before anything is attached or reserved."""
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(
            f'clipping={clipping!r} is not supported: dptrain clips each example\'s whole gradient to '
            'max_grad_norm (clipping="flat"), each of its parameters\' gradients to its own norm '
            '(clipping="per_layer", max_grad_norm a list), or to a bound that tracks a quantile (clipping="adaptive")'
        )
    if (grad_sample_mode == "ghost") != (criterion is not None):
        raise ValueError('grad_sample_mode="ghost" and criterion= go together (Opacus\' ghost clipping API: it '
                         "returns (module, optimizer, criterion, data_loader))")


def clipping_norms(clipping: str, max_grad_norm: Any) -> tuple[float, list[float] | None]:
    """The norm an example's whole clipped gradient is bounded by (the sensitivity the noise is scaled to; with
    ``clipping="adaptive"``, the first step's), and with ``clipping="per_layer"`` the norm of each parameter (Opacus: a list, one per trainable parameter of the
    optimizer, in its order; the bound is their L2 total)."""
    if clipping != "per_layer":
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError('max_grad_norm is a list: per-parameter norms need clipping="per_layer"')
        check_positive(max_grad_norm, "max_grad_norm")
        return max_grad_norm, None
    if not isinstance(max_grad_norm, (list, tuple)) or not max_grad_norm:
        raise ValueError(
            'clipping="per_layer" takes max_grad_norm as a list of norms, one per trainable parameter the optimizer '
            f"holds (in its order), got {max_grad_norm!r}"
        )
    for norm in max_grad_norm:
        check_positive(norm, "each per-layer max_grad_norm")
    norms = [float(norm) for norm in max_grad_norm]
    return math.sqrt(sum(norm * norm for norm in norms)), norms


ADAPTIVE_OPTIONS = (
    "target_unclipped_quantile", "clipbound_learning_rate", "max_clipbound", "min_clipbound", "unclipped_num_std"
)


def adaptive_clipping(clipping: str, options: dict[str, Any]) -> AdaptiveClipping | None:
    """``clipping="adaptive"``'s options (Opacus' names, all required), or None for the other modes (which take
    none of them)."""
    unknown = sorted(set(options) - set(ADAPTIVE_OPTIONS))
    if unknown:
        raise TypeError(f"make_private() got unexpected keyword arguments {', '.join(unknown)}")
    if clipping != "adaptive":
        if options:
            raise ValueError(f'{", ".join(sorted(options))}: options of clipping="adaptive" only')
        return None
    missing = [name for name in ADAPTIVE_OPTIONS if name not in options]
    if missing:
        raise ValueError(f'clipping="adaptive" needs {", ".join(missing)} (Opacus\' AdaClipDPOptimizer options)')
    return AdaptiveClipping(**{name: float(options[name]) for name in ADAPTIVE_OPTIONS})


def check_clipping_mode(
    norms: list[float] | None, adaptive: AdaptiveClipping | None, params: list, user_level: bool, distributed: bool
) -> None:
    """What per-layer and adaptive clipping cannot be combined with."""
    if adaptive is not None and (user_level or distributed):
        raise ValueError('clipping="adaptive" is not supported with privacy_unit="user" or under '
                         "DistributedDataParallel yet (the count of unclipped units is per example, on one process)")
    if norms is None:
        return
    if len(norms) != len(params):
        raise ValueError(
            f'clipping="per_layer" needs one max_grad_norm per trainable parameter of the optimizer: it holds '
            f"{len(params)}, {len(norms)} norms were given"
        )
    if user_level:
        raise ValueError('clipping="per_layer" with privacy_unit="user" is not supported: a user\'s summed gradient '
                         'is clipped as a whole (clipping="flat")')


def opacus_result(made: tuple, criterion: Any) -> tuple:
    """``make_private``'s result, as Opacus returns it for ghost clipping: with the criterion, unchanged."""
    if criterion is None:
        return made
    module, optimizer, loader = made
    return module, optimizer, criterion, loader


def refuse_schedulers(options: dict[str, Any]) -> None:
    given = sorted(k for k, v in options.items() if v is not None)
    if given:
        raise ValueError(f"{', '.join(given)}: not supported by dptrain's checkpoints (noise and clipping schedulers "
                         "are not implemented); save them in checkpoint_dict yourself")


def native_accountant(accountant: str) -> str:
    """Opacus' accountant names on dptrain's: "prv" is computed with PLD (both are numerical, tight accountants of
    the same privacy loss distribution); "gdp" is refused."""
    if accountant == "prv":
        return "pld"
    if accountant == "gdp":
        raise ValueError(
            'accountant="gdp" (Gaussian DP through the central limit theorem) can under-state epsilon, most for few '
            'steps or large sampling rates; use "pld" (the default: tight) or "rdp"'
        )
    check_accountant(accountant)
    return accountant


class OpacusMethods:
    """Opacus' checkpoint methods on top of the engine's ``state_dict`` / ``load_state_dict``, and
    ``get_compatible_module``."""

    @staticmethod
    def get_compatible_module(module: nn.Module) -> nn.Module:
        """Opacus' ``PrivacyEngine.get_compatible_module``: ``ModuleValidator.fix`` (a copy with BatchNorm
        replaced), then validated (raising ``UnsupportedModuleError`` for what remains)."""
        return ModuleValidator.fix_and_validate(module)

    def save_checkpoint(self, *, path: Any, module: nn.Module, optimizer: Any = None,
                        checkpoint_dict: dict[str, Any] | None = None, **unsupported: Any) -> None:
        """Opacus' ``save_checkpoint``: the module's and optimizer's state dicts and this engine's
        (``privacy_accountant_state_dict``: accountant, steps, random streams) in one ``torch.save`` file, with the
        entries of ``checkpoint_dict``. The file resumes the noise stream: keep it as private as the data."""
        refuse_schedulers(unsupported)
        content = dict(checkpoint_dict or {})
        content.update(module_state_dict=module.state_dict(), privacy_accountant_state_dict=self.state_dict())
        if optimizer is not None:
            content["optimizer_state_dict"] = optimizer.state_dict()
        torch.save(content, path)

    def load_checkpoint(self, *, path: Any, module: nn.Module, optimizer: Any = None,
                        **unsupported: Any) -> dict[str, Any]:
        """Opacus' ``load_checkpoint``: restore what ``save_checkpoint`` wrote into ``module``, ``optimizer`` and this
        engine (call it after ``make_private``, or before for the optimizers made private later); returns the
        checkpoint's other entries."""
        refuse_schedulers(unsupported)
        content = dict(torch.load(path, map_location="cpu", weights_only=False))
        module.load_state_dict(content.pop("module_state_dict"))
        self.load_state_dict(content.pop("privacy_accountant_state_dict"))
        optimizer_state = content.pop("optimizer_state_dict", None)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        return content
