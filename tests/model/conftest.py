"""Fixtures shared by the model tests."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """Torch on two threads for the test (the count that one_thread pins and must give back)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
