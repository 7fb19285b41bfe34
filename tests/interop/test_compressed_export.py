"""to-hf of compressed runs: merged and quantized experts come back as the plain experts HF
holds, and transformers computes what the compressed moejax run computes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import load_tool
from tests.interop.hf_models import VOCAB, make_model, transformers
from moejax import interop
from moejax import model as lm
from moejax.init.sources import load_run, run_config
from moejax.interop.errors import ConversionError

compress_tool = load_tool("compress")
CASES = {"merge": ["--method", "merge", "--to", "2"],
         "int4": ["--method", "quantize", "--bits", "4", "--group-size", "16"],
         "prune+int8": None}  # pruned, then quantized: both steps undone by the export


def _logits(run_dir: str, ids: np.ndarray) -> np.ndarray:
  cfg = run_config(run_dir)
  params, collections, _ = load_run(run_dir)
  logits, _ = lm.apply({"params": params, **collections}, ids, cfg)
  return np.asarray(logits)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp("compressed")
  model = make_model("mixtral", num_local_experts=4, num_experts_per_tok=2)
  model.save_pretrained(str(root / "hf"))
  interop.from_hf(str(root / "hf"), str(root / "run"))
  return str(root / "run")


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_computes_what_the_compressed_run_computes(name, converted, tmp_path):
  src, out, hf = converted, str(tmp_path / "c"), str(tmp_path / "hf")
  calib = ["--calib-batches", "1"]
  if CASES[name] is None:
    mid = str(tmp_path / "p")
    assert compress_tool.main(["--run", src, "--method", "prune", "--criterion", "frequency",
                               "--remove", "0.25", *calib, "--out", mid]) == 0
    argv = ["--run", mid, "--method", "quantize", "--bits", "8", "--group-size", "16"]
  else:
    argv = ["--run", src, *CASES[name]]
  assert compress_tool.main([*argv, *calib, "--out", out]) == 0
  cfg = run_config(out)
  interop.to_hf(out, hf)
  with open(os.path.join(hf, "config.json")) as f:
    hf_cfg = json.load(f)
  r = cfg.moe.num_router_experts or cfg.moe.num_experts
  assert hf_cfg["num_local_experts"] == r
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 9))
  want = _logits(out, ids)
  back = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
  import torch  # noqa: PLC0415

  with torch.no_grad():
    got = back(torch.as_tensor(ids)).logits.numpy()
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= 1e-4 * scale
  if name != "merge":  # and the export differs from the float source's (the codes are used)
    assert np.abs(_logits(src, ids) - want).max() > 1e-6


def test_skipping_has_no_hf_equivalent(converted, tmp_path):
  cfg = run_config(converted)
  cfg.moe.skip_threshold = 0.2
  from moejax.interop import compressed  # noqa: PLC0415

  with pytest.raises(ConversionError, match="moe.skip_threshold=0.2"):
    compressed.plain_config(cfg)
