"""Training config files: the shipped ones load, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["smoke", "harvard2d", "phantom3d"])
def test_shipped_configs_load_with_the_paper_optimiser(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.min_lr == pytest.approx(1e-6)
    assert config.train.grad_clip == 1.0
    assert config.loss.temperature == pytest.approx(0.1)


def test_harvard_root_is_resolved_relative_to_the_config_file():
    config = load_config(CONFIGS / "harvard2d.yaml")
    # ../../shared/... from configs/ is ../shared/... from the repository root.
    assert Path(config.data["root"]) == (CONFIGS.parent.parent / "shared" / "data" / "harvard-aanlib").resolve()


def test_an_extra_source_root_is_resolved_relative_to_the_config_file(tmp_path):
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "mixed.yaml"
    path.write_text("data: {kind: harvard, root: ../atlas, extra_sources: [{kind: folders, root: ../cases, "
                    "layout: brats}, {kind: phantom}]}\n")
    data = load_config(path).data
    assert data["root"] == str(tmp_path / "atlas")
    assert data["extra_sources"][0]["root"] == str(tmp_path / "cases")
    assert "root" not in data["extra_sources"][1]


def test_init_from_a_file_is_relative_to_the_config_and_a_name_is_kept(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    path = tmp_path / "configs" / "tune.yaml"
    path.write_text("data: {kind: phantom}\ntrain: {init_from: ../weights.safetensors}\n")
    assert load_config(path).train.init_from == str(tmp_path / "weights.safetensors")
    path.write_text("data: {kind: phantom}\ntrain: {init_from: unifuse-2d-harvard}\n")
    assert load_config(path).train.init_from == "unifuse-2d-harvard"


def test_overrides_replace_only_the_named_fields():
    config = load_config(CONFIGS / "smoke.yaml").with_overrides(train={"max_steps": 7}, data={"root": "/x"})
    assert config.train.max_steps == 7
    assert config.train.batch_size == 2
    assert config.data["root"] == "/x" and config.data["kind"] == "phantom"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train: {batch_size: 2}\n", "kind"),
        ("data: {kind: phantom}\nloss: {ssim_weight: 1}\n", "ssim_weight"),
        ("data: {kind: phantom}\ntrain: {max_steps: 2.5}\n", "integer"),
        ("data: {kind: phantom}\nmodel: {preset: huge}\n", "preset"),
        ("data: {kind: phantom}\noptimizer: {}\n", "optimizer"),
        ("data: [unclosed\n", "YAML"),
        ("data: {kind: phantom}\ntrain: {init_from: 3}\n", "init_from"),
        ("data: {kind: phantom}\nloss: {fusion_target: label}\n", "fusion_target must be one of"),
    ],
)
def test_config_mistakes_are_named(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        load_config(path)


def test_the_mmif_amin_second_stage_differs_from_the_first_only_in_its_start_and_learning_rate():
    """configs/mmif-amin-cpu-stage2.yaml continues mmif-amin-cpu.yaml's run (the bundled
    mmif-amin-2d-harvard is both in turn): same data, model, loss and schedule length."""
    first = load_config(CONFIGS / "mmif-amin-cpu.yaml").to_dict()
    second = load_config(CONFIGS / "mmif-amin-cpu-stage2.yaml").to_dict()
    assert second["train"].pop("init_from").endswith("runs/mmif-amin-cpu2/checkpoints/best.safetensors")
    assert first["train"].pop("init_from") is None
    assert (first["train"].pop("lr"), second["train"].pop("lr")) == (pytest.approx(5e-4), pytest.approx(2.5e-4))
    assert second == first
