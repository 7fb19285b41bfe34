"""tools/compress.py: the pruned run directory is an ordinary run; methods compose; bad input
exits 2 with `error: ...`."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from moejax import analysis
from moejax import model as lm
from moejax.compress import calibrate, prune
from moejax.init.sources import load_run, run_config
from moejax.train import trainer
from tests.conftest import assert_exits_2, load_tool, tiny_config

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
               calibrate(analysis.Model(cfg, variables), "train", num_batches=1))
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


def test_merge_after_prune_through_the_tool(pruned, tmp_path, capsys):
  out = str(tmp_path / "merged")
  capsys.readouterr()
  assert compress_tool.main(["--run", pruned, "--method", "merge", "--to", "2",
                             "--calib-batches", "1", "--out", out]) == 0
  assert "merged 3 experts per layer into 2" in capsys.readouterr().out
  cfg = run_config(out)
  assert (cfg.moe.num_experts, cfg.moe.num_router_experts) == (2, 3)
  first, second = json.load(open(os.path.join(out, "compress.json")))["steps"]
  assert second["method"] == "merge" and second["align"] and second["group_by"] == "router_logits"
  params, collections, _ = load_run(out)
  map_pxr = collections["expert_map"]["moe_layers"]["block0"]["moe"]["map"]
  for p, layer in enumerate(("0", "1")):
    groups = second["groups"][layer]
    assert sorted(j for g in groups for j in g) == [0, 1, 2] and len(groups) == 2
    assert second["groups_original"][layer] == [
        sorted(first["kept_original"][layer][j] for j in g) for g in groups]
    assert second["expert_map"][layer] == np.asarray(map_pxr[p]).tolist()
    assert all(a in g for a, g in zip(second["anchors"][layer], groups))
    np.testing.assert_allclose([sum(w) for w in second["weights"][layer]], 1.0)
  assert params["moe_layers"]["block0"]["moe"]["experts"]["w_up"].shape[:2] == (2, 2)
  data = tmp_path / "eval.jsonl"
  data.write_text(json.dumps({"text": "In the beginning God created the heaven."}) + "\n")
  capsys.readouterr()
  assert evaluate_tool.main(["--run", out, "--data", str(data)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["tokens"] == 41 and np.isfinite(result["mean_nll"])


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
      (["--run", src, "--method", "merge", "--to", "4", "--out", out],
       r"--to=4 is invalid: .*\[1, 3\]"),
      (["--run", src, "--method", "merge", "--to", "2", "--no-align", "--align-by",
        "activations", "--out", out], "with --no-align: nothing is aligned"),
      (_args(src, out, "--to", "2"), "--to is an option of --method merge"),
      (_args(_config_only(tmp_path, "merged", num_experts=2, num_router_experts=4), out),
       "the run's experts are merged .* prune before merging"),
  ]
  assert_exits_2(compress_tool.main, cases, capsys)
  assert not os.path.exists(out)


def _quantized_bytes(run: str) -> dict:
  from moejax.compress import quantize  # noqa: PLC0415
  params, collections, _ = load_run(run)
  return quantize.expert_bytes({"params": params, **collections})


def test_quantize_after_prune_through_the_tool(pruned, tmp_path, capsys):
  """int4 (asym) through the tool: packed uint8 in the checkpoint, bytes reported as
  measured, the run scores in tools/evaluate.py."""
  out = str(tmp_path / "q4")
  capsys.readouterr()
  assert compress_tool.main(["--run", pruned, "--method", "quantize", "--bits", "4",
                             "--scheme", "asym", "--group-size", "16", "--out", out]) == 0
  printed = capsys.readouterr().out
  assert "per layer 3 at 4 bits" in printed and "expert bytes: float32" in printed
  first, second = json.load(open(os.path.join(out, "compress.json")))["steps"]
  assert first["method"] == "prune" and second["method"] == "quantize"
  assert second["classes"] == {"4": 3} and second["scale_dtype"] == "float16"
  got = _quantized_bytes(out)
  weights = 2 * 3 * 3 * 32 * 32  # layers x experts x leaves x D x F
  assert got["codes"] == weights // 2 and got["scale"] == got["zero"] == weights // 16 * 2
  assert second["checkpoint_bytes"] == second["bytes"]["live"] == got["total"]
  assert second["bytes"]["float32"] == _quantized_bytes(pruned)["float"] == weights * 4
  cfg = run_config(out)
  assert (cfg.moe.quant.scheme, cfg.moe.quant.experts4, cfg.moe.num_experts) == ("asym", 3, 3)
  _, collections, _ = load_run(out)
  codes = collections["quant"]["moe_layers"]["block0"]["moe"]["experts"]["w_down"]["b4"]
  assert codes["codes"].dtype == np.uint8 and codes["codes"].shape == (2, 3, 16, 32)
  data = tmp_path / "eval.jsonl"
  data.write_text(json.dumps({"text": "In the beginning God created the heaven."}) + "\n")
  scores = []
  for run in (pruned, out):
    capsys.readouterr()
    assert evaluate_tool.main(["--run", run, "--data", str(data)]) == 0
    scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
  assert scores[1]["tokens"] == 41 and abs(scores[1]["mean_nll"] - scores[0]["mean_nll"]) < 0.1


def test_mixed_precision_through_the_tool(src, tmp_path, capsys):
  out = str(tmp_path / "mixed")
  capsys.readouterr()
  assert compress_tool.main(["--run", src, "--method", "quantize", "--avg-bits", "5",
                             "--calib-batches", "1", "--out", out]) == 0
  assert "allocation under --avg-bits 5.0" in capsys.readouterr().out
  (entry,) = json.load(open(os.path.join(out, "compress.json")))["steps"]
  assert entry["widths"] == [8, 4, 2] and entry["objective"] <= entry["greedy_objective"]
  assert entry["code_bits_per_weight"] <= 5
  sens = np.load(os.path.join(out, "quant_sensitivity.npy"))
  assert sens.shape == (2, 4, 3)
  counts = {b: run_config(out).moe.quant[f"experts{b}"] for b in (8, 4, 2)}
  for bits in entry["expert_bits"].values():
    assert {b: bits.count(b) for b in (8, 4, 2)} == counts
  assert entry["checkpoint_bytes"] == entry["bytes"]["live"] == _quantized_bytes(out)["total"]


def test_quantize_bad_input_exits_2(src, tmp_path, capsys):
  out = str(tmp_path / "new")
  done = str(tmp_path / "q8")
  assert compress_tool.main(["--run", src, "--method", "quantize", "--bits", "8",
                             "--out", done]) == 0

  def q(run, *extra):
    return ["--run", run, "--method", "quantize", *extra, "--out", out]
  ep = _config_only(tmp_path, "ep")
  cfg = run_config(ep)
  cfg.parallel.expert = 2
  trainer.write_config(cfg, ep)
  cases = [
      (q(src, "--bits", "1"), r"--bits=1 is not a width of --scheme='sym'; allowed: \[8, 4, 2\]"),
      (q(src, "--bits", "4", "--scheme", "fp8"), r"--bits=4 is not a width of --scheme='fp8'"),
      (q(src, "--avg-bits", "9"), r"--avg-bits=9.0 is unreachable: allowed: .*\[2, 8\]"),
      (q(src, "--avg-bits", "1"), r"--avg-bits=1.0 is unreachable"),
      (q(src, "--bits", "8", "--group-size", "5"),
       "--group-size=5 does not divide the experts' w_gate input dim D=32"),
      (q(src), "give exactly one of --bits .* and --avg-bits"),
      (q(done, "--bits", "4"), r"moe.quant.scheme='sym': the run's experts are already "
                               r"quantized \(--method quantize\)"),
      (q(ep, "--bits", "8"), "parallel.expert=2 .*quantized experts do not run expert-parallel"),
      (q(src, "--bits", "8", "--criterion", "frequency"),
       "--criterion is an option of --method prune"),
      (_args(src, out, "--bits", "4"), "--bits is an option of --method quantize"),
      (_args(done, out), r"moe.quant.scheme='sym': the run's experts are quantized .*prune "
                         r"the float run before quantizing"),
  ]
  assert_exits_2(compress_tool.main, cases, capsys)
  assert not os.path.exists(out)
