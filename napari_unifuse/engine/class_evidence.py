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
its numerator and one to its denominator so that an empty cell stays finite. Below
``MIN_LIKELIHOOD_RATIO`` = 2 the call barely moves the odds that the artefact is there (likelihood
ratios of 1-2 alter the probability of a condition "to a small and rarely important degree";
Jaeschke, Guyatt and Sackett, JAMA 1994;271:703), so the engine warns. When the modality is not
given ("auto"), the weakest of the calibrated modalities counts: the engine cannot vouch for a
call that is uninformative on any of them. A checkpoint without calibration gets no warning and
no claim: provenance records that nothing was calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from napari_unifuse.data.degrade import DEGRADATION_CLASSES

METADATA_KEY = "degradation_evidence"
CLEAN = "clean"
MIN_LIKELIHOOD_RATIO = 2.0
_HALF_COUNT = 0.5

# modality -> true condition ("clean" or a degradation class) -> named class -> count
EvidenceTable = dict[str, dict[str, dict[str, int]]]


@dataclass(frozen=True)
class ClassEvidence:
    """How often a checkpoint named ``named`` on ``modality`` inputs degraded by it and on clean ones."""

    modality: str
    named: str
    on_degraded: tuple[int, int]  # named on k of n inputs degraded by ``named``
    on_clean: tuple[int, int]     # named on k of n clean inputs

    @property
    def likelihood_ratio(self) -> float:
        (hits, degraded), (false_alarms, clean) = self.on_degraded, self.on_clean
        return ((hits + _HALF_COUNT) / (degraded + 1)) / ((false_alarms + _HALF_COUNT) / (clean + 1))

    @property
    def informative(self) -> bool:
        return self.likelihood_ratio >= MIN_LIKELIHOOD_RATIO

    def message(self, probability: float) -> str:
        (hits, degraded), (false_alarms, clean) = self.on_degraded, self.on_clean
        return (f"degradation class {self.named!r} (p {probability:.2f}) is not evidence of the artefact: on its "
                f"calibration this checkpoint named {false_alarms} of {clean} clean {self.modality} inputs "
                f"{self.named!r}, against {hits} of {degraded} that had it (likelihood ratio "
                f"{self.likelihood_ratio:.1f} < {MIN_LIKELIHOOD_RATIO:g}); it tells the modality, not the image's quality")

    @property
    def caveat(self) -> str:
        false_alarms, clean = self.on_clean
        return (f"{self.named!r} is not evidence of the artefact: also named on {false_alarms} of {clean} clean "
                f"{self.modality} inputs (likelihood ratio {self.likelihood_ratio:.1f})")

    def to_dict(self) -> dict[str, Any]:
        return {"modality": self.modality, "named": self.named, "on_degraded": list(self.on_degraded),
                "on_clean": list(self.on_clean), "likelihood_ratio": self.likelihood_ratio,
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


def _evidence(modality: str, conditions: dict[str, dict[str, int]], named: str) -> ClassEvidence | None:
    if named not in conditions:
        return None  # never calibrated on this degradation for this modality
    degraded, clean = conditions[named], conditions[CLEAN]
    return ClassEvidence(modality, named, (degraded.get(named, 0), sum(degraded.values())),
                         (clean.get(named, 0), sum(clean.values())))


def class_evidence(table: EvidenceTable | None, named: str, modality: str = "auto") -> ClassEvidence | None:
    """The calibration behind naming ``named`` on a ``modality`` input: that modality's when it
    was calibrated, else the weakest over the calibrated modalities; None when there is no
    calibration, the class is "none", or no calibrated input had that degradation."""
    if table is None or named not in DEGRADATION_CLASSES or named == DEGRADATION_CLASSES[0]:
        return None
    key = modality.lower()
    if key in table:
        return _evidence(key, table[key], named)
    candidates = [e for e in (_evidence(m, c, named) for m, c in table.items()) if e is not None]
    return min(candidates, key=lambda e: e.likelihood_ratio, default=None)
