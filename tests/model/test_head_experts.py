"""Mixture-of-Head attention (model.moh): layer vs a per-token NumPy loop, the uniform-router
relation to plain attention, causality, KV-cache decoding, counts, config errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import model as lm
from moejax.checks import ConfigError
from moejax.inference import decode
from moejax.layout import layer_plan
from moejax.model.attention import CausalAttention
from moejax.model.head_experts import HeadExperts, head_weights
from moejax.train.trainer import total_loss
from moejax.validation import validate
from tests.conftest import tiny_config
from tests.model.params import random_params

THETA = 10_000.0
GATES = ("router", "shared_router", "stage_router")


def moh_config(top_k: int = 2, shared: int = 1, heads: int = 4, renormalize: bool = True,
               **model):
  c = tiny_config(dispatch="dense")
  c.model.num_heads = heads
  c.model.moh.top_k = top_k
  c.model.moh.shared_heads = shared
  c.model.moh.renormalize = renormalize
  for key, v in model.items():
    c.model[key] = v
  return c


# ------------------------------------------------------------------ slow reference

def _np_softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max())
  return e / e.sum()


def _np_rope_vec(v_K: np.ndarray, pos: int) -> np.ndarray:
  half = v_K.shape[0] // 2
  out = np.empty_like(v_K)
  for i in range(half):
    a = pos * THETA ** (-i / half)
    out[i] = v_K[i] * np.cos(a) - v_K[i + half] * np.sin(a)
    out[i + half] = v_K[i + half] * np.cos(a) + v_K[i] * np.sin(a)
  return out


def _np_token_weights(x_D, p, h: int, s: int, k: int, renormalize: bool):
  """(g [H], routed probabilities [h_r], chosen routed heads) of one token."""
  r = h - s
  pr = _np_softmax(x_D @ p["router"])
  chosen = sorted(range(r), key=lambda i: (-pr[i], i))[:k]
  w = pr[chosen]
  if renormalize:
    w = k * w / w.sum()
  a1, a2 = 0.0, 1.0
  if s:
    a1, a2 = _np_softmax(x_D @ p["stage_router"]) * (2.0 if renormalize else 1.0)
  shared = _np_softmax(x_D @ p["shared_router"]) if s >= 2 else np.ones(s)
  if renormalize:
    shared = s * shared
  g = np.zeros(h)
  g[:s] = a1 * shared
  for i, wi in zip(chosen, w):
    g[s + i] = a2 * wi
  return g, pr, chosen


def _np_moh(x_BxLxD, p, h: int, s: int, k: int, renormalize: bool, bias: str):
  """(y [B, L, D], balance loss): loops over sequences, query tokens and heads."""
  b, l, d = x_BxLxD.shape
  if "w_qkv" in p:
    wq, wk, wv = (p["w_qkv"][:, j] for j in range(3))
    bq, bk, bv = (p["b_qkv"][j] for j in range(3)) if bias != "none" else (0.0, 0.0, 0.0)
  else:
    wq, wk, wv = p["w_q"], p["w_kv"][:, 0], p["w_kv"][:, 1]
    bq, bk, bv = ((p["b_q"], p["b_kv"][0], p["b_kv"][1]) if bias != "none"
                  else (0.0, 0.0, 0.0))
  g_kv = wk.shape[1]
  kd = wq.shape[2]
  y = np.zeros((b, l, d))
  counts, probs = np.zeros(h - s), np.zeros(h - s)
  for bi in range(b):
    x = x_BxLxD[bi]
    q = np.einsum("ld,dhk->lhk", x, wq) + bq
    kk = np.einsum("ld,dgk->lgk", x, wk) + bk
    v = np.einsum("ld,dgk->lgk", x, wv) + bv
    for t in range(l):
      g, pr, chosen = _np_token_weights(x[t], p, h, s, k, renormalize)
      probs += pr
      counts[chosen] += 1
      for hh in range(h):
        grp = hh // (h // g_kv)
        qt = _np_rope_vec(q[t, hh], t)
        scores = np.array([qt @ _np_rope_vec(kk[j, grp], j) for j in range(t + 1)])
        a = _np_softmax(scores / np.sqrt(kd))
        o = sum(a[j] * v[j, grp] for j in range(t + 1))
        y[bi, t] += g[hh] * (o @ p["w_out"][hh])
      if bias == "qkvo":
        y[bi, t] += p["b_out"]
  n = b * l
  return y, float(np.sum(counts / n * probs / n))


def _layer(h, s, k, renormalize, g=0, kd=0, bias="none", qk_norm="none"):
  return HeadExperts(num_heads=h, rope_theta=THETA, num_kv_heads=g, head_dim=kd, bias=bias,
                     qk_norm=qk_norm, top_k=k, shared_heads=s, renormalize=renormalize)


@pytest.mark.parametrize("h,s,k,renormalize,g,kd,bias", [
    (4, 0, 2, True, 0, 0, "none"),  # pure routing, fused w_qkv
    (4, 1, 2, False, 2, 0, "qkv"),  # grouped-query, the paper's Eq. 5-6 weights
    (4, 2, 1, False, 1, 0, "qkvo"),  # multi-query, two shared heads (their own softmax)
    (3, 2, 1, True, 0, 4, "qkvo"),  # one routed head, head_dim != d_model / num_heads
])
def test_forward_matches_per_token_reference(h, s, k, renormalize, g, kd, bias):
  b, l, d = 2, 7, 16
  x = np.random.default_rng(h * 10 + s).normal(size=(b, l, d)).astype(np.float32)
  mod = _layer(h, s, k, renormalize, g, kd, bias)
  params = random_params(mod, x, seed=k + s)
  assert params["router"].shape == (d, h - s)
  assert ("shared_router" in params) == (s >= 2) and ("stage_router" in params) == (s >= 1)
  y, losses = jax.jit(mod.apply)({"params": params}, x)
  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  want, balance = _np_moh(np.asarray(x, np.float64), p64, h, s, k, renormalize, bias)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(losses["moh_load_balance"]), balance, rtol=1e-5)


@pytest.mark.parametrize("h,s,g,kd,bias,qk_norm", [
    (4, 0, 0, 0, "none", "none"),
    (4, 1, 2, 0, "qkvo", "full"),
    (3, 2, 1, 6, "qkv", "head"),
])
@pytest.mark.parametrize("renormalize", [True, False])
def test_uniform_router_with_all_heads_is_plain_attention_up_to_the_weights(
    h, s, g, kd, bias, qk_norm, renormalize):
  """Gates at zero (a uniform router) and top_k = h_r: MoH(x) = sum_h c_h H_h W_O^h + b_out
  with the same weights as `CausalAttention`, where c_h = 1 for every head with
  renormalize=True (exactly plain attention) and, with the paper's weights, c_h = 1 / (2 h_s)
  for a shared head and 1 / (2 h_r) for a routed one (1 / H without shared heads)."""
  b, l, d = 2, 6, 16
  x = np.random.default_rng(7).normal(size=(b, l, d)).astype(np.float32)
  mod = _layer(h, s, h - s, renormalize, g, kd, bias, qk_norm)
  params = random_params(mod, x, seed=3)
  params = {n: (np.zeros_like(w) if n in GATES else w) for n, w in params.items()}
  y, _ = jax.jit(mod.apply)({"params": params}, x)
  plain = {n: w for n, w in params.items() if n not in GATES}
  if not renormalize:
    c_H = (np.full(h, 1.0 / h) if not s else
           np.r_[np.full(s, 0.5 / s), np.full(h - s, 0.5 / (h - s))])
    plain["w_out"] = (plain["w_out"] * c_H[:, None, None]).astype(np.float32)
  ref = CausalAttention(num_heads=h, rope_theta=THETA, num_kv_heads=g, head_dim=kd,
                        bias=bias, qk_norm=qk_norm)
  want = jax.jit(ref.apply)({"params": plain}, x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(y), 0.0)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _weights(routed, shared, stage, s, k, renormalize):
  return head_weights(routed, shared, stage, s, k, renormalize)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(h=st.integers(2, 5), t=st.integers(1, 6), renormalize=st.booleans(), data=st.data())
def test_head_weights_properties(h, t, renormalize, data):
  s = data.draw(st.integers(0, h - 1))
  k = data.draw(st.integers(1, h - s))
  rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
  routed = 2.0 * rng.normal(size=(t, h - s)).astype(np.float32)
  shared = rng.normal(size=(t, s)).astype(np.float32) if s >= 2 else None
  stage = rng.normal(size=(t, 2)).astype(np.float32) if s else None
  g, losses = _weights(routed, shared, stage, s, k, renormalize)
  g = np.asarray(g)
  assert g.shape == (t, h) and np.all(g >= 0)
  # Every token uses its h_s shared heads and exactly k routed heads: its top-k logits.
  assert np.all(g[:, :s] > 0) and np.all((g[:, s:] > 0).sum(-1) == k)
  for i in range(t):
    used = g[i, s:] > 0
    if k < h - s:
      assert routed[i, used].min() >= routed[i, ~used].max()
  # What the weights sum to: with renormalize, 2 a_1 h_s + 2 a_2 k (k without shared heads);
  # with the paper's weights, a_1 + a_2 * (probability mass of the chosen heads) <= 1.
  a = (np.exp(stage) / np.exp(stage).sum(-1, keepdims=True) if s
       else np.c_[np.zeros(t), np.ones(t)])
  p = np.exp(routed - routed.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  chosen_mass = np.where(g[:, s:] > 0, p, 0.0).sum(-1)
  if renormalize:
    want = 2 * a[:, 0] * s + 2 * a[:, 1] * k if s else np.full(t, float(k))
  else:
    want = a[:, 0] + a[:, 1] * chosen_mass
  np.testing.assert_allclose(g.sum(-1), want, rtol=1e-5)
  f = (g[:, s:] > 0).mean(0)
  np.testing.assert_allclose(float(losses["moh_load_balance"]), np.sum(f * p.mean(0)),
                             rtol=1e-5)


def test_uniform_router_balance_loss_is_k_over_routed_heads():
  """Tied logits: every token takes the lowest k indices (weight 1 each, renormalised), and
  with P_i = 1 / h_r the loss sum_i f_i P_i is k / h_r = 2 / 4."""
  g, losses = _weights(np.zeros((5, 4), np.float32), None, None, 0, 2, True)
  np.testing.assert_allclose(np.asarray(g), np.tile([1.0, 1.0, 0.0, 0.0], (5, 1)), rtol=1e-6)
  np.testing.assert_allclose(float(losses["moh_load_balance"]), 0.5, rtol=1e-6)


def test_gates_get_gradients_from_the_output():
  x = np.random.default_rng(0).normal(size=(1, 5, 8)).astype(np.float32)
  mod = _layer(4, 2, 2, True)
  params = random_params(mod, x, seed=1)
  grads = jax.grad(lambda p: jnp.sum(mod.apply({"params": p}, x)[0] ** 2))(params)
  for name in GATES:
    assert np.abs(np.asarray(grads[name])).max() > 0, name


# ------------------------------------------------------------------ the model

def _random_variables(cfg, seed=0):
  ids = np.zeros((1, cfg.train.seq_len), np.int32)
  shapes = jax.eval_shape(lm.make_model(cfg).init, jax.random.key(0), ids)
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [(0.3 * rng.normal(size=x.shape)).astype(np.float32)
                                   for x in leaves])


def test_model_is_causal_and_reports_the_balance_loss_per_layer():
  cfg = moh_config(2, 1, num_kv_heads=2)
  variables = _random_variables(cfg)
  ids = np.random.default_rng(1).integers(0, 258, (2, 16)).astype(np.int32)
  later = ids.copy()
  later[:, 9:] = (ids[:, 9:] + 5) % 258
  a, aux = lm.apply(variables, ids, cfg)
  b, _ = lm.apply(variables, later, cfg)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-5)
  assert not np.allclose(a[:, 9:], b[:, 9:])
  assert aux["losses"]["moh_load_balance"].shape == (cfg.model.num_layers,)


def test_total_loss_weights_the_head_balance_loss():
  cfg = moh_config(2, 1)
  cfg.moe.enabled = False
  cfg.model.moh.aux_loss_weight = 0.1
  aux = {"losses": {"moh_load_balance": jnp.asarray([0.5, 0.75])}}
  np.testing.assert_allclose(total_loss(jnp.float32(1.0), aux, cfg), 1.125, rtol=1e-6)


@pytest.mark.parametrize("over", [
    {"top_k": 2, "shared": 1},
    {"top_k": 2, "shared": 0, "renormalize": False, "num_kv_heads": 2, "attn_bias": "qkv"},
])
def test_cached_decoding_equals_the_full_forward(over):
  """Prefill, then one token at a time through moejax.inference's decoder: every position's
  logits equal the full forward pass's (routing is per query token; all K/V are cached)."""
  over = dict(over)
  cfg = moh_config(over.pop("top_k"), over.pop("shared"), **over)
  cfg.train.seq_len = 32
  cfg.moe.dispatch = "dropless"
  variables = lm.init(jax.random.key(1), cfg)
  dec = decode.Decoder(cfg, variables)
  rng = np.random.default_rng(0)
  lengths, split = np.array([12, 9]), np.array([5, 2])
  ids = rng.integers(0, cfg.model.vocab_size, (2, 12)).astype(np.int32)
  full, _ = lm.apply(variables, ids, cfg)
  width, steps = 16, 7
  ids_BxP = np.zeros((2, width), np.int32)
  pad_B = width - split
  for b in range(2):
    ids_BxP[b, pad_B[b]:] = ids[b, :split[b]]
  logits, cache = dec.prefill(ids_BxP, pad_B, width + steps)
  rel = lambda got, want: np.abs(np.asarray(got) - want).max() / np.abs(want).max()
  for b in range(2):
    assert rel(logits[b, pad_B[b]:], np.asarray(full[b, :split[b]])) <= 1e-5
  for i in range(steps):
    pos = split + i
    out, cache = dec.step(cache, ids[np.arange(2), pos], pos, width + i)
    for b in range(2):
      if pos[b] < lengths[b]:
        assert rel(out[b], np.asarray(full[b, pos[b]])) <= 1e-5, (i, b)


