"""Examples must not be coupled through the model: one example's output may not depend on another's input.

Per-example clipping bounds one example's influence on the released gradient only if no other example's gradient
depends on it. A layer that normalises with statistics of the batch (BatchNorm, which ``ModuleValidator`` refuses,
but also any ``x - x.mean(0)`` in a custom ``forward``) couples the examples: each gradient then carries
information about all the others, and no clipping bounds it. ``IndependenceCheck`` verifies it on the first forward
pass with gradients over more than one example: it runs the same pass again on the batch's first ``SUB_BATCH``
examples (the whole batch if the forward cannot take fewer; random generators forked, so dropout and the user's
stream are unaffected; the engine's hooks record nothing) with the floating-point inputs as leaves, and takes the
gradient of example 0's outputs with respect to every input. Any gradient on another example's row is refused.
Token ids cannot be differentiated: for them the outputs of the model's embedding layers (``nn.Embedding``,
batched) are made the leaves instead, so language models are checked from their first hidden states on.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dptrain.grad.base import ReplayGuard, example_zero_objective, same_layout


#: Examples the check's extra forward pass runs on (the first ones of the batch).
SUB_BATCH = 4


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
        leaves, spec = tree_flatten((args, kwargs))
        sizes = [t.shape[self.batch_dim] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > self.batch_dim]
        if not sizes or sizes[0] < 2:
            return  # a batch of one example (or none): checked at a later forward pass
        try:
            # A few examples suffice to see a coupling, and keep the extra pass's memory small.
            grads = self._gradients(module, leaves, spec, sizes[0], min(sizes[0], SUB_BATCH))
        except Exception:  # a forward that needs the whole batch (a state of the batch's size passed in)
            grads = self._gradients(module, leaves, spec, sizes[0], sizes[0])
        if grads is None:
            return
        self.checked = True
        for grad in grads:
            if grad is not None and bool(grad.movedim(self.batch_dim, 0)[1:].ne(0).any()):
                raise RuntimeError(
                    "the model couples the examples of a batch: example 0's output depends on other examples' inputs. "
                    "A layer that uses statistics of the batch (a mean or norm over the batch dimension, "
                    "BatchNorm-like layers) makes each example's gradient depend on all the others, and per-example "
                    "clipping no longer bounds any example's influence. Normalise per example (LayerNorm, "
                    "GroupNorm) instead"
                )

    def _gradients(self, module: nn.Module, leaves: list, spec: object, batch: int, keep: int):
        """The forward pass on the first ``keep`` of ``batch`` examples again, and the gradients of example 0's
        outputs with respect to the batched floating-point inputs and embedding outputs (None: nothing to
        differentiate)."""
        leaves = [
            t.narrow(self.batch_dim, 0, keep)
            if isinstance(t, torch.Tensor) and t.dim() > self.batch_dim and t.shape[self.batch_dim] == batch and keep < batch
            else t
            for t in leaves
        ]  # fmt: skip
        batched = [
            i for i, t in enumerate(leaves)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() > self.batch_dim
        ]  # fmt: skip
        inputs = [leaves[i].detach().clone().requires_grad_(True) for i in batched]
        for i, t in zip(batched, inputs):
            leaves[i] = t
        new_args, new_kwargs = tree_unflatten(leaves, spec)
        embedded: list[torch.Tensor] = []  # the embedding layers' outputs of the re-run, as leaves
        ids = [t for t in leaves if isinstance(t, torch.Tensor) and not t.is_floating_point()]

        def as_leaf(layer: nn.Module, layer_args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            # Only an embedding of the model's own token ids, in their layout (examples on ``batch_dim``): one
            # applied to rearranged ids (a transpose inside forward) has its examples elsewhere.
            if not layer_args or not any(same_layout(layer_args[0], t) for t in ids):
                return None
            leaf = out.detach().requires_grad_(True)
            embedded.append(leaf)
            return leaf

        hooks = [m.register_forward_hook(as_leaf) for m in module.modules() if isinstance(m, nn.Embedding)]
        devices = sorted({t.device.index for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda})
        try:
            with torch.random.fork_rng(devices=devices), self.guard.replaying(), torch.enable_grad():
                outputs = tree_flatten(module(*new_args, **new_kwargs))[0]
                # Weights of example 0's outputs from a generator of the check's own, not the user's stream.
                target = example_zero_objective(outputs, self.batch_dim, keep, torch.Generator().manual_seed(0))
                sources = [
                    t for t in inputs + embedded if t.dim() > self.batch_dim and t.shape[self.batch_dim] == keep
                ]  # a broadcast leading 1 (position embeddings) holds no example of its own
                if target is None or not sources:
                    return None
                return torch.autograd.grad(target, sources, allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()

    def detach(self) -> None:
        self._handle.remove()
