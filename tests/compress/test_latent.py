"""tools/compress.py --method latent: the SVD factorisation against an eigendecomposition
reference, exact at full rank on a tiny trained run (logits and tools/evaluate.py's loss),
errors falling with the rank, the result an ordinary run, bad input refused by name."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from moejax import layout, model as lm
from moejax.compress import latent
from moejax.init.sources import load_run, run_config
from moejax.train import trainer
from tests.conftest import assert_exits_2, load_tool, tiny_config

compress_tool = load_tool("compress")
evaluate_tool = load_tool("evaluate")
D = 16


def _reference_projector(w_ExDxF: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
  """(P [D, D], relative error) from the eigendecomposition of M M^T, M = [w_0 ... w_E-1]:
  P projects onto its top-`rank` eigenvectors; the error is sqrt(discarded / total)."""
  m = np.concatenate(list(np.asarray(w_ExDxF, np.float64)), axis=1)  # [D, E F]
  vals, vecs = np.linalg.eigh(m @ m.T)  # ascending
  top = vecs[:, ::-1][:, :rank]
  kept = np.sort(vals)[::-1][:rank].sum()
  return top @ top.T, float(np.sqrt(max(vals.sum() - kept, 0.0) / vals.sum()))


@settings(max_examples=25, deadline=None)
@given(e=st.integers(1, 3), d=st.integers(2, 6), f=st.integers(1, 4), frac=st.floats(0, 1),
       seed=st.integers(0, 2**16))
def test_factor_equals_an_eigendecomposition_reference(e, d, f, frac, seed):
  rank = 1 + int(frac * (d - 1))
  w = np.random.default_rng(seed).standard_normal((e, d, f))
  a, b, err = latent.factor(w, rank)
  assert a.shape == (d, rank) and b.shape == (e, rank, f)
  np.testing.assert_allclose(a.T @ a, np.eye(rank), atol=1e-10)  # orthonormal columns
  approx = np.einsum("dr,erf->edf", a, b)
  proj, want_err = _reference_projector(w, rank)
  if rank < min(d, e * f):  # the subspace is unique (random spectra have no ties)
    np.testing.assert_allclose(a @ a.T, proj, atol=1e-6)
    np.testing.assert_allclose(approx, np.einsum("dk,ekf->edf", proj, w), atol=1e-6)
  else:  # the stacked matrix has rank <= R: reconstructed exactly
    np.testing.assert_allclose(approx, w, atol=1e-9)
  np.testing.assert_allclose(err, want_err, atol=1e-6)
  np.testing.assert_allclose(err, np.linalg.norm(w - approx) / np.linalg.norm(w), atol=1e-10)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
  """A tiny trained SwiGLU MoE (shared expert included), its full-rank conversion by the tool,
  and a JSONL of token records for tools/evaluate.py."""
  root = tmp_path_factory.mktemp("latent")
  cfg = tiny_config(expert_hidden=D, num_shared_experts=1)
  cfg.model.d_model, cfg.model.ffn_hidden = D, 2 * D
  cfg.train.steps, cfg.train.warmup_steps, cfg.train.seq_len, cfg.train.batch_size = 3, 1, 8, 4
  cfg.train.eval_every = cfg.train.checkpoint_every = cfg.train.log_every = 3
  cfg.train.eval_batches = 1
  src, full = str(root / "src"), str(root / "full")
  trainer.train(cfg, src)
  assert compress_tool.main(["--run", src, "--method", "latent", "--rank", str(D),
                             "--out", full]) == 0
  data = root / "eval.jsonl"
  rng = np.random.default_rng(0)
  data.write_text("".join(json.dumps({"tokens": rng.integers(0, 256, 9).tolist()}) + "\n"
                          for _ in range(6)))
  return {"src": src, "full": full, "data": str(data), "root": root}


def _variables(run_dir):
  params, collections, _ = load_run(run_dir)
  return {"params": params, **collections}


def _evaluate(run_dir, data, out):
  assert evaluate_tool.main(["--run", run_dir, "--data", data, "--json", out]) == 0
  with open(out) as f:
    return json.load(f)


def test_full_rank_conversion_computes_what_the_source_did(run):
  cfg, new = run_config(run["src"]), run_config(run["full"])
  assert (new.moe.expert, new.moe.latent.rank) == ("latent", D)
  v, nv = _variables(run["src"]), _variables(run["full"])
  experts = layout.get(nv["params"], layout.EXPERTS_PATH)
  assert sorted(experts) == ["a_gate", "a_up", "b_gate", "b_up", "w_down"]
  np.testing.assert_array_equal(experts["w_down"],
                                layout.get(v["params"], layout.EXPERTS_PATH)["w_down"])
  ids = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)
  want, _ = lm.apply(v, ids, cfg)
  got, _ = lm.apply(nv, ids, new)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  entry = json.load(open(os.path.join(run["full"], "compress.json")))["steps"][-1]
  assert entry["method"] == "latent" and entry["rank"] == D
  assert sorted(entry["relative_error"]) == ["0", "1"]  # both MoE layers
  for key in ("relative_error", "shared_relative_error"):
    for errs in entry[key].values():
      assert sorted(errs) == ["w_down", "w_gate", "w_up"]
      assert max(errs.values()) < 1e-6, errs
  per_layer = entry["expert_params_per_layer"]
  assert per_layer == {"before": 4 * 3 * D * D, "after": 4 * (2 * D * D + D * D) + 2 * D * D}
  # tools/evaluate.py on the source and the result: the loss does not change
  a = _evaluate(run["src"], run["data"], str(run["root"] / "src.json"))
  b = _evaluate(run["full"], run["data"], str(run["root"] / "full.json"))
  assert a["tokens"] == b["tokens"] == 6 * 8
  np.testing.assert_allclose(b["mean_nll"], a["mean_nll"], rtol=1e-6)


def test_error_falls_with_the_rank_and_the_loss_moves_below_full_rank(run, tmp_path):
  cfg, v = run_config(run["src"]), _variables(run["src"])
  errs = {r: latent.to_latent(cfg, v, r) for r in (1, 2, 4, 8, D)}
  for leaf in ("w_gate", "w_up"):
    for layer in range(2):
      seq = [errs[r].errors[leaf][layer] for r in sorted(errs)]
      assert all(x > y for x, y in zip(seq, seq[1:])), (leaf, layer, seq)
      assert seq[-1] < 1e-6 and seq[0] > 0.1
      shared = [errs[r].shared_errors[leaf][layer] for r in sorted(errs)]
      assert all(x > y for x, y in zip(shared, shared[1:])), (leaf, layer, shared)
  low = str(tmp_path / "r2")
  assert compress_tool.main(["--run", run["src"], "--method", "latent", "--rank", "2",
                             "--out", low]) == 0
  entry = json.load(open(os.path.join(low, "compress.json")))["steps"][-1]
  np.testing.assert_allclose(entry["relative_error"]["1"]["w_up"], errs[2].errors["w_up"][1],
                             rtol=1e-12)
  a = _evaluate(run["src"], run["data"], str(tmp_path / "src.json"))
  b = _evaluate(low, run["data"], str(tmp_path / "low.json"))
  assert abs(b["mean_nll"] - a["mean_nll"]) > 1e-4


def test_the_converted_run_fine_tunes(run, tmp_path):
  """`python -m experiments --workdir OUT` resumes the result: the trainer's step updates the
  shared latent projections too, and its summary counts the tree it trained."""
  out = str(tmp_path / "ft")
  assert compress_tool.main(["--run", run["src"], "--method", "latent", "--rank", "4",
                             "--out", out]) == 0
  before = _variables(out)["params"]
  cfg = run_config(out)
  cfg.train.steps = cfg.train.eval_every = cfg.train.checkpoint_every = 2  # step 0: lr 0
  summary = trainer.train(cfg, out)
  after, _, step = load_run(out)
  assert step == 2
  assert summary["params_total"] == sum(x.size for x in jax.tree.leaves(after))
  moved = (layout.get(after, layout.EXPERTS_PATH)["a_gate"]
           - layout.get(before, layout.EXPERTS_PATH)["a_gate"])
  assert float(np.max(np.abs(moved))) > 0


def test_bad_input_exits_2_naming_the_argument(run, tmp_path, capsys):
  def config_only(name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(d)

  mlp = config_only("mlp", tiny_config(expert="mlp"))
  q = tiny_config()
  q.moe.quant.scheme, q.moe.quant.experts8 = "sym", 4
  quantized = config_only("quant", q)
  dense = tiny_config()
  dense.moe.enabled = False
  dense_run = config_only("dense", dense)
  out = str(tmp_path / "out")
  src = run["src"]
  cases = [
      (["--run", src, "--method", "latent", "--rank", "0", "--out", out],
       r"--rank=0 is invalid: allowed: an integer latent rank in \[1, model.d_model=16\]"),
      (["--run", src, "--method", "latent", "--rank", str(D + 1), "--out", out],
       r"--rank=17 is invalid"),
      (["--run", src, "--method", "latent", "--out", out], "--method latent needs --rank"),
      (["--run", src, "--method", "latent", "--rank", "4", "--bits", "8", "--out", out],
       "--bits is an option of --method quantize"),
      (["--run", mlp, "--method", "latent", "--rank", "4", "--out", out],
       r"--run: moe.expert='mlp'; the latent conversion factors SwiGLU experts"),
      (["--run", run["full"], "--method", "latent", "--rank", "4", "--out", out],
       r"--run: moe.expert='latent'"),
      (["--run", quantized, "--method", "latent", "--rank", "4", "--out", out],
       r"--run: moe.quant.scheme='sym': the experts are quantized codes"),
      (["--run", dense_run, "--method", "latent", "--rank", "4", "--out", out],
       "the run is not an MoE"),
  ]
  assert_exits_2(compress_tool.main, cases, capsys)
  assert not os.path.exists(out)
