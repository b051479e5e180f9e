"""Every lesson and every exercise solution runs top to bottom from a clean kernel.

The lessons end with checks against references; each solution ends with asserts that a wrong answer fails.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

LESSONS = Path(__file__).parent.parent / "lessons"
NOTEBOOKS = sorted(LESSONS.glob("[0-9][0-9]_*.ipynb")) + sorted((LESSONS / "solutions").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[str(p.relative_to(LESSONS).with_suffix("")) for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()


def test_every_lesson_has_its_solutions():
    lessons = {p.name for p in LESSONS.glob("[0-9][0-9]_*.ipynb")}
    assert lessons == {p.name for p in (LESSONS / "solutions").glob("[0-9][0-9]_*.ipynb")}
