"""tools/compress.py: the pruned run directory is an ordinary run; methods compose; bad input
exits 2 with `error: ...`."""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np
import pytest

from moejax import analysis
from moejax import model as lm
from moejax.compress import calibrate, prune
from moejax.init.sources import load_run, run_config
from moejax.train import trainer
from tests.conftest import load_tool, tiny_config

compress_tool = load_tool("compress")
evaluate_tool = load_tool("evaluate")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
  """A run directory around initial params, written with the writer the tool uses."""
  cfg = tiny_config()
  run = str(tmp_path_factory.mktemp("src") / "run")
  trainer.write_run(cfg, lm.init(jax.random.key(8), cfg), run)
  return run


@pytest.fixture(scope="module")
def pruned(src, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("out") / "pruned")
  code = compress_tool.main(["--run", src, "--method", "prune", "--criterion", "gate_weight",
                             "--remove", "0.25", "--calib-batches", "1", "--out", out])
  assert code == 0
  return out


def _args(run, out, *extra):
  return ["--run", run, "--method", "prune", "--criterion", "frequency", "--remove", "0.5",
          "--calib-batches", "1", "--out", out, *extra]


def test_the_pruned_run_holds_what_prune_computes(src, pruned):
  cfg = run_config(src)
  params, collections, _ = load_run(src)
  variables = {"params": params, **collections}
  want = prune(cfg, variables, "gate_weight", 0.25,
               calibrate(analysis.Model(cfg, variables), "val", num_batches=1))
  assert json.load(open(os.path.join(pruned, "config.json")))["moe"]["num_experts"] == 3
  got, got_collections, step = load_run(pruned)
  assert step == 0 and not got_collections
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want.variables["params"])):
    np.testing.assert_array_equal(a, b)
  report = json.load(open(os.path.join(pruned, "compress.json")))
  (entry,) = report["steps"]
  assert entry["method"] == "prune" and entry["criterion"] == "gate_weight"
  assert entry["num_experts_before"] == 4 and entry["num_experts_after"] == 3
  assert entry["removed"] == {"0": want.removed_NxR[0].tolist(),
                              "1": want.removed_NxR[1].tolist()}
  gate = np.asarray(entry["calibration"]["gate_weight"]["0"])
  r0 = entry["removed"]["0"]
  np.testing.assert_allclose(entry["removed_share"]["0"]["gate_weight"],
                             gate[r0].sum() / gate.sum(), rtol=1e-9)
  assert entry["calibration"]["sequences"] == 8


def test_the_pruned_run_loads_in_evaluate_and_analysis(pruned, tmp_path, capsys):
  data = tmp_path / "eval.jsonl"
  data.write_text(json.dumps({"text": "In the beginning God created the heaven."}) + "\n")
  capsys.readouterr()
  assert evaluate_tool.main(["--run", pruned, "--data", str(data)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["tokens"] == 41 and np.isfinite(result["mean_nll"]) and result["step"] == 0
  model = analysis.load_model(pruned)
  assert model.cfg.moe.num_experts == 3
  assert model.variables["params"]["moe_layers"]["block0"]["moe"]["router"]["w_gate"].shape == (
      2, 32, 3)


def test_methods_compose(pruned, tmp_path, capsys):
  out = str(tmp_path / "twice")
  capsys.readouterr()
  assert compress_tool.main(_args(pruned, out, "--remove", "0.34")) == 0
  assert "moe.num_experts 3 -> 2" in capsys.readouterr().out
  first, second = json.load(open(os.path.join(out, "compress.json")))["steps"]
  assert first == json.load(open(os.path.join(pruned, "compress.json")))["steps"][0]
  for layer in ("0", "1"):
    assert second["kept_original"][layer] == [first["kept_original"][layer][j]
                                              for j in second["kept"][layer]]
    assert len(second["kept_original"][layer]) == 2
  assert run_config(out).moe.num_experts == 2


def _config_only(tmp_path, name, **moe):
  cfg = tiny_config()
  for k, v in moe.items():
    cfg.moe[k] = v
  run = tmp_path / name
  run.mkdir()
  trainer.write_config(cfg, str(run))
  return str(run)


def test_bad_input_exits_2(src, pruned, tmp_path, capsys):
  out = str(tmp_path / "new")
  cases = [
      (_args(str(tmp_path / "nowhere"), out), "is not a run directory"),
      (_args(src, src), "is the --run directory"),
      (_args(src, pruned), "already holds config.json"),
      (_args(src, out, "--remove", "1.5"), r"--remove=1.5 is invalid: .* in \(0, 1\)"),
      (_args(src, out, "--remove", "0.9"), "--remove=0.9 removes all 4 experts"),
      (_args(src, out, "--remove", "0.75"), "fewer than moe.top_k=2"),
      (_args(_config_only(tmp_path, "soft", router="soft"), out),
       "moe.router='soft': pruning has no meaning"),
      (_args(_config_only(tmp_path, "dense", enabled=False), out), "not an MoE"),
      (_args(src, out, "--calib", str(tmp_path / "missing.txt")), "is neither a split"),
      (_args(src, out, "--calib-batches", "0"), "--calib-batches 0 is invalid"),
      (_args(src, out, "--method", "shrink"), r"--method 'shrink' is not implemented; "
                                              r"allowed: \['prune'"),
      (["--run", src, "--method", "prune", "--remove", "0.5", "--out", out],
       "--method prune needs --criterion"),
      (_args(src, out, "--criterion", "magnitude"), r"--criterion 'magnitude' .*allowed: "
                                                    r"\['frequency', 'gate_weight'"),
      (_args(src, out, "--seed", "-1"), "--seed -1 is invalid"),
  ]
  for argv, message in cases:
    capsys.readouterr()
    assert compress_tool.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), (argv, err)
  assert not os.path.exists(out)
