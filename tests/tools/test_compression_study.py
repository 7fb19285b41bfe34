"""tools/compression_study.py: the rows it runs and the table it writes (the study itself is a
long run; its pieces are checked here on synthetic results)."""

from __future__ import annotations

import numpy as np

from tests.conftest import load_tool

study = load_tool("compression_study")


def test_rows_cover_every_method_once_and_random_pruning_per_seed():
  rows = study.rows(8, seeds=3)
  names = [r["name"] for r in rows]
  assert len(names) == len(set(names)) and names[0] == "none"
  assert sum(n.startswith("prune-random-25") for n in names) == 3
  for c in ("frequency", "gate_weight", "output_error"):
    assert {f"prune-{c}-25", f"prune-{c}-50"} <= set(names)
  merge = {r["name"]: r["argv"] for r in rows if r["name"].startswith("merge")}
  assert merge["merge-aligned"] == ["--method", "merge", "--to", "4"]
  assert merge["merge-unaligned"][-1] == "--no-align"
  assert {"int8", "int4", "mixed-4"} <= set(names)


def test_table_averages_seeds_and_compares_with_none():
  base = {"name": "none", "group": "none", "command": None, "val_bpb": 2.0,
          "num_experts": 8, "expert_bytes": 2**20}
  seeds = [{"name": f"r{s}", "group": "prune random 25%", "command": f"python x --seed {s}",
            "val_bpb": v, "num_experts": 6, "expert_bytes": 3 * 2**18}
           for s, v in enumerate((2.1, 2.2, 2.3))]
  lines = study.table([base, *seeds]).splitlines()
  assert lines[2].startswith("| none | 8 | 1.00 | 2.0000 | +0.00% | (the trained run) |")
  mean, std = np.mean([2.1, 2.2, 2.3]), np.std([2.1, 2.2, 2.3], ddof=1)
  assert f"{mean:.4f} +- {std:.4f} (3 seeds)" in lines[3]
  assert f"{100 * (mean / 2 - 1):+.2f}%" in lines[3] and "(--seed 0..2)" in lines[3]
  assert "| 6 | 0.75 |" in lines[3]
