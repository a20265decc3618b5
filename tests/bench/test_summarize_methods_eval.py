"""bench/summarize_methods_eval.py writes docs/results/methods.md: a regeneration with the README's
command must keep the shipped header, hand-written caveats included."""

import importlib.util
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_summarizer():
    spec = importlib.util.spec_from_file_location("summarize_methods_eval", REPO / "bench" / "summarize_methods_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_command() -> list[str]:
    """The README's summarize_methods_eval.py command, its continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "bench/summarize_methods_eval.py --results" in line)
    return shlex.split(line)[2:]


def test_the_readme_command_regenerates_the_shipped_header_with_its_note(monkeypatch):
    arguments = readme_command()

    def values(flag):
        start = arguments.index(flag) + 1
        end = next((i for i in range(start, len(arguments)) if arguments[i].startswith("--")), len(arguments))
        return arguments[start:end]

    notes = [REPO / path for path in values("--note")]
    assert notes, "the README's command names no --note: the SimpleITK caveat would be dropped"
    header = load_summarizer().header([Path(path) for path in values("--results")], Path(values("--unifuse")[0]),
                                      notes)
    shipped = (REPO / "docs" / "results" / "methods.md").read_text(encoding="utf-8").splitlines()
    assert shipped[:len(header)] == header
    assert any("SimpleITK rows" in line for line in header)
