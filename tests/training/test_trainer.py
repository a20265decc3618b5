"""The training loop through its Python API: a resumed run equals an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from napari_unifuse.model import UniFuse
from napari_unifuse.training.config import load_config
from napari_unifuse.training.trainer import model_config, train

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _tiny_config():
    # 16x16 crops and no intermediate validation keep the runs of this test short.
    return load_config(SMOKE).with_overrides(
        data={"crop": 16}, train={"max_steps": 3, "val_every": 100, "checkpoint_every": 100}
    )


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    config = _tiny_config()
    straight = train(config, tmp_path / "straight", device="cpu", progress=False)
    assert straight.step == 3

    stopped = train(config, tmp_path / "split", device="cpu", progress=False, stop_at_step=2)
    assert stopped.step == 2
    state = torch.load(tmp_path / "split" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]  # AdamW moments were saved
    resumed = train(config, tmp_path / "split", device="cpu", resume=True, progress=False)
    assert resumed.step == 3

    expected = load_file(straight.last_checkpoint)
    got = load_file(resumed.last_checkpoint)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # ... and training moved the weights away from the seeded initialisation.
    torch.manual_seed(config.seed)
    initial = UniFuse(model_config(config)).state_dict()
    assert any(not torch.equal(initial[name], expected[name]) for name in expected)
