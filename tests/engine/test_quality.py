"""QualityMaps: per-slice scores, suspicious-slice navigation, the JSON summary; the engine's quality stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import load_method
from napari_unifuse.engine.outputs import QUALITY_FILE, is_complete, write_fusion_outputs
from napari_unifuse.engine.quality import (
    INVENTED,
    LOST,
    RESTORATION_CHANGE,
    UNCERTAINTY,
    QualityMaps,
    quality_maps,
)
from napari_unifuse.io import Geometry, ImageVolume, read_image
from napari_unifuse.model import UniFuse, UniFuseConfig

THRESHOLDS = {INVENTED: 0.1, LOST: 0.1, RESTORATION_CHANGE: 0.1, UNCERTAINTY: 1.0}


def volume_maps(shape=(8, 20, 20)) -> dict[str, np.ndarray]:
    return {name: np.zeros(shape, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY)}


def test_slice_scores_are_flagged_fractions_and_suspicion_their_maximum():
    maps = volume_maps()
    maps[INVENTED][2, :5, :4] = 0.5  # 20 of 400 voxels
    maps[LOST][2, :2, :2] = 0.5  # 4 of 400
    maps[UNCERTAINTY][5, :10, :] = 2.0  # half the slice
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.slice_scores[INVENTED][2] == pytest.approx(0.05)
    assert quality.slice_scores[LOST][2] == pytest.approx(0.01)
    assert quality.suspicion[2] == pytest.approx(0.05)
    assert quality.suspicion[5] == pytest.approx(0.5)
    assert quality.suspicion[0] == 0.0
    assert quality.suspicious_slices() == [2, 5]
    assert quality.dominant_problem(2) == "hallucinated structure"
    assert quality.dominant_problem(5) == "misalignment"
    assert quality.worst_slices(2) == [5, 2]


def test_in_a_volume_only_slices_that_stand_out_from_the_rest_are_suspicious():
    """A map that flags a little of every slice (5 %, with some spread) sends a reviewer only to the
    slice where it flags much more; each flag is still above the flag level."""
    maps = volume_maps((24, 20, 20))
    for index in range(24):
        maps[LOST][index, : 1 + index % 3, :] = 1.0  # 5-15 % of every slice
    maps[LOST][17, :12, :] = 1.0  # 60 %
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert (quality.slice_scores[LOST] > quality.flag_level).all()
    assert quality.suspicious_slices() == [17]
    assert quality.worst_slices(1) == [17]


def test_cutoffs_are_the_scores_a_map_must_beat_to_make_a_slice_suspicious():
    """The workbench plot draws them: in a volume the typical score's outlier margin where it is above
    the flag level, the flag level otherwise and in a volume too short for a typical score."""
    maps = volume_maps((24, 20, 20))
    for index in range(24):
        maps[LOST][index, : 1 + index % 3, :] = 1.0  # 5, 10, 15 % in turn: median 10 %, MAD 5 %
    maps[LOST][17, :12, :] = 1.0  # 60 %
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    cutoffs = quality.cutoffs()
    assert cutoffs[LOST] == pytest.approx(0.10 + 3 * 1.4826 * 0.05, rel=1e-5)
    assert cutoffs[INVENTED] == quality.flag_level  # flags nothing: a typical score of 0 is under the level
    above = np.flatnonzero(quality.slice_scores[LOST] > cutoffs[LOST])
    assert quality.suspicious_slices() == above.tolist() == [17]
    short = QualityMaps.from_maps(volume_maps((7, 20, 20)) | {LOST: maps[LOST][:7]}, THRESHOLDS)
    assert set(short.cutoffs().values()) == {short.flag_level}
    assert short.suspicious_slices() == list(range(7))


def test_a_value_at_the_threshold_is_not_flagged():
    maps = volume_maps()
    maps[RESTORATION_CHANGE][:] = THRESHOLDS[RESTORATION_CHANGE]
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.suspicious_slices() == []
    assert quality.next_suspicious(3) is None


def test_next_and_previous_suspicious_slice_wrap_around():
    maps = volume_maps()
    for index in (1, 6):
        maps[LOST][index] = 1.0
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.next_suspicious(0) == 1
    assert quality.next_suspicious(1) == 6
    assert quality.next_suspicious(6) == 1
    assert quality.next_suspicious(7, step=-1) == 6
    assert quality.next_suspicious(1, step=-1) == 6
    assert quality.dominant_problem(6) == "lost structure"


def test_a_2d_image_is_one_slice_and_uncertainty_is_optional():
    maps = {name: np.zeros((16, 16), np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    maps[RESTORATION_CHANGE][4:8, 4:8] = 0.3
    quality = QualityMaps.from_maps({**maps, UNCERTAINTY: None}, THRESHOLDS)
    assert quality.uncertainty_mm is None
    assert set(quality.slice_scores) == {INVENTED, LOST, RESTORATION_CHANGE}
    assert quality.suspicion.shape == (1,)
    assert quality.to_dict()["slice_axis"] is None
    assert quality.next_suspicious(0) == 0
    assert quality.dominant_problem(0) == "restoration change"


@pytest.mark.parametrize("shape", [(20, 20, 1), (20, 1, 20), (1, 20, 20)], ids=["sagittal", "coronal", "axial"])
def test_a_one_slice_volume_is_one_image_whichever_axis_holds_the_slice(shape):
    """Stored as x = 1 voxel, a sagittal slice was scored as 20 one-voxel lines along axis 0, none
    flagged, though 6 % of the image was lost structure."""
    maps = volume_maps(shape)
    plane = maps[LOST].reshape(20, 20)  # a view of the one slice, whichever axis holds it
    plane[:2, :10] = 1.0  # 5 % of the image: a tenth of the few lines it lies in
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    assert quality.slice_count == 1 and quality.slice_axis is None
    assert quality.slice_scores[LOST].tolist() == [pytest.approx(0.05)]
    assert quality.suspicious_slices() == [0] and quality.flagged_by(0) == [LOST]
    assert quality.to_dict()["slice_axis"] is None


def test_summary_is_json_with_no_voxel_arrays():
    maps = volume_maps()
    maps[INVENTED][3, 0, 0:10] = 1.0
    quality = QualityMaps.from_maps(maps, THRESHOLDS)
    summary = json.loads(json.dumps(quality.to_dict()))
    assert summary["suspicious_slices"] == [3]
    assert summary["problems"] == {"3": "hallucinated structure"}
    assert summary["thresholds"] == THRESHOLDS
    assert len(summary["per_slice"][INVENTED]) == 8
    assert summary["maps"][UNCERTAINTY]["units"] == "mm"
    assert summary["slice_axis"] == 0  # the array axis scored along, whatever world direction it has
    assert len(json.dumps(summary)) < 5000


def test_maps_of_different_shapes_are_refused():
    maps = volume_maps()
    maps[LOST] = np.zeros((8, 20, 21), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        QualityMaps.from_maps(maps, THRESHOLDS)


def test_a_blob_pasted_into_one_slice_of_the_fused_volume_is_the_next_suspicious_slice():
    yy, xx = np.indices((48, 48))
    head = (((yy - 24) ** 2 + (xx - 24) ** 2) < 18**2).astype(np.float32)
    reference = np.stack([ndimage.gaussian_filter(0.6 * head, 1.0)] * 8)
    moving = np.stack([ndimage.gaussian_filter(0.4 * head, 1.0)] * 8)
    fused = 0.5 * (reference + moving)
    blob = (((yy - 20) ** 2 + (xx - 28) ** 2) < 4**2).astype(np.float32)
    fused[5] += 0.4 * ndimage.gaussian_filter(blob, 1.0)
    quality = quality_maps(reference, moving, moving, fused)
    assert quality.suspicious_slices() == [5]
    assert quality.next_suspicious(0) == 5
    assert quality.next_suspicious(7) == 5
    assert quality.dominant_problem(5) == "hallucinated structure"
    assert quality.uncertainty_mm is None


@pytest.fixture(scope="module")
def model_2d() -> UniFuse:
    torch.manual_seed(0)
    return UniFuse(UniFuseConfig.small(spatial_dims=2))


def blob_pair(shape=(64, 64)) -> tuple[ImageVolume, ImageVolume]:
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    reference = np.exp(-4 * sum(g**2 for g in grids)).astype(np.float32)
    moving = np.exp(-4 * sum((g - 0.1) ** 2 for g in grids)).astype(np.float32)
    geometry = Geometry((1.5, 1.5), (0.0, 0.0), np.eye(2))
    return ImageVolume(reference, geometry), ImageVolume(moving, geometry)


def test_a_run_computes_and_writes_the_quality_maps(model_2d, tmp_path):
    reference, moving = blob_pair()
    stages = []
    result = FusionEngine(model_2d, device="cpu").run_fusion(
        reference, moving, progress=lambda stage, done, total: stages.append(stage))
    quality = result.quality
    assert "quality" in stages
    assert quality.invented.shape == quality.uncertainty_mm.shape == reference.array.shape
    assert quality.thresholds["uncertainty_mm"] == pytest.approx(1.5)
    assert set(quality.seconds) == {"uncertainty", "maps"}
    assert result.provenance["quality"]["thresholds"] == quality.thresholds
    assert "quality" in result.provenance["timings_s"]

    written = write_fusion_outputs(result, tmp_path)
    for name in ("invented.nii.gz", "lost.nii.gz", "restoration_change.nii.gz", "uncertainty.nii.gz"):
        on_disk = read_image(written[name])
        assert on_disk.array.shape == reference.array.shape
        np.testing.assert_allclose(on_disk.geometry.spacing, (1.5, 1.5))
    np.testing.assert_allclose(read_image(written["uncertainty.nii.gz"]).array, quality.uncertainty_mm, atol=1e-5)
    summary = json.loads((tmp_path / QUALITY_FILE).read_text())
    assert summary["suspicion"] == pytest.approx(quality.suspicion.tolist(), abs=1e-6)
    assert is_complete(tmp_path)


def test_quality_can_be_left_out_or_run_without_uncertainty(model_2d, tmp_path):
    reference, moving = blob_pair()
    engine = FusionEngine(model_2d, device="cpu")
    assert engine.run_fusion(reference, moving, quality=False).quality is None
    result = engine.run_fusion(reference, moving, uncertainty_passes=0)
    assert result.quality.uncertainty_mm is None
    assert "uncertainty_mm" not in result.quality.thresholds
    written = write_fusion_outputs(result, tmp_path)
    assert "uncertainty.nii.gz" not in written and "invented.nii.gz" in written


def air_like_uncertainty_and_one_invented_patch(slices: int = 12) -> QualityMaps:
    """The uncertainty flags 40-50 % of every slice (as over air: each slice's largest score, but no
    slice stands out); the invented-structure map flags a small patch of slice 4 only."""
    maps = volume_maps((slices, 20, 20))
    for index in range(slices):
        maps[UNCERTAINTY][index, : 8 + index % 3, :] = 2.0
    maps[INVENTED][4, :2, :2] = 0.5  # 1 % of the slice
    return QualityMaps.from_maps(maps, THRESHOLDS)


def test_a_flagged_slice_is_named_by_the_map_that_flagged_it_not_by_the_highest_score():
    quality = air_like_uncertainty_and_one_invented_patch()
    assert quality.suspicious_slices() == [4]
    assert quality.slice_scores[UNCERTAINTY][4] > quality.slice_scores[INVENTED][4]
    assert quality.flagged_by(4) == [INVENTED]
    assert quality.flagged_by(5) == []
    assert quality.dominant_problem(4) == "hallucinated structure"
    summary = quality.to_dict()
    assert summary["problems"] == {"4": "hallucinated structure"}
    assert summary["flagged_by"] == {"4": [INVENTED]}


def test_key_slices_are_the_flagged_ones_first_then_the_most_suspicious_others():
    quality = air_like_uncertainty_and_one_invented_patch()
    assert quality.worst_slices(3) == [2, 5, 8]  # the plain ranking: the air, never slice 4
    assert quality.key_slices(3) == [4, 2, 5]


def thick_slice_pair(order: tuple[int, int, int]) -> tuple[ImageVolume, ImageVolume]:
    """A head (a ball) bright on the reference and dark on the moving image (as bone on CT and T1:
    an average fusion loses its outline), on 1.5 mm in-plane voxels and 6 mm slices, the slices
    stored along array axis ``order.index(0)``."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in (6, 32, 32)), indexing="ij")
    head = ndimage.gaussian_filter((sum(g**2 for g in grids) < 0.8).astype(np.float32), (0.0, 1.0, 1.0))
    reference, moving = 0.2 + 0.6 * head, 0.8 - 0.5 * head
    spacing = np.array([6.0, 1.5, 1.5])[list(order)]
    geometry = Geometry(spacing, np.zeros(3), np.eye(3))  # thick slices along that world axis too: no reorientation
    return tuple(ImageVolume(np.ascontiguousarray(np.transpose(image, order)), geometry)
                 for image in (reference, moving))


def test_the_quality_maps_of_a_run_do_not_depend_on_which_axis_stores_the_thick_slices():
    """The same pair stored slices first and slices last: the maps match up to the transposition
    (an identity alignment with average fusion is itself indifferent to the storage order)."""
    engine = FusionEngine(load_method("identity+average", spatial_dims=3), device="cpu")
    slices_first = engine.run_fusion(*thick_slice_pair((0, 1, 2)), uncertainty_passes=0).quality
    slices_last = engine.run_fusion(*thick_slice_pair((1, 2, 0)), uncertainty_passes=0).quality
    assert slices_last.thresholds == pytest.approx(slices_first.thresholds)
    for name, array in slices_first.maps().items():
        np.testing.assert_allclose(slices_last.maps()[name], np.transpose(array, (1, 2, 0)), atol=1e-5, err_msg=name)
    assert (slices_first.lost > slices_first.thresholds[LOST]).any()
