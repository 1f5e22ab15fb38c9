"""Model state may change only through the DP step: a guard on the versions of parameters and buffers.

The DP guarantee covers what the DP optimizer releases. A layer that rewrites its own weights in ``forward``, or
keeps statistics of the batches in a buffer (a running mean, a counter of tokens seen), changes the model with
the training data directly: that change is saved with the model, unclipped and without noise. ``StateGuard``
takes a snapshot of every parameter and buffer of the model (the tensor object and its in-place version counter)
when a forward pass with gradients starts and compares it when that pass ends; any difference raises at once,
naming the tensor, before a loss exists to step on. Changes outside forward passes (loading a checkpoint,
projecting the weights after ``step()``) and forward passes without gradients (evaluation) are not its business.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class StateGuard:
    """Refuses parameter and buffer changes during a forward pass with gradients of ``module``."""

    def __init__(self, module: nn.Module) -> None:
        # (owner, attribute, kind, full name): read straight from the owners' dicts at each snapshot, so that a
        # tensor replaced by another object (``self.stat = ...``) shows as well as one changed in place.
        self._slots = [
            (owner, attribute, kind, f"{path}.{attribute}" if path else attribute)
            for path, owner in module.named_modules(remove_duplicate=False)
            for kind, table in (("parameter", owner._parameters), ("buffer", owner._buffers))
            for attribute in table
        ]
        self._snapshot: list[tuple[torch.Tensor | None, int]] | None = None
        self._depth = 0  # the model's forward may run inside itself (the fast engine's probe)
        self._handles = [
            module.register_forward_pre_hook(self._begin),
            module.register_forward_hook(self._end, always_call=True),
        ]

    def _read(self) -> list[tuple[torch.Tensor | None, int]]:
        out = []
        for owner, attribute, kind, _ in self._slots:
            tensor = (owner._parameters if kind == "parameter" else owner._buffers).get(attribute)
            out.append((tensor, -1 if tensor is None else tensor._version))
        return out

    def _begin(self, module: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth == 1 and torch.is_grad_enabled():
            self._snapshot = self._read()

    def _end(self, module: nn.Module, args: tuple, output: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            if sys.exc_info()[1] is not None:  # the forward pass raised: its own error goes through, unmasked
                self._snapshot = None
                return
            self.check()

    def check(self) -> None:
        """Compare with the snapshot of the forward pass that began (none: nothing to check)."""
        before, self._snapshot = self._snapshot, None
        if before is None:
            return
        changed = [
            (kind, name)
            for (tensor, version), (now, now_version), (_, _, kind, name) in zip(before, self._read(), self._slots)
            if now is not tensor or now_version != version
        ]
        if changed:
            listed = ", ".join(f"{kind} {name}" for kind, name in changed[:5])
            raise RuntimeError(
                f"the model's {listed} changed during a training forward pass: a layer that rewrites its weights or "
                "keeps statistics of the batch in a buffer saves data-dependent values with the model, unclipped "
                "and without noise, outside the DP step. Make the layer stateless in training (what it learns goes "
                "through the optimizer as a parameter; a running statistic has no DP release here), and do not "
                "save this model: it already holds the change"
            )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._snapshot, self._depth = None, 0
