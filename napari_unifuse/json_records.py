"""Standard JSON text for the package's records; a leaf module that every layer may import."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` (nested mappings, lists, tuples) with every non-finite float (NaN, ±inf) as None.

    Python's json writes NaN, which is not JSON: jq, JavaScript and most readers outside Python
    reject the file (a validation score is NaN when, e.g., no clean crop was drawn). Numpy and
    torch scalars and arrays become plain numbers and lists (their ``tolist``)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def standard_json(value: Any, indent: int | None = None) -> str:
    """``value`` as standard JSON text: undefined numbers are ``null`` (``finite_or_null``), other
    objects (paths) their ``str``. The one writer of the package's JSON records (checkpoint sidecars,
    training logs, run outputs)."""
    return json.dumps(finite_or_null(value), indent=indent, default=str, allow_nan=False)
