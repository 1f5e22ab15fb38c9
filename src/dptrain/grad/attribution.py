"""The first step's check that per-example gradients account for the whole batch gradient (issue #8: a parameter
used outside its layer's calls must not lose that part of its gradient unclipped)."""

from __future__ import annotations

import torch
from torch import nn

from dptrain.grad.fast_gradients import FastGradients


def outside_use_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"parameter {name} receives gradient outside its layer's forward call (e.g. its weight is used directly in "
        "another module's forward), so the fast engine cannot attribute it to examples; nothing of this batch is "
        "released. Use grad_sample_mode='vmap' for this model"
    )


def check_attribution(grads: FastGradients, wanted: set[nn.Parameter], module: nn.Module, scale_by_batch: bool) -> None:
    """On the first step, check that the per-example gradients add up to autograd's batch gradient.

    A parameter also used outside its layer's forward call (``F.linear(h, self.embed.weight)`` in a parent)
    would otherwise lose that part of its gradient silently, unclipped and unaccounted. From the second step,
    when autograd's gradients of rule layers are suspended, any autograd gradient they get is such a use
    (``_on_accumulated``).
    """
    scale = 1.0 / grads.batch_size if scale_by_batch else 1.0
    ones = torch.full((grads.batch_size,), scale)
    totals = grads.weighted_sum(ones)
    names = {p: n for n, p in module.named_parameters()}
    # Replayed parameters are exact by construction (and an example's own gradient may legitimately differ
    # from its share of the batch gradient, e.g. Embedding(scale_grad_by_freq=True)).
    replayed = set(grads.fallback.per_param) if grads.fallback is not None else set()
    # A 16-bit call's autograd gradient is rounded to 16 bits (bf16: 2^-8 relative) where the sum is not.
    half = {p for (_, call), owned in zip(grads.calls, grads.owned) if call.half for p in owned.values()}
    for p in wanted - replayed:
        if p.grad is None:
            continue
        total = totals.get(p)
        total = torch.zeros_like(p) if total is None else total.to(p.grad.dtype)
        rtol = 3e-2 if p in half or p.dtype.itemsize == 2 else 1e-3
        tolerance = rtol * max(float(p.grad.abs().max()), 1e-12) + 1e-6
        if not torch.allclose(total, p.grad, rtol=rtol, atol=tolerance):
            raise outside_use_error(names.get(p, "?"))
