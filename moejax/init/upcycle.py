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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax.config import default_config
from moejax.layout import DENSE_STACK, EXPERTS, MOE, is_moe_layer, layer_location
from moejax.moe import chain
from moejax.moe.experts import ExpertFamily, get_family

MODES = ("copy", "split")


def ffn_to_experts(ffn: dict[str, Any], num_experts: int, expert_hidden: int,
                   mode: str, family: ExpertFamily | None = None) -> dict[str, np.ndarray]:
  """One dense FFN (the family's leaves without E, e.g. SwiGLU's w_gate [D,F],
  w_up [D,F], w_down [F,D]) -> the family's expert leaves [E, ...].

  The family's declaration says where each leaf's expert and F axes are and
  which leaves produce the output (scaled by the slice count in split mode);
  `family` defaults to the default `moe.expert` (SwiGLU, the dense FFN's form).
  """
  family = family or get_family(default_config().moe)
  leaves = family.leaves()
  shared = sorted(family.shared_leaves())
  if shared:
    raise ValueError(f"config key moe.expert={family.name!r} is invalid for upcycling: its "
                     f"leaves {shared} are shared by all experts of a layer, which copies or "
                     "slices of one dense FFN do not define; upcycle into the dense FFN's own "
                     "family")
  if set(ffn) != set(leaves):
    raise ValueError(f"config key moe.expert={family.name!r} is invalid for upcycling: its "
                     f"experts have leaves {sorted(leaves)}, the dense FFN {sorted(ffn)}; "
                     "upcycle into the dense FFN's own family")
  first = next(k for k, leaf in leaves.items() if "F" in leaf.dims)
  lf = leaves[first]
  f = np.shape(ffn[first])[[x for x in lf.dims if x != "E"].index("F")]
  if mode == "copy":
    if expert_hidden != f:
      raise ValueError(f"config key moe.expert_hidden={expert_hidden} is invalid for "
                       f"init.upcycle='copy': must equal the dense ffn_hidden={f}")
    return {k: np.repeat(np.expand_dims(np.asarray(ffn[k]), leaf.expert_axis), num_experts,
                         axis=leaf.expert_axis) for k, leaf in leaves.items()}
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
  reps = num_experts // g  # expert e = r * G + slice
  out = {}
  for k, leaf in leaves.items():
    w = np.asarray(ffn[k])
    ea = leaf.expert_axis
    if "F" not in leaf.dims:  # e.g. an output bias: every slice expert keeps it
      out[k] = np.repeat(np.expand_dims(w, ea), num_experts, axis=ea)
      continue
    fa = [x for x in leaf.dims if x != "E"].index("F")
    slices = np.stack(np.split(w, g, axis=fa), axis=ea)
    if leaf.output:  # the G slices' outputs, weighted 1/G each, sum to the dense output
      slices = slices * g
    out[k] = np.concatenate([slices] * reps, axis=ea)
  return out


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
  layers = src[DENSE_STACK]["block0"]
  n_src = layers["attn_norm"]["scale"].shape[0]
  n = moe_cfg.model.num_layers
  if n_src != n:
    raise ValueError(f"config key model.num_layers={n} does not match the dense run's "
                     f"{n_src} layers")
  m = moe_cfg.moe
  family = get_family(m)
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
      _copy_into(dst[name], layer[name], idx, name)
    if is_moe_layer(moe_cfg, i):
      if router == "zero":  # every round's router (moe.chain.rounds)
        for name in chain.router_names(m):
          dst[MOE][name] = jax.tree.map(np.zeros_like, dst[MOE][name])
      experts = ffn_to_experts(layer["ffn"], m.num_experts, m.expert_hidden, mode, family)
      for j, (k, leaf) in enumerate(family.leaves().items()):
        w = np.moveaxis(experts[k], leaf.expert_axis, 0)  # noise is relative to expert 0
        w = np.moveaxis(_noisy(w, noise, jax.random.fold_in(rng, 3 * i + j)), 0,
                        leaf.expert_axis)
        dst[MOE][EXPERTS][k][idx] = _checked(w, dst[MOE][EXPERTS][k][idx], f"experts/{k}")
    else:
      for k, v in layer["ffn"].items():
        dst["ffn"][k][idx] = _checked(v, dst["ffn"][k][idx], f"ffn/{k}")
  return jax.tree.map(jnp.asarray, out)


def _copy_into(dst: dict, src: dict, idx: int, name: str) -> None:
  """dst[...][idx] = src[...] for every leaf of the (nested) `src`, e.g. an
  attention's q/k norms {"q_norm": {"scale": ...}} or its latent-attention norms."""
  for k, v in src.items():
    if k not in dst:
      raise ValueError(f"parameter {name}/{k}: the source has it, the new model does not; "
                       "the model.* keys must match the source run's")
    if isinstance(v, Mapping):
      _copy_into(dst[k], v, idx, f"{name}/{k}")
    else:
      dst[k][idx] = _checked(v, dst[k][idx], f"{name}/{k}")


def _checked(src: np.ndarray, dst: np.ndarray, name: str) -> np.ndarray:
  if src.shape != dst.shape:
    raise ValueError(f"parameter {name}: the source has shape {src.shape}, the new model "
                     f"{dst.shape}; the model.* keys must match the source run's")
  return src.astype(dst.dtype)
