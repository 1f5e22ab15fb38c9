"""Reference per-example gradients with torch.func: vmap over examples of a vjp through the user's whole module.

The forward hook keeps the module's inputs; a gradient hook on its outputs keeps dLoss/dOutput from the user's own
backward pass. Example i's gradient is then the vjp of the module at input i with output gradient i — exact for any
module that treats examples independently (buffers included), whatever its layers. It costs one more forward and
backward, under vmap; the fast engine is measured against it.

A replay cannot draw the random numbers the user's forward drew (dropout masks), so a module whose forward consumes
random numbers is refused at that forward: the CPU generator's state, and that of each CUDA device its inputs are
on, is compared before and after the call (a few microseconds). The replay itself is checked the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from dptrain.grad.base import GradSampler, MaterializedGradients, ReplayGuard


@dataclass
class _BackwardRecord:
    """One forward call's inputs and the output gradients its backward pass produced."""

    inputs: tuple[tuple, dict]
    output_indices: list[int]  # positions (in the flattened output) of outputs that received a gradient
    output_grads: list[torch.Tensor]
    batch_size: int
    tags: frozenset[Hashable]  # the batch tag at the forward pass, if the engine set ``batch_tag``


def _cuda_devices(inputs: Any) -> tuple[torch.device, ...]:
    """The CUDA devices of the tensors in ``inputs`` (any nesting); none to look for before CUDA is initialised."""
    if not torch.cuda.is_initialized():
        return ()
    return tuple({t.device for t in tree_flatten(inputs)[0] if isinstance(t, torch.Tensor) and t.is_cuda})


def _generator_states(cuda_devices: tuple[torch.device, ...]) -> list[torch.Tensor]:
    """The state of the CPU random generator and of each given CUDA device's."""
    return [torch.default_generator.get_state(), *(torch.cuda.get_rng_state(d) for d in cuda_devices)]


def _drew_random_numbers(cuda_devices: tuple[torch.device, ...], before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, _generator_states(cuda_devices)))


