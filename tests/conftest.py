"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread_torch():
    """The tests use tiny tensors: intra-op threads only add OpenMP spin-waiting, which on the
    shared 2-core CI machine made a model forward pass 30x slower (4 s instead of 0.13 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