# ------------------------------------------------------------------ counting

@pytest.mark.parametrize("over", [
    {"top_k": 2, "shared": 1},
    {"top_k": 1, "shared": 2, "renormalize": False, "num_kv_heads": 1, "attn_bias": "qkvo"},
    {"top_k": 2, "shared": 0, "head_dim": 6, "qk_norm": "full", "attn_bias": "qkv"},
    {"top_k": 3, "shared": 1, "qk_norm": "head", "moe_every": 2},
])
def test_param_counts_match_the_tree_and_flops_count_every_head(over):
  over = dict(over)
  every = over.pop("moe_every", 1)
  cfg = moh_config(over.pop("top_k"), over.pop("shared"), **over)
  cfg.moe.every = every
  params = jax.eval_shape(lm.make_model(cfg).init, jax.random.key(0),
                          jnp.zeros((1, 16), jnp.int32))["params"]
  counts = lm.param_counts(cfg)
  assert counts["params_total"] == sum(x.size for x in jax.tree.leaves(params))
  m, h, s, k = cfg.model, cfg.model.num_heads, cfg.model.moh.shared_heads, cfg.model.moh.top_k
  # Inactive per token: the routed experts not chosen, and per layer the Q/O slices of the
  # h_r - k heads not chosen, read off the initialised tree.
  attn = [params[stack][blk]["attn"] for stack in params if stack.endswith("layers")
          for blk in params[stack]]
  per_head = 0
  for a in attn:
    n_layers = a["w_out"].shape[0]
    q_size = a["w_qkv"].size // 3 if "w_qkv" in a else a["w_q"].size  # [L, D, (3,) H, K]
    if m.qk_norm == "full":  # every head's q feeds the RMS; only its gain slice is idle
      q_slice = a["q_norm"]["scale"].size // n_layers // h
    else:
      q_slice = q_size // n_layers // h
      bias = a.get("b_qkv", a.get("b_q"))
      q_slice += 0 if bias is None else (bias.size // n_layers // (3 if "b_qkv" in a else 1)
                                         // h)
    per_head += n_layers * (q_slice + a["w_out"].size // n_layers // h)
  inactive_heads = (h - s - k) * per_head
  inactive_experts = layer_plan(cfg)[1] * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * 32 * 32
  assert counts["params_active"] == counts["params_total"] - inactive_experts - inactive_heads
  # Every head is computed: flops are the plain attention's plus the gates' 6 FLOPs/param.
  gates = sum(a[n].size for a in attn for n in GATES if n in a)
  plain = cfg.copy_and_resolve_references()
  plain.model.moh.top_k = 0
  assert lm.flops_per_token(cfg) == pytest.approx(lm.flops_per_token(plain) + 6.0 * gates)
  assert lm.param_counts(plain)["params_total"] == counts["params_total"] - gates


# ------------------------------------------------------------------ config errors

@pytest.mark.parametrize("key,value,match", [
    ("top_k", -1, r"model.moh.top_k=-1 is invalid: must be an integer >= 0"),
    ("top_k", 4, r"model.moh.top_k=4 is invalid: must be an integer in \[1, model.num_heads - "
     r"model.moh.shared_heads = 3\]"),
    ("shared_heads", 4, r"model.moh.shared_heads=4 is invalid: must be an integer in \[0, "
     r"model.num_heads - 1 = 3\]"),
    ("shared_heads", -1, r"model.moh.shared_heads=-1 is invalid"),
    ("aux_loss_weight", -0.5, r"model.moh.aux_loss_weight=-0.5 is invalid"),
])
def test_moh_key_errors_name_key_value_and_allowed(key, value, match):
  cfg = moh_config(2, 1)
  cfg.model.moh[key] = value
  with pytest.raises(ConfigError, match=match):
    validate(cfg)


@pytest.mark.parametrize("over,match", [
    ({"attention": "mla"}, r"model.attention='mla' is invalid: must be 'mha' with "
     r"model.moh.top_k=2"),
    ({"attn_experts": 2}, r"model.attn_experts=2 is invalid: must be 0 with model.moh.top_k=2"),
])
def test_other_attention_layers_are_refused(over, match):
  cfg = moh_config(2, 1, **over)
  with pytest.raises(ConfigError, match=match):
    validate(cfg)


def test_top1_of_several_routed_heads_needs_the_paper_weights():
  cfg = moh_config(1, 1)  # renormalize=True: the one routed weight would be constant
  with pytest.raises(ConfigError, match=r"model.moh.renormalize=True is invalid: with "
                     r"model.moh.top_k=1 of 3 experts"):
    validate(cfg)
  validate(moh_config(1, 1, renormalize=False))
  validate(moh_config(1, 3))  # one routed head: nothing to choose
  validate(moh_config(4, 0, num_kv_heads=2, qk_norm="full", attn_bias="qkvo"))


def test_hugging_face_export_names_the_head_routing():
  from moejax.interop.decoder import export_reasons  # noqa: PLC0415
  assert "model.moh.top_k=2 (Mixture-of-Head attention)" in export_reasons(moh_config(2, 1))
  assert not any("moh" in r for r in export_reasons(moh_config(0, 0)))


def test_architectures_variant_counts_as_documented():
  """configs/architectures.py:moh: 3 of 4 heads per token; the counts its docstring states."""
  from configs.architectures import get_config  # noqa: PLC0415
  cfg, base = get_config("moh"), get_config("topk")
  validate(cfg)
  assert (cfg.model.moh.top_k, cfg.model.moh.shared_heads, cfg.model.num_heads) == (2, 1, 4)
  assert lm.param_counts(cfg)["params_active"] == 1_089_664
  assert lm.param_counts(base)["params_active"] == 1_119_872
  gates = cfg.model.num_layers * cfg.model.d_model * (3 + 2)
  assert lm.flops_per_token(cfg) == lm.flops_per_token(base) + 6.0 * gates
