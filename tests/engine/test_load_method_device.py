"""load_method and method_from_checkpoint take the device as FusionEngine does (auto | cuda | cpu)."""

import pytest
import torch

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method, method_from_checkpoint
from napari_unifuse.errors import UniFuseError

BUNDLED = "mmif-amin-2d-harvard"  # a network method's bundled weights


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def engine_cuda_message() -> str:
    with pytest.raises(UniFuseError) as refused:
        FusionEngine(load_method("identity+average"), device="cuda")
    return str(refused.value)


def test_cuda_without_cuda_is_the_engines_one_line_error(no_cuda):
    with pytest.raises(UniFuseError) as refused:
        load_method("mmif-amin", device="cuda")
    assert str(refused.value) == engine_cuda_message()
    assert "\n" not in str(refused.value)


def test_method_from_checkpoint_refuses_cuda_the_same_way(no_cuda):
    with pytest.raises(UniFuseError) as refused:
        method_from_checkpoint(BUNDLED, device="cuda")
    assert str(refused.value) == engine_cuda_message()


def test_the_device_is_checked_before_the_weights_load(no_cuda, tmp_path):
    with pytest.raises(UniFuseError, match="CUDA was requested"):
        load_method("mmif-amin", checkpoint=tmp_path / "missing.safetensors", device="cuda")


def test_auto_without_cuda_puts_the_network_on_the_cpu(no_cuda):
    method = method_from_checkpoint(BUNDLED, device="auto")
    assert {parameter.device.type for parameter in method.network.parameters()} == {"cpu"}


def test_an_unknown_device_names_the_choices():
    with pytest.raises(UniFuseError, match="unknown device 'tpu'; choose one of auto, cuda, cpu"):
        load_method("identity+average", device="tpu")


def test_a_particular_device_is_taken_as_given():
    """A torchrun process's device (torch.device("cuda", rank)) or "cpu:0" was refused as unknown."""
    for device in (torch.device("cpu", 0), "cpu:0", torch.device("cpu")):
        tensors = [*load_method("mmif-amin", spatial_dims=2, device=device).network.parameters()]
        assert tensors and all(tensor.device.type == "cpu" for tensor in tensors)


def test_a_particular_cuda_device_without_cuda_is_the_engines_one_line_error(no_cuda):
    with pytest.raises(UniFuseError, match="CUDA was requested"):
        load_method("identity+average", spatial_dims=2, device=torch.device("cuda", 1))
