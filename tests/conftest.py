"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The tests' models are tiny: one intra-op thread is as fast, and avoids OpenMP oversubscription (tests ~10x
    slower) when the 2-core machine is shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
