"""Training UniFuse: losses (Eq. 1-15), datasets with on-the-fly degradation + misalignment, and
the (distributed, resumable) training loop behind `unifuse train`.

    from napari_unifuse.training.config import load_config
    from napari_unifuse.training.trainer import train
    result = train(load_config("configs/smoke.yaml"), "runs/smoke", device="cpu")
"""
