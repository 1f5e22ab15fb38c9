"""Which dimension of a rule layer's input carries the examples: the candidates a call's shape allows.

The fast engine knows the batch size; a layer's examples may sit on any leading dimension its rule treats alike (a
model may transpose batch-first data to (T, B, ...) inside ``forward``). One candidate decides; several (a
dimension equal to the batch size by chance) are settled by the layout learned at an earlier step or by a probe of
the forward pass (``probe_verdict``), never by a guess.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import nn

from dptrain.grad.base import example_zero_objective, same_layout
from dptrain.grad.layers import LayerRule, rule_for
from dptrain.grad.layers.embedding import EmbeddingRule
from dptrain.grad.layers.linear import LinearRule

#: Where a call's examples are, besides a dimension index: a leading 1 broadcast over the batch (GPT-2's position
#: ids), an input without a batch dimension (nanoGPT's position ids), or (a learned layout only) a layer seen with its
#: examples on different dimensions.
BROADCAST, CONFLICT, UNBATCHED = -1, -2, -3
#: The candidates whose output is expanded to the batch.
EXPANDED = (BROADCAST, UNBATCHED)


def leading_dims(rule: LayerRule, module: nn.Module, activation: torch.Tensor) -> int:
    """How many leading dimensions of a rule layer's input its rule treats alike, so that any one of them may carry
    the examples: those before the features (Linear, HF Conv1D), all of token ids (Embedding), those before
    ``normalized_shape`` (LayerNorm, RMSNorm); only dim 0 of a batched input for the others (convolutions,
    GroupNorm), whose other dimensions are channels and positions."""
    if isinstance(rule, LinearRule):
        return activation.dim() - 1
    if isinstance(rule, EmbeddingRule):
        return activation.dim()
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return activation.dim() - len(module.normalized_shape)
    if isinstance(module, nn.modules.conv._ConvNd):
        return int(activation.dim() == len(module.kernel_size) + 2)
    return int(activation.dim() >= 2)


def candidate_dims(activation: torch.Tensor, leading: int, batch_size: int, unbatched: bool = False) -> list[int]:
    """The leading dimensions of the batch size, and ``BROADCAST`` for a leading 1 in a batch of several, or else
    (``unbatched``: an input that may have no batch dimension) ``UNBATCHED``."""
    shape = activation.shape
    dims = [d for d in range(leading) if shape[d] == batch_size]
    if batch_size > 1 and leading and shape[0] == 1:
        dims.append(BROADCAST)
    elif batch_size > 1 and unbatched:
        dims.append(UNBATCHED)
    return dims


def expand_to_batch(t: torch.Tensor, where: int, batch_size: int) -> torch.Tensor:
    """A call's input or output given a batch dimension 0 of ``batch_size`` (a view: every example sees the same
    values), for the ``EXPANDED`` candidates."""
    if where == BROADCAST:
        return t.expand(batch_size, *t.shape[1:])
    return t.unsqueeze(0).expand(batch_size, *t.shape)


def probe_verdict(dims: list[int], grad: torch.Tensor | None) -> int | None:
    """The example dimension among ``dims`` from the gradient of one example's (example 0's) output with respect to
    the layer's output: entries of other examples get none, so the example dimension has it at index 0 only. A
    dimension with gradient at another index is refuted; the verdict is the one dimension not refuted (it must
    have gradient at 0), or ``BROADCAST`` when every dimension is refuted and a broadcast leading 1 fits. None:
    undecided."""
    if grad is None:
        return None
    used = grad != 0
    standing = []
    for d in dims:
        if d not in EXPANDED:
            along = used.movedim(d, 0).flatten(1).any(1)
            if not along[1:].any():
                standing.append((d, bool(along[0])))
    if len(standing) == 1:
        return standing[0][0] if standing[0][1] else None
    expanded = [d for d in dims if d in EXPANDED]
    return expanded[0] if not standing and expanded else None


Key = tuple[nn.Module, int]  # a layer and the rank of its input


class ForwardProbe:
    """The current forward pass run again to find where each layer's examples are: random generators forked (the
    user's stream and dropout masks are unaffected), the engine's hooks recording nothing but the layer calls, and
    the gradient of a random function of example 0's outputs taken with respect to every rule layer's output.

    The layer hooks report their calls while it runs (``seen``); ``candidates(module, activation)`` gives each call's
    candidates. Verdicts that expand a layer's output are confirmed by a second run with those outputs expanded.
    """

    def __init__(self, guard, batch_dim: int) -> None:
        self.guard = guard
        self.batch_dim = batch_dim
        self.calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] | None = None  # while a run is under way
        self._expand: dict[Key, int] = {}
        self._batch_size = 0

    @property
    def running(self) -> bool:
        return self.calls is not None

    def seen(self, module: nn.Module, activation: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """A rule layer's call during a run; the output to use instead (expanded to the batch), if any."""
        where = self._expand.get((module, activation.dim()))
        if where is not None:
            output = expand_to_batch(output, where, self._batch_size)
        self.calls.append((module, activation, output))
        return output if where is not None else None

    def run(self, module: nn.Module, args: tuple, kwargs: dict, batch_size: int, candidates) -> dict[Key, int]:
        """The verdict of each layer (and input rank) that has several candidates, or one that expands its output."""
        outputs, calls, grads = self._forward(module, args, kwargs, batch_size, {})
        verdicts: dict[Key, int | None] = {}
        for (layer, activation, _), grad in zip(calls, grads):
            dims = candidates(layer, activation)
            if len(dims) > 1 or (dims and dims[0] in EXPANDED):
                key, verdict = (layer, activation.dim()), probe_verdict(dims, grad)
                verdicts[key] = verdict if verdicts.get(key, verdict) == verdict else None  # calls must agree
        expand = {key: v for key, v in verdicts.items() if v in EXPANDED}
        if expand:
            try:
                with warnings.catch_warnings():  # the user's code on shapes it was not written for: not the user's
                    warnings.simplefilter("ignore")
                    expanded, calls, grads = self._forward(module, args, kwargs, batch_size, expand)
            except Exception:  # code that uses the output by its own shape: it cannot be expanded
                return {key: v for key, v in verdicts.items() if v is not None and v not in EXPANDED}
            same = len(expanded) == len(outputs) and not any(_differ(a, b) for a, b in zip(outputs, expanded))
            for (layer, activation, _), grad in zip(calls, grads):
                key = (layer, activation.dim())
                # an expanded output: example 0's outputs must take gradient from its row 0 only
                if key in expand and (not same or grad is None or bool(grad[1:].ne(0).any())):
                    verdicts[key] = None
        return {key: v for key, v in verdicts.items() if v is not None}

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict, batch_size: int, expand: dict[Key, int]):
        """The module's outputs (detached), the layer calls whose output takes gradient, and the gradients of
        example 0's objective with respect to those outputs (all None when no output is batched)."""
        leaves = [t for t in torch.utils._pytree.tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        cuda = sorted({t.device.index for t in leaves if t.is_cuda})
        self.calls, self._expand, self._batch_size = [], expand, batch_size
        try:
            with torch.random.fork_rng(devices=cuda), self.guard.replaying(), torch.enable_grad():
                outputs = torch.utils._pytree.tree_flatten(module(*args, **kwargs))[0]
                # Weights of example 0's outputs from a generator of the probe's own, the same in every run.
                target = example_zero_objective(outputs, self.batch_dim, batch_size, torch.Generator().manual_seed(0))
                calls = [(m, a, o) for m, a, o in self.calls if o.requires_grad]
                if target is None or not calls:
                    grads = [None] * len(calls)
                else:
                    grads = list(torch.autograd.grad(target, [o for _, _, o in calls], allow_unused=True))
        finally:
            self.calls, self._expand = None, {}
        detached = [t.detach() for t in outputs if isinstance(t, torch.Tensor)]
        return detached, calls, grads


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two runs' outputs differ in shape or beyond rounding."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    if not a.is_floating_point():
        return not torch.equal(a, b)
    scale = max(float(a.abs().nan_to_num(0).max()) if a.numel() else 0.0, 1e-30)
    return not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


class ExampleDimensions:
    """``FastGradSampler``'s choice of each rule layer call's example dimension (a mixin: it uses the sampler's
    learned layouts, probe, root inputs and whole-model replay)."""

    def _candidates(
        self, module: nn.Module, activation: torch.Tensor, batch_size: int, rule: LayerRule | None = None
    ) -> list[int]:
        """Where this call's examples may be (``candidate_dims``). An input that takes no gradient and is not one of
        the model's own inputs may have no batch dimension at all: when no dimension fits, and otherwise when it is
        a vector of token ids (position ids (T,), T == B by chance) or one of the model's buffers (a table shared by
        all examples)."""
        leading = leading_dims(rule or rule_for(module), module, activation)
        dims = candidate_dims(activation, leading, batch_size)
        if activation.requires_grad or self._is_root_input(activation):
            return dims
        ids = not activation.is_floating_point()
        if not dims or (ids and activation.dim() == 1) or (not ids and self._is_buffer(activation)):
            return candidate_dims(activation, leading, batch_size, unbatched=True)
        return dims

    def _is_buffer(self, activation: torch.Tensor) -> bool:
        return any(same_layout(activation, b) for b in self.module.buffers())

    def _example_dim(self, module: nn.Module, activation: torch.Tensor, batch_size: int, rule: LayerRule) -> int | None:
        """The dimension of this call's input (and output) that carries the examples, or an ``EXPANDED``
        candidate; None when the call's gradients come from the replay of the whole model instead (never a guess)."""
        dims = self._candidates(module, activation, batch_size, rule)
        if batch_size <= 1 and dims:
            return dims[0]  # no or one example: every fitting dimension attributes the same
        key = (module, activation.dim())
        if len(dims) == 1 and dims[0] not in EXPANDED:
            if self._learned.setdefault(key, dims[0]) != dims[0]:
                self._learned[key] = CONFLICT
            return dims[0]
        if not dims:
            self._replay_whole_model(module)
            return None
        learned = self._learned.get(key)
        if learned in dims:
            return learned
        if self.batch_dim in dims and self._is_root_input(activation):
            verdict = self.batch_dim
        else:
            forward, verdicts = self._verdicts
            if forward != self._forwards and self._root_call is not None:
                args, kwargs = self._root_call
                candidates = partial(self._candidates, batch_size=batch_size)
                verdicts = self.probe.run(self.module, args, kwargs, batch_size, candidates)
                self._verdicts = (self._forwards, verdicts)
            verdict = verdicts.get(key)
        if verdict not in dims:  # undecided (or called outside the model's forward): the replay attributes it
            self._replay_whole_model(module)
            return None
        if learned is None:
            self._learned[key] = verdict
        return verdict

    def _is_root_input(self, activation: torch.Tensor) -> bool:
        """Whether ``activation`` is one of the module's inputs (the same elements in the same layout)."""
        return any(same_layout(activation, t) for t in self._root_inputs if isinstance(t, torch.Tensor))
