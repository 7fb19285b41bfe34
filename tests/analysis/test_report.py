"""The routing report and its CLI (tools/analyze_routing.py) on a tiny trained run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from moejax.analysis import report
from tests.conftest import REPO

PLOTS = ("load.png", "coactivation.png", "tokens.png", "domains.png", "saturation.png",
         "locality.png", "experts_per_token.png")


def test_analyze_writes_plots_and_numbers(tiny_run, tmp_path):
  res = report.analyze(tiny_run, str(tmp_path), segment_lens=[1, 4], cache_sizes=[1, 2])
  for name in PLOTS:
    assert os.path.getsize(tmp_path / name) > 1000, name
  text = (tmp_path / "routing_report.md").read_text()
  for section in ("Expert load", "Co-activation", "Token-id specialisation",
                  "Domain specialisation", "Router saturation", "Local routing consistency",
                  "Experts per token"):
    assert f"## {section}" in text
  assert res["step"] == 4 and res["saturation_steps"].tolist() == [2, 4]
  np.testing.assert_allclose(res["saturation"][-1], 1.0)  # the checkpoint against itself
  assert res["srp"].shape == (2, 2, 2)
  assert f"| 0 | {res['load_cv'][0]:.4g} |" in text


def test_cli(tiny_run, tmp_path):
  out = tmp_path / "out"
  cmd = [sys.executable, os.path.join(REPO, "tools", "analyze_routing.py"), "--run", tiny_run,
         "--checkpoint", "2", "--out", str(out), "--segments", "2,16", "--cache", "1"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  assert p.returncode == 0, p.stderr
  assert "step 2" in p.stdout and (out / "routing_report.md").exists()
  assert "Checkpoint step 2" in (out / "routing_report.md").read_text()
  bad = subprocess.run(cmd[:-2] + ["--cache", "0"], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0 and "--cache='0'" in bad.stderr
  bad = subprocess.run(cmd[:4] + ["--checkpoint", "3", "--out", str(out)], capture_output=True,
                       text=True, cwd=REPO)
  assert bad.returncode != 0 and "step=3 has no checkpoint" in bad.stderr


@pytest.mark.parametrize("seq_len,want", [(16, [1, 2, 4, 8, 16]), (5, [1, 2, 4, 5])])
def test_default_segment_lens(seq_len, want):
  assert report.default_segment_lens(seq_len) == want
  assert report.default_cache_sizes(8, 2) == [1, 2, 4]
