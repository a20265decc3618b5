"""Which process of a job this is, from torchrun's environment alone: no torch import, so that the
CLI can ask it at any moment, an interrupt during its start-up included (a handler that imported
torch there met it half loaded and crashed)."""

from __future__ import annotations

import os


def is_first_process() -> bool:
    """Whether this process speaks for its job: rank 0 under torchrun (from its environment, before
    the processes are joined, which validates it), or a plain run. Every process of a job finds the
    same problems and notes; one says them."""
    return os.environ.get("RANK", "").strip() in ("", "0")
