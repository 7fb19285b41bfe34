"""Mixture of attention experts (model.attn_experts): forward vs NumPy, counts, config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.validation import validate
from moejax.model.attention import AttentionExperts, attention_route
from moejax.train.trainer import total_loss
from tests.conftest import tiny_config

THETA = 10_000.0


def moa_config(experts: int = 3, top_k: int = 2, shared_kv: bool = True, **moe):
  c = tiny_config(dispatch="dense", **moe)
  c.model.attn_experts = experts
  c.model.attn_top_k = top_k
  c.model.attn_shared_kv = shared_kv
  return c


def _np_rope(x_LxHxK: np.ndarray) -> np.ndarray:
  l, _, k = x_LxHxK.shape
  half = k // 2
  freq = THETA ** (-np.arange(half) / half)
  ang = np.arange(l)[:, None] * freq[None, :]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  x1, x2 = x_LxHxK[..., :half], x_LxHxK[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_attention(x_LxD, wq_DxHxK, wk_DxHxK, wv_DxHxK, wo_HxKxD) -> np.ndarray:
  """One expert's causal attention, a loop over positions."""
  l = x_LxD.shape[0]
  h, k = wq_DxHxK.shape[1:]
  q = _np_rope(np.einsum("ld,dhk->lhk", x_LxD, wq_DxHxK))
  kk = _np_rope(np.einsum("ld,dhk->lhk", x_LxD, wk_DxHxK))
  v = np.einsum("ld,dhk->lhk", x_LxD, wv_DxHxK)
  o = np.zeros((l, h, k))
  for t in range(l):
    s_HxS = np.einsum("hk,shk->hs", q[t], kk[:t + 1]) / np.sqrt(k)
    p = np.exp(s_HxS - s_HxS.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o[t] = np.einsum("hs,shk->hk", p, v[:t + 1])
  return np.einsum("lhk,hkd->ld", o, wo_HxKxD)


def _np_moa(x_BxLxD, p, top_k: int, shared_kv: bool, renormalize: bool = True):
  """(y [B, L, D], balance, z-loss) by loops over experts and tokens."""
  b, l, d = x_BxLxD.shape
  e = p["router"].shape[1]
  y_ExBxLxD = np.zeros((e, b, l, d))
  for ei in range(e):
    if shared_kv:
      wq, wk, wv = p["w_q"][ei], p["w_kv"][:, 0], p["w_kv"][:, 1]
    else:
      wq, wk, wv = (p["w_qkv"][ei][:, j] for j in range(3))
    for bi in range(b):
      y_ExBxLxD[ei, bi] = _np_attention(x_BxLxD[bi], wq, wk, wv, p["w_out"][ei])
  logits_TxE = x_BxLxD.reshape(-1, d) @ p["router"]
  probs_TxE = np.exp(logits_TxE - logits_TxE.max(-1, keepdims=True))
  probs_TxE /= probs_TxE.sum(-1, keepdims=True)
  y_TxD = np.zeros((b * l, d))
  counts_E = np.zeros(e)
  for t in range(b * l):
    chosen = np.argsort(-probs_TxE[t], kind="stable")[:top_k]
    w = probs_TxE[t, chosen]
    if renormalize:
      w = w / w.sum()
    for ei, wi in zip(chosen, w):
      y_TxD[t] += wi * y_ExBxLxD[ei].reshape(-1, d)[t]
      counts_E[ei] += 1
  balance = e * np.sum(counts_E / counts_E.sum() * probs_TxE.mean(0))
  lse = np.log(np.exp(logits_TxE).sum(-1))
  return y_TxD.reshape(b, l, d), balance, np.mean(lse ** 2)


@pytest.mark.parametrize("shared_kv,experts,top_k,renormalize", [
    (True, 3, 2, True), (False, 4, 1, True), (True, 4, 1, False), (False, 3, 2, False)])
def test_forward_matches_numpy_reference(shared_kv, experts, top_k, renormalize):
  b, l, d, h = 2, 7, 16, 2  # L not a multiple of anything
  rng = np.random.default_rng(experts)
  x = rng.normal(size=(b, l, d)).astype(np.float32)
  shapes = {"router": (d, experts), "w_out": (experts, h, d // h, d)}
  shapes.update({"w_q": (experts, d, h, d // h), "w_kv": (d, 2, h, d // h)} if shared_kv
                else {"w_qkv": (experts, d, 3, h, d // h)})
  params = {k: (rng.normal(size=v) / np.sqrt(d)).astype(np.float32) for k, v in shapes.items()}
  params["router"] *= 8.0  # spread-out routing weights
  layer = AttentionExperts(h, experts, top_k, shared_kv, renormalize=renormalize)
  y, losses = jax.jit(layer.apply)({"params": params}, x)
  want, balance, z = _np_moa(np.asarray(x, np.float64),
                             jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                             top_k, shared_kv, renormalize)
  np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(losses["attn_load_balance"], balance, rtol=1e-4)
  np.testing.assert_allclose(losses["attn_z_loss"], z, rtol=1e-4)


_route = jax.jit(attention_route, static_argnums=1)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(t=st.sampled_from([1, 7]), e=st.sampled_from([1, 3]), data=st.data())
def test_route_weights_sum_to_one_over_k_experts(t, e, data):
  k = data.draw(st.integers(1, e))
  tied = data.draw(st.booleans())
  seed = data.draw(st.integers(0, 2 ** 16))
  logits = (np.zeros((t, e), np.float32) if tied else
            np.random.default_rng(seed).normal(size=(t, e)).astype(np.float32))
  combine, losses = _route(jnp.asarray(logits), k)
  combine = np.asarray(combine)
  np.testing.assert_allclose(combine.sum(-1), 1.0, rtol=1e-6)
  assert np.all((combine > 0).sum(-1) == k)
  if tied:  # ties: the k lowest indices, weight 1/k each; balance E * sum_i f_i / E = 1
    np.testing.assert_allclose(combine[:, :k], 1.0 / k, rtol=1e-6)
    np.testing.assert_allclose(losses["attn_load_balance"], 1.0, rtol=1e-6)
  assert np.isfinite(float(losses["attn_z_loss"]))


@pytest.mark.parametrize("shared_kv,moe", [(True, {}), (False, {"every": 2})])
def test_param_counts_match_the_model_and_flops_count_all_experts(shared_kv, moe):
  cfg = moa_config(4, 2, shared_kv, **moe)
  ids = jnp.zeros((1, cfg.train.seq_len), jnp.int32)
  params = jax.eval_shape(lm.make_model(cfg).init, jax.random.key(0), ids)["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(params))
  d, n = cfg.model.d_model, cfg.model.num_layers
  per_expert = (2 if shared_kv else 4) * d * d
  plain = cfg.copy_and_resolve_references()
  plain.model.attn_experts = 0
  base = lm.param_counts(plain)
  # 2 of 4 experts active (+ shared K/V and the router) instead of one attention.
  extra_active = n * (2 * per_expert + (2 * d * d if shared_kv else 0) + 4 * d - 4 * d * d)
  assert counts["params_active"] == base["params_active"] + extra_active
  extra_computed = n * 2 * per_expert  # the 2 unused experts still run
  attn_scores = 6.0 * n * cfg.train.seq_len * d * 3  # 4 experts' scores instead of 1
  assert lm.flops_per_token(cfg) == pytest.approx(
      lm.flops_per_token(plain) + 6.0 * (extra_active + extra_computed) + attn_scores)


def test_model_is_causal():
  cfg = moa_config(3, 2, False)
  ids = np.zeros((1, cfg.train.seq_len), np.int32)
  shapes = jax.eval_shape(lm.make_model(cfg).init, jax.random.key(0), ids)
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  variables = jax.tree.unflatten(tree, [(0.3 * rng.normal(size=x.shape)).astype(np.float32)
                                        for x in leaves])
  ids = np.random.default_rng(1).integers(0, 258, (2, 16)).astype(np.int32)
  later = ids.copy()
  later[:, 9:] = (ids[:, 9:] + 5) % 258
  a, aux = lm.apply(variables, ids, cfg)
  b, _ = lm.apply(variables, later, cfg)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
  assert not np.allclose(a[:, 9:], b[:, 9:])
  # Every layer reports its attention router's losses, unweighted.
  assert aux["losses"]["attn_load_balance"].shape == (cfg.model.num_layers,)
  assert aux["losses"]["attn_z_loss"].shape == (cfg.model.num_layers,)


def test_total_loss_adds_the_weighted_attention_losses():
  cfg = moa_config(3, 2, False)
  cfg.model.attn_aux_loss_weight, cfg.model.attn_z_loss_weight = 0.01, 1e-3
  cfg.moe.enabled = False
  aux = {"losses": {"attn_load_balance": jnp.asarray([1.5, 0.5]),
                    "attn_z_loss": jnp.asarray([2.0, 1.0])}}
  got = total_loss(jnp.float32(1.0), aux, cfg)
  np.testing.assert_allclose(got, 1.023, rtol=1e-6)
  with pytest.raises(ValueError, match="not declared"):
    total_loss(jnp.float32(1.0), {"losses": {"load_balance": jnp.ones(2)}}, cfg)


@pytest.mark.parametrize("key,value,match", [
    ("model.attn_experts", -1, "model.attn_experts=-1 is invalid: must be an integer >= 0"),
    ("model.attn_top_k", 0, r"model.attn_top_k=0 is invalid: must be an integer in \[1, "),
    ("model.attn_top_k", 4, r"model.attn_top_k=4 is invalid: .*model.attn_experts=3"),
    ("model.attn_top_k", 1, r"model.attn_renormalize=True is invalid: with model.attn_top_k=1 "
     r"of 3 experts the gate would be constantly 1 .*model.attn_renormalize=False"),
    ("model.attn_aux_loss_weight", -0.1, "model.attn_aux_loss_weight=-0.1 is invalid"),
])
def test_config_errors_name_key_value_and_allowed(key, value, match):
  cfg = moa_config(3, 2)
  group, name = key.split(".")
  cfg[group][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(cfg)


def test_top1_attention_router_needs_an_unnormalised_gate():
  cfg = moa_config(3, 1)
  cfg.model.attn_renormalize = False  # Switch-style: the chosen expert's probability
  validate(cfg)
  cfg = moa_config(1, 1)  # one expert: nothing to route, the weight 1 is right
  validate(cfg)


def test_upcycle_attention_config_errors(tmp_path):
  cfg = moa_config(3, 2)
  cfg.init.upcycle_attention = True
  with pytest.raises(ConfigError, match="init.upcycle_attention=True is invalid: needs "
                     "init.from_dense"):
    validate(cfg)
  cfg = tiny_config()
  cfg.init.upcycle_attention = True
  cfg.init.from_dense = str(tmp_path)
  with pytest.raises(ConfigError, match="needs model.attn_experts > 0"):
    validate(cfg)
  cfg = moa_config(3, 2)
  cfg.init.from_dense = str(tmp_path)
  with pytest.raises(ConfigError, match="model.attn_experts=3 is invalid: with init.from_dense "
                     "needs init.upcycle_attention=True"):
    validate(cfg)
