"""The decoder-only Transformer: causality, layer plan, counts, dtypes, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import model as lm
from moejax.layout import layer_plan
from tests.conftest import tiny_config


def _ids(cfg, seed=0, batch=2):
  return jax.random.randint(jax.random.key(seed), (batch, cfg.train.seq_len), 0, 256)


@pytest.mark.parametrize("dispatch,moe", [("dropless", True), ("dense", True),
                                          ("capacity", True), (None, False)])
def test_causal(dispatch, moe):
  """Logits at positions <= t do not change when tokens after t change."""
  cfg = tiny_config()
  cfg.moe.enabled = moe
  if dispatch:
    cfg.moe.dispatch = dispatch
    cfg.moe.capacity_factor = 4.0  # no drops: dropping couples tokens batch-wide
  variables = lm.init(jax.random.key(1), cfg)
  ids = _ids(cfg)
  t = 6
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  a, b = lm.apply(variables, ids, cfg)[0], lm.apply(variables, ids2, cfg)[0]
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])  # the change is visible later


def test_layer_plan_and_param_stacks():
  cfg = tiny_config()
  cfg.model.num_layers = 5
  cfg.moe.first_dense_layers = 1
  cfg.moe.every = 2
  assert layer_plan(cfg) == (1, 2)
  p = lm.init(jax.random.key(0), cfg)["params"]
  assert p["dense_layers"]["block0"]["ffn"]["w_up"].shape == (1, 32, 64)
  period = p["moe_layers"]
  assert period["block0"]["moe"]["experts"]["w_up"].shape == (2, 4, 32, 32)
  assert period["block1"]["ffn"]["w_up"].shape == (2, 32, 64)
  _, aux = lm.apply({"params": p}, _ids(cfg), cfg)
  assert aux["losses"]["load_balance"].shape == (2,)
  assert aux["metrics"]["load"].shape == (2, 4)


@pytest.mark.parametrize("overrides", [
    {}, {"moe.enabled": False}, {"model.tie_embeddings": True},
    {"moe.num_shared_experts": 2}, {"moe.first_dense_layers": 1, "model.num_layers": 3},
    {"moe.every": 2, "model.num_layers": 4},
])
def test_param_counts_match_init(overrides):
  cfg = tiny_config()
  for k, v in overrides.items():
    sect, key = k.split(".")
    cfg[sect][key] = v
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  if cfg.moe.enabled:
    n_moe = layer_plan(cfg)[1]
    inactive = n_moe * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * 32 * cfg.moe.expert_hidden
    assert counts["params_active"] == counts["params_total"] - inactive
  else:
    assert counts["params_active"] == counts["params_total"]


def test_flops_per_token_formula():
  cfg = tiny_config()
  c = lm.param_counts(cfg)
  m = cfg.model
  expected = (6 * (c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model)
              + 6 * m.num_layers * cfg.train.seq_len * m.d_model)
  assert lm.flops_per_token(cfg) == expected


@pytest.mark.parametrize("moe", [False, True])
def test_bfloat16_close_to_float32(moe):
  cfg = tiny_config(num_experts=2, top_k=2)  # k = E: no discrete routing flips
  cfg.moe.enabled = moe
  variables = lm.init(jax.random.key(0), cfg)
  ids = _ids(cfg)
  a, _ = lm.apply(variables, ids, cfg)
  cfg.model.dtype = "bfloat16"
  b, _ = lm.apply(variables, ids, cfg)
  assert b.dtype == jnp.float32
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32  # params stay float32
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.1, rtol=0.05)
  assert not np.array_equal(np.asarray(a), np.asarray(b))  # bf16 really used


def test_remat_same_values_and_grads():
  cfg = tiny_config()
  variables = lm.init(jax.random.key(0), cfg)
  ids = _ids(cfg)

  def loss(params, c):
    logits, _ = lm.apply({"params": params}, ids, c)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  g1 = jax.grad(loss)(variables["params"], cfg)
  cfg.model.remat = True
  g2 = jax.grad(loss)(variables["params"], cfg)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    # Recomputation may fuse (and so round) differently: float32 rounding of
    # the leaf's largest entries, not of each entry alone.
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5,
                               atol=1e-5 * np.max(np.abs(y), initial=1e-7))


def test_jitter_only_in_training():
  cfg = tiny_config()
  cfg.moe.topk.jitter = 0.1
  variables = lm.init(jax.random.key(0), cfg)
  ids = _ids(cfg)
  a, _ = lm.apply(variables, ids, cfg)
  b, _ = lm.apply(variables, ids, cfg)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c, _ = lm.apply(variables, ids, cfg, rng=jax.random.key(3))
  assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("router", ["recurrent", "soft", "null_experts", "hash",
                                    "expert_choice", "topk_noisy", "zero_experts", "chain"])
def test_param_counts_match_init_for_routers(router):
  cfg = tiny_config()
  if router == "topk_noisy":
    cfg.moe.topk.noise = "gaussian"
  elif router == "chain":  # Chain-of-Experts: a router per round, shared experts per layer
    cfg.moe.chain.rounds, cfg.moe.num_shared_experts = 3, 1
  else:
    cfg.moe.router = router
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  assert lm.param_counts(cfg)["params_total"] == sum(x.size for x in jax.tree.leaves(p))


def test_soft_moe_active_experts_follow_slots():
  from moejax.model.counting import experts_per_token  # noqa: PLC0415
  cfg = tiny_config()
  cfg.moe.router = "soft"
  cfg.moe.soft.slots_per_expert = 4  # 4 experts x 4 slots per group of 8 tokens
  assert experts_per_token(cfg) == 2.0


def test_expert_choice_active_experts_follow_capacity():
  from moejax.model.counting import experts_per_token  # noqa: PLC0415
  cfg = tiny_config()  # B=8, E=4, k=2
  cfg.moe.router = "expert_choice"
  cfg.moe.capacity_factor = 1.0
  assert experts_per_token(cfg) == 2.0  # C = 4 tokens of 8, times 4 experts
  cfg.moe.capacity_factor = 0.3  # C = ceil(1.2) = 2
  assert experts_per_token(cfg) == 1.0


def _set(cfg, overrides):
  for key, value in overrides.items():
    node = cfg
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return cfg


ATTENTION_VARIANTS = [
    {"model.num_kv_heads": 1},  # multi-query
    {"model.num_heads": 4, "model.num_kv_heads": 2, "model.attn_bias": "qkv",
     "model.qk_norm": "head"},  # Qwen3 / Qwen2-style
    {"model.num_kv_heads": 1, "model.head_dim": 6, "model.attn_bias": "qkvo",
     "model.qk_norm": "full"},  # OLMoE-style norms, head_dim != d_model / num_heads
    {"model.num_heads": 3, "model.head_dim": 10, "model.qk_norm": "full"},  # MHA, fused w_qkv
    {"model.attention": "mla"},  # full-rank queries
    {"model.attention": "mla", "model.mla.q_lora_rank": 12, "model.attn_bias": "qkvo",
     "model.mla.v_head_dim": 8},  # DeepSeek-V3-style
]


@pytest.mark.parametrize("overrides", ATTENTION_VARIANTS + [
    {"moe.num_shared_experts": 1, "moe.shared_hidden": 24, "moe.shared_gate": True},
    {"moe.num_shared_experts": 2, "moe.shared_gate": True, "moe.first_dense_layers": 1},
    {"model.attention": "mla", "model.mla.q_lora_rank": 8, "moe.num_shared_experts": 1,
     "moe.shared_gate": True, "moe.router": "sigmoid_bias", "moe.sigmoid_bias.num_groups": 2},
    {"model.num_kv_heads": 1, "model.attn_bias": "qkvo", "moe.enabled": False},
])
def test_param_counts_match_init_for_model_options(overrides):
  """The counted total equals the initialised tree's size (GQA, biases, norms, MLA, gates)."""
  cfg = _set(tiny_config(), overrides)
  p = jax.eval_shape(lambda k: lm.init(k, cfg), jax.random.key(0))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(p))
  if cfg.moe.enabled:  # only the routed experts a token does not use are inactive
    inactive = layer_plan(cfg)[1] * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * 32 * 32
    assert counts["params_active"] == counts["params_total"] - inactive


