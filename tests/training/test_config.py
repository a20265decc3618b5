"""Training config files: the shipped ones load, mistakes are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from napari_unifuse.errors import InputError
from napari_unifuse.training.config import load_config, read_yaml

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


def test_a_relative_init_from_beside_the_config_is_found_from_another_working_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "resources").mkdir()
    (tmp_path / "resources" / "weights.safetensors").write_bytes(b"")
    path = tmp_path / "configs" / "tune.yaml"
    path.write_text("data: {kind: phantom}\ntrain: {init_from: ../resources/weights.safetensors}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(Path("..") / "configs" / "tune.yaml").train.init_from == str(
        tmp_path / "resources" / "weights.safetensors")


def test_a_bare_init_from_name_means_the_packaged_checkpoint_even_beside_a_file_of_that_name(tmp_path):
    (tmp_path / "unifuse-2d-harvard").write_bytes(b"")
    path = tmp_path / "tune.yaml"
    path.write_text("data: {kind: phantom}\ntrain: {init_from: unifuse-2d-harvard}\n")
    assert load_config(path).train.init_from == "unifuse-2d-harvard"


def test_overrides_replace_only_the_named_fields():
    config = load_config(CONFIGS / "harvard2d.yaml").with_overrides(train={"max_steps": 7}, data={"root": "/x"})
    assert config.train.max_steps == 7
    assert config.train.batch_size == load_config(CONFIGS / "harvard2d.yaml").train.batch_size
    assert config.data["root"] == "/x" and config.data["kind"] == "harvard"


def test_a_data_root_override_of_a_generated_data_kind_says_where_it_applies():
    with pytest.raises(InputError, match="data.kind phantom .*reads no data.root: --data-root applies to harvard"):
        load_config(CONFIGS / "smoke.yaml").with_overrides(data={"root": "/x"})


def test_overrides_are_range_checked_like_the_file():
    with pytest.raises(InputError, match=r"train.min_lr must be between 0 and train.lr \(1e-07\)"):
        load_config(CONFIGS / "smoke.yaml").with_overrides(train={"lr": 1e-7})


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
        ("data: {kind: phantom}\ntrain: {batch_size: true}\n", "'train.batch_size' must be a number, got True"),
        ("data: {kind: phantom}\nseed: true\n", "seed must be a non-negative integer, got True"),
        ("data: {kind: phantom, tasks: []}\n", r"data.tasks must be a list of at least one task, got \[\]"),
        ("data: {kind: phantom, extra_sources: [{kind: phantom, tasks: []}]}\n",
         r"data.extra_sources\[0\].tasks must be a list of at least one task"),
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
    # The first stage's own run folder: `unifuse train --config configs/mmif-amin-cpu.yaml` writes
    # runs/mmif-amin-cpu by default, so the two commands chain without an --out.
    assert second["train"].pop("init_from").endswith("runs/mmif-amin-cpu/checkpoints/best.safetensors")
    assert first["train"].pop("init_from") is None
    assert (first["train"].pop("lr"), second["train"].pop("lr")) == (pytest.approx(5e-4), pytest.approx(2.5e-4))
    assert second == first


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        # clip_grad_norm_ with max 0 zeroes every gradient; a negative max reverses them.
        ("train", "grad_clip", "-1", r"above 0 \(\.inf: no clipping\)"),
        ("train", "grad_clip", "0", r"above 0 \(\.inf: no clipping\)"),
        ("train", "lr", "-1e-4", "a finite number above 0"),
        ("train", "lr", "0", "a finite number above 0"),
        ("train", "lr", ".inf", "a finite number above 0"),
        ("train", "lr", ".nan", "a finite number above 0"),
        ("train", "min_lr", "-1e-6", r"between 0 and train.lr \(0.0001\)"),
        ("train", "min_lr", "1e-3", r"between 0 and train.lr \(0.0001\)"),
        ("train", "weight_decay", "-1", "a finite number of at least 0"),
        ("train", "num_workers", "-1", "at least 0"),
        ("train", "val_batches", "0", "at least 1"),
        ("train", "val_every", "0", "at least 1"),
        ("train", "checkpoint_every", "0", "at least 1"),
        ("train", "log_every", "0", "at least 1"),
        ("loss", "moda_negatives", "-3", "at least 1"),
        ("loss", "moda_anchors", "0", "at least 1"),
        ("loss", "temperature", "0", "a finite number above 0"),
        ("loss", "ssim", "-1", "a finite number of at least 0"),
        ("data", "val_length", "0", "an integer of at least 1"),
        ("data", "train_length", "0", "an integer of at least 1"),
    ],
)
def test_out_of_range_numbers_are_refused_at_load_naming_the_key_and_range(tmp_path, section, key, value, allowed):
    entry = f"{key}: {value}"
    path = tmp_path / "config.yaml"
    path.write_text(f"data: {{kind: phantom, {entry}}}\n" if section == "data"
                    else f"data: {{kind: phantom}}\n{section}: {{{entry}}}\n")
    with pytest.raises(InputError, match=f"{section}.{key} must be {allowed}, got "):
        load_config(path)


def test_the_range_edges_that_still_train_are_accepted(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data: {kind: phantom, val_length: 1}\n"
                    "train: {lr: 1e-4, min_lr: 1e-4, weight_decay: 0, num_workers: 0, grad_clip: .inf}\n"
                    "loss: {moda_negatives: 1, smooth: 0}\n")
    config = load_config(path)
    assert config.train.min_lr == config.train.lr and config.train.grad_clip == float("inf")


@pytest.mark.parametrize("name", sorted(path.name for path in CONFIGS.glob("*.yaml")))
def test_every_shipped_configs_init_from_resolves_from_any_working_directory(name, tmp_path, monkeypatch):
    from napari_unifuse.model.checkpoint import resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    config = load_config(CONFIGS / name)
    if config.train.init_from is not None and not str(config.train.init_from).startswith("runs/"):
        assert Path(resolve_checkpoint(config.train.init_from)).is_file()


@pytest.mark.parametrize(("folders", "message"), [
    ("layout: synthrad, moving_modality: pet", "data: layout 'synthrad' sets .*not both"),
    ("reference: mr.nii.gz, moving: ct.nii.gz, reference_modality: mr, moving_modality: auto",
     "data: moving_modality 'auto' picks no degradation"),
])
def test_a_folders_section_that_would_train_on_something_else_than_it_says_is_refused_at_load(tmp_path, folders,
                                                                                              message):
    path = tmp_path / "folders.yaml"
    path.write_text(f"data: {{kind: folders, root: cases, {folders}}}\n")
    with pytest.raises(InputError, match=message):
        load_config(path)
    path.write_text(f"data: {{kind: phantom, extra_sources: [{{kind: folders, root: cases, {folders}}}]}}\n")
    with pytest.raises(InputError, match=message.replace("data:", r"data.extra_sources\[0\]:")):
        load_config(path)


def _stage_config(tmp_path: Path, stage: str, loss: str = "", train: str = "") -> Path:
    """A config of a partial ``stage`` with ``loss`` (a YAML mapping) and more ``train`` keys."""
    path = tmp_path / f"{stage}.yaml"
    overrides = "model: {overrides: {image_restoration_width: 8}}\n" if stage == "image_restoration" else ""
    path.write_text(f"data: {{kind: phantom}}\n{overrides}train: {{stage: {stage}, init_from: net.safetensors"
                    f"{', ' + train if train else ''}}}\n" + (f"loss: {loss}\n" if loss else ""))
    return path


@pytest.mark.parametrize(("stage", "loss", "train", "named"), [
    # Two head refits with loss.ce 0 and 1, loss.reg 1000 and grad_clip 1e-6 gave the same weights.
    ("degradation_head", "{ce: 0.0}", "", "loss.ce"),
    ("degradation_head", "", "grad_clip: 1.0e-6", "train.grad_clip"),
    ("image_restoration", "{ce: 2.0, restore: 1.0}", "", "loss.ce"),
    ("fusion_weight", "{restore: 1.0, balance: 3.0}", "", "loss.restore"),
])
def test_a_key_the_stage_does_not_use_is_refused_in_one_line(tmp_path, stage, loss, train, named):
    with pytest.raises(InputError) as refusal:
        load_config(_stage_config(tmp_path, stage, loss, train))
    message = str(refusal.value)
    assert named in message and f"train.stage {stage!r} does not use" in message and "\n" not in message


def test_a_stage_weighs_the_terms_that_cannot_reach_its_module_zero_and_records_only_what_it_reads(tmp_path):
    config = load_config(_stage_config(tmp_path, "fusion_weight", "{inten: 0.6}"))
    assert (config.loss.inten, config.loss.balance, config.loss.ce, config.loss.restore) == (0.6, 3.0, 0.0, 0.0)
    recorded = config.to_dict()
    assert set(recorded["loss"]) == {"ssim", "inten", "grad", "balance", "fusion_target"}
    head = load_config(_stage_config(tmp_path, "degradation_head"))
    assert head.to_dict()["loss"] == {} and "grad_clip" not in head.to_dict()["train"]
    # What to_dict records loads again (config.yaml, --resume, with_overrides).
    assert head.with_overrides(train={"lr": 1e-3}).train.lr == 1e-3


FUSION_LOSSES = {"ssim", "inten", "grad", "balance", "fusion_target"}


@pytest.mark.parametrize(("name", "recorded_loss"), [
    ("harvard2d-cpu-head", set()), ("phantom3d-cpu-head", set()), ("phantom3d-cpu-head-as-given", set()),
    ("harvard2d-cpu-restoration", {"restore", "fusion_target"}),
    ("phantom3d-cpu-restoration", {"restore", "fusion_target"}),
    ("harvard2d-cpu-fusion-weight", FUSION_LOSSES),
])
def test_the_shipped_stage_configs_load_and_record_only_the_losses_their_stage_trains_with(name, recorded_loss):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert set(config.to_dict()["loss"]) == recorded_loss


def test_a_misspelled_misalignment_key_is_refused_at_load_naming_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("data: {kind: phantom, misalignment: {max_rotaton_deg: 90.0}}\n")
    with pytest.raises(InputError, match=r"typo.yaml: data.misalignment: unknown key max_rotaton_deg; accepted: "):
        load_config(path)


@pytest.mark.parametrize(("entry", "message"), [
    ("none_fraction: 20%", "data.none_fraction must be a number between 0 and 1, got '20%'"),
    ("none_fraction: .nan", "data.none_fraction must be a number between 0 and 1, got nan"),
    ("severity: 0.5", r"data.severity must be \[low, high\], two numbers with 0 <= low <= high <= 1, got 0.5"),
    ("severity: [low, high]", r"data.severity must be \[low, high\].*got \['low', 'high'\]"),
    ("val_fraction: x", "data.val_fraction must be a number of at least 0 and below 1, got 'x'"),
    ("split_seed: a", "data.split_seed must be a non-negative integer, got 'a'"),
    ("split_seed: -1", "data.split_seed must be a non-negative integer, got -1"),
    ("samples_per_case: two", "data.samples_per_case must be an integer of at least 1, got 'two'"),
    ("samples_per_case: -2", "data.samples_per_case must be an integer of at least 1, got -2"),
    ("crop: 32.5", "data.crop must be one size or one per axis, integers of at least 1, got 32.5"),
    ("crop: '32'", "data.crop must be one size or one per axis, integers of at least 1, got '32'"),
    ("size: [128, 0]", r"data.size must be one size or one per axis, integers of at least 1, got \[128, 0\]"),
    ("whole_image_degradations: motion",
     r"data.whole_image_degradations must be a list of degradation names, e.g. \[motion\], got 'motion'"),
])
def test_a_data_value_of_the_wrong_type_is_refused_at_load_naming_the_key(tmp_path, entry, message):
    """These gave tracebacks (or, for a string, its letters as values) where the datasets were built."""
    path = tmp_path / "config.yaml"
    path.write_text(f"data: {{kind: folders, root: cases, layout: brats, {entry}}}\n")
    with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {message}$"):
        load_config(path)
    path.write_text(f"data: {{kind: phantom, extra_sources: [{{kind: folders, root: cases, layout: brats, {entry}}}]}}\n")
    with pytest.raises(InputError, match=message.replace("data.", r"data.extra_sources\[0\].", 1)):
        load_config(path)


def test_the_data_values_that_train_are_accepted(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("data: {kind: folders, root: cases, layout: brats, none_fraction: 1, severity: [0, 1], "
                    "val_fraction: 0.5, split_seed: 0, samples_per_case: 1, crop: [16, 24], "
                    "whole_image_degradations: [motion], extra_sources: [{kind: harvard, root: atlas, size: 64, "
                    "crop: null}]}\n")
    assert load_config(path).data["crop"] == [16, 24]


@pytest.mark.parametrize("pattern", ["'{patient}_spect.png'", "'{}.png'", "'a{b.png'"])
def test_a_folder_pattern_with_another_placeholder_than_case_is_refused_at_load(tmp_path, pattern):
    path = tmp_path / "config.yaml"
    path.write_text(f"data: {{kind: folders, root: cases, reference: mr.png, moving: {pattern}, "
                    "reference_modality: mr, moving_modality: spect}\n")
    with pytest.raises(InputError, match=r"data.moving .* holds .*: the only placeholder is \{case\}"):
        load_config(path)


@pytest.mark.parametrize("given", ["harvard2d-cpu", "harvard2d-cpu.yaml", "configs/harvard2d-cpu.yaml"])
def test_a_packaged_config_loads_by_name_from_any_folder(tmp_path, monkeypatch, given):
    """An installed package held no configs, so the README's `--config configs/...` ran only in the checkout."""
    monkeypatch.chdir(tmp_path)
    config = load_config(given)
    # The packaged copy is the checkout's file: its relative data.root reaches the same folder.
    assert config.to_dict() == load_config(CONFIGS / "harvard2d-cpu.yaml").to_dict()
    assert Path(config.source).resolve() == (CONFIGS / "harvard2d-cpu.yaml").resolve()


