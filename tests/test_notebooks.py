"""Every notebook in notebooks/ runs top to bottom on a small store, and is committed clean."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_catalog import make_store

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """A few hundred 1m bars over 20 symbols, shared by all notebooks."""
    return make_store(tmp_path_factory.mktemp("notebooks") / "market.zarr", minutes=300)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, \
                f"{path.name}: clear outputs before committing"


@pytest.mark.slow
@pytest.mark.xdist_group("browser")  # one worker runs these in turn (see the Makefile)
@pytest.mark.usefixtures("compiled_kernels")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_runs_without_errors(path, small_store, monkeypatch):
    monkeypatch.setenv("TAPEFLOW_STORE", str(small_store))
    nb = nbformat.read(path, as_version=4)
    # "python3" runs this interpreter (jupyter_client maps the spec's "python" to sys.executable);
    # the last cell proves it, so a notebook can never pass on some other environment.
    nb.cells.append(nbformat.v4.new_code_cell(
        f"import sys, flows\nassert sys.prefix == {sys.prefix!r}, sys.prefix"))
    client = NotebookClient(nb, kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
