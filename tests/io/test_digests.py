"""Content hashes of arrays (io.digests)."""

import hashlib

import numpy as np

from napari_unifuse.io import digests


def test_array_digests_hash_each_array_once_and_a_new_array_anew(monkeypatch):
    """The workbench re-derived its run folder at every keystroke of the form, hashing a
    clinical volume each time (a second for a 512×512×200 CT)."""
    hashed = []
    real = digests.sha256_of_array
    monkeypatch.setattr(digests, "sha256_of_array", lambda array: hashed.append(array.shape) or real(array))
    cache = digests.ArrayDigests()
    volume = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    assert cache(volume) == cache(volume) == hashlib.sha256(volume.tobytes()).hexdigest()
    assert len(hashed) == 1
    replaced = volume.astype(np.float32)  # napari gives a layer new data as a new array
    assert cache(replaced) != cache(volume) and len(hashed) == 2
    del replaced
    assert len(cache._digests) == 1  # a freed array's entry goes with it
