"""The notebook that walks the d2l chapter with the template runs top to bottom, and is committed
without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "notebooks" / "house_prices.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom(real_data, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOK_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(REPO)}})
    client.execute()  # a cell that raises fails the test, naming it; the kernel inherits the environment
    summary = (tmp_path / "out" / "summary.json").read_text()
    assert '"submission"' in summary and (tmp_path / "out" / "submission.csv").is_file()
