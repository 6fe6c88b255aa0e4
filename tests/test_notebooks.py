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


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_notebook(NOTEBOOKS / "quickstart.ipynb")
    assert ns["short"].shape == (16, 32, 32, 3) and ns["short"].dtype == np.uint8
    assert {m: v.shape for m, v in ns["long"].items()} == {"direct": (64, 32, 32, 3), "longdiff": (64, 32, 32, 3)}
    assert (tmp_path / "longdiff_64.gif").stat().st_size > 0
    np.testing.assert_allclose(ns["probs"].sum(-1), 1.0, rtol=1e-5)
