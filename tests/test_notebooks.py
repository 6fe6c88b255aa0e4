"""The notebooks run as shipped: every code cell in order, in one namespace, in a scratch directory."""

import json
import pathlib

import numpy as np

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"


def run_notebook(path: pathlib.Path) -> dict:
    namespace = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name} cell", "exec"), namespace)
    return namespace


def test_quickstart_notebook_runs(tmp_path, monkeypatch, optimized_compiles):  # its samples run long
    monkeypatch.chdir(tmp_path)
    ns = run_notebook(NOTEBOOKS / "quickstart.ipynb")
    assert ns["short"].shape == (16, 32, 32, 3) and ns["short"].dtype == np.uint8
    assert {m: v.shape for m, v in ns["long"].items()} == {"direct": (64, 32, 32, 3), "longdiff": (64, 32, 32, 3)}
    assert (tmp_path / "longdiff_64.gif").stat().st_size > 0
    assert all((tmp_path / f"{m}_64.png").stat().st_size > 0 for m in ("direct", "longdiff"))  # the sheets shown
    np.testing.assert_allclose(ns["probs"].sum(-1), 1.0, rtol=1e-5)


def test_quickstart_notebook_ships_with_its_outputs():
    """Every code cell carries the outputs of a run, and the sheets are shown as images."""
    cells = [c for c in json.loads((NOTEBOOKS / "quickstart.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    assert all(c["outputs"] for c in cells)
    images = [o for c in cells for o in c["outputs"] if o["output_type"] == "display_data"]
    assert len(images) == 2 and all(o["data"]["image/png"] for o in images)
