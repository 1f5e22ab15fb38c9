"""DP-SGD under torch.distributed (gloo, 2 processes on localhost) equals one process on the same examples."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from dptrain import PrivacyEngine
from dptrain.sampling import PoissonBatchSampler
from dptrain.randomness import RandomSource

EXAMPLES = 12
NOISE_SEED = 1234
SIGMA, CLIP, LR = 1.0, 0.5, 0.3
MODES = ("auto", "vmap")


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(EXAMPLES, 6, generator=generator), torch.randint(0, 3, (EXAMPLES,), generator=generator))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _train_one_step(module: nn.Module, loader: DataLoader, mode: str) -> list[torch.Tensor]:
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    optimizer = torch.optim.SGD(inner.parameters(), lr=LR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, optimizer, loader = PrivacyEngine().make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            grad_sample_mode=mode,
            noise_generator=torch.Generator().manual_seed(NOISE_SEED),
        )
    for x, y in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(module(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in inner.parameters()]


def _rank_main(rank: int, world_size: int, rendezvous: str, out_path: str) -> None:
    # A file rendezvous: no TCP port to find free and race other processes for.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        shard = list(range(rank, EXAMPLES, world_size))  # each rank its own examples, as a DistributedSampler would
        for mode in MODES:
            loader = DataLoader(_data(), batch_size=len(shard), sampler=shard)
            params = _train_one_step(DistributedDataParallel(_model()), loader, mode)
            torch.save(params, f"{out_path}.{mode}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_with_the_same_noise_seed(tmp_path):
    single = _train_one_step(_model(), DataLoader(_data(), batch_size=EXAMPLES), "auto")
    out = str(tmp_path / "params")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    for mode in MODES:
        rank0, rank1 = torch.load(f"{out}.{mode}.0"), torch.load(f"{out}.{mode}.1")
        for a, b, expected in zip(rank0, rank1, single):
            assert torch.equal(a, b)  # ranks stay in sync
            torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    start = _model()
    moved = sum((a - s).abs().sum() for a, s in zip(single, start.parameters()))
    assert moved > 0


def test_distributed_poisson_shards_union_to_a_poisson_sample():
    """Each rank samples only its shard; every index is included at rate q, independently across ranks."""
    n, q, steps, world = 40, 0.25, 4000, 2
    counts = torch.zeros(n)
    samplers = [
        PoissonBatchSampler(n, q, steps, RandomSource(generator=torch.Generator().manual_seed(10 + r)), r, world)
        for r in range(world)
    ]
    together = torch.zeros(steps)  # co-inclusion of index 0 (rank 0) and index 1 (rank 1)
    for step, batches in enumerate(zip(*samplers)):
        for r, batch in enumerate(batches):
            assert all(i % world == r for i in batch)
            counts[batch] += 1
        together[step] = float(0 in batches[0] and 1 in batches[1])
    # Binomial(4000, 0.25): std of a frequency is sqrt(q(1-q)/steps) = 0.0068; 5 std = 0.034.
    assert (counts / steps - q).abs().max() < 0.034
    # Independence across ranks: P(both) = q^2 = 0.0625, std sqrt(q^2(1-q^2)/steps) = 0.0038; 5 std = 0.019.
    assert abs(together.mean().item() - q * q) < 0.019
