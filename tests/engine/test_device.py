from __future__ import annotations

import pytest
import torch

from napari_unifuse.engine.device import resolve_device
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
    with pytest.raises(UniFuseError, match="CUDA was requested.*use --device auto or cpu"):
        resolve_device("cuda")


def test_unknown_device_lists_the_choices():
    with pytest.raises(UniFuseError, match="auto, cuda, cpu"):
        resolve_device("gpu")