def test_attention_width_in_flops():
  """Score/value products cost H * (K_qk + K_v) / 2 per context token: d_model for MHA and
  for GQA (fewer K/V heads, the same scores), H * head_dim with head_dim, MLA's own dims."""
  from moejax.model.counting import attention_width  # noqa: PLC0415
  m = tiny_config().model  # d_model 32, 2 heads
  assert attention_width(m) == 32
  m.num_kv_heads = 1
  assert attention_width(m) == 32
  m.head_dim = 6
  assert attention_width(m) == 12
  m.head_dim, m.attention = 0, "mla"
  m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim = 8, 4, 6
  assert attention_width(m) == 2 * (8 + 4 + 6) / 2
  cfg = _set(tiny_config(), {"model.head_dim": 6})
  c = lm.param_counts(cfg)
  assert lm.flops_per_token(cfg) == (
      6 * (c["params_active"] - c["params_embedding"] + 258 * 32)
      + 6 * 2 * cfg.train.seq_len * 12)


def test_causal_with_latent_attention():
  """The whole LM stays causal with latent attention (grouped-query attention: the layer
  tests in test_attention.py)."""
  cfg = _set(tiny_config(), {**ATTENTION_VARIANTS[5], "moe.dispatch": "dense"})
  variables = lm.init(jax.random.key(1), cfg)
  ids = _ids(cfg)
  t = 6
  ids2 = ids.at[:, t + 1:].set((ids[:, t + 1:] + 17) % 256)
  a, b = lm.apply(variables, ids, cfg)[0], lm.apply(variables, ids2, cfg)[0]
  np.testing.assert_array_equal(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]))
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:])
