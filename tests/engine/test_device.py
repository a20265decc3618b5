from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_unifuse.engine.device import is_out_of_memory, resolve_device
from napari_unifuse.errors import UniFuseError


def test_auto_prefers_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("AUTO") == torch.device("cuda")


def test_cpu_is_always_cpu():
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UniFuseError, match="CUDA was requested.*; choose device auto or cpu$"):
        resolve_device("cuda")


def test_unknown_device_lists_the_choices():
    with pytest.raises(UniFuseError, match="auto, cuda, cpu"):
        resolve_device("gpu")


def failed_allocation(allocate) -> BaseException:
    """What ``allocate`` raises when asked for far more memory than any machine has (40 TB)."""
    with pytest.raises(Exception) as caught:  # noqa: PT011 - which type each library raises is the point
        allocate(10**13)
    return caught.value


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_a_gpu_library_that_fails_to_allocate_is_out_of_memory(message):
    """cuBLAS and cuDNN raise plain RuntimeErrors: without reading them the engine neither halves
    its tiles nor says what ran out, and a traceback reaches the user."""
    assert is_out_of_memory(RuntimeError(message))


def test_a_failed_host_allocation_is_out_of_memory_whoever_made_it():
    torch_error = failed_allocation(torch.empty)
    assert not isinstance(torch_error, torch.OutOfMemoryError)  # a plain RuntimeError: why the message is read
    assert is_out_of_memory(torch_error)
    assert is_out_of_memory(failed_allocation(np.empty))
    itk_error = failed_allocation(lambda size: sitk.Image([int(size**0.5)] * 2, sitk.sitkFloat32))
    assert type(itk_error) is RuntimeError  # noqa: E721 - ITK's buffers fail as plain RuntimeErrors too
    assert is_out_of_memory(itk_error)
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator"))
