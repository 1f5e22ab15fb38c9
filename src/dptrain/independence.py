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

A coupling through a selection, ranking or comparison across the batch (``x * (x.sum(1) > x.sum(1).median())``,
keeping the batch's top-k) has zero gradient and passes that test. So each of the first ``SUB_BATCH`` examples is
also run alone, as a batch of copies of itself of the same size (same random state, so the same dropout masks): its
outputs must be those it had in the batch. (A test of a few examples at one step, not a proof: a selection that
happens to treat those examples alike in both runs, such as a top-k that keeps them, passes it.)

A model may return its own loss (nanoGPT's ``logits, loss = model(x, y)``, Hugging Face's ``labels=``): a 0-dim
output. Its gradient is the mean (or, with ``loss_reduction="sum"``, the sum) of per-example gradients only if the
loss is the mean of per-example losses. A token mean over the whole batch with padding or ``ignore_index`` weights
each example by its share of the batch's tokens, which depends on the other examples: not a per-example loss, and
the sensitivity bound fails. So on that first forward pass the first ``LOSS_EXAMPLES`` examples are run again, as a
batch and each alone (in eval mode, so that dropout does not enter the comparison): the gradient of the batch's
loss with respect to example i's inputs (or token embeddings) must be that of example i's own loss over the batch
size (under a mean), whatever the loss values. (Checked on the first batch only: a batch without padding there
passes.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from dptrain.grad.base import ReplayGuard, example_zero_objective, same_layout


#: Examples the check's extra forward pass runs on (the first ones of the batch).
SUB_BATCH = 4
#: Examples whose losses, alone and as a batch, test a loss the model returns.
LOSS_EXAMPLES = 8


class IndependenceCheck:
    """On the first forward pass with gradients of ``module``, refuse a model whose outputs couple examples."""

    def __init__(self, module: nn.Module, guard: ReplayGuard, batch_dim: int = 0, loss_reduction: str = "mean") -> None:
        self.module = module
        self.loss_reduction = loss_reduction
        self.guard = guard
        self.batch_dim = batch_dim
        self.checked = False  # set once a forward pass passed (a refused one is checked again: no caught way out)
        self._loss_checked = False
        self._handle = module.register_forward_hook(self._after, with_kwargs=True)

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if self.checked or self.guard.active or not torch.is_grad_enabled():
            return
        leaves, spec = tree_flatten((args, kwargs))
        sizes = [t.shape[self.batch_dim] for t in leaves if isinstance(t, torch.Tensor) and t.dim() > self.batch_dim]
        if not sizes or sizes[0] < 2:
            return  # a batch of one example (or none): checked at a later forward pass
        if not self._loss_checked and _returned_losses(output):
            self._check_returned_loss(module, leaves, spec, sizes[0])
            self._loss_checked = True
        try:
            # A few examples suffice to see a coupling, and keep the extra passes' memory small.
            keep = min(sizes[0], SUB_BATCH)
            narrowed = self._narrow(leaves, sizes[0], keep)
            grads, firsts = self._gradients(module, narrowed, spec, keep)
        except Exception:  # a forward that needs the whole batch (a state of the batch's size passed in)
            keep, narrowed = sizes[0], list(leaves)
            grads, firsts = self._gradients(module, narrowed, spec, keep)
        if grads is None and not firsts:
            return
        for grad in grads or ():
            if grad is not None and bool(grad.movedim(self.batch_dim, 0)[1:].ne(0).any()):
                raise RuntimeError(
                    "the model couples the examples of a batch: example 0's output depends on other examples' inputs. "
                    "A layer that uses statistics of the batch (a mean or norm over the batch dimension, "
                    "BatchNorm-like layers) makes each example's gradient depend on all the others, and per-example "
                    "clipping no longer bounds any example's influence. Normalise per example (LayerNorm, "
                    "GroupNorm) instead"
                )
        for i in range(min(keep, SUB_BATCH)):
            copies = [t.narrow(self.batch_dim, i, 1).expand_as(t).clone() if self._batched(t, keep) else t
                      for t in narrowed]  # fmt: skip
            alone = self._batched_outputs(module, copies, spec, keep)
            # row i in both: the same position, so the same dropout mask
            if len(firsts) != len(alone) or any(
                _differ(a.select(self.batch_dim, i), b.select(self.batch_dim, i)) for a, b in zip(firsts, alone)
            ):
                raise RuntimeError(
                    f"the model couples the examples of a batch: example {i}'s output changes when the other examples "
                    "of the batch are replaced by copies of it (a selection, ranking or comparison across the batch "
                    "dimension: no gradient flows through it, but one example's output depends on the others, which "
                    "per-example clipping cannot bound). Make every example's output a function of that example alone"
                )
        self.checked = True

    def _check_returned_loss(self, module: nn.Module, leaves: list, spec: object, batch: int) -> None:
        """The gradient of the batch's 0-dim outputs with respect to example i's inputs (or embeddings) must be that
        of example i's own, over the batch size under a mean: each example's weight in the loss is its own (a
        comparison of gradients, not of loss values, which are all alike at initialisation)."""
        keep = min(batch, LOSS_EXAMPLES)
        first = self._narrow(leaves, batch, keep)
        share = 1.0 if self.loss_reduction == "sum" else 1.0 / keep
        try:
            with _eval_mode(module):
                together, _ = self._gradients(module, first, spec, keep, objective=_total_loss)
                alone = [
                    self._gradients(module, self._narrow(first, keep, 1, start=i), spec, 1, objective=_total_loss)[0]
                    for i in range(keep)
                ]  # fmt: skip
        except Exception as error:
            raise RuntimeError(
                "the model returns a loss (a 0-dim output), and dptrain checks at the first step that it is the "
                f"{self.loss_reduction} of per-example losses by running a few examples alone, but the model's "
                f"forward failed on fewer examples ({type(error).__name__}: {error}). Return per-example outputs and "
                "compute the loss outside the model"
            ) from error
        if together is None:
            return  # nothing to differentiate (the loss does not depend on the inputs' values)
        for i, own in enumerate(alone):
            if own is None or len(own) != len(together) or any(
                _differ(g.select(self.batch_dim, i), o.select(self.batch_dim, 0) * share) for g, o in zip(together, own)
            ):
                raise RuntimeError(
                    f"the loss the model returns is not the {self.loss_reduction} of per-example losses: example {i}'s "
                    "weight in it depends on the other examples of the batch. A token mean over the batch (padding, "
                    "ignore_index) weights each example by its share of the batch's tokens, so no clipping bounds "
                    "one example's influence. Average each example's loss over its own tokens first, e.g. "
                    "dptrain.lm.causal_lm_loss(logits, labels, attention_mask) outside the model (or the same "
                    "per-example mean inside it)"
                )

    def _batched(self, t: object, size: int) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > self.batch_dim and t.shape[self.batch_dim] == size

    def _narrow(self, leaves: list, batch: int, keep: int, start: int = 0) -> list:
        """The call's arguments cut to ``keep`` of their ``batch`` examples, from example ``start``."""
        return [t.narrow(self.batch_dim, start, keep) if self._batched(t, batch) else t for t in leaves]

    def _batched_outputs(self, module: nn.Module, leaves: list, spec: object, keep: int) -> list[torch.Tensor]:
        """The batched outputs of the forward pass on ``leaves`` (random generators forked), detached."""
        args, kwargs = tree_unflatten(leaves, spec)
        with torch.random.fork_rng(devices=self._cuda(leaves)), self.guard.replaying(), torch.enable_grad():
            outputs = tree_flatten(module(*args, **kwargs))[0]
        return [t.detach() for t in outputs if self._batched(t, keep)]

    @staticmethod
    def _cuda(leaves: list) -> list[int]:
        return sorted({t.device.index for t in leaves if isinstance(t, torch.Tensor) and t.is_cuda})

    def _gradients(self, module: nn.Module, leaves: list, spec: object, keep: int, objective=None):
        """The forward pass on ``leaves`` (``keep`` examples) again: the gradients of example 0's outputs (or of
        ``objective(outputs)``) with respect to the batched floating-point inputs and embedding outputs (None:
        nothing to differentiate), and the batched outputs, detached."""
        leaves = list(leaves)  # its float inputs are replaced by leaves below: the caller's list stays as it was
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
        try:
            with torch.random.fork_rng(devices=self._cuda(leaves)), self.guard.replaying(), torch.enable_grad():
                outputs = tree_flatten(module(*new_args, **new_kwargs))[0]
                firsts = [t.detach() for t in outputs if self._batched(t, keep)]
                # Weights of example 0's outputs from a generator of the check's own, not the user's stream.
                if objective is not None:
                    target = objective(outputs)
                else:
                    target = example_zero_objective(outputs, self.batch_dim, keep, torch.Generator().manual_seed(0))
                # a broadcast leading 1 (position embeddings) holds no example of its own
                sources = [t for t in inputs + embedded if self._batched(t, keep)]
                if target is None or not sources:
                    return None, firsts
                grads = torch.autograd.grad(target, sources, allow_unused=True)
                return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, sources)], firsts
        finally:
            for hook in hooks:
                hook.remove()

    def detach(self) -> None:
        self._handle.remove()


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two runs' outputs of one example differ beyond rounding (the kernels may block other rows apart)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if not a.is_floating_point():
        return not torch.equal(a, b)
    if not torch.equal(a.isnan(), b.isnan()):
        return True
    rtol = 1e-3 if torch.finfo(a.dtype).bits >= 32 else 3e-2
    a, b = a.nan_to_num(0.0).double(), b.nan_to_num(0.0).double()
    return bool((a - b).abs().max() > rtol * max(float(a.abs().max()), float(b.abs().max()), 1e-30))


def _total_loss(outputs: list) -> torch.Tensor | None:
    losses = _returned_losses(outputs)
    return sum(losses) if losses else None


def _is_loss(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point()


def _returned_losses(output: object) -> list[torch.Tensor]:
    """The 0-dim floating-point outputs that take gradient: losses the model computes itself."""
    return [t for t in tree_flatten(output)[0] if _is_loss(t) and t.requires_grad]


@contextmanager
def _eval_mode(module: nn.Module):
    """Every submodule in eval mode (no dropout) for the duration, then each back in its own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
