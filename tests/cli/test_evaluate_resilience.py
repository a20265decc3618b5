"""`unifuse evaluate` over a batch where one pair fails: the pairs already scored are kept, the failed
one is recorded with its error, and the run goes on (as `unifuse fuse --pairs` does)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from napari_unifuse.cli import evaluate as evaluate_module
from napari_unifuse.cli import main
from napari_unifuse.cli.evaluate import METRIC_COLUMNS
from napari_unifuse.data.phantoms import make_brain_phantom_slices
from napari_unifuse.engine.inference import FusionEngine
from napari_unifuse.engine.outputs import FolderBusyError, output_folder_lock
from napari_unifuse.errors import UniFuseError
from napari_unifuse.io import ImageVolume, write_image
from napari_unifuse.io.image import Geometry

SIDE = 48  # the fusion metrics' windows need at least 41 pixels
# An engine method and one classical pipeline: seconds for three pairs.
CHEAP_METHODS = ["--methods", "identity+average", "--baselines", "identity", "--fusion-rules", "average",
                 "--device", "cpu"]
ROWS = {"identity+average", "identity + average", "identity + copy-reference", "identity + copy-moving"}
ENGINE_OUT_OF_MEMORY = ("out of memory in the 'fuse' stage even with (4, 4) tiles on cpu; these are the smallest "
                        "tiles this model takes: free memory (close other programs) and run again")


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory):
    """Three T1/T2 pairs, the moving image shifted by 1, 2 and 3 pixels; named moving_1 ... moving_3."""
    root = tmp_path_factory.mktemp("pairs")
    slices = make_brain_phantom_slices((SIDE, SIDE), ("t1", "t2"))
    geometry = Geometry.identity(2)
    rows = []
    for shift in (1, 2, 3):
        label = slices["t2"].array.astype(np.float32)
        images = {"reference": slices["t1"].array.astype(np.float32), "moving": np.roll(label, shift, axis=1),
                  "label": label}
        for role, array in images.items():
            write_image(ImageVolume(array, geometry), root / f"{role}_{shift}.nii.gz")
        rows.append({role: f"{role}_{shift}.nii.gz" for role in images} | {"task": "t1-t2"})
    path = root / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def fail_engine_on(monkeypatch, moving_name: str, error: Exception) -> None:
    """The engine raises ``error`` on the pair whose moving image is ``moving_name``, as the engine
    does once halving the tiles no longer fits."""
    real_run_fusion = FusionEngine.run_fusion

    def run_fusion(self, reference, moving, **kwargs):
        if Path(str(moving.source)).name == moving_name:
            raise error
        return real_run_fusion(self, reference, moving, **kwargs)

    monkeypatch.setattr(FusionEngine, "run_fusion", run_fusion)


def evaluate(pairs_csv: Path, out: Path) -> int:
    return main(["evaluate", "--pairs", str(pairs_csv), "--out", str(out), *CHEAP_METHODS])


def test_a_pair_that_runs_out_of_memory_is_recorded_as_failed_and_the_others_are_kept(
        pairs_csv, tmp_path, monkeypatch, capsys):
    fail_engine_on(monkeypatch, "moving_2.nii.gz", UniFuseError(ENGINE_OUT_OF_MEMORY))
    out = tmp_path / "out"
    assert evaluate(pairs_csv, out) == 2
    stderr = capsys.readouterr().err
    assert f"[given 2/3] moving_2.nii.gz: error: {ENGINE_OUT_OF_MEMORY}\n" in stderr
    assert "unifuse evaluate: 1 of 3 pairs failed" in stderr.splitlines()[-1]

    rows = read_csv(out / "per_pair.csv")
    assert [row["pair"] for row in rows] == [f"moving_{shift}.nii.gz" for shift in (1, 2, 3) for _ in ROWS]
    assert {row["method"] for row in rows} == ROWS
    for row in rows:
        if row["pair"] == "moving_2.nii.gz":  # every method of the failed pair: NaN, with the reason
            assert row["error"] == ENGINE_OUT_OF_MEMORY
            assert all(math.isnan(float(row[column])) for column in METRIC_COLUMNS)
        else:
            assert row["error"] == ""
            assert math.isfinite(float(row["ncc"])) and float(row["seconds"]) > 0
    # The means are over the two scored pairs, and the table says so.
    summary = {row["method"]: row for row in read_csv(out / "evaluation.csv")}
    assert int(summary["identity + average"]["n"]) == 3 and int(summary["identity + average"]["ncc_n"]) == 2
    report = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "## Failed pairs\n\n" in report and f"- pair moving_2.nii.gz (given): {ENGINE_OUT_OF_MEMORY}\n" in report
    assert "(n=2)" in report
    assert (out / "paired.csv").is_file()


def test_an_allocation_failing_outside_the_engine_fails_only_its_pair(pairs_csv, tmp_path, monkeypatch, capsys):
    """A metric (or a classical registration) that runs out of memory raises a MemoryError, not the
    engine's explained UniFuseError: it too fails that pair alone, in one line."""
    real_score = evaluate_module.score

    def score(*args, **kwargs):
        pair = args[4]
        if pair.name == "moving_1.nii.gz":
            raise MemoryError
        return real_score(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "score", score)
    out = tmp_path / "out"
    assert evaluate(pairs_csv, out) == 2
    stderr = capsys.readouterr().err
    assert "[given 1/3] moving_1.nii.gz: error: the computer ran out of memory while scoring this pair" in stderr
    rows = read_csv(out / "per_pair.csv")
    failed = {row["pair"] for row in rows if row["error"]}
    assert failed == {"moving_1.nii.gz"} and len(rows) == 3 * len(ROWS)


