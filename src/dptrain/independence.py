"""Examples must not be coupled through the model: one example's output may not depend on another's input.

Per-example clipping bounds one example's influence on the released gradient only if no other example's gradient
depends on it. A layer that normalises with statistics of the batch (BatchNorm, which ``ModuleValidator`` refuses,
but also any ``x - x.mean(0)`` in a custom ``forward``) couples the examples: each gradient then carries
information about all the others, and no clipping bounds it. ``IndependenceCheck`` verifies it on the first forward
pass with gradients: it runs the same pass again (random generators forked, so dropout and the user's stream are
unaffected; the engine's hooks record nothing) with the floating-point inputs as leaves, and takes the gradient of
example 0's outputs with respect to every input. Any gradient on another example's row is refused. Models whose
inputs are all integer (token ids) have nothing to differentiate against here and are not checked.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dptrain.grad.base import ReplayGuard


class IndependenceCheck:
    """On the first forward pass with gradients of ``module``, refuse a model whose outputs couple examples."""

    def __init__(self, module: nn.Module, guard: ReplayGuard, batch_dim: int = 0) -> None:
        self.module = module
        self.guard = guard
        self.batch_dim = batch_dim
        self.checked = False
        self._handle = module.register_forward_hook(self._after, with_kwargs=True)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self.checked or self.guard.active or not torch.is_grad_enabled():
            return
        self.checked = True
        leaves, spec = tree_flatten((args, kwargs))
        batched = [
            i for i, t in enumerate(leaves)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > self.batch_dim
        ]  # fmt: skip
        sizes = {leaves[i].shape[self.batch_dim] for i in batched}
        if len(sizes) != 1 or sizes.pop() < 2:
            return  # no floating-point batched input (token ids), or a single example: nothing to compare
        inputs = [leaves[i].detach().clone().requires_grad_(True) for i in batched]
        for i, t in zip(batched, inputs):
            leaves[i] = t
        new_args, new_kwargs = tree_unflatten(leaves, spec)
        devices = sorted({t.device.index for t in inputs if t.is_cuda})
        with torch.random.fork_rng(devices=devices), self.guard.replaying(), torch.enable_grad():
            outputs = tree_flatten(module(*new_args, **new_kwargs))[0]
            firsts = [
                t.select(self.batch_dim, 0) for t in outputs
                if isinstance(t, torch.Tensor) and t.requires_grad and t.dim() > self.batch_dim
            ]  # fmt: skip
            if not firsts:
                return
            generator = torch.Generator().manual_seed(0)  # weights of example 0's outputs: not the user's stream
            target = sum((t * torch.rand(t.shape, generator=generator).to(t)).sum() for t in firsts)
            grads = torch.autograd.grad(target, inputs, allow_unused=True)
        for index, grad in zip(batched, grads):
            if grad is not None and bool(grad.movedim(self.batch_dim, 0)[1:].ne(0).any()):
                raise RuntimeError(
                    "the model couples the examples of a batch: example 0's output depends on other examples' inputs "
                    f"(input {index} of forward). A layer that uses statistics of the batch (a mean or norm over the "
                    "batch dimension, BatchNorm-like layers) makes each example's gradient depend on all the others, "
                    "and per-example clipping no longer bounds any example's influence. Normalise per example "
                    "(LayerNorm, GroupNorm) instead"
                )

    def detach(self) -> None:
        self._handle.remove()
