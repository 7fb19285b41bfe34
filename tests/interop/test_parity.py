"""HF -> moejax -> HF: logits and per-layer router choices agree with transformers itself."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.interop.hf_models import CASES, VOCAB, make_model, run, transformers
from moejax import analysis, interop
from moejax import model as lm
from moejax.init.sources import load_run, run_config


def _moejax(run_dir: str, ids: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
  cfg = run_config(run_dir)
  params, collections, step = load_run(run_dir)
  assert step == 0
  variables = {"params": params, **collections}
  logits, _ = lm.apply(variables, ids, cfg)
  chosen = {}
  if cfg.moe.enabled:
    routing = analysis.capture(analysis.Model(cfg, variables), ids)
    for n, layer in enumerate(routing.layers):
      sel = routing.selected_NxBxLxE[n].reshape(-1, cfg.moe.num_experts)
      chosen[layer] = np.stack([np.flatnonzero(r) for r in sel])
  return np.asarray(logits), chosen


def _close(got: np.ndarray, want: np.ndarray) -> None:
  scale = max(1.0, float(np.abs(want).max()))
  assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_round_trip_parity(case, tmp_path):
  _, model_type, overrides = case
  model = make_model(model_type, **overrides)
  hf_dir, run_dir, out_dir = (str(tmp_path / n) for n in ("hf", "run", "out"))
  model.save_pretrained(hf_dir)
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
  want, want_chosen = run(model, ids)

  interop.from_hf(hf_dir, run_dir)
  got, got_chosen = _moejax(run_dir, ids)
  _close(got, want)
  assert sorted(got_chosen) == sorted(want_chosen)
  assert bool(want_chosen) == (model_type not in ("llama", "qwen3"))
  for layer in want_chosen:
    np.testing.assert_array_equal(got_chosen[layer], want_chosen[layer], err_msg=f"layer {layer}")

  interop.to_hf(run_dir, out_dir)
  with open(os.path.join(out_dir, "config.json")) as f:
    assert json.load(f)["model_type"] == model_type
  back = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  again, again_chosen = run(back, ids)
  _close(again, want)
  for layer in want_chosen:
    np.testing.assert_array_equal(again_chosen[layer], want_chosen[layer])
