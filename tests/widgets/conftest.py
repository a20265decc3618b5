"""A small synthetic pair (two 'modalities' of nested ellipsoids, the moving one shifted and noisy)
with a ground-truth label and a real (random-weight) checkpoint, so widget tests run in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse._napari_io import volume_to_layer_data
from napari_unifuse.data.misalign import warp_array
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import save_checkpoint

# Anisotropic spacing and an off-zero origin, so a layer placed in index space would visibly differ.
GEOMETRY_3D = Geometry(np.array([2.5, 1.25, 1.0]), np.array([-20.0, 12.0, 5.0]), np.eye(3))


def ellipsoid_pair(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference, moving, label): label is the moving contrast on the reference grid."""
    # An axis of one voxel (a one-slice volume) samples the centre.
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape], indexing="ij"))
    radius = np.sqrt(sum(axis**2 for axis in grid / np.array([0.8, 0.7, 0.6][-len(shape):]).reshape(-1, *[1] * len(shape))))
    head, core = (radius < 0.9).astype(np.float32), (radius < 0.45).astype(np.float32)
    reference = 0.3 * head + 0.6 * core  # "T1": bright core
    label = 0.8 * head - 0.5 * core  # "T2": dark core
    shift = np.zeros((len(shape), *shape), np.float32)
    shift[-1] += 2.0  # two voxels along x: a misalignment the error map can see
    rng = np.random.default_rng(seed)
    moving = warp_array(label, shift) + rng.normal(0, 0.03, shape).astype(np.float32)
    return reference.astype(np.float32), moving.astype(np.float32), label.astype(np.float32)


def add_pair(viewer, shape=(16, 48, 48), geometry=GEOMETRY_3D, names=("T1", "T2")):
    """Reference, moving and hidden ground-truth layers, tagged with their roles like sample data."""
    reference, moving, label = ellipsoid_pair(shape)
    layers = ((reference, names[0], "reference"), (moving, names[1], "moving"),
              (label, f"{names[1]} ground truth", "label"))
    for array, name, role in layers:
        data, kwargs, _ = volume_to_layer_data(ImageVolume(array, geometry), name)
        kwargs["metadata"]["unifuse"]["role"] = role
        viewer.add_image(data, visible=role != "label", **kwargs)
    return reference, moving, label


@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory):
    """Random-weight small-preset checkpoints saved for real (2D and 3D)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {dims: save_checkpoint(UniFuse(UniFuseConfig.small(dims)), folder / f"tiny{dims}d", {"seed": dims})
            for dims in (2, 3)}


@pytest.fixture
def notifications():
    """Every message the workbench shows, as (severity, text)."""
    from napari.utils.notifications import notification_manager

    shown: list[tuple[str, str]] = []

    def record(notification) -> None:
        shown.append((str(notification.severity), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield shown
    notification_manager.notification_ready.disconnect(record)
