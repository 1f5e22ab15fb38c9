"""What ``make_private`` checks and builds before it attaches anything: the training set a loader draws from, the
privacy unit's arguments, the weak-delta warning, the model's validity, how batches are drawn (``plan_batches``) and
their randomness, the ledger reservation, and DDP's own synchronisation switched off. Split from ``dptrain.engine`` (one concept: the engine's preconditions)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from dptrain.randomness import RandomSource, fresh_generator
from dptrain.sampling import PoissonBatchSampler, UserPoissonBatchSampler, sample_space
from dptrain.validators import ModuleValidator, UnsupportedModuleError

if TYPE_CHECKING:
    from dptrain.budget import BudgetLedger

LOSS_REDUCTIONS = ("mean", "sum")
PRIVACY_UNITS = ("example", "user")
USER_REDUCTIONS = ("sum", "mean")

def training_set(data_loader: DataLoader, distributed: bool = False) -> tuple[torch.Tensor | None, int]:
    """The dataset indices the loader trains on (None: all of them) and their number N, for sampling and
    accounting: a loader's own sampler over a subset (a train split) is honoured, never silently widened. Under
    DDP each rank's sampler is its part (as a DistributedSampler's shard is): the training set is their union."""
    try:
        steps = len(data_loader)
        size = len(data_loader.dataset)
    except TypeError as err:
        raise ValueError(
            "data_loader must have a length (a map-style dataset with __len__): Poisson sampling and accounting "
            "need the dataset size N and the number of steps per epoch"
        ) from err
    if size == 0 or steps == 0:
        raise ValueError("data_loader is empty: there is nothing to train on")
    indices = sample_space(data_loader)
    if distributed:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, indices)
        if any(part is None for part in parts):
            indices = None
        else:
            indices = torch.unique(torch.cat(parts))
            indices = None if len(indices) == size else indices
    return indices, size if indices is None else len(indices)


def seed_if_fresh(generator: torch.Generator | None) -> int | None:
    """The seed of a user's generator that has not drawn anything since it was seeded (a run starting from that
    seed, which the ledger checks for reuse), else None."""
    if generator is None or generator.device.type != "cpu":
        return None
    seed = generator.initial_seed()
    return seed if torch.equal(generator.get_state(), torch.Generator().manual_seed(seed).get_state()) else None


def warn_weak_delta(delta: float, dataset_size: int | None) -> None:
    if dataset_size and delta >= 1.0 / dataset_size:
        warnings.warn(
            f"delta={delta} >= 1/N = {1.0 / dataset_size:.3g}: a mechanism that publishes one random example in full "
            "satisfies this delta, so the guarantee is weak; choose delta well below 1/N (e.g. 1/N^1.1)",
            stacklevel=3,
        )


def check_privacy_unit(
    privacy_unit: str, user_ids: Any, user_reduction: str, poisson_sampling: bool, data_loader: DataLoader
) -> torch.Tensor | None:
    """The user of each example as a tensor under user-level privacy (None at example level), after checks."""
    if privacy_unit not in PRIVACY_UNITS:
        raise ValueError(f"privacy_unit must be one of {PRIVACY_UNITS}, got {privacy_unit!r}")
    if privacy_unit == "example":
        if user_ids is not None:
            raise ValueError('user_ids is only used with privacy_unit="user"')
        return None
    if user_reduction not in USER_REDUCTIONS:
        raise ValueError(f"user_reduction must be one of {USER_REDUCTIONS}, got {user_reduction!r}")
    if not poisson_sampling:
        raise ValueError('privacy_unit="user" samples users by Poisson sampling; poisson_sampling=False is not supported')
    if user_ids is None:
        raise ValueError('privacy_unit="user" needs user_ids: the user of each example of the dataset')
    users = torch.as_tensor(user_ids)
    if users.dim() != 1 or users.dtype.is_floating_point or users.dtype == torch.bool:
        raise ValueError(f"user_ids must be a 1-D sequence of integer ids, got shape {tuple(users.shape)}, {users.dtype}")
    training_set(data_loader)  # a loader without a length or with no example fails here
    size = len(data_loader.dataset)
    if len(users) != size:
        raise ValueError(f"user_ids has {len(users)} entries but the dataset has {size} examples; give one per example")
    return users.long()


def refuse_invalid_model(module: nn.Module) -> None:
    errors = ModuleValidator.validate(module)
    if errors:
        raise UnsupportedModuleError.of(errors)  # a ValueError, as in Opacus


def sampling_source(secure: bool, generator: torch.Generator | None, rank: int, world_size: int) -> RandomSource:
    """Randomness for Poisson sampling: independent across ranks (correlated shards would break the analysis); a
    seeded user generator is shared with the noise in one process, and offset by rank under DDP."""
    if secure:
        return RandomSource(secure=True)
    if generator is None:
        return RandomSource(generator=fresh_generator())
    if world_size == 1:
        return RandomSource(generator=generator)
    return RandomSource(generator=torch.Generator().manual_seed(generator.initial_seed() + 1 + rank))


def stop_ddp_synchronisation(module: DistributedDataParallel) -> None:
    """Turn off DDP's own gradient all-reduce and buffer broadcasts for good: the DP optimizer makes the one
    reduction of each logical step (clipped sums plus rank 0's noise). Left on, DDP's bucket all-reduces would run
    once per backward pass, so ranks with different numbers of physical chunks would pair the DP all-reduce with a
    DDP bucket of raw gradients. DDP has already broadcast rank 0's parameters when it was constructed."""
    if module.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) cannot run with its gradient synchronisation off, which the "
            "DP engine needs (it makes the one reduction of each step itself): build DDP without static_graph"
        )
    module.require_backward_grad_sync = False
    module.require_forward_param_sync = False


