"""``BatchMemoryManager``: logical batches handed out in physical chunks, under Opacus' name and call pattern.

Opacus code reads::

    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=optimizer) as chunks:
        for x, y in chunks:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()

dptrain's private loader already splits each logical (Poisson) batch when ``make_private`` is given
``max_physical_batch_size``; this context manager sets that size on the loader for the duration of the block, so the
code above runs unchanged: ``step()`` after each chunk accumulates its clipped per-example gradients, and the real
(noised) step is taken after the logical batch's last chunk. Sampling and accounting are those of the logical
batches, as planned by ``make_private``.
"""

from __future__ import annotations

from typing import Any

from dptrain.sampling import DPDataLoader


class BatchMemoryManager:
    """Within ``with``, ``data_loader`` (the one ``make_private`` returned) yields chunks of at most
    ``max_physical_batch_size`` examples of each logical batch; ``optimizer`` is accepted for Opacus' signature."""

    def __init__(self, *, data_loader: DPDataLoader, max_physical_batch_size: int, optimizer: Any = None) -> None:
        if not isinstance(data_loader, DPDataLoader):
            raise ValueError(
                "BatchMemoryManager needs the data loader that make_private returned (it splits the private "
                f"loader's logical batches), got a {type(data_loader).__name__}"
            )
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or (
            max_physical_batch_size <= 0
        ):
            raise ValueError(f"max_physical_batch_size must be a positive integer, got {max_physical_batch_size!r}")
        self.data_loader, self.max_physical_batch_size, self.optimizer = data_loader, max_physical_batch_size, optimizer
        self._previous: int | None = None

    def __enter__(self) -> DPDataLoader:
        self._previous = self.data_loader.max_physical_batch_size
        self.data_loader.max_physical_batch_size = self.max_physical_batch_size
        return self.data_loader

    def __exit__(self, *exc: object) -> None:
        self.data_loader.max_physical_batch_size = self._previous
