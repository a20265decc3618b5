"""Whether a checkpoint's named degradation is evidence of an artefact (its sidecar's calibration).

Why. A degradation classifier can learn the modality instead of the artefact: when every T2 of
its training data is motion-corrupted or clean, and clean ones are few, "T2" predicts "motion"
well enough. The 3-D phantom checkpoint does exactly this: through the engine, on whole 96³
volumes, it names motion on a clean T2 with p 0.68 and on a motion-corrupted one with p 0.63
(``bench/class_evidence.py``). Its "motion, p 0.72" then says "this is a T2", and a reviewer who
reads it as "this image has motion" is misled.

How. ``bench/class_evidence.py --write`` runs the engine on clean and degraded inputs of each
moving modality the checkpoint was trained on and stores, per modality, how often each class was
named for each true condition::

    "degradation_evidence": {
        "modalities": {"t2": {"clean": {"motion": 5}, "motion": {"motion": 5}}, ...},
        "calibration": "<the command>"
    }

A named class c of a modality is weighed by its positive likelihood ratio
LR = P(named c | degraded by c) / P(named c | clean), each proportion with a half count added to
its numerator and one to its denominator so that an empty cell stays finite. "None" claims the
opposite, a clean image, and is weighed by P(named none | clean) / P(named none | degraded), over
every degradation calibrated for the modality: a head that says "none" as often on degraded inputs
as on clean ones does not show that an image is clean. Below
``MIN_LIKELIHOOD_RATIO`` = 2 the call barely moves the odds that the artefact is there (likelihood
ratios of 1-2 alter the probability of a condition "to a small and rarely important degree";
Jaeschke, Guyatt and Sackett, JAMA 1994;271:703), so the engine warns. When the image's modality
is not known ("auto") or not calibrated, the weakest of the calibrated modalities counts: the
engine cannot vouch for a call that is uninformative on any of them. A calibrated modality with no
input degraded by the named class (for "none": by any degradation) counts as not informative, its
likelihood ratio 1, as nothing shows what the call means on it: metal calibrated on CT alone is
not evidence on an MR image, however well the checkpoint tells it on CT. The record and its
messages then say so, lest the weakest modality read as the image's. No claim is made where no
calibrated input of the image's modality (when it is unknown or not calibrated: of any modality)
had the named degradation, nor for a checkpoint without calibration: provenance records that
nothing was calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_unifuse.data.degrade import DEGRADATION_CLASSES

METADATA_KEY = "degradation_evidence"
CLEAN = "clean"
NONE = DEGRADATION_CLASSES[0]
MIN_LIKELIHOOD_RATIO = 2.0
_HALF_COUNT = 0.5

# modality -> true condition ("clean" or a degradation class) -> named class -> count
EvidenceTable = dict[str, dict[str, dict[str, int]]]


@dataclass(frozen=True)
class ClassEvidence:
    """How often a checkpoint named ``named`` on ``modality`` inputs degraded by it and on clean ones.

    ``image_modality``: the modality of the image the call was made on ("auto": not known);
    ``modality``: the calibration weighed, that modality's or, where it has none, the weakest
    calibrated modality's standing in (``weakest_fallback``), which may hold no input degraded by
    ``named`` (``calibrated`` False; not informative)."""

    modality: str
    named: str
    on_degraded: tuple[int, int]  # named on k of n inputs degraded by ``named`` (for "none": by any degradation)
    on_clean: tuple[int, int]     # named on k of n clean inputs
    image_modality: str

    @property
    def weakest_fallback(self) -> bool:
        return self.image_modality != self.modality

    @property
    def _fallback_note(self) -> str:
        """What leads the messages when the calibration is not the image's own modality's."""
        if not self.weakest_fallback:
            return ""
        why = "modality unknown" if self.image_modality == "auto" else f"{self.image_modality} not calibrated"
        return f"{why}: judged by the weakest calibration, {self.modality}'s: "

    @property
    def calibrated(self) -> bool:
        """Whether any input degraded by the named class (for "none": by any degradation) was calibrated."""
        return self.on_degraded[1] > 0

    @property
    def claims_clean(self) -> bool:
        """Whether the call is "none": then the clean inputs are the ones it should be named on."""
        return self.named == NONE

    @property
    def likelihood_ratio(self) -> float:
        """1 where no degraded input was calibrated: nothing shows that the call moves the odds."""
        if not self.calibrated:
            return 1.0
        (on_degraded, degraded), (on_clean, clean) = self.on_degraded, self.on_clean
        given_degraded = (on_degraded + _HALF_COUNT) / (degraded + 1)
        given_clean = (on_clean + _HALF_COUNT) / (clean + 1)
        return given_clean / given_degraded if self.claims_clean else given_degraded / given_clean

    @property
    def informative(self) -> bool:
        return self.likelihood_ratio >= MIN_LIKELIHOOD_RATIO

    @property
    def _not_evidence_of(self) -> str:
        return "a clean image" if self.claims_clean else "the artefact"

    @property
    def _uncalibrated_inputs(self) -> str:
        """The inputs whose absence from the calibration leaves the call unweighed."""
        return f"degraded {self.modality} inputs" if self.claims_clean else f"{self.modality} inputs with {self.named!r}"

    def message(self, probability: float) -> str:
        (on_degraded, degraded), (on_clean, clean) = self.on_degraded, self.on_clean
        ratio = f"(likelihood ratio {self.likelihood_ratio:.1f} < {MIN_LIKELIHOOD_RATIO:g})"
        if not self.calibrated:
            return (f"{self._fallback_note}degradation class {self.named!r} (p {probability:.2f}) is not evidence of "
                    f"{self._not_evidence_of}: this checkpoint's calibration holds no {self._uncalibrated_inputs}, "
                    f"so nothing shows what the call means there {ratio}")
        if self.claims_clean:
            return (f"{self._fallback_note}degradation class 'none' (p {probability:.2f}) is not evidence of a "
                    f"clean image: on its calibration this checkpoint named {on_degraded} of {degraded} degraded "
                    f"{self.modality} inputs 'none', against {on_clean} of {clean} clean ones {ratio}")
        return (f"{self._fallback_note}degradation class {self.named!r} (p {probability:.2f}) is not evidence of "
                f"the artefact: on its calibration this checkpoint named {on_clean} of {clean} clean {self.modality} "
                f"inputs {self.named!r}, against {on_degraded} of {degraded} that had it {ratio}; it tells the "
                f"modality, not the image's quality")

    @property
    def caveat(self) -> str:
        if not self.calibrated:
            return (f"{self._fallback_note}{self.named!r} is not evidence of {self._not_evidence_of}: no "
                    f"{self._uncalibrated_inputs} were calibrated (likelihood ratio {self.likelihood_ratio:.1f})")
        if self.claims_clean:
            on_degraded, degraded = self.on_degraded
            return (f"{self._fallback_note}'none' is not evidence of a clean image: also named on {on_degraded} "
                    f"of {degraded} degraded {self.modality} inputs (likelihood ratio {self.likelihood_ratio:.1f})")
        on_clean, clean = self.on_clean
        return (f"{self._fallback_note}{self.named!r} is not evidence of the artefact: also named on {on_clean} "
                f"of {clean} clean {self.modality} inputs (likelihood ratio {self.likelihood_ratio:.1f})")

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "image_modality": self.image_modality,
                "weakest_fallback": self.weakest_fallback, "named": self.named, "calibrated": self.calibrated,
                "on_degraded": list(self.on_degraded), "on_clean": list(self.on_clean),
                "likelihood_ratio": self.likelihood_ratio,
                "min_likelihood_ratio": MIN_LIKELIHOOD_RATIO, "informative": self.informative}


def evidence_table(metadata: dict[str, Any]) -> EvidenceTable | None:
    """The sidecar's calibration table, or None when it has none; ValueError when malformed."""
    section = metadata.get(METADATA_KEY)
    if section is None:
        return None
    modalities = section.get("modalities") if isinstance(section, dict) else None
    if not isinstance(modalities, dict) or not modalities:
        raise ValueError(f"{METADATA_KEY}.modalities must map modalities to counts, got {modalities!r}")
    for modality, conditions in modalities.items():
        if not isinstance(conditions, dict) or CLEAN not in conditions:
            raise ValueError(f"{METADATA_KEY}.modalities.{modality} must hold a {CLEAN!r} entry, got {conditions!r}")
        for condition, named in conditions.items():
            if condition != CLEAN and condition not in DEGRADATION_CLASSES:
                raise ValueError(f"{METADATA_KEY}: unknown condition {condition!r} for {modality}")
            if not isinstance(named, dict) or any(
                    name not in DEGRADATION_CLASSES or isinstance(count, bool) or not isinstance(count, int)
                    or count < 0 for name, count in named.items()):
                raise ValueError(f"{METADATA_KEY}.modalities.{modality}.{condition} must map class names to "
                                 f"counts, got {named!r}")
    return modalities


