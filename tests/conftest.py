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


@pytest.fixture(autouse=True)
def small_3d_samples(monkeypatch):
    """The bundled 3D samples are clinical size (176 × 216 × 180); tests open the same head at
    64 × 80 × 64, which builds in a second instead of a minute."""
    from napari_unifuse.data import samples

    monkeypatch.setattr(samples, "SAMPLE_SHAPE_3D", samples.SMALL_SAMPLE_SHAPE_3D)


@pytest.fixture
def smallest_unifuse():
    """``build(spatial_dims)``: the smallest UniFuse the config allows, seeded, for tests whose cost
    is the network per voxel or that only need its outputs' layout."""
    from napari_unifuse.model import UniFuse, UniFuseConfig

    def build(spatial_dims: int) -> UniFuse:
        torch.manual_seed(0)
        config = UniFuseConfig.from_dict({
            **UniFuseConfig.small(spatial_dims=spatial_dims).to_dict(), "feature_channels": 2, "embed_dim": 8,
            "d_state": 2, "prompt_length": 2, "regblock_channels": (8, 4), "unet_channels": (4, 8), "lora_rank": 1,
        })
        return UniFuse(config)

    return build


@pytest.fixture
def cancel_after():
    """``make(calls, allowed)``: a ``check_cancelled`` callable that appends to ``calls`` at every
    call and raises ``errors.Cancelled`` (what the engine's Cancel raises) from call ``allowed + 1`` on."""
    from napari_unifuse.errors import Cancelled

    def make(calls: list[int], allowed: int):
        def check() -> None:
            calls.append(1)
            if len(calls) > allowed:
                raise Cancelled("cancelled by the test")

        return check

    return make
