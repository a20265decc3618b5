"""The Review tab of a run whose alignment uncertainty flags most of every slice: it said "no slice
is flagged by the quality maps", as if the run were clean."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from napari_unifuse.engine.quality import INVENTED, LOST, RESTORATION_CHANGE, UNCERTAINTY, QualityMaps

from .test_review import SHAPE, result_with_defects, review

pytestmark = pytest.mark.gui


def uncertain_throughout(reference, moving):
    """The constructed result, its maps replaced by ones flagging nothing but the uncertainty on 99 %
    of every slice (as a pure-noise moving volume's does)."""
    maps = {name: np.zeros(SHAPE, np.float32) for name in (INVENTED, LOST, RESTORATION_CHANGE)}
    uncertainty = np.full(SHAPE, 2.0, np.float32)
    uncertainty[:, :1, :23] = 0.0  # 23 of 2304 voxels per slice below the threshold: 99.0 % flagged
    maps[UNCERTAINTY] = uncertainty
    quality = QualityMaps.from_maps(maps, {INVENTED: 0.5, LOST: 0.5, RESTORATION_CHANGE: 0.5, UNCERTAINTY: 1.0})
    return dataclasses.replace(result_with_defects(reference, moving), quality=quality)


def test_the_review_tab_says_the_uncertainty_flags_the_whole_volume(
        make_napari_viewer, qtbot, tmp_path, checkpoint_files, notifications):
    workbench = review(make_napari_viewer(), qtbot, tmp_path, checkpoint_files[3], notifications, uncertain_throughout)
    assert workbench.qc_panel.suspicion.value == (
        "The alignment uncertainty flags 99.0 % of a typical slice of this volume: no slice stands out because "
        "every slice is affected; do not trust this run's alignment.")
    assert not workbench.qc_panel.next_suspicious.enabled  # no slice to go to: the volume as a whole is flagged
