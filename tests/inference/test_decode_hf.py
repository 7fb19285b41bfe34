"""Greedy decoding of converted Hugging Face checkpoints equals transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest

hf_models = pytest.importorskip("tests.interop.hf_models")
torch = hf_models.torch

from moejax import interop  # noqa: E402
from moejax.inference import decode  # noqa: E402
from moejax.init.sources import load_run, run_config  # noqa: E402

CASES = [
    ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("qwen2_moe", dict(num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, shared_expert_intermediate_size=24)),
    ("deepseek_v3", dict(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=8,
                         q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
                         n_group=2, topk_group=1, first_k_dense_replace=1,
                         num_hidden_layers=3)),
]
NEW = 12


@pytest.mark.parametrize("model_type, overrides", CASES, ids=[c[0] for c in CASES])
def test_greedy_generation_equals_transformers_generate(model_type, overrides, tmp_path):
  model = hf_models.make_model(model_type, **overrides)
  hf_dir, run_dir = str(tmp_path / "hf"), str(tmp_path / "run")
  model.save_pretrained(hf_dir)
  interop.from_hf(hf_dir, run_dir)
  cfg = run_config(run_dir)
  params, collections, _ = load_run(run_dir)
  dec = decode.Decoder(cfg, {"params": params, **collections},
                       context=decode.max_context(cfg, run_dir))
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, hf_models.VOCAB, n).tolist() for n in (5, 11, 1)]
  ours, _ = dec.generate(prompts, max_new_tokens=NEW)  # one batch, left-padded
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  for p, got in zip(prompts, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False)
    np.testing.assert_array_equal(got.tokens, out[0, len(p):].numpy())
