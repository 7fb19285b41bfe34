"""tools/aot_compile.py: one config on a TPU slice from the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.aot.conftest import needs_libtpu
from tests.conftest import REPO

TOOL = os.path.join(REPO, "tools", "aot_compile.py")
SMALL = ["--config", os.path.join(REPO, "configs", "quickstart.py"),
         "--config.model.num_layers=2", "--config.train.batch_size=8",
         "--config.parallel.expert=4"]


def run(*args):
  return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                        timeout=600, cwd=REPO)


@needs_libtpu
def test_table_row_and_json_line(tmp_path):
  out = tmp_path / "aot.jsonl"
  r = run(*SMALL, "--topology", "v5e:2x2", "--exchange", "padded", "--json", str(out))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [line for line in r.stdout.splitlines() if line.startswith("| quickstart")]
  assert len(rows) == 1, r.stdout
  cells = [c.strip() for c in rows[0].strip("|").split("|")]
  assert cells[1:5] == ["v5e:2x2", "1, 1, 4", "padded", "yes"]
  (result,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert result["status"] == "fits" and result["ragged"] is False
  assert result["mesh"] == {"data": 1, "fsdp": 1, "expert": 4}
  assert cells[5] == f"{result['required_bytes'] / 2**30:.2f} / 15.75"


def test_bad_arguments_exit_2_with_the_value_and_what_is_allowed():
  r = run(*SMALL, "--topology", "v5e-64")
  assert r.returncode == 2
  assert "topology='v5e-64' is invalid; allowed: GEN:SHAPE" in r.stderr
  r = run(*SMALL, "--exchange", "ragged,fast")
  assert r.returncode == 2
  assert "--exchange='ragged,fast': 'fast' is unknown; allowed: auto, ragged, padded" in r.stderr
