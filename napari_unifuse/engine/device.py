"""Which torch device inference runs on (``auto`` | ``cuda`` | ``cpu``), and what running out of
its memory looks like."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from napari_unifuse.errors import UniFuseError

DEVICE_CHOICES = ("auto", "cuda", "cpu")


def resolve_device(requested: str = "auto") -> torch.device:
    """Turn the user's choice into a device; ``auto`` picks CUDA when there is one.

    Asking for CUDA explicitly on a machine without it is an error rather than a silent CPU run,
    so that a user who expects GPU speed learns at once why it will not happen.
    """
    choice = str(requested).strip().lower()
    if choice not in DEVICE_CHOICES:
        raise UniFuseError(f"unknown device {requested!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UniFuseError(
            "CUDA was requested but this torch build or machine has no usable CUDA GPU "
            f"(torch {torch.__version__}); choose device auto or cpu"
        )
    return torch.device(choice)


# What a failed host allocation says when it arrives as a plain RuntimeError: torch's CPU
# allocator, and ITK's image buffers (SimpleITK's filters, e.g. a resampling to a huge grid).
_HOST_ALLOCATION_FAILURES = ("DefaultCPUAllocator", "Failed to allocate memory")
# GPU libraries that allocate their own workspace report a failure as a plain RuntimeError:
# cuBLAS and cuDNN inside torch, and older torch or extensions (mamba-ssm, Triton) for CUDA itself.
_DEVICE_ALLOCATION_FAILURES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                               "CUDNN_STATUS_NOT_ENOUGH_MEMORY", "cudaErrorMemoryAllocation")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: CUDA's ``torch.OutOfMemoryError``, numpy's
    ``MemoryError``, or an allocator that reports it as a plain ``RuntimeError`` (torch's
    "DefaultCPUAllocator: can't allocate memory", ITK's "Failed to allocate memory for image",
    cuBLAS's "CUBLAS_STATUS_ALLOC_FAILED"), so that only its message tells."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(
        sign in str(error) for sign in (*_HOST_ALLOCATION_FAILURES, *_DEVICE_ALLOCATION_FAILURES))


@contextmanager
def out_of_memory_explained(message: Callable[[], str]) -> Iterator[None]:
    """A failed allocation (:func:`is_out_of_memory`) inside the block becomes a one-line
    UniFuseError of ``message()``, read when it happens (the stage that failed is known only then);
    any other error passes through."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise UniFuseError(message()) from error
