"""engine.distributed outside a torchrun job: a stray variable is one clear line, not a traceback."""

from __future__ import annotations

import pytest

from napari_unifuse.cli import main
from napari_unifuse.engine.distributed import setup_distributed
from napari_unifuse.errors import InputError


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_the_job_is_one_process(no_torchrun):
    job = setup_distributed("cpu")
    assert (job.rank, job.world_size) == (0, 1)


def test_a_world_size_exported_for_another_tool_is_named_with_what_is_missing(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: start the "
                                         "batch with torchrun.*or unset WORLD_SIZE"):
        setup_distributed("cpu")
    no_torchrun.setenv("RANK", "0")
    with pytest.raises(InputError, match="but MASTER_ADDR, MASTER_PORT are not"):
        setup_distributed("cpu")


@pytest.mark.parametrize(("name", "value"), [("WORLD_SIZE", "two"), ("WORLD_SIZE", "0"), ("RANK", "-1")])
def test_a_variable_torchrun_would_never_set_is_refused(no_torchrun, name, value):
    no_torchrun.setenv("WORLD_SIZE", "2")
    for variable in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        no_torchrun.setenv(variable, "0" if variable == "RANK" else "1")
    no_torchrun.setenv(name, value)
    with pytest.raises(InputError, match=f"{name}='{value}' is not a {'process count' if name == 'WORLD_SIZE' else 'rank'} "
                                         "torchrun would set"):
        setup_distributed("cpu")


def test_an_exported_but_empty_world_size_is_no_setting(no_torchrun):
    no_torchrun.setenv("WORLD_SIZE", "")
    assert setup_distributed("cpu").world_size == 1


def test_fuse_in_a_shell_with_a_stray_world_size_says_so_in_one_line(no_torchrun, tmp_path, capsys):
    no_torchrun.setenv("WORLD_SIZE", "2")
    image = tmp_path / "image.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(image)
    assert main(["fuse", "--reference", str(image), "--moving", str(image), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "WORLD_SIZE=2 is set but RANK" in error[0]
