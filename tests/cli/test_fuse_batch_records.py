"""What `unifuse fuse --pairs` records of a batch into an --out other batches share: failures carried
until their pair is done, pairs another run held, folders of moving files of one name from other
batches, and batch files in --out that unifuse did not write."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from napari_unifuse.cli import fuse as fuse_module
from napari_unifuse.cli import main
from napari_unifuse.engine.device import resolve_device
from napari_unifuse.engine.outputs import output_folder_lock

CHEAP = ("--method", "identity+average", "--no-quality", "--device", "cpu")


def blob(shape, shift=0.0):
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (255 * np.exp(-3 * sum((g - shift) ** 2 for g in grids))).astype(np.uint8)


def picture(path: Path, shift: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(blob((32, 28), shift)).save(path)
    return path


def fuse(*argv):
    return main(["fuse", *map(str, argv)])


def pairs_csv(path: Path, *rows: tuple[str, str]) -> Path:
    path.write_text("reference,moving\n" + "".join(f"{reference},{moving}\n" for reference, moving in rows),
                    encoding="utf-8")
    return path


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def moving_fused_in(folder: Path) -> str:
    return json.loads((folder / "provenance.json").read_text(encoding="utf-8"))["inputs"]["moving"]["path"]


def test_a_failed_pair_retried_in_a_csv_of_its_own_is_no_longer_listed_as_failed(tmp_path, capsys):
    """Carried failures were matched by folder name: the retry's one-row CSV names the pair's folder
    `mov`, the full CSV `bad_mov`, so the pair stayed "failed in an earlier batch" for good."""
    picture(tmp_path / "ref.png")
    picture(tmp_path / "good" / "mov.png", 0.1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "mov.png").write_bytes(b"\x89PNG not really")
    everything = pairs_csv(tmp_path / "all.csv", ("ref.png", "good/mov.png"), ("ref.png", "bad/mov.png"))
    out = tmp_path / "out"
    assert fuse("--pairs", everything, "--out", out, *CHEAP) == 2
    assert [(o["name"], o["status"]) for o in summary_of(out)["outcomes"]] == [("good_mov", "done"),
                                                                               ("bad_mov", "failed")]

    picture(tmp_path / "bad" / "mov.png", 0.2)  # repaired
    retry = pairs_csv(tmp_path / "retry.csv", ("ref.png", "bad/mov.png"))
    assert fuse("--pairs", retry, "--out", out, *CHEAP) == 0
    assert [(o["name"], o["status"]) for o in summary_of(out)["outcomes"]] == [("mov", "done")]
    assert summary_of(out)["earlier_failures"] == []

    assert fuse("--pairs", everything, "--out", out, *CHEAP) == 0  # finds the retried pair in mov
    assert [(o["name"], o["status"]) for o in summary_of(out)["outcomes"]] == [("good_mov", "skipped"),
                                                                               ("mov", "skipped")]
    assert summary_of(out)["earlier_failures"] == []
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert "Failed pairs" not in (out / "index.html").read_text(encoding="utf-8")


def test_a_carried_failure_stays_until_its_own_pair_runs_whatever_its_folder_was_named(tmp_path):
    job = type("Job", (), {"world_size": 1, "device": "cpu"})()
    failed = {"name": "bad_mov", "status": "failed", "error": "unreadable",
              "reference": "/data/ref.png", "moving": "/data/bad/mov.png"}
    (tmp_path / "summary.json").write_text(json.dumps({"created": "2026-12-03T10:00:00+00:00", "pairs": 1,
                                                       "outcomes": [failed]}), encoding="utf-8")
    other_pair_in_its_folder = {"name": "bad_mov", "status": "done", "reference": "/data/ref.png",
                                "moving": "/elsewhere/bad/mov.png"}
    busy_pair = {**failed, "name": "mov", "status": "busy"}  # another run held it: not run by this batch
    for outcome in (other_pair_in_its_folder, busy_pair):
        pair = fuse_module.Pair(Path("/data/ref.png"), Path(outcome["moving"]), output_name=outcome["name"])
        fuse_module.write_summary([outcome], [pair], job, tmp_path, tmp_path / "later.csv")
        assert [(o["name"], o["error"]) for o in summary_of(tmp_path)["earlier_failures"]] == [
            ("bad_mov", "unreadable")]


def test_a_pair_another_run_held_is_tried_again_after_the_others_and_is_no_failure(tmp_path, capsys, monkeypatch):
    """Two batches into one --out: the last summary.json called every pair the other run had fused
    failed, and the QC index listed them among the failed pairs."""
    reference, pet7, pet8 = (picture(tmp_path / name, shift) for name, shift in (("ref.png", 0.0), ("pet7.png", 0.1),
                                                                                   ("pet8.png", 0.2)))
    out = tmp_path / "out"
    batch = pairs_csv(tmp_path / "pairs.csv", (reference, pet7), (reference, pet8))
    other_run = ExitStack()
    real_fuse_pair = fuse_module.fuse_pair

    def the_other_run_finishes_pet7_meanwhile(pair, *args, **kwargs):
        if pair.name == "pet8":  # the other run, which took pet7's folder first, writes its results now
            other_run.close()
            assert fuse("--reference", reference, "--moving", pet7, "--out", out, *CHEAP) == 0
        return real_fuse_pair(pair, *args, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_pair", the_other_run_finishes_pet7_meanwhile)
    other_run.enter_context(output_folder_lock(out / "pet7"))

    assert fuse("--pairs", batch, "--out", out, *CHEAP) == 0

    printed = capsys.readouterr()
    assert "pet7: skipped, already done, found when the other run let go of its folder" in printed.out
    assert "pairs failed" not in printed.err
    summary = summary_of(out)
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "skipped"), ("pet8", "done")]
    assert summary["outcomes"][0]["after_another_run"] is True
    assert (summary["failed"], summary["busy"]) == (0, 0)
    assert main(["report", str(out)]) == 0
    assert "Failed pairs" not in (out / "index.html").read_text(encoding="utf-8")


def test_a_pair_another_run_left_unfinished_is_fused_when_tried_again(tmp_path, capsys, monkeypatch):
    reference = picture(tmp_path / "ref.png")
    out = tmp_path / "out"
    batch = pairs_csv(tmp_path / "pairs.csv", (reference, picture(tmp_path / "pet7.png", 0.1)),
                      (reference, picture(tmp_path / "pet8.png", 0.2)))
    other_run = ExitStack()
    real_fuse_pair = fuse_module.fuse_pair

    def the_other_run_gives_up(*args, **kwargs):
        other_run.close()
        return real_fuse_pair(*args, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_pair", the_other_run_gives_up)
    other_run.enter_context(output_folder_lock(out / "pet7"))

    assert fuse("--pairs", batch, "--out", out, *CHEAP) == 0
    assert [(o["name"], o["status"]) for o in summary_of(out)["outcomes"]] == [("pet7", "done"), ("pet8", "done")]


def test_a_pair_another_run_holds_to_the_end_is_recorded_busy_not_failed(tmp_path, capsys):
    reference = picture(tmp_path / "ref.png")
    out = tmp_path / "out"
    batch = pairs_csv(tmp_path / "pairs.csv", (reference, picture(tmp_path / "pet7.png", 0.1)),
                      (reference, picture(tmp_path / "pet8.png", 0.2)))
    with output_folder_lock(out / "pet7"):
        assert fuse("--pairs", batch, "--out", out, *CHEAP) == 2  # pet7 is not known to be done
    err = capsys.readouterr().err
    assert f"[1/2] pet7: another unifuse run is writing into {out / 'pet7'}; tried again after this batch's" in err
    assert f"[1/2] pet7: busy: another unifuse run is still writing into {out / 'pet7'}" in err
    assert "1 of 2 pairs were still being written by another unifuse run when this batch ended; rerun" in err
    assert "pairs failed" not in err
    summary = summary_of(out)
    assert [(o["name"], o["status"]) for o in summary["outcomes"]] == [("pet7", "busy"), ("pet8", "done")]
    assert "another unifuse run is writing into this folder" in summary["outcomes"][0]["error"]
    assert (summary["failed"], summary["busy"]) == (0, 1)
    # The QC index's counts add up to the batch's pairs (it listed done, skipped and failed only).
    assert main(["report", str(out)]) == 0
    assert "2 pairs, 1 done, 0 skipped, 0 failed, 1 busy (another run held their folders" in \
        (out / "index.html").read_text(encoding="utf-8")


def test_a_later_batchs_moving_file_of_an_earlier_ones_name_gets_a_folder_of_its_own(tmp_path, capsys):
    """ct1/mov.png then a/mov.png into one --out: the second clashed on OUT/mov, and the message's
    --overwrite deleted the first subject's results."""
    for subject, shift in (("ct1", 0.1), ("a", 0.2)):
        picture(tmp_path / subject / "ref.png")
        picture(tmp_path / subject / "mov.png", shift)
    first = pairs_csv(tmp_path / "batch1.csv", ("ct1/ref.png", "ct1/mov.png"))
    second = pairs_csv(tmp_path / "batch2.csv", ("a/ref.png", "a/mov.png"))
    out = tmp_path / "out"
    assert fuse("--pairs", first, "--out", out, *CHEAP) == 0
    assert fuse("--pairs", second, "--out", out, *CHEAP) == 0, capsys.readouterr().err

    assert moving_fused_in(out / "mov") == str(tmp_path / "ct1" / "mov.png")
    assert moving_fused_in(out / "a_mov") == str(tmp_path / "a" / "mov.png")
    capsys.readouterr()
    for rerun in (first, second):  # each finds its folder again
        assert fuse("--pairs", rerun, "--out", out, *CHEAP) == 0
    assert fuse("--reference", tmp_path / "a" / "ref.png", "--moving", tmp_path / "a" / "mov.png", "--out", out,
                *CHEAP) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped, already done") == 3 and printed.count(f"({out / 'a_mov'})") == 2
    assert sorted(path.name for path in out.iterdir() if path.is_dir()) == ["a_mov", "mov"]


