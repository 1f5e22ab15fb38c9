"""PrivacyEngine: makes a model, optimizer and data loader private, and accounts for what they release.

The API follows Opacus (``make_private``, ``make_private_with_epsilon``, ``get_epsilon``) so existing code runs
with the import changed. Unlike Opacus, the module is not wrapped: hooks are attached to the object the user
passed, whose ``state_dict`` keys and save/load behaviour are unchanged.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dptrain.accounting import (
    Accountant,
    calibrate_noise,
    check_delta,
    check_noise_multiplier,
    check_positive,
)
from dptrain.adaptive_clipping import AdaptiveClipping
from dptrain.compat import (
    ADAPTIVE_OPTIONS,
    OpacusMethods,
    adaptive_clipping,
    check_clipping_mode,
    check_opacus_options,
    clipping_norms,
    native_accountant,
    opacus_result,
)
from dptrain.engine_setup import (
    LOSS_REDUCTIONS,
    check_privacy_unit,
    refuse_invalid_model,
    plan_batches,
    reserve_steps,
    seed_if_fresh,
    stop_ddp_synchronisation,
    training_set,
    warn_weak_delta,
)
from dptrain.grad import make_grad_sampler
from dptrain.independence import IndependenceCheck
from dptrain.optim import DPOptimizer
from dptrain.randomness import RandomSource, fresh_generator
from dptrain.sampling import ChunkSignal, DPDataLoader
from dptrain.state_guard import StateGuard

if TYPE_CHECKING:
    from dptrain.budget import BudgetLedger

# Modules that already carry dptrain hooks (weak: the engine must not keep a user's model alive).
_PRIVATE_MODULES: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@dataclass
class _Attachment:
    """A model this engine made private: what ``detach`` undoes and ``state_dict`` saves the random streams of."""

    module: nn.Module  # as passed (DistributedDataParallel or the model)
    hooked: nn.Module  # the model carrying the hooks
    optimizer: DPOptimizer
    sampling: RandomSource | None  # None when the user's loader selects batches (poisson_sampling=False)
    rank: int
    state_guard: StateGuard
    independence: IndependenceCheck


@dataclass
class _Reservation:
    """A ledger reservation held for one private optimizer, settled by ``PrivacyEngine.close``."""

    optimizer: DPOptimizer
    entry_id: int | None  # None on ranks other than 0, which do not write to the ledger
    first_step: int


class PrivacyEngine(OpacusMethods):
    """Owns the privacy accounting of every model made private with it.

    ``accountant``: "pld" (default, tightest) or "rdp". ``secure_mode``: draw sampling and noise from the OS
    cryptographic generator instead of torch's (see ``dptrain.randomness``). ``ledger`` and ``budget``: charge every
    run to a persistent privacy budget (``dptrain.budget``): the planned or allowed steps are reserved before
    training, ``optimizer.step()`` raises ``BudgetExhausted`` once they are used, and ``close()`` settles the
    reservation to the steps actually taken. ``on_budget_exhausted`` is called once, with the engine, after the
    last step the budget allows. ``ledger_note`` is recorded with each reservation (e.g. the run's directory).
    """

    def __init__(
        self,
        accountant: str = "pld",
        secure_mode: bool = False,
        ledger: "BudgetLedger | None" = None,
        budget: str | None = None,
        on_budget_exhausted: "Callable[[PrivacyEngine], None] | None" = None,
        ledger_note: str = "",
    ) -> None:
        accountant = native_accountant(accountant)
        if (ledger is None) != (budget is None):
            raise ValueError("pass both ledger= and budget= (the budget's name) to charge a budget, or neither")
        if ledger is not None:
            ledger.budget(budget)  # an unknown budget fails here, before any work
        self.ledger = ledger
        self.budget = budget
        self.on_budget_exhausted = on_budget_exhausted
        self.ledger_note = ledger_note
        self._reservations: list[_Reservation] = []  # open, settled by close()
        self._all_reservations: list[_Reservation] = []
        self.accountant = Accountant(accountant)
        self.privacy_unit: str | None = None  # set by make_private: "example" or "user"
        self.secure_mode = secure_mode
        self.dataset_size: int | None = None
        self.optimizers: list[DPOptimizer] = []
        self._attached: list[_Attachment] = []
        self._pending_optimizer_states: list[dict[str, Any]] = []  # loaded before make_private

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        max_physical_batch_size: int | None = None,
        batch_first: bool = True,
        grad_sample_mode: str = "auto",
        noise_generator: torch.Generator | None = None,
        privacy_unit: str = "example",
        user_ids: Any = None,
        user_reduction: str = "sum",
        clipping: str = "flat",
        criterion: Any = None,
        **clipping_options: float,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """Attach per-example gradient hooks to ``module`` and return it with a DP optimizer and data loader.

        Opacus' arguments: ``clipping="flat"`` or ``"per_layer"`` (``max_grad_norm`` a list: each trainable
        parameter's per-example gradient clipped to its own norm, the noise scaled to their L2 total) or
        ``"adaptive"`` (``clipping_options``: Opacus' ``target_unclipped_quantile``, ``clipbound_learning_rate``,
        ``max_clipbound``, ``min_clipbound``, ``unclipped_num_std``; ``dptrain.adaptive_clipping``), ``grad_sample_mode`` "hooks", "ew", "ghost"
        (= "auto") or "functorch" (= "vmap"); with "ghost" and a ``criterion`` the result is Opacus' four-tuple
        (module, optimizer, criterion, data_loader), the criterion unchanged (the engine clips from the ordinary
        backward pass).

        Every ``optimizer.step()`` at the end of a logical batch clips each example's gradient to
        ``max_grad_norm``, adds N(0, (noise_multiplier * max_grad_norm)^2) noise, divides by the expected batch
        size and calls the wrapped optimizer's step; the engine records the step for ``get_epsilon``. With a
        ledger, as many steps as the budget has left are reserved.

        ``privacy_unit="user"`` with ``user_ids`` (the user of each dataset example) protects users instead of
        examples: users are Poisson-sampled with all their examples, each user's summed (``user_reduction="sum"``)
        or averaged (``"mean"``) gradient is clipped as one unit, the sum is divided by the expected number of
        users, and epsilon is per user.
        """
        check_opacus_options(clipping, grad_sample_mode, criterion)
        max_grad_norm, per_layer = clipping_norms(clipping, max_grad_norm)
        adaptive = adaptive_clipping(clipping, clipping_options)
        made = self._make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            per_layer_norms=per_layer,
            adaptive=adaptive,
            poisson_sampling=poisson_sampling,
            loss_reduction=loss_reduction,
            max_physical_batch_size=max_physical_batch_size,
            batch_first=batch_first,
            grad_sample_mode=grad_sample_mode,
            noise_generator=noise_generator,
            privacy_unit=privacy_unit,
            user_ids=user_ids,
            user_reduction=user_reduction,
            planned_steps=None,
        )
        return opacus_result(made, criterion)

    def _make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        planned_steps: int | None,
        per_layer_norms: list[float] | None = None,
        adaptive: AdaptiveClipping | None = None,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        max_physical_batch_size: int | None = None,
        batch_first: bool = True,
        grad_sample_mode: str = "auto",
        noise_generator: torch.Generator | None = None,
        privacy_unit: str = "example",
        user_ids: Any = None,
        user_reduction: str = "sum",
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """``make_private``'s implementation; ``planned_steps`` is the ledger reservation (None: what is left)."""
        check_noise_multiplier(noise_multiplier)
        users = check_privacy_unit(privacy_unit, user_ids, user_reduction, poisson_sampling, data_loader)
        if self.privacy_unit is not None and privacy_unit != self.privacy_unit:
            raise ValueError(
                f"this engine accounts per {self.privacy_unit}; use another PrivacyEngine for a per-{privacy_unit} run"
            )
        budget_unit = self.ledger.budget(self.budget).privacy_unit if self.ledger is not None else privacy_unit
        if budget_unit != privacy_unit:
            raise ValueError(
                f"budget {self.budget!r} protects each {budget_unit}, but this run's privacy unit is "
                f"{privacy_unit!r}; charge it to a budget created with privacy_unit={privacy_unit!r}"
            )
        check_positive(max_grad_norm, "max_grad_norm")
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if module in _PRIVATE_MODULES or getattr(module, "module", None) in _PRIVATE_MODULES:
            raise ValueError("this module is already private; make_private must be called once per module")
        refuse_invalid_model(module)
        distributed = isinstance(module, DistributedDataParallel)
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        hooked = module.module if distributed else module
        if distributed:
            stop_ddp_synchronisation(module)
        params = self._private_params(hooked, optimizer)
        check_clipping_mode(per_layer_norms, adaptive, params, users is not None, isinstance(module, DistributedDataParallel))
        if adaptive is not None:
            adaptive.gradient_noise_multiplier(noise_multiplier)  # refused before anything is attached
        indices, dataset_size = training_set(data_loader, distributed)
        self.dataset_size = dataset_size

        noise_source = noise_generator
        if noise_source is None and not self.secure_mode:
            noise_source = fresh_generator(params[0].device)
        random = RandomSource(secure=self.secure_mode, generator=noise_source)
        signal = ChunkSignal()
        plan = plan_batches(data_loader, users, indices, poisson_sampling, dataset_size, self.secure_mode,
                            noise_generator, rank, world_size)  # fmt: skip
        sampling, sample_rate, expected_batch_size, batch_sampler = (
            plan.sampling, plan.sample_rate, plan.expected_batch_size, plan.batch_sampler
        )
        if users is not None:
            self.dataset_size = plan.units  # the privacy units, for the weak-delta check
        private_loader = DPDataLoader(data_loader, batch_sampler, signal, max_physical_batch_size, users, sample_rate)
        restored = self._pending_optimizer_states[0] if self._pending_optimizer_states else None
        seed = None if restored is not None else seed_if_fresh(noise_generator)
        sampling_scheme = "poisson" if sampling is not None else "shuffled"
        reserved = None
        if self.ledger is not None:
            note = f"{self.ledger_note}: " if self.ledger_note else ""
            reserved = reserve_steps(self.ledger, self.budget, note, sample_rate, noise_multiplier, planned_steps,
                                     rank, world_size, sampling_scheme, seed)  # fmt: skip

        grad_sampler = make_grad_sampler(grad_sample_mode, hooked, batch_first, loss_reduction)
        grad_sampler.batch_tag = lambda: signal.chunk_id  # each forward's chunk: accumulation across chunks shows
        _PRIVATE_MODULES.add(hooked)
        if not hasattr(hooked, "_module"):  # Opacus' GradSampleModule._module: here the model itself (no wrapper)
            object.__setattr__(hooked, "_module", hooked)  # not a submodule: state_dict and modules() unchanged

        def record_step(opt: DPOptimizer) -> None:
            self.accountant.step(sample_rate, opt.noise_multiplier)
            if opt.step_allowance is not None and opt.steps_taken == opt.step_allowance and self.on_budget_exhausted:
                self.on_budget_exhausted(self)

        dp_optimizer = DPOptimizer(
            optimizer,
            params=params,
            grad_sampler=grad_sampler,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            random=random,
            signal=signal,
            on_step=record_step,
            distributed=distributed,
            user_reduction=user_reduction if users is not None else None,
            per_layer_norms=per_layer_norms,
            adaptive=adaptive,
        )
        dp_optimizer.sample_rate = sample_rate
        # The state guard's hooks first: a forward pass that changed the model is refused as such, before the
        # independence check runs it again.
        state_guard = StateGuard(hooked)
        independence = IndependenceCheck(hooked, grad_sampler.guard, 0 if batch_first else 1, loss_reduction)
        self._attached.append(_Attachment(module, hooked, dp_optimizer, sampling, rank, state_guard, independence))
        self.privacy_unit = privacy_unit
        if self._pending_optimizer_states:
            self._restore(self._attached[-1], self._pending_optimizer_states.pop(0))
        if reserved is not None:
            entry_id, allowance = reserved
            dp_optimizer.step_allowance = dp_optimizer.steps_taken + allowance
            dp_optimizer.budget_name = self.budget
            dp_optimizer.charged_noise_multiplier = noise_multiplier
            reservation = _Reservation(dp_optimizer, entry_id, dp_optimizer.steps_taken)
            self._reservations.append(reservation)
            self._all_reservations.append(reservation)
        self.optimizers.append(dp_optimizer)
        return module, dp_optimizer, private_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        **kwargs: Any,
    ) -> tuple[nn.Module, DPOptimizer, DataLoader]:
        """``make_private`` with the smallest noise multiplier that keeps ``epochs`` epochs within the target."""
        criterion = kwargs.pop("criterion", None)
        clipping = kwargs.pop("clipping", "flat")
        check_opacus_options(clipping, kwargs.get("grad_sample_mode", "auto"), criterion)
        max_grad_norm, kwargs["per_layer_norms"] = clipping_norms(clipping, max_grad_norm)
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in ADAPTIVE_OPTIONS}
        kwargs["adaptive"] = adaptive_clipping(clipping, options)
        check_positive(target_epsilon, "target_epsilon")
        check_delta(target_delta, "target_delta")
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs <= 0:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        epochs = int(epochs)
        check_positive(max_grad_norm, "max_grad_norm")
        refuse_invalid_model(module)  # before calibration, which takes seconds
        dataset_size = training_set(data_loader, isinstance(module, DistributedDataParallel))[1]
        warn_weak_delta(target_delta, dataset_size)
        steps_per_epoch = len(data_loader)
        if kwargs.get("poisson_sampling", True):
            sample_rate = 1.0 / steps_per_epoch
        else:  # the rate the accountant will record: the loader's batch on every rank
            if data_loader.batch_size is None:
                raise ValueError(
                    "poisson_sampling=False needs a data loader with a fixed batch_size (not a custom batch_sampler)"
                )
            distributed = isinstance(module, DistributedDataParallel)
            world_size = dist.get_world_size() if distributed else 1
            sample_rate = data_loader.batch_size * world_size / dataset_size
        steps = epochs * steps_per_epoch
        noise_multiplier = calibrate_noise(target_epsilon, target_delta, sample_rate, steps, self.accountant.kind)
        made = self._make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            planned_steps=steps,
            **kwargs,
        )
        return opacus_result(made, criterion)

    @property
    def ledger_entries(self) -> list[int]:
        """Ids of the ledger entries this engine reserved (on rank 0; empty without a ledger)."""
        return [r.entry_id for r in self._all_reservations if r.entry_id is not None]

    def close(self) -> None:
        """Settle every ledger reservation to the steps actually taken; the optimizers take no further step.
        Idempotent."""
        while self._reservations:
            reservation = self._reservations.pop()
            optimizer = reservation.optimizer
            if reservation.entry_id is not None:
                self.ledger.settle(reservation.entry_id, optimizer.steps_taken - reservation.first_step)
            optimizer.step_allowance = optimizer.steps_taken  # a step after close() would go uncharged: refuse it

    def __enter__(self) -> "PrivacyEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _private_params(module: nn.Module, optimizer: Optimizer) -> list[nn.Parameter]:
        """The optimizer's trainable parameters, all of which must belong to ``module``."""
        owned = {id(p) for p in module.parameters()}
        params, seen = [], set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad or id(p) in seen:
                    continue
                if id(p) not in owned:
                    raise ValueError(
                        "the optimizer updates a parameter that is not in the private module; its gradient would be "
                        "released without clipping or noise. Give the optimizer only the module's parameters"
                    )
                seen.add(id(p))
                params.append(p)
        if not params:
            raise ValueError("the optimizer has no trainable parameters of the module (all frozen?)")
        return params

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` per privacy unit (example, or user), composing every recorded step."""
        check_delta(delta)
        warn_weak_delta(delta, self.dataset_size)
        return self.accountant.get_epsilon(delta)

    def detach(self) -> None:
        """Undo ``make_private`` on every model made private with this engine: settle the ledger (``close``), remove
        every hook, give DDP its own gradient synchronisation back; the optimizers take no further step. The
        accountant keeps its history, so the same engine can make the model private again (e.g. with a new set of
        trainable parameters) and go on accounting for the same run."""
        self.close()
        for attached in self._attached:
            attached.optimizer.grad_sampler.detach()
            attached.state_guard.detach()
            attached.independence.detach()
            attached.optimizer.detached = True
            _PRIVATE_MODULES.discard(attached.hooked)
            if attached.hooked.__dict__.get("_module") is attached.hooked:
                del attached.hooked.__dict__["_module"]
            if isinstance(attached.module, DistributedDataParallel):
                attached.module.require_backward_grad_sync = True
                attached.module.require_forward_param_sync = True
        self._attached = []

    def _streams(self, attached: _Attachment) -> dict[str, Any]:
        sampling = attached.sampling.state_dict() if attached.sampling is not None else None
        return {"noise": attached.optimizer.random.state_dict(), "sampling": sampling}

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history, the dataset size, and per optimizer its step count and every random stream
        (noise and sampling) of every rank: loading it continues the streams instead of repeating them.

        Under DistributedDataParallel this gathers the ranks' streams, so every rank must call it (as with other
        collective calls); any rank's result can then be saved."""
        optimizers = []
        for attached in self._attached:
            streams = {attached.rank: self._streams(attached)}
            if isinstance(attached.module, DistributedDataParallel):
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, streams)
                streams = {rank: s for part in gathered for rank, s in part.items()}
            optimizer = attached.optimizer
            optimizers.append({"steps_taken": optimizer.steps_taken, "streams": streams})
            if optimizer.adaptive is not None:  # the bound adaptive clipping has reached
                optimizers[-1]["max_grad_norm"] = optimizer.max_grad_norm
        return {
            "accountant": self.accountant.state_dict(),
            "privacy_unit": self.privacy_unit,
            "dataset_size": self.dataset_size,
            "optimizers": optimizers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant; optimizer state (step count, random streams) applies to the optimizers made
        private so far, in order, and to those made private later for the rest."""
        self.accountant.load_state_dict(state["accountant"])
        self.privacy_unit = state.get("privacy_unit", self.privacy_unit)
        self.dataset_size = state.get("dataset_size")
        optimizer_states = list(state.get("optimizers", []))
        for attached in self._attached:
            if optimizer_states:
                self._restore(attached, optimizer_states.pop(0))
        self._pending_optimizer_states = optimizer_states

    @staticmethod
    def _restore(attached: _Attachment, state: dict[str, Any]) -> None:
        attached.optimizer.steps_taken = state["steps_taken"]
        if attached.optimizer.adaptive is not None and "max_grad_norm" in state:
            attached.optimizer.max_grad_norm = state["max_grad_norm"]
        streams = state.get("streams")
        if streams is None:  # written before sampling streams were saved: the noise stream only
            attached.optimizer.random.load_state_dict(state["random"])
            return
        mine = streams.get(attached.rank)
        if mine is None:
            raise ValueError(
                f"the saved engine state has random streams for ranks {sorted(streams)}, not for rank "
                f"{attached.rank}: resume with the world size it was saved with"
            )
        attached.optimizer.random.load_state_dict(mine["noise"])
        if attached.sampling is not None and mine["sampling"] is not None:
            attached.sampling.load_state_dict(mine["sampling"])
