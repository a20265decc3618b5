"""UniFuseConfig: presets, validation and dict round trip."""

import json

import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.model import UniFuseConfig


@pytest.mark.parametrize("preset", ["paper", "small"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_dict_round_trip_through_json(preset, spatial_dims):
    config = getattr(UniFuseConfig, preset)(spatial_dims)
    restored = UniFuseConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.spatial_dims == spatial_dims


def test_paper_preset_uses_the_sizes_the_paper_gives():
    config = UniFuseConfig.paper(3)
    assert config.num_regblocks == 4  # Table 5
    assert config.num_classes == 4   # none, motion, metal, low-dose


def test_size_multiple_covers_patching_and_unet_pooling():
    config = UniFuseConfig(patch_size=2, num_regblocks=2, regblock_channels=(16, 16),
                           unet_channels=(16, 16, 16, 16))
    assert config.size_multiple == 8
    assert UniFuseConfig.small(2).size_multiple == 4


@pytest.mark.parametrize(("changes", "problem"), [
    ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
    ({"patch_size": 6}, "power of two"),
    ({"patch_size": 32}, "needs 5 upsampling RegBLKs"),
    ({"regblock_channels": (64, 64)}, "expected num_regblocks=4"),
    ({"unet_channels": (16, 24)}, "multiples of head_dim=16"),
    ({"slab_size": 6}, "multiple of patch_size"),
    ({"lora_rank": 0}, "lora_rank must be a positive integer"),
    ({"correlation_levels": 0}, "correlation_levels must be a positive integer"),
    ({"matching_step": 0}, "matching_step must be a positive integer"),
    ({"matching_range": -1}, "matching_range must be a non-negative integer"),
])
def test_invalid_configs_are_rejected_with_the_reason(changes, problem):
    with pytest.raises(InputError, match=problem):
        UniFuseConfig(**changes)


def test_unknown_fields_are_named():
    values = UniFuseConfig.small(2).to_dict() | {"colour": 3}
    with pytest.raises(InputError, match="colour"):
        UniFuseConfig.from_dict(values)


def test_differences_lists_only_changed_fields():
    # The small 3-D preset searches a shorter range: it trains on 32³ crops.
    assert UniFuseConfig.small(2).differences(UniFuseConfig.small(3)) == {
        "spatial_dims": (2, 3), "matching_range": (32, 12)}
