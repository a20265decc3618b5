"""The provenance records the device the user asked for ("auto" included) beside the one the run used."""

from __future__ import annotations

import numpy as np
import torch

from napari_unifuse.engine.device import resolve_device
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig


def test_a_run_left_on_auto_records_auto_and_the_device_auto_chose():
    torch.manual_seed(0)
    config = UniFuseConfig.from_dict({**UniFuseConfig.small(spatial_dims=2).to_dict(),
                                      "matching_mutual_information": False})
    y, x = np.mgrid[:24, :20]
    image = ImageVolume(np.exp(-((y - 12.0) ** 2 + (x - 9.0) ** 2) / 30).astype(np.float32), Geometry.identity(2))

    provenance = FusionEngine(UniFuse(config), device="auto").run_fusion(image, image, quality=False).provenance

    assert provenance["requested_device"] == "auto"
    assert provenance["device"] == str(resolve_device("auto"))


def test_a_device_object_is_recorded_as_its_name():
    """A torch.device handed in (the Python API) went into the provenance as an object JSON cannot hold."""
    engine = FusionEngine(load_method("identity+average", spatial_dims=2), device=torch.device("cpu"))
    assert engine.requested_device == "cpu"
