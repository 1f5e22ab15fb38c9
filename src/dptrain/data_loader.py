"""Opacus' ``opacus.data_loader`` name for dptrain's private data loader (``DPDataLoader.from_data_loader``)."""

from dptrain.sampling import DPDataLoader

__all__ = ["DPDataLoader"]