def test_a_folder_holding_another_pairs_results_is_refused_naming_that_pair(tmp_path, capsys):
    """The same moving file with another reference keeps its folder: the message said only "a
    different reference image; pass --overwrite", which deletes the other pair's results."""
    for name, shift in (("ref1.png", 0.0), ("ref2.png", 0.3), ("mov.png", 0.1)):
        picture(tmp_path / name, shift)
    out = tmp_path / "out"
    assert fuse("--pairs", pairs_csv(tmp_path / "one.csv", ("ref1.png", "mov.png")), "--out", out, *CHEAP) == 0
    capsys.readouterr()

    assert fuse("--reference", tmp_path / "ref2.png", "--moving", tmp_path / "mov.png", "--out", out, *CHEAP) == 2

    assert capsys.readouterr().err == (
        f"unifuse fuse: error: {out / 'mov'}: holds the results of another pair (reference {tmp_path / 'ref1.png'}, "
        f"moving {tmp_path / 'mov.png'}), which --overwrite would delete; choose another --out, or pass --overwrite "
        "only if those results may go\n")


@pytest.mark.parametrize(("name", "flags", "said"), [
    ("summary.json", (), "is not a batch summary unifuse wrote, and the batch's summary goes there, so nothing was "
                         "fused; move it away or choose another --out"),
    ("index.html", ("--report",), "is not a QC index unifuse wrote, so it is left as it is and nothing was fused; "
                                  "unifuse report {out} --overwrite replaces it with a QC index, or fuse without "
                                  "--report"),
])
def test_a_batch_file_unifuse_did_not_write_is_refused_before_any_pair(tmp_path, capsys, name, flags, said):
    """A foreign summary.json was replaced without a word; a foreign index.html was refused only
    after every pair had been fused."""
    reference = picture(tmp_path / "ref.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_text('{"study": "my cohort notes"}\n', encoding="utf-8")
    batch = pairs_csv(tmp_path / "pairs.csv", (reference, picture(tmp_path / "pet7.png", 0.1)))

    assert fuse("--pairs", batch, "--out", out, *CHEAP, *flags) == 2

    assert capsys.readouterr().err == f"unifuse fuse: error: {out / name}: {said.format(out=out)}\n"
    assert sorted(path.name for path in out.iterdir()) == [name]
    assert (out / name).read_text(encoding="utf-8") == '{"study": "my cohort notes"}\n'


def test_the_summary_error_names_busy_pairs_as_another_runs_not_as_failed():
    """A summary that cannot be written says what the batch left: busy pairs were counted failed."""
    busy, done, failed = ({"status": status} for status in ("busy", "done", "failed"))
    assert fuse_module.where_the_outputs_are([busy]) == (
        "no pair has outputs yet: 1 of 1 pairs were still being written by another unifuse run")
    said = fuse_module.where_the_outputs_are([done, busy, failed])
    assert "1 finished pair(s)" in said and "1 of 3 pairs failed" in said
    assert "1 of 3 pairs were still being written by another unifuse run" in said
    assert fuse_module.where_the_outputs_are([failed, failed]) == (
        "no pair has outputs: all 2 pairs failed (the errors are above)")


def test_a_run_left_on_auto_records_auto_as_the_device_asked_for(tmp_path):
    """The CLI handed the engine the device it had resolved, so provenance said "cpu" was asked."""
    reference, moving = picture(tmp_path / "ref.png"), picture(tmp_path / "mov.png", 0.1)
    out = tmp_path / "out"
    assert fuse("--reference", reference, "--moving", moving, "--out", out, *CHEAP[:3]) == 0
    provenance = json.loads(next(out.rglob("provenance.json")).read_text(encoding="utf-8"))
    assert (provenance["requested_device"], provenance["device"]) == ("auto", str(resolve_device("auto")))


def test_the_summary_names_each_pairs_folder_absolutely_as_it_does_the_inputs(tmp_path, capsys, monkeypatch):
    """`output` was relative to the cwd of the batch that wrote it (`../out/mov` beside `out/bad`),
    which the summary does not record."""
    picture(tmp_path / "data" / "ref.png")
    picture(tmp_path / "data" / "mov.png", 0.1)
    (tmp_path / "csvs").mkdir()
    pairs = pairs_csv(tmp_path / "csvs" / "pairs.csv", ("../data/ref.png", "../data/mov.png"))
    monkeypatch.chdir(tmp_path / "csvs")

    assert fuse("--pairs", pairs.name, "--out", "../out", *CHEAP) == 0, capsys.readouterr().err

    [outcome] = summary_of(tmp_path / "out")["outcomes"]
    assert outcome["output"] == str(tmp_path / "out" / "mov")
    assert outcome["moving"] == str(tmp_path / "data" / "mov.png")


def test_a_pair_fused_alone_after_it_failed_in_a_running_batch_is_indexed_as_a_later_run(tmp_path, capsys,
                                                                                          monkeypatch):
    """The index compared the single run's provenance with the summary's `created`, written when the
    batch ended: the fixed pair's newer outputs were "an earlier run's outputs", not of this attempt."""
    reference, good = picture(tmp_path / "ref.png"), picture(tmp_path / "good.png", 0.1)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG truncated")
    out = tmp_path / "out"
    real_fuse_pair = fuse_module.fuse_pair

    def the_user_fuses_the_fixed_pair_alone_meanwhile(pair, *args, **kwargs):
        if pair.name == "good":  # after bad failed, before the batch ends
            picture(bad, 0.2)
            time.sleep(1.1)  # timestamps count whole seconds: the single run's is later than the failure's
            assert fuse("--reference", reference, "--moving", bad, "--out", out, *CHEAP) == 0
        return real_fuse_pair(pair, *args, **kwargs)

    monkeypatch.setattr(fuse_module, "fuse_pair", the_user_fuses_the_fixed_pair_alone_meanwhile)
    assert fuse("--pairs", pairs_csv(tmp_path / "pairs.csv", (reference, bad), (reference, good)), "--out", out,
                *CHEAP) == 2
    capsys.readouterr()
    assert main(["report", str(out)]) == 0

    index = (out / "index.html").read_text(encoding="utf-8")
    assert "an earlier run" not in index
    assert "<td>bad</td><td>" in index and "a later run's (bad, listed above)" in index


def test_the_summary_records_each_pairs_label_when_it_ended_and_the_version(tmp_path):
    reference, labelled, plain = (picture(tmp_path / name, shift) for name, shift in (("ref.png", 0.0),
                                                                                       ("a.png", 0.1), ("b.png", 0.2)))
    label = picture(tmp_path / "label.png", 0.05)
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"reference,moving,label\n{reference},{labelled},{label}\n{reference},{plain},\n",
                     encoding="utf-8")
    out = tmp_path / "out"
    assert fuse("--pairs", pairs, "--out", out, *CHEAP) == 0

    summary = summary_of(out)
    with_label, without = summary["outcomes"]
    assert with_label["label"] == str(label) and "label" not in without
    for outcome in (with_label, without):
        assert datetime.fromisoformat(outcome["finished"]) <= datetime.fromisoformat(summary["created"])
    provenance = json.loads((out / "a" / "provenance.json").read_text(encoding="utf-8"))
    assert summary["versions"] == {"napari_unifuse": provenance["versions"]["napari_unifuse"]}
