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


@pytest.fixture(scope="session")
def clipped_run(tmp_path_factory) -> dict:
    """The ServerApp's report of ``federated_helpers.CLIPPED_RUN`` on Flower's simulation runtime, run once for the
    hand computation and the deployment test that compares against it."""
    from federated_helpers import CLIPPED_RUN, simulate  # Flower's runtime: loaded only by the tests that use it

    return simulate(tmp_path_factory.mktemp("clipped-run"), "simulated", **CLIPPED_RUN)
