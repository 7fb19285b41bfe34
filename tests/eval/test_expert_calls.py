"""moejax.eval.expert_calls and tools/evaluate.py --skip-threshold: the calls counted over real
tokens equal what each layer reports on the unpadded sequences."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from moejax import model as lm
from moejax.eval.expert_calls import skipped_calls
from moejax.train import trainer
from tests.conftest import load_tool, tiny_config


def test_skipped_calls_and_evaluate_report_what_the_layers_skip(tmp_path, capsys):
  cfg = tiny_config()
  run = str(tmp_path / "run")
  variables = lm.init(jax.random.key(3), cfg)
  trainer.write_run(cfg, variables, run)
  texts = ["In the beginning God created the heaven and the earth.", "And God said, Let there"]
  data = tmp_path / "d.jsonl"
  data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  skip = tiny_config(skip_threshold=0.45)
  seqs = [np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts]
  got = skipped_calls(skip, variables, seqs, batch_size=2)
  # Reference: each sequence alone (no padding) through the model; the layers' metric.
  want = 0.0
  model = lm.make_model(skip, deterministic=True)
  for s in seqs:
    _, aux = model.apply(variables, jnp.asarray(s[None]))
    frac_N = np.asarray(aux["metrics"]["skipped_fraction"], np.float64)
    want += (s.size * 2 * (1 - frac_N)).sum()
  moe_layers = 2  # tiny_config: both layers are MoE, top-2
  assert got["possible_calls"] == sum(s.size for s in seqs) * 2 * moe_layers
  np.testing.assert_allclose(got["expert_calls"], want, rtol=1e-6)
  assert 0 < got["skipped_fraction"] < 1
  evaluate = load_tool("evaluate")
  capsys.readouterr()
  assert evaluate.main(["--run", run, "--data", str(data)]) == 0
  plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert evaluate.main(["--run", run, "--data", str(data), "--skip-threshold", "0.45"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert "skipped_fraction" not in plain and out["skip_threshold"] == 0.45
  assert out["possible_calls"] > 0 and 0 < out["skipped_fraction"] < 1
  assert out["mean_nll"] != plain["mean_nll"]
  assert evaluate.main(["--run", run, "--data", str(data), "--skip-threshold", "1.5"]) == 2
  assert "--skip-threshold 1.5: " in capsys.readouterr().err
