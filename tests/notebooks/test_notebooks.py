"""Notebooks run top to bottom (code cells executed in order, tiny parameters)."""

from __future__ import annotations

import json
import os

import matplotlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _code_cells(name):
  with open(os.path.join(REPO, "notebooks", name)) as f:
    nb = json.load(f)
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_quickstart_notebook(tmp_path, monkeypatch):
  matplotlib.use("Agg")
  monkeypatch.chdir(REPO)
  cells = _code_cells("quickstart.ipynb")
  ns: dict = {}
  exec(cells[0], ns)  # the parameters cell, then tiny overrides
  ns.update(STEPS=6, WORKROOT=str(tmp_path), OVERRIDES={
      "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
      "train.batch_size": 4, "train.seq_len": 16, "train.eval_every": 3,
      "train.eval_batches": 1, "train.checkpoint_every": 6})
  for src in cells[1:]:
    exec(src, ns)
  assert set(ns["results"]) == {"moe", "dense"}
  assert ns["results"]["moe"][1]["steps"] == 6
  assert os.path.getsize(tmp_path / "val_bpb.png") > 1000
