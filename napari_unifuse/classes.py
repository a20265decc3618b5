"""The degradation classes UniFuse tells apart, in the order of its classifier's outputs (a class's
index is its position here). A leaf module: ``model`` routes its LoRA experts by class without
importing ``data``, which synthesises the degradations."""

DEGRADATION_CLASSES = ("none", "motion", "metal", "lowdose")
