"""The UniFuse network (pure torch, generic over 2-D / 3-D); see docs/architecture.md."""

from napari_unifuse.model.config import UniFuseConfig
from napari_unifuse.model.unifuse import UniFuse, UniFuseOutput

__all__ = ["UniFuse", "UniFuseConfig", "UniFuseOutput"]