def _evidence(modality: str, conditions: dict[str, dict[str, int]], named: str,
              image_modality: str) -> ClassEvidence:
    if named == NONE:
        degraded_by = [condition for condition in conditions if condition not in (CLEAN, NONE)]
    else:
        degraded_by = [named] if named in conditions else []
    clean = conditions[CLEAN]
    named_on_degraded = sum(conditions[condition].get(named, 0) for condition in degraded_by)
    degraded = sum(sum(conditions[condition].values()) for condition in degraded_by)
    return ClassEvidence(modality, named, (named_on_degraded, degraded), (clean.get(named, 0), sum(clean.values())),
                         image_modality)


def class_evidence(table: EvidenceTable | None, named: str, modality: str = "auto") -> ClassEvidence | None:
    """The calibration behind naming ``named`` on a ``modality`` input ("auto": not known): that
    modality's when it was calibrated, else the weakest over the calibrated modalities, where one
    without an input degraded by ``named`` is not informative; None when there is no calibration or
    no input of the modality weighed (of any, for the weakest) had that degradation (for "none": any)."""
    if table is None or named not in DEGRADATION_CLASSES:
        return None
    key = modality.lower()
    candidates = [_evidence(key, table[key], named, key)] if key in table else [
        _evidence(calibrated, conditions, named, key) for calibrated, conditions in table.items()]
    if not any(evidence.calibrated for evidence in candidates):
        return None
    return min(candidates, key=lambda evidence: evidence.likelihood_ratio)