@dataclass(frozen=True)
class BatchPlan:
    """How a private loader draws its logical batches: the sampler, its rate and expected size, the randomness of
    Poisson sampling (None for the loader's own shuffling) and the number of sampled units (examples or users)."""

    batch_sampler: Any
    sample_rate: float
    expected_batch_size: float
    sampling: RandomSource | None
    units: int


def plan_batches(
    data_loader: DataLoader,
    users: torch.Tensor | None,
    indices: torch.Tensor | None,
    poisson_sampling: bool,
    dataset_size: int,
    secure_mode: bool,
    noise_generator: torch.Generator | None,
    rank: int,
    world_size: int,
) -> BatchPlan:
    """Users or examples Poisson-sampled at q = 1/len(data_loader), or (``poisson_sampling=False``, warned) the
    loader's own shuffled batches."""
    steps_per_epoch = len(data_loader)
    if users is not None and indices is not None:
        raise ValueError(
            'privacy_unit="user" samples users from the whole dataset, but the data loader has a sampler over a '
            "subset of it: pass a loader (and user_ids) over the examples to train on only"
        )
    if users is not None:
        # Every user is sampled at rate q = 1/len(data_loader), with all of its examples.
        sample_rate = 1.0 / steps_per_epoch
        sampling = sampling_source(secure_mode, noise_generator, rank, world_size)
        batch_sampler = UserPoissonBatchSampler(users, sample_rate, steps_per_epoch, sampling, rank, world_size)
        return BatchPlan(batch_sampler, sample_rate, sample_rate * batch_sampler.num_users, sampling,
                         batch_sampler.num_users)  # fmt: skip
    if poisson_sampling:
        # The whole dataset is sampled at rate q = 1/len(data_loader): one epoch sees N examples in expectation.
        sample_rate = 1.0 / steps_per_epoch
        sampling = sampling_source(secure_mode, noise_generator, rank, world_size)
        batch_sampler = PoissonBatchSampler(
            dataset_size, sample_rate, steps_per_epoch, sampling, rank, world_size, indices=indices
        )
        return BatchPlan(batch_sampler, sample_rate, sample_rate * dataset_size, sampling, dataset_size)
    if data_loader.batch_size is None:
        raise ValueError("poisson_sampling=False needs a data loader with a fixed batch_size (not a custom batch_sampler)")
    warnings.warn(
        "poisson_sampling=False: batches come from the data loader's own shuffling, but the accountant assumes "
        "Poisson sampling (as Opacus does); the reported epsilon is then not a proven guarantee. "
        "Use poisson_sampling=True for a guarantee that holds.",
        stacklevel=4,
    )
    batch_size = data_loader.batch_size * world_size
    return BatchPlan(data_loader.batch_sampler, batch_size / dataset_size, float(batch_size), None, dataset_size)


def reserve_steps(
    ledger: "BudgetLedger",
    budget: str,
    note: str,
    sample_rate: float,
    noise_multiplier: float,
    planned_steps: int | None,
    rank: int,
    world_size: int,
    sampling: str,
    seed: int | None,
) -> tuple[int | None, int]:
    """Reserve ``planned_steps`` (or all the budget allows) in the ledger: (entry id, steps allowed).

    Only rank 0 writes; the allowance is broadcast so that every rank stops at the same step. ``sampling`` labels
    the entry ("poisson" or "shuffled"); ``seed``, the seed the run's noise starts from, lets the ledger warn
    about a run that repeats an earlier one's randomness.
    """
    entry_id, allowance = None, 0
    if rank == 0:
        if planned_steps is None:
            allowance = ledger.max_steps(budget, sample_rate, noise_multiplier)
            # With nothing left, reserving one step raises BudgetExceededError naming cap, spent and cost.
            steps = max(allowance, 1)
        else:
            allowance = steps = planned_steps
        entry_id = ledger.reserve(
            budget,
            sample_rate,
            noise_multiplier,
            steps,
            note=f"{note}dptrain run, {steps} steps reserved",
            sampling=sampling,
            seed=seed,
        )
    if world_size > 1:
        shared = [allowance]
        dist.broadcast_object_list(shared, src=0)
        allowance = shared[0]
    return entry_id, allowance
