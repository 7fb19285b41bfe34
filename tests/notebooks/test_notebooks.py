"""The Colab notebooks: structure, stripped outputs, and a FAST=1 run of each (nbclient)."""

from __future__ import annotations

import csv
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from tests.conftest import quick_compile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ["01_quickstart.ipynb", "02_routers.ipynb", "03_scaling_laws.ipynb",
         "04_routing_analysis.ipynb", "05_checkpoints.ipynb", "06_inference.ipynb",
         "07_compression.ipynb"]
NEEDS = {"05_checkpoints.ipynb": ("torch", "transformers")}  # beyond moejax's dependencies


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def test_the_notebooks_are_these():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_stripped(name):
  for i, cell in enumerate(_read(name).cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (
          f"{name} cell {i} has outputs: strip them before committing")


@pytest.mark.parametrize("name", NAMES)
def test_badge_install_cell_and_fast_flag(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == "markdown"
  assert (f"https://colab.research.google.com/github/moejax/moejax/blob/main/notebooks/{name}"
          in nb.cells[0].source)
  code = [c.source for c in nb.cells if c.cell_type == "code"]
  assert "git+https://github.com/moejax/moejax" in code[0] and 'find_spec("moejax")' in code[0]
  assert any('os.environ.get("FAST", "0") == "1"' in src for src in code)
  assert "reproduces" in nb.cells[0].source and "small run shows" in nb.cells[-1].source


def _synthetic_results(path: str) -> None:
  """A results.csv shaped like a moejax sweep's, from a known Chinchilla law (test input)."""
  rng = np.random.default_rng(0)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "_family", "params_active", "tokens_seen", "final_val_loss"])
    for family, (e, a, b) in {"dense": (1.0, 30.0, 60.0), "moe": (0.95, 28.0, 55.0)}.items():
      for n in (2e5, 5e5, 1e6):
        for d in (1e6, 3e6, 1e7):
          loss = (e + a / n ** 0.3 + b / d ** 0.3) * np.exp(1e-3 * rng.standard_normal())
          w.writerow([f"{family}-{n:g}-{d:g}", family, n, d, loss])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_with_fast(name, tmp_path, monkeypatch):
  for module in NEEDS.get(name, ()):
    pytest.importorskip(module)
  monkeypatch.setenv("FAST", "1")
  monkeypatch.setenv("WORKROOT", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  # The kernel compiles quickly: the test is that every cell runs (05's parity
  # tolerances are 1e-4, far above the last-bit differences of the compile level).
  monkeypatch.setenv("XLA_FLAGS", quick_compile()["XLA_FLAGS"])
  results = tmp_path / "results.csv"
  _synthetic_results(str(results))
  monkeypatch.setenv("RESULTS_CSV", str(results))
  nb = _read(name)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()  # raises on an error
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "Traceback" not in text
  if name == "03_scaling_laws.ipynb":
    assert "moe {" in text and "dense {" in text  # the sweep section fitted both families
  if name == "05_checkpoints.ipynb":  # parity with transformers, import and export
    rel = [float(x) for x in re.findall(r"/ scale = ([0-9.e+-]+)", text)]
    assert len(rel) == 2 and max(rel) <= 1e-4, rel
    assert "identical to transformers in every layer: True" in text
    dense, step0 = (float(x) for x in re.findall(r"(?:dense loss on the text|step 0) +([0-9.]+)",
                                                 text))
    assert abs(dense - step0) <= 1e-4 * dense  # the upcycled MoE starts at the dense loss
