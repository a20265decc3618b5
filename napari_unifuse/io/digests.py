"""Content hashes of arrays: what identifies data that has no file (a napari layer, a bundled
sample, pixels edited since they were read). Torch-free, so the napari reader can use them."""

from __future__ import annotations

import hashlib
import weakref

import numpy as np


def sha256_of_array(array: np.ndarray) -> str:
    """SHA-256 of an array's values (C order), what identifies data that has no file."""
    # The buffer itself, not a tobytes() copy: a clinical volume need not be held twice.
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data).hexdigest()


class ArrayDigests:
    """``sha256_of_array`` of arrays seen before, by identity (a weak reference tells a live array
    from a new one at a reused address). The workbench derives its run folder and the annotations'
    input hashes again at every change of its form, each keystroke in a folder name included:
    hashing a 512×512×200 CT each time took a second. An array changed in place keeps its
    digest; napari gives an image layer new data as a new array."""

    def __init__(self) -> None:
        self._digests: dict[int, tuple[weakref.ref, str]] = {}

    def __call__(self, array: np.ndarray) -> str:
        key = id(array)
        known = self._digests.get(key)
        if known is not None and known[0]() is array:
            return known[1]
        digest = sha256_of_array(array)

        def forget(_: weakref.ref) -> None:
            self._digests.pop(key, None)

        self._digests[key] = (weakref.ref(array, forget), digest)
        return digest


# The content hashes of napari layers' arrays: the reader hashes what it read, and the workbench's
# run form (its run folder) and annotations (the pair a flag is about) ask again at every change
# of the form; one cache hashes each array once.
LAYER_DIGESTS = ArrayDigests()
