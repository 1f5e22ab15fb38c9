"""The DP optimizer: clip each example's gradient, sum, add Gaussian noise once per logical step, scale, step.

It wraps the user's optimizer (SGD, Adam, ...) and delegates ``param_groups`` and ``state`` to it, so learning-rate
schedulers and ``state_dict`` work as before. The update it hands to the wrapped optimizer is

    (sum_i clip(g_i, C) + N(0, (sigma * C)^2 I)) / expected_batch_size

where clip(g, C) = g * min(1, C / ||g||) over all privatised parameters together (flat clipping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from dptrain.adaptive_clipping import AdaptiveClipping
from dptrain.grad.base import GradSampler, MaterializedGradients, PerExampleGradients
from dptrain.randomness import RandomSource
from dptrain.sampling import ChunkSignal


class BudgetExhausted(Exception):
    """The privacy budget allows no further step: raised by ``optimizer.step()`` before it changes anything.

    Catch it to end the training loop; the steps already taken stay recorded and are settled by
    ``PrivacyEngine.close()``.
    """

    def __init__(self, budget: str, steps_taken: int) -> None:
        self.budget = budget
        self.steps_taken = steps_taken
        super().__init__(
            f"privacy budget {budget!r} is spent: {steps_taken} steps were taken, one more would exceed its cap"
        )


class NonFiniteGradientError(RuntimeError):
    """A per-example gradient was NaN or infinite: clipping it would silently turn it into noise."""


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per example (1 for a zero gradient)."""
    return max_grad_norm / torch.clamp(norms, min=max_grad_norm)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a step's clipped sum and noise are formed in: at least float32, so that a bf16/fp16 model's
    contribution per example stays within C up to float32 rounding; the cast back to the parameter's dtype comes
    after the noise (post-processing, which cannot weaken the guarantee)."""
    return torch.promote_types(dtype, torch.float32)


class _StepTotal:
    """The running total of one logical step: one flat buffer per accumulation dtype and device (one random draw,
    one all-reduce, one division each) and a view of it shaped like each parameter."""

    def __init__(
        self, params: list[nn.Parameter], fill: Callable[[int, torch.dtype, torch.device], torch.Tensor]
    ) -> None:
        groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
        for p in params:
            groups.setdefault((accumulation_dtype(p.dtype), p.device), []).append(p)
        self.buffers: list[torch.Tensor] = []
        self.views: dict[nn.Parameter, torch.Tensor] = {}
        for (dtype, device), group in groups.items():
            sizes = [p.numel() for p in group]
            flat = fill(sum(sizes), dtype, device)
            self.buffers.append(flat)
            self.views.update((p, view.view(p.shape)) for p, view in zip(group, flat.split(sizes)))


class DPOptimizer(Optimizer):
    """Wraps ``optimizer`` so that each of its steps uses a clipped, noised, averaged gradient."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        params: list[nn.Parameter],
        grad_sampler: GradSampler,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        random: RandomSource,
        signal: ChunkSignal | None = None,
        on_step: Callable[["DPOptimizer"], None] | None = None,
        distributed: bool = False,
        user_reduction: str | None = None,
        per_layer_norms: list[float] | None = None,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        """With ``distributed``, each rank clips its own examples, the clipped sums are summed across ranks and
        rank 0 alone adds the noise, so each logical step carries the noise once. With ``user_reduction`` ("sum" or
        "mean") the privacy unit is the user: the data loader reports each row's user (``signal.units``), each
        user's examples' gradients are summed (or averaged) over the whole logical batch and clipped as one. With
        ``per_layer_norms`` (one per parameter of ``params``; ``max_grad_norm`` is then their L2 total) each
        parameter's per-example gradient is clipped to its own norm (Opacus' ``clipping="per_layer"``). With
        ``adaptive``, ``max_grad_norm`` follows a quantile of the norms (``dptrain.adaptive_clipping``): the gradient
        noise is then raised to pay for the noisy count, and ``noise_multiplier`` is the combined mechanism's."""
        # Deliberately no super().__init__: parameter groups and state live in the wrapped optimizer.
        self.original_optimizer = optimizer
        self.params = params
        self.grad_sampler = grad_sampler
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        #: Opacus' name for the per-parameter norms of ``clipping="per_layer"`` (None: flat clipping).
        self.max_grad_norms = per_layer_norms
        self.adaptive = adaptive
        self.expected_batch_size = expected_batch_size
        self.random = random
        self.signal = signal or ChunkSignal()
        self.on_step = on_step
        self.step_hooks: list[Callable[["DPOptimizer"], None]] = []  # the user's (attach_step_hook)
        self.distributed = distributed
        self.user_reduction = user_reduction
        self._reset_users()
        self.steps_taken = 0
        #: Steps the privacy budget allows this optimizer (None: no budget); set by the engine.
        self.step_allowance: int | None = None
        self.budget_name = ""
        #: The noise multiplier the ledger reservation was charged at (None: no budget); set by the engine.
        self.charged_noise_multiplier: float | None = None
        self._total: _StepTotal | None = None
        self._logical_batch: int | None = None  # the data loader's logical batch being accumulated, if any
        self._planned = set(params)  # what make_private privatised: nothing else may be updated
        #: Steps must consume the private data loader's batches (set when the engine wires a loader's signal).
        self.requires_private_loader = signal is not None
        self._stepped_chunk = 0  # the loader's last chunk a step consumed
        self._next_chunk = 0  # the position, in its logical batch, of the chunk the next step must consume
        self._skip_next_step = False  # Opacus' signal_skip_step
        self._failed_batch: int | None = None  # a logical batch skipped (and charged) after an error in a chunk
        #: Logical steps skipped after an error and charged (included in ``steps_taken``).
        self.steps_skipped = 0
        self.detached = False
        #: Called at the end of every logical batch with the step's running total (noise plus clipped sums) as one
        #: tensor per parameter, before the division by the expected batch size; a hook may add to it in place
        #: (the white-box auditor inserts its gradient canaries here).
        self.clipped_sum_hooks: list[Callable[["DPOptimizer", dict[nn.Parameter, torch.Tensor]], None]] = []

    # Delegation to the wrapped optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> dict:
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.original_optimizer.defaults

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RuntimeError("parameters cannot be added to a private optimizer; add them before make_private")

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
            f"expected_batch_size={self.expected_batch_size}, optimizer={self.original_optimizer!r})"
        )

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus' ``signal_skip_step``: the next ``step()`` only accumulates this chunk's clipped gradients. Here the
        private loader already says where each logical batch ends (``max_physical_batch_size``, BatchMemoryManager):
        a skip within a logical batch is what ``step()`` does anyway; a skip at its last chunk would merge two
        Poisson batches into one step charged as one, and that ``step()`` raises."""
        self._skip_next_step = bool(do_skip)

    @property
    def accumulated_iterations(self) -> int:
        """Opacus' ``accumulated_iterations``: the forward/backward passes whose per-example gradients wait for the
        next ``step()`` (0 after a step or ``zero_grad``; 1 after one pass). Two backward passes through one forward
        pass (two loss terms) count once. Unlike Opacus, passes over two different batches before one ``step()``
        are refused there (their examples would be paired by row): accumulate with ``max_physical_batch_size``."""
        return self.grad_sampler.pending_forward_passes()

    def attach_step_hook(self, fn: Callable[["DPOptimizer"], None]) -> None:
        """Call ``fn(optimizer)`` at every real (noised) step, after the noise and before the update, as Opacus'
        ``attach_step_hook``. It is added beside the engine's own accounting hook, never in its place."""
        self.step_hooks.append(fn)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients and drop per-example gradients not yet consumed by ``step``."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.grad_sampler.discard()

    def _accumulate_chunk(self) -> None:
        grads = self.grad_sampler.collect(self.params)
        if grads is None:
            if self.signal.chunk_size == 0:
                return  # an empty Poisson batch whose forward pass the user skipped: noise only
            raise RuntimeError(
                "optimizer.step() found no per-example gradients: call loss.backward() on the output of the "
                "private model before optimizer.step()"
            )
        if self.requires_private_loader:
            self._check_provenance(grads)
        if self.user_reduction is not None:
            self._accumulate_users(grads.materialize(), grads.batch_size)
            return
        if self.max_grad_norms is not None:
            self._add_clipped_per_layer(grads.materialize(), self._step_total().views)
            return
        norms = grads.squared_norms().sqrt()
        self._check_finite(norms, "example")
        if self.adaptive is not None:
            self.adaptive.count(norms, self.max_grad_norm)
        grads.add_weighted_sum(clip_factors(norms, self.max_grad_norm), into=self._step_total().views)

    def _add_clipped_per_layer(self, per_example: dict[nn.Parameter, torch.Tensor], into: dict) -> None:
        """``clipping="per_layer"``: each parameter's per-example gradients clipped to that parameter's norm; an
        example's whole contribution is then within the L2 total of the norms (``max_grad_norm``)."""
        for p, max_norm in zip(self.params, self.max_grad_norms):
            g = per_example.get(p)
            if g is None:
                continue
            g = g.to(into[p].dtype)  # at least float32 (accumulation_dtype)
            norms = g.flatten(1).square().sum(1).sqrt()
            self._check_finite(norms, "example")
            into[p].add_(torch.tensordot(clip_factors(norms, max_norm), g, dims=1))

    def _check_finite(self, norms: torch.Tensor, unit: str) -> None:
        if not torch.isfinite(norms).all():
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            raise NonFiniteGradientError(
                f"non-finite per-{unit} gradient at step {self.steps_taken + 1} for {unit}(s) {bad[:10]} of the "
                "batch; clipping would hide it in the noise. Check the inputs and the loss (log of 0, overflow)"
            )

    def _step_total(self) -> _StepTotal:
        """The logical step's running total, created at its first chunk as the Gaussian noise N(0, (sigma * C)^2 I)
        (rank 0 alone under ``distributed``; zeros when sigma * C is 0), to which every chunk's clipped sums are
        added in place: no separate buffer of sums next to the noise."""
        if self._total is None:
            std = self.gradient_noise_multiplier * self.max_grad_norm
            noisy = std > 0 and (not self.distributed or dist.get_rank() == 0)

            def fill(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
                if not noisy:
                    return torch.zeros(n, dtype=dtype, device=device)
                return self.random.normal(torch.Size([n]), dtype=dtype, device=device).mul_(std)

            self._total = _StepTotal(self.params, fill)
        return self._total

    @property
    def gradient_noise_multiplier(self) -> float:
        """The noise multiplier of the gradient sum: ``noise_multiplier``, or with adaptive clipping the larger one
        that leaves room for the noisy count (the accountant charges ``noise_multiplier``, the two together)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return self.adaptive.gradient_noise_multiplier(self.noise_multiplier)

    def _abandon_logical_step(self) -> None:
        """Forget everything accumulated for the current logical step (after an error in one of its chunks, or when
        the loader moved on before its last chunk), so that no clipped sum of it leaks into a later step's update."""
        self._total = None
        if self.adaptive is not None:
            self.adaptive.abandon()
        self._reset_users()

    def _reset_users(self) -> None:
        self._unit_rows: dict[int, int] = {}  # user id -> row in the per-user sums of the logical batch
        self._unit_sums: dict[nn.Parameter, torch.Tensor] = {}
        self._unit_examples = torch.zeros(0)  # examples of each user in the logical batch so far

    def _accumulate_users(self, per_example: dict[nn.Parameter, torch.Tensor], batch_size: int) -> None:
        """Add each example's gradient to its user's running sum over the logical batch."""
        units = self.signal.units
        if units is None or len(units) != batch_size:
            raise RuntimeError(
                "user-level privacy needs the private data loader's batches: the optimizer did not receive the users "
                "of this batch (use the data loader returned by make_private, unchanged)"
            )
        rows = torch.tensor(
            [self._unit_rows.setdefault(int(u), len(self._unit_rows)) for u in units.tolist()], dtype=torch.long
        )
        count = len(self._unit_rows)
        for p, g in per_example.items():
            total = self._unit_sums.get(p)
            if total is None:
                total = g.new_zeros((count, *p.shape))
            elif total.shape[0] < count:
                total = torch.cat([total, total.new_zeros((count - total.shape[0], *p.shape))])
            self._unit_sums[p] = total.index_add_(0, rows.to(g.device), g)
        self._unit_examples = torch.cat([self._unit_examples, torch.zeros(count - len(self._unit_examples))])
        self._unit_examples.index_add_(0, rows, torch.ones(len(rows)))

    def _clip_users(self) -> None:
        """Clip each user's summed (or averaged) gradient as one unit and add it to the clipped sum."""
        if not self._unit_sums:
            return
        sums = self._unit_sums
        if self.user_reduction == "mean":
            sums = {p: t / self._unit_examples.to(t).view(-1, *([1] * (t.dim() - 1))) for p, t in sums.items()}
        users = MaterializedGradients(sums, len(self._unit_rows))
        norms = users.squared_norms().sqrt()
        self._check_finite(norms, "user")
        users.add_weighted_sum(clip_factors(norms, self.max_grad_norm), into=self._step_total().views)
        self._reset_users()

    def _noisy_average(self) -> None:
        """Set each ``p.grad`` to (clipped sum + N(0, (sigma * C)^2 I)) / expected_batch_size.

        A parameter no example's loss touched (an unused branch) has a zero clipped sum: noise only. With
        ``distributed`` the totals (noise from rank 0 only) are summed across ranks, so each logical step carries
        the noise once. A privatised parameter frozen since ``make_private`` gets no gradient (it is not updated).
        """
        total = self._step_total()
        self._total = None
        for hook in self.clipped_sum_hooks:
            hook(self, total.views)
        for flat in total.buffers:
            if self.distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.expected_batch_size)
        for p in self.params:
            view = total.views[p]
            p.grad = (view if view.dtype == p.dtype else view.to(p.dtype)) if p.requires_grad else None

    def _check_parameters(self) -> None:
        """Refuse a step that would update a parameter without privatising it: one made trainable (or added to the
        wrapped optimizer) after ``make_private``; clear the stale gradient of every parameter not privatised."""
        for group in self.original_optimizer.param_groups:
            for p in group["params"]:
                if p in self._planned:
                    continue
                if p.requires_grad:
                    self.grad_sampler.discard()
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} became trainable (or was added to the optimizer) after "
                        "make_private: its gradient would reach the optimizer unclipped and without noise. Make every "
                        "layer you will train trainable before make_private (freeze later if you must), or call "
                        "engine.detach() and make_private again with the new set of trainable parameters"
                    )
                p.grad = None  # frozen: never updated with a gradient left from before make_private

    def _check_batch(self) -> None:
        """A step must consume exactly one physical batch of the private data loader, once: the accountant charges
        each logical step as one fresh Poisson sample of the dataset."""
        chunk = self.signal.chunk_id
        if chunk == 0:
            self.grad_sampler.discard()
            raise RuntimeError(
                "optimizer.step() before any batch of the private data loader: iterate over the data loader that "
                "make_private returned (not the original one); each step is charged as one Poisson-sampled batch of it"
            )
        if chunk == self._stepped_chunk:
            self.grad_sampler.discard()
            raise RuntimeError(
                "optimizer.step() was called again without a new batch from the private data loader: several steps "
                "on one batch (or steps on batches from another loader) would be charged as fresh Poisson batches "
                "they are not. Take exactly one optimizer.step() per batch of the loader make_private returned"
            )
        self._stepped_chunk = chunk
        if self.signal.logical_batch == self._failed_batch:
            return
        if self._logical_batch is None and self.signal.chunk_index != 0 or (
            self._logical_batch == self.signal.logical_batch and self.signal.chunk_index != self._next_chunk
        ):
            raise RuntimeError(
                f"optimizer.step() was not called for every physical chunk of logical batch {self.signal.logical_batch}"
                " (one was skipped): a logical step must include all of its chunks. Call optimizer.step() after the "
                "backward pass of every chunk the loader yields"
            )
        self._next_chunk = self.signal.chunk_index + 1

    def _check_provenance(self, grads: PerExampleGradients) -> None:
        """The per-example gradients must all come from forward passes on the current chunk, and have its size."""
        tags = getattr(grads, "tags", frozenset())
        chunk = self.signal.chunk_id
        if len(tags) > 1:
            raise RuntimeError(
                "backward() ran on several different batches before one optimizer.step() (gradient accumulation): "
                "their examples would be paired by row and clipped together. Call optimizer.step() after every "
                "batch, and use make_private(max_physical_batch_size=...) to split large logical batches into chunks"
            )
        if tags and chunk not in tags:
            raise RuntimeError(
                "the per-example gradients come from a forward pass on an earlier batch, not on the private data "
                "loader's current batch: call optimizer.step() after the backward pass of each batch"
            )
        if self.signal.chunk_size is not None and grads.batch_size != self.signal.chunk_size:
            raise RuntimeError(
                f"the gradients are of a batch of {grads.batch_size} examples, but the private data loader's current "
                f"batch has {self.signal.chunk_size}: train on the batches of the loader make_private returned"
            )

    def _skip_failed_batch(self, error: BaseException, charged: bool) -> None:
        """After an error in a chunk, the whole logical batch is skipped: nothing of it is released and its other
        chunks are ignored, so one example can never remove only some of the others. A skip caused by an example's
        gradient (``charged``: non-finite) depends on the data, so it is charged as one step."""
        self._abandon_logical_step()
        self._logical_batch = None
        if not self.requires_private_loader:
            return
        self._failed_batch = self.signal.logical_batch
        charge = "is charged as one step (the skip depends on the data)" if charged else "is not charged"
        if charged:
            self.steps_taken += 1
            self.steps_skipped += 1
            if self.on_step is not None:
                self.on_step(self)
        error.add_note(
            f"dptrain: logical batch {self.signal.logical_batch} is skipped as a whole (no example of it is released, "
            f"its remaining chunks are ignored) and {charge}"
        )

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Clip this chunk's per-example gradients; at the end of a logical batch, noise, scale and step.

        Returns the closure's loss on a real step, None when only a physical chunk was accumulated.
        """
        if self.step_allowance is not None and self.steps_taken >= self.step_allowance:
            self.grad_sampler.discard()
            raise BudgetExhausted(self.budget_name, self.steps_taken)
        if self.detached:
            self.grad_sampler.discard()
            raise RuntimeError("this optimizer's engine was detached from the model: make the model private again")
        if self.charged_noise_multiplier not in (None, self.noise_multiplier):
            self.grad_sampler.discard()
            raise ValueError(
                f"noise_multiplier was changed from {self.charged_noise_multiplier} to {self.noise_multiplier}, but "
                f"the ledger reserved budget {self.budget_name!r} at {self.charged_noise_multiplier}: the steps would "
                "be charged at the wrong cost. Close this engine and start a new one with the new noise multiplier"
            )
        skip, self._skip_next_step = self._skip_next_step, False
        if skip and self.signal.is_last_chunk:
            self.grad_sampler.discard()
            raise RuntimeError(
                "signal_skip_step() before the step of a logical batch's last chunk would accumulate two Poisson "
                "batches into one step, charged as one: each logical batch of the private loader is one step. Split "
                "a large batch with max_physical_batch_size= (or BatchMemoryManager) instead"
            )
        self._check_parameters()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._logical_batch not in (None, self.signal.logical_batch):
            self._abandon_logical_step()  # the loader moved on before the last chunk's step: that step never ends
            self._logical_batch = None
        if self.requires_private_loader:
            self._check_batch()
            if self.signal.logical_batch == self._failed_batch:
                self.grad_sampler.discard()  # a chunk of a batch already skipped and charged after an error
                return None
        self._logical_batch = self.signal.logical_batch
        try:
            self._accumulate_chunk()
            if not self.signal.is_last_chunk:
                return None
            if self.user_reduction is not None:
                self._clip_users()
        except BaseException as error:
            self._skip_failed_batch(error, charged=isinstance(error, NonFiniteGradientError))
            raise
        self._noisy_average()
        if self.adaptive is not None:  # the next step's bound, from this step's noisy count
            self.max_grad_norm = self.adaptive.next_bound(self.max_grad_norm, self.random, self.expected_batch_size)
        self._logical_batch = None
        for hook in self.step_hooks:  # with the noisy gradients in .grad, before the update (as in Opacus)
            hook(self)
        self.original_optimizer.step()
        self.steps_taken += 1
        if self.on_step is not None:
            self.on_step(self)
        return loss
