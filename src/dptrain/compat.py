"""Opacus' names and call patterns on dptrain's engine, where its design allows them (issue #10's Opacus surface).

``accountant="prv"`` is computed with PLD, ``"gdp"`` refused; ``clipping="flat"`` only; ghost clipping's
``criterion=`` comes back in Opacus' four-tuple, unchanged; ``save_checkpoint`` / ``load_checkpoint`` write and
restore the module, the optimizer and the engine's state. ``PrivacyEngine`` mixes in :class:`CheckpointMethods`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dptrain.accounting import check_accountant


def check_opacus_options(clipping: str, grad_sample_mode: str, criterion: Any) -> None:
    """Opacus' arguments dptrain takes, checked before anything is attached or reserved."""
    if clipping != "flat":
        raise ValueError(
            f'clipping={clipping!r} is not supported yet: dptrain clips each example\'s whole gradient to '
            'max_grad_norm (clipping="flat")'
        )
    if (grad_sample_mode == "ghost") != (criterion is not None):
        raise ValueError('grad_sample_mode="ghost" and criterion= go together (Opacus\' ghost clipping API: it '
                         "returns (module, optimizer, criterion, data_loader))")


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


class CheckpointMethods:
    """Opacus' checkpoint methods on top of the engine's ``state_dict`` / ``load_state_dict``."""

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
