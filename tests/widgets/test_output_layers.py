"""A run's map layers saved with napari's own File → Save Selected Layer(s) through our writer land
where every tool shows the reference, as the workbench's Save outputs writes them."""

from __future__ import annotations

import napari
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from napari.layers import Image

from napari_unifuse._napari_io import LAYER_METADATA_KEY
from napari_unifuse._qt.outputs import OutputNames
from napari_unifuse._qt.run_panel import OUTPUT_ROLE
from napari_unifuse.engine.quality import MAP_LABELS

from .conftest import ellipsoid_pair
from .test_workbench import make_workbench, run_and_wait

pytestmark = pytest.mark.gui

_SFORM = np.array([[1.5, 0, 0, -40.0], [0, 1.5, 0, -30.0], [0, 0, 1.5, 20.0], [0, 0, 0, 1]])  # plane at z = 20 mm
HEADERS = {
    # Every tool guesses: nibabel centred with x flipped, ITK at origin 0.
    "no orientation 0/0": {"qform_code": 0, "sform_code": 0, "qform_shift": 0.0},
    # ITK reads the qform, nibabel the sform.
    "qform 2 4 mm from an MNI sform 4": {"qform_code": 2, "sform_code": 4, "qform_shift": 4.0},
}


def _write_2d_nifti(path, array: np.ndarray, *, qform_code: int, sform_code: int, qform_shift: float) -> None:
    qform = _SFORM.copy()
    qform[0, 3] += qform_shift
    image = nib.Nifti1Image(np.ascontiguousarray(array.T), _SFORM)  # nibabel's axes are (x, y)
    image.set_sform(_SFORM, code=sform_code)
    image.set_qform(qform, code=qform_code)
    image.to_filename(path)


@pytest.mark.parametrize("header", HEADERS.values(), ids=HEADERS.keys())
def test_map_layers_saved_through_the_plugin_writer_keep_the_reference_header(make_napari_viewer, qtbot, tmp_path,
                                                                             checkpoint_files, notifications, header):
    """The maps had only scale and translate: saved, a codes-0 reference's maps were shifted and
    y-flipped in ITK, and a reference with disagreeing forms got its sform in both (codes 1/1)."""
    reference, moving, _ = ellipsoid_pair((48, 48))
    for name, array in (("ref", reference), ("mov", moving)):
        _write_2d_nifti(tmp_path / f"{name}.nii.gz", array, **header)
    viewer = make_napari_viewer()
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    for name in ("ref", "mov"):
        viewer.open(str(tmp_path / f"{name}.nii.gz"), plugin="napari-unifuse")
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications

    names = OutputNames.for_inputs("ref", "mov")
    maps = [layer for layer in viewer.layers
            if isinstance(layer, Image) and layer.metadata[LAYER_METADATA_KEY].get("role") == OUTPUT_ROLE
            and layer.name not in (names.fused, names.aligned)]
    assert {names.error, names.jacobian, names.grid, names.checkerboard,
            *(names.quality_map(name) for name in MAP_LABELS)} <= {layer.name for layer in maps}
    theirs = nib.load(tmp_path / "ref.nii.gz").header
    itk_reference = sitk.ReadImage(str(tmp_path / "ref.nii.gz"))
    for index, layer in enumerate(maps):
        path = tmp_path / f"map{index}.nii.gz"
        assert napari.save_layers(str(path), [layer], plugin="napari-unifuse") == [str(path)], layer.name
        ours = nib.load(path).header
        assert (ours["qform_code"], ours["sform_code"]) == (theirs["qform_code"], theirs["sform_code"]), layer.name
        np.testing.assert_allclose(ours.get_qform(), theirs.get_qform(), atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(ours.get_sform(), theirs.get_sform(), atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(nib.load(path).affine, nib.load(tmp_path / "ref.nii.gz").affine, atol=1e-4,
                                   err_msg=layer.name)  # the plane height (z = 20 mm) included
        itk_map = sitk.ReadImage(str(path))
        np.testing.assert_allclose(itk_map.GetOrigin(), itk_reference.GetOrigin(), atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(itk_map.GetDirection(), itk_reference.GetDirection(), atol=1e-6,
                                   err_msg=layer.name)


def test_a_rerun_keeps_the_display_settings_a_reviewer_changed_and_only_those(make_napari_viewer, qtbot, tmp_path,
                                                                                checkpoint_files, notifications):
    """A re-run used to reset every window, colour map and hidden layer to the workbench's own."""
    from napari_unifuse.io.image import Geometry

    from .conftest import add_pair

    viewer = make_napari_viewer()
    add_pair(viewer, shape=(48, 48), geometry=Geometry.identity(2), names=("MR", "CT"))
    workbench = make_workbench(viewer, tmp_path, checkpoint_files[2])
    run_and_wait(qtbot, workbench)
    assert workbench.outcome is not None, notifications
    names = OutputNames.for_inputs("MR", "CT")
    fused, error = viewer.layers[names.fused], viewer.layers[names.error]
    fused.contrast_limits, fused.colormap, fused.opacity, fused.gamma = (0.1, 0.5), "viridis", 0.5, 0.7
    error.visible, error.blending = False, "translucent"
    untouched = {name: (viewer.layers[name].colormap.name, tuple(viewer.layers[name].contrast_limits),
                        viewer.layers[name].visible) for name in (names.jacobian, names.aligned)}
    earlier = fused
    workbench.run_panel.tile_size.value = 32  # another run of the same pair, replacing its layers
    run_and_wait(qtbot, workbench)
    fused, error = viewer.layers[names.fused], viewer.layers[names.error]
    assert fused is not earlier
    assert (tuple(fused.contrast_limits), fused.colormap.name, fused.opacity, fused.gamma) == ((0.1, 0.5), "viridis",
                                                                                               0.5, 0.7)
    assert (error.visible, str(error.blending)) == (False, "translucent")
    assert {name: (viewer.layers[name].colormap.name, tuple(viewer.layers[name].contrast_limits),
                   viewer.layers[name].visible) for name in untouched} == untouched
