"""Opacus' ``opacus.distributed.DifferentiallyPrivateDistributedDataParallel`` under its name.

dptrain takes torch's own ``DistributedDataParallel`` in ``make_private`` (each rank clips its examples, the clipped
sums are all-reduced once per logical step, rank 0 alone adds the noise; DDP's own gradient synchronisation is
switched off while the engine owns the reduction), so this is that class, constructed the way Opacus' examples
construct it: ``DifferentiallyPrivateDistributedDataParallel(model)``.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DifferentiallyPrivateDistributedDataParallel(DistributedDataParallel):
    """``DistributedDataParallel(model)``: parameters broadcast from rank 0 at construction, as in Opacus."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
