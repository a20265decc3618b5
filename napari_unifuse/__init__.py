"""napari-unifuse: UniFuse (ICCV 2025) for joint alignment, restoration and fusion of
degraded, misaligned multimodal medical images, in napari and on the command line."""

__version__ = "0.1.0"