def test_a_local_config_file_wins_over_the_packaged_one_of_its_name(tmp_path, monkeypatch):
    local = tmp_path / "configs" / "smoke.yaml"
    local.parent.mkdir()
    local.write_text("seed: 7\ndata: {kind: phantom}\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("configs/smoke.yaml")
    assert config.seed == 7 and config.source == "configs/smoke.yaml"


@pytest.mark.parametrize("given", ["no-such-config", "elsewhere/smoke.yaml", "smoke.yml"])
def test_a_missing_config_that_names_no_packaged_one_lists_the_packaged_names(tmp_path, monkeypatch, given):
    """Only a bare name or the checkout's configs/NAME.yaml means a packaged config: another path stays a path."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"^{re.escape(given)}: training config not found: give a YAML file or "
                                         r"a packaged config's name \(.*harvard2d-cpu, .*smoke\)$"):
        load_config(given)


def test_the_package_ships_every_config_and_the_license():
    """pyproject's package data and license files, read as setuptools reads them, against the checkout."""
    import tomllib

    from napari_unifuse.training.config import list_packaged_configs, packaged_config_dir

    package = Path(__file__).resolve().parents[2] / "napari_unifuse"
    project = tomllib.loads((CONFIGS.parent / "pyproject.toml").read_text(encoding="utf-8"))
    shipped = {path.resolve() for pattern in project["tool"]["setuptools"]["package-data"]["napari_unifuse"]
               for path in package.glob(pattern) if path.is_file()}
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert configs and {path.resolve() for path in configs} <= shipped
    assert packaged_config_dir().resolve() == CONFIGS.resolve()
    assert list_packaged_configs() == sorted(path.stem for path in configs)
    assert project["project"]["license"] == "BSD-3-Clause"
    licenses = [CONFIGS.parent / name for name in project["project"]["license-files"]]
    assert licenses and all("BSD 3-Clause License" in path.read_text(encoding="utf-8") for path in licenses)
    # The README's install command reads constraints.txt: the sdist must hold it.
    assert "include constraints.txt" in (CONFIGS.parent / "MANIFEST.in").read_text(encoding="utf-8").splitlines()


def test_a_repeated_section_is_refused_naming_the_key_and_both_lines(tmp_path):
    # PyYAML alone keeps the second train: section and drops the first one's settings without a word.
    path = tmp_path / "twice.yaml"
    path.write_text("data: {kind: phantom}\ntrain:\n  batch_size: 2\n  log_every: 1\ntrain:\n  max_steps: 5\n")
    with pytest.raises(InputError, match=r"'train' is given twice \(lines 2 and 5\)"):
        load_config(path)


def test_a_repeated_key_inside_a_section_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("data: {kind: phantom}\ntrain:\n  max_steps: 3\n  max_steps: 5\n")
    with pytest.raises(InputError, match=r"'max_steps' is given twice \(lines 3 and 4\)"):
        load_config(path)


def test_keys_a_merge_brings_in_may_be_replaced_by_the_mappings_own():
    values = read_yaml("base: &base {max_steps: 3, batch_size: 2}\ntrain: {<<: *base, max_steps: 5}\n")
    assert values["train"] == {"max_steps": 5, "batch_size": 2}
