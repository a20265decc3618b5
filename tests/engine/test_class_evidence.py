"""A named degradation is weighed against the checkpoint's calibration on clean inputs
(engine.class_evidence): a class that a checkpoint also names on clean inputs is not evidence of
the artefact, and the engine says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unifuse.data.degrade import DEGRADATION_CLASSES
from napari_unifuse.engine.class_evidence import (
    CLEAN,
    METADATA_KEY,
    MIN_LIKELIHOOD_RATIO,
    ClassEvidence,
    class_evidence,
    evidence_table,
)
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.methods import method_for_network
from napari_unifuse.errors import CheckpointError
from napari_unifuse.io import Geometry, ImageVolume
from napari_unifuse.model import UniFuse, UniFuseConfig
from napari_unifuse.model.checkpoint import read_metadata

# A T2 classifier that calls everything motion, and a PET one that tells low dose from clean.
TABLE = {"t2": {CLEAN: {"motion": 5}, "motion": {"motion": 5}},
         "pet": {CLEAN: {"none": 9, "lowdose": 1}, "lowdose": {"lowdose": 9, "none": 1}}}


def test_likelihood_ratio_on_known_answers():
    # Half a count added to each numerator and one to each denominator: (5.5/6) / (5.5/6) and (9.5/11) / (1.5/11).
    blind = ClassEvidence("t2", "motion", on_degraded=(5, 5), on_clean=(5, 5), image_modality="t2")
    seeing = ClassEvidence("pet", "lowdose", on_degraded=(9, 10), on_clean=(1, 10), image_modality="pet")
    never_on_clean = ClassEvidence("ct", "metal", on_degraded=(3, 3), on_clean=(0, 3), image_modality="ct")
    assert blind.likelihood_ratio == pytest.approx(1.0)
    assert seeing.likelihood_ratio == pytest.approx(9.5 / 1.5)
    assert never_on_clean.likelihood_ratio == pytest.approx(3.5 / 0.5)
    assert not blind.informative and seeing.informative and never_on_clean.informative
    assert blind.message(0.72).startswith("degradation class 'motion' (p 0.72) is not evidence")
    assert "5 of 5 clean t2" in blind.message(0.72)
    assert blind.caveat.startswith("'motion' is not evidence") and "5 of 5 clean t2" in blind.caveat


def test_the_given_modality_is_looked_up_and_auto_takes_the_weakest():
    table = evidence_table({METADATA_KEY: {"modalities": TABLE}})
    assert class_evidence(table, "lowdose", "PET").informative
    assert not class_evidence(table, "motion", "t2").informative
    # "auto" (or a modality the calibration lacks): the weakest calibrated modality for that class,
    # where one with no input degraded by it (no low-dose T2) is the weakest of all.
    assert class_evidence(table, "motion", "auto").modality == "t2"
    lowdose_on_mr = class_evidence(table, "lowdose", "mr")
    assert (lowdose_on_mr.modality, lowdose_on_mr.calibrated, lowdose_on_mr.informative) == ("t2", False, False)


def test_a_fallback_to_the_weakest_calibration_says_it_is_not_the_images_modality():
    table = evidence_table({METADATA_KEY: {"modalities": TABLE}})
    own = class_evidence(table, "motion", "T2")
    unknown = class_evidence(table, "motion", "auto")
    uncalibrated = class_evidence(table, "motion", "mr")
    assert (own.modality, own.image_modality, own.weakest_fallback) == ("t2", "t2", False)
    assert (unknown.modality, unknown.image_modality, unknown.weakest_fallback) == ("t2", "auto", True)
    assert (uncalibrated.modality, uncalibrated.image_modality, uncalibrated.weakest_fallback) == ("t2", "mr", True)
    assert own.message(0.7).startswith("degradation class 'motion'") and own.caveat.startswith("'motion'")
    for evidence, lead in ((unknown, "modality unknown"), (uncalibrated, "mr not calibrated")):
        assert evidence.message(0.7).startswith(f"{lead}: judged by the weakest calibration, t2's: degradation class")
        assert evidence.caveat.startswith(f"{lead}: judged by the weakest calibration, t2's: 'motion' is not")
    recorded = unknown.to_dict()
    assert (recorded["modality"], recorded["image_modality"], recorded["weakest_fallback"]) == ("t2", "auto", True)
    assert own.to_dict()["weakest_fallback"] is False


# As the bundled 2-D checkpoint's: metal calibrated on CT alone, low dose on PET alone; no MR.
CT_METAL_ONLY = {"ct": {CLEAN: {"none": 20}, "metal": {"metal": 20}},
                 "pet": {CLEAN: {"none": 12, "lowdose": 8}, "lowdose": {"none": 6, "lowdose": 14}}}


@pytest.mark.parametrize("image_modality, lead", [("mr", "mr not calibrated"), ("auto", "modality unknown")])
def test_a_class_calibrated_on_one_modality_alone_is_not_evidence_on_another(image_modality, lead):
    # CT's 20 of 20 against 0 of 20 (likelihood ratio 41) does not stand in for PET, where no input had metal.
    table = evidence_table({METADATA_KEY: {"modalities": CT_METAL_ONLY}})
    on_ct = class_evidence(table, "metal", "ct")
    assert on_ct.calibrated and on_ct.likelihood_ratio == pytest.approx(41.0) and on_ct.informative
    fallback = class_evidence(table, "metal", image_modality)
    assert (fallback.modality, fallback.calibrated, fallback.weakest_fallback) == ("pet", False, True)
    assert fallback.likelihood_ratio == 1.0 and not fallback.informative
    assert fallback.message(0.9) == (
        f"{lead}: judged by the weakest calibration, pet's: degradation class 'metal' (p 0.90) is not evidence of "
        "the artefact: this checkpoint's calibration holds no pet inputs with 'metal', so nothing shows what the "
        "call means there (likelihood ratio 1.0 < 2)")
    assert fallback.caveat.startswith(f"{lead}: judged by the weakest calibration, pet's: 'metal' is not evidence")
    recorded = fallback.to_dict()
    assert (recorded["calibrated"], recorded["on_degraded"], recorded["informative"]) == (False, [0, 0], False)


def test_none_on_an_uncalibrated_modality_is_not_evidence_where_a_calibrated_one_saw_no_degradation():
    # CT was calibrated on clean inputs alone: nothing shows whether its "none" tells clean from degraded.
    table = evidence_table({METADATA_KEY: {"modalities": {
        "ct": {CLEAN: {"none": 10}}, "t2": {CLEAN: {"none": 10}, "motion": {"motion": 10}}}}})
    assert class_evidence(table, "none", "t2").informative
    assert class_evidence(table, "none", "ct") is None  # the image's own modality: no claim, as before
    fallback = class_evidence(table, "none", "mr")
    assert (fallback.modality, fallback.calibrated, fallback.informative) == ("ct", False, False)
    assert "not evidence of a clean image: this checkpoint's calibration holds no degraded ct inputs" in \
        fallback.message(0.8)


def test_no_claim_without_calibration_or_for_an_uncalibrated_class():
    table = evidence_table({METADATA_KEY: {"modalities": TABLE}})
    assert evidence_table({}) is None
    assert class_evidence(None, "motion", "t2") is None
    assert class_evidence(None, "none", "t2") is None
    assert class_evidence(table, "metal", "t2") is None  # no T2 was calibrated with metal
    assert class_evidence(table, "metal", "auto") is None
    assert class_evidence({"t2": {CLEAN: {"none": 5}}}, "none", "t2") is None  # no degraded T2 calibrated


def test_a_none_call_is_weighed_as_a_claim_that_the_image_is_clean():
    # "none" on 9 of 10 clean PETs and 1 of 10 low-dose ones: (9.5/11) / (1.5/11); the T2 head never says it.
    table = evidence_table({METADATA_KEY: {"modalities": {
        **TABLE, "ct": {CLEAN: {"none": 4}, "metal": {"none": 1, "metal": 2}, "motion": {"none": 2}}}}})
    seeing, blind = class_evidence(table, "none", "pet"), class_evidence(table, "none", "t2")
    assert seeing.claims_clean and seeing.likelihood_ratio == pytest.approx(9.5 / 1.5) and seeing.informative
    assert blind.likelihood_ratio == pytest.approx(1.0) and not blind.informative
    # Every degradation calibrated for the modality counts as degraded: 3 of 5 CTs, against 4 of 4 clean.
    pooled = class_evidence(table, "none", "ct")
    assert (pooled.on_degraded, pooled.on_clean) == ((3, 5), (4, 4))
    assert pooled.likelihood_ratio == pytest.approx((4.5 / 5) / (3.5 / 6)) and not pooled.informative
    assert "not evidence of a clean image" in pooled.message(0.6) and "3 of 5 degraded ct" in pooled.message(0.6)
    assert "3 of 5 degraded ct" in pooled.caveat
    assert class_evidence(table, "none", "auto").modality == "t2"  # the weakest


@pytest.mark.parametrize("section", [
    [], {"modalities": {}}, {"modalities": {"t2": {"motion": {"motion": 5}}}},  # no clean entry
    {"modalities": {"t2": {CLEAN: {"motion": -1}}}}, {"modalities": {"t2": {CLEAN: {"motion": 2.5}}}},
    {"modalities": {"t2": {CLEAN: {"motion": True}}}}, {"modalities": {"t2": {CLEAN: {"blur": 3}}}},
    {"modalities": {"t2": {CLEAN: {}, "blur": {"none": 1}}}}, {"modalities": {"t2": {CLEAN: [5]}}},
])
def test_malformed_calibrations_are_refused(section):
    with pytest.raises(ValueError, match=METADATA_KEY):
        evidence_table({METADATA_KEY: section})


def _caller(named: str) -> UniFuse:
    """An untrained 2-D UniFuse whose classifier says ``named`` for any input."""
    torch.manual_seed(0)
    network = UniFuse(UniFuseConfig.small(spatial_dims=2))
    with torch.no_grad():
        last = network.dapl.classifier[-1]
        last.weight.zero_()
        last.bias.copy_(torch.full_like(last.bias, -5.0))
        last.bias[DEGRADATION_CLASSES.index(named)] = 5.0
    return network


@pytest.fixture(scope="module")
def motion_caller() -> UniFuse:
    return _caller("motion")


def _pair() -> tuple[ImageVolume, ImageVolume]:
    rng = np.random.default_rng(0)
    image = np.zeros((64, 64), np.float32)
    image[16:48, 16:48] = 0.8
    image += rng.normal(0, 0.02, image.shape).astype(np.float32)
    return ImageVolume(np.clip(image, 0, 1), Geometry.identity(2)), ImageVolume(np.clip(1 - image, 0, 1),
                                                                                Geometry.identity(2))


def _engine(network: UniFuse, table: dict | None) -> FusionEngine:
    method = method_for_network(network)
    method.checkpoint_metadata = {} if table is None else {METADATA_KEY: {"modalities": table}}
    return FusionEngine(method, device="cpu")


def test_the_engine_warns_when_its_call_is_not_evidence_and_records_it(motion_caller):
    reference, moving = _pair()
    result = _engine(motion_caller, TABLE).run_fusion(reference, moving, moving_modality="t2", quality=False)

    assert result.predicted_class == "motion"
    warned = [w for w in result.warnings if "not evidence of the artefact" in w]
    assert len(warned) == 1 and "5 of 5 clean t2" in warned[0]
    assert warned[0] in result.provenance["warnings"]
    recorded = result.provenance[METADATA_KEY]
    assert recorded["informative"] is False and recorded["likelihood_ratio"] < MIN_LIKELIHOOD_RATIO
    assert result.degradation_report()["evidence"] == recorded
    assert result.class_caveat is not None and "likelihood ratio 1.0" in result.class_caveat


def test_the_engine_warns_when_none_is_not_evidence_of_a_clean_image():
    # The T2 head of TABLE never says "none"; the PET one says it on 9 of 10 clean inputs.
    reference, moving = _pair()
    engine = _engine(_caller("none"), TABLE)
    blind = engine.run_fusion(reference, moving, moving_modality="t2", quality=False)
    seeing = engine.run_fusion(reference, moving, moving_modality="pet", quality=False)
    assert blind.predicted_class == seeing.predicted_class == "none"
    assert any("not evidence of a clean image" in w for w in blind.warnings)
    assert blind.class_caveat is not None and "0 of 5 degraded t2" in blind.class_caveat
    assert not any("not evidence" in w for w in seeing.warnings) and seeing.class_caveat is None
    assert seeing.provenance[METADATA_KEY]["informative"] is True


def test_auto_weighs_the_call_on_the_modality_the_moving_image_shows_of_itself():
    # The "pet" head says "none" on clean inputs, the "ct" one never does: which one is read shows.
    table = {"ct": {CLEAN: {"none": 9, "metal": 1}, "metal": {"metal": 9, "none": 1}},
             "pet": {CLEAN: {"lowdose": 5}, "lowdose": {"lowdose": 5}}}
    reference, moving = _pair()
    engine = _engine(_caller("none"), table)
    # Air at -1000 HU around tissue near 40 HU: CT's signature (io.normalize), not merely values below -500.
    in_hounsfield_units = ImageVolume((1 - moving.array) * 1300 - 1000, moving.geometry)
    tagged_ct = ImageVolume(moving.array, moving.geometry, {"modality": "CT"})
    for shows_ct in (in_hounsfield_units, tagged_ct):
        assert engine.run_fusion(reference, shows_ct, quality=False).provenance[METADATA_KEY]["modality"] == "ct"
    # An image that says nothing is normalised as MR, a guess: the weakest calibration, here PET's,
    # which the warning and the record name as standing in for an unknown modality.
    says_nothing = engine.run_fusion(reference, moving, quality=False)
    recorded = says_nothing.provenance[METADATA_KEY]
    assert (recorded["modality"], recorded["image_modality"], recorded["weakest_fallback"]) == ("pet", "auto", True)
    warned = [w for w in says_nothing.warnings if "not evidence of a clean image" in w]
    assert len(warned) == 1 and warned[0].startswith("modality unknown: judged by the weakest calibration, pet's: ")
    declared_pet = engine.run_fusion(reference, tagged_ct, moving_modality="pet", quality=False)
    recorded = declared_pet.provenance[METADATA_KEY]
    assert (recorded["modality"], recorded["weakest_fallback"]) == ("pet", False)
    assert not any("modality unknown" in w for w in declared_pet.warnings)


def test_the_engine_warns_when_a_class_calibrated_on_ct_alone_is_named_on_an_mr_image():
    # The reviewers' case: an MR named "metal" was reported as evidence by CT's likelihood ratio 41, unwarned.
    reference, moving = _pair()
    engine = _engine(_caller("metal"), CT_METAL_ONLY)
    on_mr = engine.run_fusion(reference, moving, moving_modality="mr", quality=False)
    recorded = on_mr.provenance[METADATA_KEY]
    assert (recorded["modality"], recorded["informative"], recorded["likelihood_ratio"]) == ("pet", False, 1.0)
    warned = [w for w in on_mr.warnings if "not evidence of the artefact" in w]
    assert len(warned) == 1 and warned[0].startswith("mr not calibrated: judged by the weakest calibration, pet's: ")
    assert warned[0] in on_mr.provenance["warnings"] and on_mr.degradation_report()["evidence"] == recorded
    assert on_mr.class_caveat is not None and "no pet inputs with 'metal'" in on_mr.class_caveat
    on_ct = engine.run_fusion(reference, moving, moving_modality="ct", quality=False)
    assert on_ct.provenance[METADATA_KEY]["informative"] is True and on_ct.class_caveat is None
    assert not any("not evidence" in w for w in on_ct.warnings)


def test_no_warning_when_the_calibration_shows_the_call_is_informative_or_absent(motion_caller):
    reference, moving = _pair()
    seeing = {"t2": {CLEAN: {"none": 10}, "motion": {"motion": 10}}}
    informed = _engine(motion_caller, seeing).run_fusion(reference, moving, moving_modality="t2", quality=False)
    uncalibrated = _engine(motion_caller, None).run_fusion(reference, moving, moving_modality="t2", quality=False)

    assert not any("not evidence" in w for w in informed.warnings + uncalibrated.warnings)
    assert informed.provenance[METADATA_KEY]["informative"] is True and informed.class_caveat is None
    assert uncalibrated.provenance[METADATA_KEY] is None and uncalibrated.class_caveat is None


def test_a_header_tag_is_looked_up_as_calibrated_before_its_normalisation_alias(motion_caller):
    # The 3-D checkpoint calibrates "t2"; a T2 normalises as "mr", which was judged "mr not calibrated".
    reference, moving = _pair()
    seeing = {"t2": {CLEAN: {"none": 10}, "motion": {"motion": 10}}}
    tagged_t2 = ImageVolume(moving.array, moving.geometry, {"modality": "T2"})
    result = _engine(motion_caller, seeing).run_fusion(reference, tagged_t2, quality=False)

    recorded = result.provenance[METADATA_KEY]
    assert (recorded["modality"], recorded["image_modality"], recorded["informative"]) == ("t2", "t2", True)
    assert not any("not evidence" in w for w in result.warnings) and result.class_caveat is None


def test_a_malformed_calibration_in_a_checkpoint_is_a_checkpoint_error(motion_caller):
    with pytest.raises(CheckpointError, match=METADATA_KEY):
        _engine(motion_caller, {"t2": {"motion": {"motion": 5}}})


def test_the_bundled_3d_checkpoint_is_calibrated_and_its_calls_are_evidence_on_every_task():
    """The shipped calibration (bench/class_evidence.py): reading the patch statistics alone, the
    3-D head calls clean T2s, CTs and PETs "none" and degraded ones by their artefact."""
    metadata = read_metadata("unifuse-3d-phantom")
    table = evidence_table(metadata)
    assert "class_evidence.py" in metadata[METADATA_KEY]["calibration"]
    assert set(table) == {"t2", "ct", "pet"}
    for modality, degradation in (("t2", "motion"), ("ct", "metal"), ("pet", "lowdose")):
        assert class_evidence(table, degradation, modality).informative
        assert class_evidence(table, "none", modality).informative


def test_a_colour_moving_image_is_of_unknown_modality_and_the_warning_asks_for_it(motion_caller):
    # Under "auto" its luma mapping's name, "rgb", was taken for a modality: "rgb not calibrated".
    reference, moving = _pair()
    coloured = ImageVolume(np.stack([moving.array, 0.5 * moving.array, 0.2 * moving.array], axis=-1),
                           moving.geometry, is_rgb=True)
    result = _engine(motion_caller, TABLE).run_fusion(reference, coloured, quality=False)
    assert result.provenance[METADATA_KEY]["image_modality"] == "auto"
    (warned,) = [w for w in result.warnings if "not evidence of the artefact" in w]
    assert warned.startswith("modality unknown: judged by the weakest calibration")
    assert warned.endswith("a colour image does not say its modality: give it (unifuse fuse --moving-modality pet "
                           "or spect; the workbench's Advanced ▸ moving modality; moving_modality= in Python)")
    declared = _engine(motion_caller, TABLE).run_fusion(reference, coloured, moving_modality="pet", quality=False)
    assert not any("does not say its modality" in w for w in declared.warnings)
