"""bench/probe_alignment_guard.py stands in for the engine's guard: it must decide exactly as the
engine's call asks (every keyword forwarded), sweep k with nothing else changed, and describe runs
whatever estimates the engine weighed (the bundled 2-D checkpoint weighs no network field)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from napari_unifuse.data.misalign import warp_array
from napari_unifuse.engine.alignment_guard import IDENTITY, choose_displacement
from napari_unifuse.engine.inference import MATCHING

REPO = Path(__file__).resolve().parents[2]
SHIFT = (3.0, 4.0)


def load_probe():
    spec = importlib.util.spec_from_file_location("probe_alignment_guard", REPO / "bench" / "probe_alignment_guard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shifted_pair():
    """A textured 96² reference, the moving image shifted by SHIFT, and the field that undoes it."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96].astype(np.float32)
    reference = np.zeros((96, 96), np.float32)
    for y, x, size, weight in zip(rng.uniform(20, 76, 12), rng.uniform(20, 76, 12), rng.uniform(3, 9, 12),
                                  rng.uniform(0.3, 1.0, 12), strict=True):
        reference += weight * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * size**2))
    reference /= reference.max()
    field = np.broadcast_to(np.array(SHIFT, np.float32)[:, None, None], (2, 96, 96)).copy()
    return warp_array(reference, -field), reference, field


def test_the_recorder_forwards_the_engines_keywords_and_sweeps_k_with_them():
    probe = load_probe()
    moving, reference, field = shifted_pair()
    estimates = {MATCHING: field}
    # A floor above the 5 px correction: the engine's call must keep the identity, and so must every k.
    options = {"min_credible_motion": 8.0, "blur_voxels": 1.0, "spacing": (1.0, 1.0), "field_of_view": None}
    recorder = probe.RecordingGuard((2.0, 4.0))

    decision = recorder(moving, reference, estimates, **options)

    assert decision == choose_displacement(moving, reference, estimates, **options)
    assert decision.kept == IDENTITY and decision.min_credible_motion == 8.0 and decision.blur_voxels == 1.0
    assert recorder.kept_by_factor == {2.0: IDENTITY, 4.0: IDENTITY}
    # Without the floor the same pair keeps the matching: the sweep above did see the floor.
    assert choose_displacement(moving, reference, estimates, 2.0, min_credible_motion=0.0).kept == MATCHING


def test_a_run_whose_guard_weighed_no_network_field_is_described_from_the_initial_alignment():
    probe = load_probe()
    moving, reference, field = shifted_pair()
    recorder = probe.RecordingGuard((4.0,))
    decision = recorder(moving, reference, {MATCHING: field}, min_credible_motion=0.0)
    result = SimpleNamespace(alignment_guard=decision, displacement=field,
                             provenance={"timings_s": {"guard": 0.01}})
    tissue = reference > 0.1

    row = probe.describe_run(result, recorder, tissue, np.array(SHIFT, np.float32)[:, None, None])

    assert row["weighed"] == (MATCHING,) and row["before"] == MATCHING and row["kept"] == MATCHING
    assert row["EPE before"] < 0.1 and row["EPE after"] < 0.1 and row["|u| before"] == row["|u| after"] > 4.9
    assert row["second pass s"] == 0.0 and row["EPE by k"] == {4.0: row["EPE after"]}
