"""engine.coarse_readout: a coarse reading may only raise the classes it is calibrated for."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.coarse_readout import CoarseReadout, coarse_readout

MOTION_ONLY = CoarseReadout(2.8, ("motion",))


def test_a_listed_class_takes_the_larger_reading_and_the_others_keep_their_ratios():
    native = np.array([[0.42, 0.43, 0.02, 0.13],    # motion read weakly on the own grid
                       [0.05, 0.01, 0.87, 0.07]])   # metal, which the coarse copy averages away
    coarse = np.array([[0.27, 0.72, 0.01, 0.00],
                       [0.77, 0.00, 0.20, 0.03]])
    combined = MOTION_ONLY.combine(native, coarse, DEGRADATION_CLASSES)
    np.testing.assert_allclose(combined.sum(axis=1), 1.0, atol=1e-6)
    assert combined[0, 1] == pytest.approx(0.72)
    # none, metal and low dose share the remaining 0.28 as 0.42 : 0.02 : 0.13.
    np.testing.assert_allclose(combined[0, [0, 2, 3]], np.array([0.42, 0.02, 0.13]) * 0.28 / 0.57, atol=1e-6)
    # A coarse copy never lowers what the own grid read: the metal row is unchanged.
    np.testing.assert_allclose(combined[1], native[1], atol=1e-6)


def test_the_coarse_reading_applies_only_to_voxels_clearly_finer_than_its_spacing():
    assert MOTION_ONLY.applies_to((1.0, 1.0, 1.0))
    assert MOTION_ONLY.applies_to((3.0, 1.0, 2.2))  # the finest axis counts
    assert not MOTION_ONLY.applies_to((2.8, 2.8, 2.8))
    assert not MOTION_ONLY.applies_to((2.5, 2.5, 5.0))


def test_the_sidecar_section_is_read_and_checked():
    assert coarse_readout({}, DEGRADATION_CLASSES) is None
    section = {"coarse_readout": {"spacing_mm": 2.8, "classes": ["motion"], "command": "bench/coarse_readout.py"}}
    assert coarse_readout(section, DEGRADATION_CLASSES) == MOTION_ONLY
    for bad, message in (({"spacing_mm": 0, "classes": ["motion"]}, "spacing_mm"),
                         ({"spacing_mm": True, "classes": ["motion"]}, "spacing_mm"),
                         ({"spacing_mm": 2.8, "classes": ["none"]}, "classes"),
                         ({"spacing_mm": 2.8, "classes": ["blur"]}, "classes"),
                         ({"spacing_mm": 2.8, "classes": []}, "classes"),
                         ("2.8 mm", "mapping")):
        with pytest.raises(ValueError, match=message):
            coarse_readout({"coarse_readout": bad}, DEGRADATION_CLASSES)