def test_a_run_without_failures_writes_no_error_column(pairs_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate(pairs_csv, out) == 0
    assert "error" not in read_csv(out / "per_pair.csv")[0]
    assert "Failed pairs" not in (out / "evaluation.md").read_text(encoding="utf-8")
    assert "failed" not in capsys.readouterr().err


def test_when_every_pair_fails_nothing_is_written(pairs_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FusionEngine, "run_fusion", lambda *args, **kwargs: (_ for _ in ()).throw(
        UniFuseError(ENGINE_OUT_OF_MEMORY)))
    out = tmp_path / "out"
    assert evaluate(pairs_csv, out) == 2
    assert "every one of the 3 pairs failed" in capsys.readouterr().err.splitlines()[-1]
    assert not out.exists()


def test_a_programming_error_on_a_pair_still_stops_the_run(pairs_csv, tmp_path, monkeypatch):
    fail_engine_on(monkeypatch, "moving_2.nii.gz", ZeroDivisionError("a bug"))
    out = tmp_path / "out"
    with pytest.raises(ZeroDivisionError):
        evaluate(pairs_csv, out)
    assert not out.exists()


def test_an_interrupted_evaluation_leaves_no_results(pairs_csv, tmp_path, monkeypatch, capsys):
    fail_engine_on(monkeypatch, "moving_3.nii.gz", KeyboardInterrupt())
    out = tmp_path / "out"
    out.mkdir()
    assert evaluate(pairs_csv, out) == 130
    assert "unifuse evaluate: interrupted" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # no result file, no staging folder


def test_the_help_says_a_failed_pair_does_not_stop_the_evaluation():
    helped = " ".join(evaluate_module.__doc__.split())
    assert "A pair that fails altogether (out of memory even with the smallest tiles, say) does not stop" in helped


def test_an_evaluation_into_an_out_another_run_holds_is_refused_before_any_pair(pairs_csv, tmp_path, monkeypatch,
                                                                              capsys):
    """Two evaluations into one --out both ran, and the later one silently replaced the other's results."""
    monkeypatch.setattr(evaluate_module, "evaluate_pair", lambda *args, **kwargs: pytest.fail("a pair was computed"))
    out = tmp_path / "out"
    with output_folder_lock(out):
        assert evaluate(pairs_csv, out) == 2
    assert capsys.readouterr().err == (f"unifuse evaluate: error: {out}: another unifuse run is writing into this "
                                       "folder; wait for it to finish or write the outputs to another folder\n")
    assert not out.exists()  # the folder the lock created, with nothing put in it


def test_the_out_folder_is_held_from_the_first_pair_to_the_written_results(pairs_csv, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_evaluate_pair = evaluate_module.evaluate_pair
    held_while_scoring = []

    def evaluate_pair(*args, **kwargs):
        try:
            with output_folder_lock(out):
                held_while_scoring.append(False)
        except FolderBusyError:
            held_while_scoring.append(True)
        return real_evaluate_pair(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_pair", evaluate_pair)
    assert evaluate(pairs_csv, out) == 0
    assert held_while_scoring == [True, True, True]
    assert {path.name for path in out.iterdir()} == {"per_pair.csv", "evaluation.csv", "paired.csv", "evaluation.md"}


def test_the_help_says_a_second_evaluation_into_one_out_is_refused():
    helped = " ".join(evaluate_module.__doc__.split())
    assert "held for the whole run: a second evaluation into it is refused at once" in helped


def test_the_help_says_one_of_checkpoint_and_methods_is_needed(capsys):
    """Without either the run stops with "nothing to evaluate"; --help listed both as plain options."""
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    helped = capsys.readouterr().out
    group = helped[helped.index("methods (one or both):"):]
    assert group.index("--checkpoint") < group.index("--methods") < group.index("pairs (one of):")
