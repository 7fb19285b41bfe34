"""Sparse upcycling (Komatsuzaki et al., 2023): a dense model's FFNs become MoE experts.

`upcycle_params(dense_params, moe_params, moe_cfg, mode, noise, rng)` is a
pure function: it returns the MoE parameters with every parameter the dense
model has carried over (embeddings, attention, norms, head, the FFNs of the
MoE model's dense layers) and each MoE layer's experts built from that
layer's dense FFN; the router (and anything else the dense model lacks)
keeps its fresh initialisation from `moe_params`.

Modes:
  copy:  every expert is a copy of the dense FFN (moe.expert_hidden must be
         the dense ffn_hidden). Whatever k experts a token is routed to,
         weights summing to 1 give exactly the dense output.
  split: fine-grained experts: the dense hidden units are cut into
         G = ffn_hidden / expert_hidden slices, expert e holding slice e % G
         with its down projection scaled by G (moe.num_experts must be a
         multiple of G). A token routed to one copy of every slice with
         weight 1/G each gets exactly the dense output.
`noise` > 0 adds N(0, (noise * std(w))^2) to every expert weight w
independently, to break the symmetry between copies. `router="zero"` zeroes
the router instead of keeping its fresh init: every expert then ties, top-k
takes the k lowest indices with weight 1/k, which in split mode with
k = G is one copy of every slice, so the upcycled model starts exactly at
the dense function (the balancing loss then spreads tokens over the copies).

Attention (init.upcycle_attention, the MoE config having model.attn_experts
= E_a > 0): `attention_to_experts` makes every attention expert a copy of
the layer's dense attention (shared K/V: the dense K/V projection is the
shared one, each expert gets the dense Q and O); the attention router is
fresh (or zero with router="zero") and `noise` applies to the per-expert
weights too. Top-k weights are renormalised, so any choice of experts gives
the dense attention output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.init.layout import is_moe_layer, layer_location

MODES = ("copy", "split")
FFN_KEYS = ("w_gate", "w_up", "w_down")


def ffn_to_experts(ffn: dict[str, Any], num_experts: int, expert_hidden: int,
                   mode: str) -> dict[str, np.ndarray]:
  """One dense SwiGLU {w_gate [D,F], w_up [D,F], w_down [F,D]} -> experts [E, ...]."""
  f = ffn["w_gate"].shape[-1]
  if mode == "copy":
    if expert_hidden != f:
      raise ValueError(f"config key moe.expert_hidden={expert_hidden} is invalid for "
                       f"init.upcycle='copy': must equal the dense ffn_hidden={f}")
    return {k: np.repeat(np.asarray(ffn[k])[None], num_experts, axis=0) for k in FFN_KEYS}
  if mode != "split":
    raise ValueError(f"config key init.upcycle={mode!r} is invalid: allowed: {list(MODES)}")
  if f % expert_hidden:
    raise ValueError(f"config key moe.expert_hidden={expert_hidden} is invalid for "
                     f"init.upcycle='split': must divide the dense ffn_hidden={f}")
  g = f // expert_hidden
  if num_experts % g:
    raise ValueError(f"config key moe.num_experts={num_experts} is invalid for "
                     f"init.upcycle='split': must be a multiple of ffn_hidden / "
                     f"expert_hidden = {g} slices")
  gate = np.asarray(ffn["w_gate"]).reshape(-1, g, expert_hidden).transpose(1, 0, 2)
  up = np.asarray(ffn["w_up"]).reshape(-1, g, expert_hidden).transpose(1, 0, 2)
  down = np.asarray(ffn["w_down"]).reshape(g, expert_hidden, -1) * g
  reps = num_experts // g  # expert e = r * G + slice
  return {"w_gate": np.tile(gate, (reps, 1, 1)), "w_up": np.tile(up, (reps, 1, 1)),
          "w_down": np.tile(down, (reps, 1, 1))}


def attention_to_experts(attn: dict[str, Any], num_experts: int,
                         shared_kv: bool) -> dict[str, np.ndarray]:
  """Dense {w_qkv [D,3,H,K], w_out [H,K,D]} -> attention-expert weights (no router).

  shared_kv: {w_q [E,D,H,K], w_kv [D,2,H,K], w_out [E,H,K,D]}; else
  {w_qkv [E,D,3,H,K], w_out [E,H,K,D]}; every expert equals the dense attention.
  """
  w_qkv, w_out = np.asarray(attn["w_qkv"]), np.asarray(attn["w_out"])
  out = {"w_out": np.repeat(w_out[None], num_experts, axis=0)}
  if shared_kv:
    out["w_q"] = np.repeat(w_qkv[None, :, 0], num_experts, axis=0)
    out["w_kv"] = np.array(w_qkv[:, 1:], copy=True)
  else:
    out["w_qkv"] = np.repeat(w_qkv[None], num_experts, axis=0)
  return out


def _noisy(w_ExN: np.ndarray, noise: float, rng: jax.Array) -> np.ndarray:
  if noise <= 0:
    return w_ExN
  std = float(np.std(w_ExN[0]))
  eps = np.asarray(jax.random.normal(rng, w_ExN.shape, jnp.float32))
  return w_ExN + noise * std * eps


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def upcycle_params(dense_params: dict, moe_params: dict, moe_cfg: ml_collections.ConfigDict,
                   *, mode: str = "copy", noise: float = 0.0, router: str = "fresh",
                   rng: jax.Array | None = None) -> dict:
  """MoE params built from a dense model's params (see the module docstring).

  `dense_params` has the dense model's layout ("dense_layers"/block0 stacked
  over all layers); `moe_params` is a fresh init of the MoE config, giving
  the target structure and the router weights. Raises ValueError naming the
  config key when shapes do not fit.
  """
  out = _to_numpy(moe_params)
  src = _to_numpy(dense_params)
  rng = jax.random.key(0) if rng is None else rng
  for key in ("embed", "head", "final_norm"):
    if key in out:
      out[key] = jax.tree.map(lambda a, b: _checked(a, b, key), src[key], out[key])
  layers = src["dense_layers"]["block0"]
  n_src = layers["attn_norm"]["scale"].shape[0]
  n = moe_cfg.model.num_layers
  if n_src != n:
    raise ValueError(f"config key model.num_layers={n} does not match the dense run's "
                     f"{n_src} layers")
  m = moe_cfg.moe
  attn_experts = moe_cfg.model.get("attn_experts", 0)
  for i in range(n):
    stack, block, idx = layer_location(moe_cfg, i)
    dst = out[stack][block]
    layer = jax.tree.map(lambda a: a[i], layers)
    if attn_experts:  # mixture of attention experts: copies of the dense attention
      layer["attn"] = attention_to_experts(layer["attn"], attn_experts,
                                           moe_cfg.model.attn_shared_kv)
      for j, k in enumerate(("w_q", "w_qkv", "w_out")):
        if k in layer["attn"]:
          layer["attn"][k] = _noisy(layer["attn"][k], noise,
                                    jax.random.fold_in(rng, 3 * n + 3 * i + j))
      if router == "zero":
        dst["attn"]["router"][idx] = 0.0
    for name in ("attn", "attn_norm", "ffn_norm"):
      for k, v in layer[name].items():
        dst[name][k][idx] = _checked(v, dst[name][k][idx], f"{name}/{k}")
    if is_moe_layer(moe_cfg, i):
      if router == "zero":
        dst["moe"]["router"] = jax.tree.map(np.zeros_like, dst["moe"]["router"])
      experts = ffn_to_experts(layer["ffn"], m.num_experts, m.expert_hidden, mode)
      for j, k in enumerate(FFN_KEYS):
        w = _noisy(experts[k], noise, jax.random.fold_in(rng, 3 * i + j))
        dst["moe"]["experts"][k][idx] = _checked(w, dst["moe"]["experts"][k][idx],
                                                 f"experts/{k}")
    else:
      for k in FFN_KEYS:
        dst["ffn"][k][idx] = _checked(layer["ffn"][k], dst["ffn"][k][idx], f"ffn/{k}")
  return jax.tree.map(jnp.asarray, out)


def _checked(src: np.ndarray, dst: np.ndarray, name: str) -> np.ndarray:
  if src.shape != dst.shape:
    raise ValueError(f"parameter {name}: the source has shape {src.shape}, the new model "
                     f"{dst.shape}; the model.* keys must match the source run's")
  return src.astype(dst.dtype)