class VmapGradSampler(GradSampler):
    """Per-example gradients of ``module`` by torch.func (functional_call + vjp + vmap)."""

    def __init__(
        self,
        module: nn.Module,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        guard: ReplayGuard | None = None,
        kwarg_batch_dims: dict[str, int | None] | None = None,
        arg_batch_dims: dict[int, int | None] | None = None,
        enabled: bool = True,
    ) -> None:
        """``guard`` is shared with other hooks of the same engine; ``kwarg_batch_dims`` / ``arg_batch_dims``
        override the batch dimension of keyword / positional arguments (None: shared by all examples), e.g.
        nn.MultiheadAttention's key_padding_mask is batch-first and its attn_mask shared whatever the layout.
        A sampler with ``enabled=False`` records nothing until enabled."""
        self.module = module
        self.batch_dim = 0 if batch_first else 1
        self.loss_reduction = loss_reduction
        self.guard = guard or ReplayGuard()
        self.kwarg_batch_dims = kwarg_batch_dims or {}
        self.arg_batch_dims = arg_batch_dims or {}
        self.enabled = enabled
        self._records: list[_BackwardRecord] = []
        # The random generators' states when the module's current forward call began (None: not captured).
        self._rng_before: tuple[tuple[torch.device, ...], list[torch.Tensor]] | None = None
        self._handles = [
            module.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            module.register_forward_hook(self._on_forward, with_kwargs=True),
        ]

    def _random_forward_error(self, when: str) -> RuntimeError:
        return RuntimeError(
            f"{type(self.module).__name__} draws random numbers {when} (dropout in training mode, or other "
            "randomness), but its per-example gradients come from a torch.func replay of its forward, which cannot "
            "draw the same ones: the gradients would not be the ones this forward produced. Make its forward "
            "deterministic: set its dropout to 0 (e.g. nn.GRU(dropout=0)), call model.eval(), or apply the dropout "
            "outside this module (an nn.Dropout on its input or output in the parent module). grad_sample_mode="
            "'vmap' replays the whole model; 'auto' replays only layers without a per-layer rule (nn.LSTM, nn.GRU, "
            "custom layers with their own parameters) and the model when a layer is applied to unbatched inputs"
        )

    def _batch_size(self, inputs: tuple[tuple, dict]) -> int:
        for leaf in tree_flatten(inputs)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.dim() > self.batch_dim:
                return leaf.shape[self.batch_dim]
        raise RuntimeError(
            f"{type(self.module).__name__} was called without a tensor argument with a batch dimension "
            f"(dim {self.batch_dim}); per-example gradients need batched tensor inputs"
        )

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the random generators' states (also while disabled: the fast engine enables its whole-model replay
        during a forward pass)."""
        if self.guard.active or not torch.is_grad_enabled():
            return
        devices = _cuda_devices((args, kwargs))
        self._rng_before = (devices, _generator_states(devices))

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.guard.active or not torch.is_grad_enabled():
            return  # a probe or replay inside the user's forward pass: the states kept are that pass's
        rng_before, self._rng_before = self._rng_before, None
        if not self.enabled:
            return
        leaves = tree_flatten(output)[0]
        tracked = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not tracked:
            return
        if rng_before is not None and _drew_random_numbers(*rng_before):
            raise self._random_forward_error("in its forward pass")
        tags = frozenset((self.batch_tag(),)) if self.batch_tag is not None else frozenset()
        inputs = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        batch_size = self._batch_size(inputs)

        def on_output_grads(grads: list[torch.Tensor | None]) -> None:
            used = [(i, g.detach()) for i, g in zip(tracked, grads) if g is not None]
            if not used:
                return
            for _, g in used:
                if g.dim() == 0 and g.is_floating_point():
                    continue  # a loss the model returns: a mean (sum) of per-example losses (IndependenceCheck)
                if g.dim() <= self.batch_dim or g.shape[self.batch_dim] != batch_size:
                    raise RuntimeError(
                        f"an output of {type(module).__name__} with shape {tuple(g.shape)} has no batch dimension "
                        f"{self.batch_dim} of size {batch_size}; return per-example outputs and reduce the loss "
                        "outside the model"
                    )
            self._records.append(
                _BackwardRecord(inputs, [i for i, _ in used], [g for _, g in used], batch_size, tags)
            )

        if len(tracked) == 1:  # a multi-grad hook does not fire for the root of backward (a loss the model returns)
            leaves[tracked[0]].register_hook(lambda g: on_output_grads([g]))
        else:
            torch.autograd.graph.register_multi_grad_hook([leaves[i] for i in tracked], on_output_grads)

    def collect(self, params: list[nn.Parameter]) -> MaterializedGradients | None:
        records, self._records = self._records, []
        total = None
        for record in records:
            grads = self._per_example(record, params)
            total = grads if total is None else total + grads
        return total

    def _per_example(self, record: _BackwardRecord, params: list[nn.Parameter]) -> MaterializedGradients:
        wanted = set(params)
        names = {p: n for n, p in self.module.named_parameters()}
        missing = [p for p in params if p not in names]
        if missing:
            raise RuntimeError(f"{len(missing)} parameter(s) to privatise do not belong to the private module")
        trainable = {names[p]: p.detach() for p in params}
        constants = {n: p.detach() for n, p in self.module.named_parameters() if p not in wanted}
        constants.update(dict(self.module.named_buffers()))
        batch_dim, batch_size = self.batch_dim, record.batch_size
        if batch_size == 0:
            return MaterializedGradients({p: p.new_zeros((0, *p.shape)) for p in params}, 0, record.tags)

        def is_batched(leaf: Any) -> bool:
            return isinstance(leaf, torch.Tensor) and leaf.dim() > batch_dim and leaf.shape[batch_dim] == batch_size

        def dims_of(value: Any, override: dict, key: Any) -> Any:
            if key in override:
                return tree_map(lambda t: override[key] if isinstance(t, torch.Tensor) else None, value)
            return tree_map(lambda t: batch_dim if is_batched(t) else None, value)

        args, kwargs = record.inputs
        input_dims = (
            tuple(dims_of(a, self.arg_batch_dims, i) for i, a in enumerate(args)),
            {key: dims_of(value, self.kwarg_batch_dims, key) for key, value in kwargs.items()},
        )

        # A 0-dim output (a loss the model returns) is each example's own loss in its replay; example i's share of
        # its gradient is the gradient over the batch size under a mean.
        share = 1.0 / batch_size if self.loss_reduction == "mean" else 1.0
        output_grads = [g * share if g.dim() == 0 else g for g in record.output_grads]
        grad_dims = tuple(None if g.dim() == 0 else batch_dim for g in output_grads)

        def outputs_of(w: dict, inputs: tuple[tuple, dict]) -> tuple:
            """The module's outputs that received gradients, each still with a batch dimension of size 1 (0-dim
            outputs as they are)."""
            leaves = tree_flatten(functional_call(self.module, {**w, **constants}, *inputs))[0]
            return tuple(leaves[i] for i in record.output_indices)

        def one_example(weights: dict, inputs: tuple[tuple, dict], output_grads: list[torch.Tensor]) -> dict:
            batched = tree_map(lambda t, d: t.unsqueeze(d) if d is not None else t, inputs, input_dims)
            _, pullback = vjp(
                lambda w: tuple(o.select(batch_dim, 0) if o.dim() else o for o in outputs_of(w, batched)), weights
            )
            return pullback(tuple(output_grads))[0]

        def example_by_example() -> dict:
            """The same, one example at a time: for code vmap cannot batch (data-dependent control flow)."""
            grads = []
            for i in range(batch_size):
                inputs = tree_map(lambda t, d: t.narrow(d, i, 1) if d is not None else t, record.inputs, input_dims)
                _, pullback = vjp(lambda w: outputs_of(w, inputs), trainable)
                grads.append(pullback(tuple(g.narrow(batch_dim, i, 1) if g.dim() else g for g in output_grads))[0])
            return {name: torch.stack([g[name] for g in grads]) for name in trainable}

        devices = _cuda_devices(record.inputs)
        rng_before = _generator_states(devices)
        with self.guard.replaying(), warnings.catch_warnings():
            # Layers without a batching rule (LSTM, CPU attention) run per example under vmap: expected here.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            try:
                # A random operation raises under vmap here; the per-example loop then draws and is refused below.
                per_name = vmap(one_example, in_dims=(None, input_dims, grad_dims), randomness="error")(
                    trainable, record.inputs, tuple(output_grads)
                )
            except torch.OutOfMemoryError:
                raise  # not a missing batching rule: a per-example loop would only hide it
            except RuntimeError:
                per_name = example_by_example()
        if _drew_random_numbers(devices, rng_before):
            raise self._random_forward_error("when its forward is replayed")
        scale = float(batch_size) if self.loss_reduction == "mean" else 1.0
        per_param = {p: per_name[names[p]] * scale for p in params}
        return MaterializedGradients(per_param, batch_size, record.tags)

    def discard(self) -> None:
        self._records = []

    def pending_forward_passes(self) -> int:
        return len({id(record.inputs) for record in self._records})  # a forward pass's records share its inputs

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._records = []
