"""Cross-layer expert pools: one set of experts outside the layer scan, shared by every MoE layer.

Config (`moe.pool.*`):
  kind    "none" (each MoE layer owns moe.num_experts experts), "global"
          (UniPool, 2025: one pool of moe.pool.size experts; every MoE
          layer's router scores all of them; moe.num_experts is not used) or
          "window" (ReXMoE, 2025: the pool is the num_moe_layers *
          moe.num_experts experts of all MoE layers, E per layer, and MoE
          layer i routes over the window * E experts of a window of
          `window` consecutive layers around it).
  size    kind="global": P, the pool's experts (0 otherwise).
  window  kind="window": w, the layers whose experts a layer may use (0 otherwise).

The window of MoE layer i (of N) is layers start_i .. start_i + w - 1 with
start_i = min(max(i - (w - 1) // 2, 0), N - w): centred on i (one layer more
after i than before it when w is even) and shifted to stay inside the stack,
so every layer has the same R = w * E choices and the scan stays
homogeneous (w = N: every layer routes over the whole pool; w = 1: the
plain per-layer MoE).

The pool's parameters are created once in the model's scope
(`ExpertPool`, params "expert_pool/experts/<leaf>") and passed to every MoE
layer of the scanned stack; a layer's router scores its R choices and the
layer maps choice r onto pool expert `layer_map(i)[r]` (start_i * E + r for
a window, r for the global pool) through its int32 map in the
"expert_map" collection, the same map merged experts use
(moejax/moe/layer.py). Gradients of every layer add up in the pool. Expert
parallelism shards the pool's expert axis over `parallel.expert` exactly as
a layer's experts, so the pool size must be divisible by it. Routing capture
(moejax/analysis) reports ids over the pool's experts; what reads each
layer's own experts refuses a pool run with `refusal`.

Not modelled: UniPool's pool-level balancing loss (usage summed over layers)
and its NormRouter (each layer keeps the configured router and balancing
losses over its own R choices); ReXMoE's progressive scaling routing (the
full window is open from the first step).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.checks import fail, is_int
from moejax.moe.experts import ExpertFamily, Experts, ExpertWeights, get_family

KINDS = ("none", "global", "window")
MODULE = "expert_pool"  # the pool's module in the model's scope


def kind(cfg_moe) -> str:
  """moe.pool.kind ("none" when the config has no pool group)."""
  pool = cfg_moe.get("pool")
  return "none" if pool is None else pool.get("kind", "none")


def enabled(cfg_moe) -> bool:
  return kind(cfg_moe) != "none"


def num_choices(cfg_moe) -> int:
  """R, the experts each MoE layer's router scores: P (global) or w * E (window)."""
  k = kind(cfg_moe)
  if k == "global":
    return int(cfg_moe.pool.size)
  if k == "window":
    return int(cfg_moe.pool.window) * int(cfg_moe.num_experts)
  return int(cfg_moe.num_experts)


def pool_size(cfg: ml_collections.ConfigDict) -> int:
  """Experts in the pool (full config): P (global) or num_moe_layers * E (window)."""
  k = kind(cfg.moe)
  if k == "global":
    return int(cfg.moe.pool.size)
  if k == "window":
    return layout.layer_plan(cfg)[1] * int(cfg.moe.num_experts)
  raise ValueError("moe.pool.kind='none': the model has no expert pool")


def dispatched_experts(cfg: ml_collections.ConfigDict) -> tuple[int, str]:
  """(experts an MoE layer dispatches into, the config key that sets them): the pool's, or
  moe.num_experts. What `parallel.expert` must divide."""
  k = kind(cfg.moe)
  if k == "global":
    return pool_size(cfg), "moe.pool.size"
  if k == "window":
    return pool_size(cfg), "the window pool's experts (MoE layers * moe.num_experts)"
  return int(cfg.moe.num_experts), "moe.num_experts"


def window_start(layer: Any, num_layers: int, window: int) -> Any:
  """First MoE layer of MoE layer `layer`'s window (python int or traced int32)."""
  lo = layer - (window - 1) // 2
  if isinstance(layer, int):
    return min(max(lo, 0), num_layers - window)
  return jnp.clip(lo, 0, num_layers - window)


def layer_map(layer: Any, cfg_moe, pool_experts: int) -> jax.Array:
  """[R] int32 pool expert of each router choice of MoE layer `layer` (traced or int)."""
  r = num_choices(cfg_moe)
  r_R = jnp.arange(r, dtype=jnp.int32)
  if kind(cfg_moe) == "global":
    return r_R
  e = int(cfg_moe.num_experts)
  start = window_start(layer, pool_experts // e, int(cfg_moe.pool.window))
  return (jnp.asarray(start, jnp.int32) * e + r_R).astype(jnp.int32)


class ExpertPool(nn.Module):
  """The pool's experts of `family` ("expert_pool/experts/<leaf>"), returned bound."""

  family: ExpertFamily
  num_experts: int
  hidden: int
  dtype: Any
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, d: int) -> ExpertWeights:
    return Experts(self.family, self.num_experts, self.hidden, self.dtype, self.out_scale,
                   name=layout.EXPERTS)(d)


def refusal(cfg: ml_collections.ConfigDict, what: str) -> str | None:
  """Why `what` cannot handle `cfg`'s cross-layer pool (None without one)."""
  if not cfg.moe.get("enabled", True) or not enabled(cfg.moe):
    return None
  return (f"moe.pool.kind={kind(cfg.moe)!r}: the MoE layers share one cross-layer expert "
          f"pool; {what} reads each layer's own experts (needs moe.pool.kind='none')")


def check_config(cfg: ml_collections.ConfigDict, mappable: tuple[str, ...]) -> None:
  """moe.pool.* and what a pool rules out (called by the MoE layer's check)."""
  moe = cfg.moe
  pool = moe.get("pool")
  if pool is None:
    return
  k = pool.get("kind", "none")
  if k not in KINDS:
    fail("moe.pool.kind", k, f"allowed: {list(KINDS)}")
  size, window = pool.get("size", 0), pool.get("window", 0)
  for key, v in (("moe.pool.size", size), ("moe.pool.window", window)):
    if not is_int(v) or v < 0:
      fail(key, v, "must be a non-negative integer")
  if k != "global" and size:
    fail("moe.pool.size", size, f"must be 0 unless moe.pool.kind='global' (kind={k!r})")
  if k != "window" and window:
    fail("moe.pool.window", window, f"must be 0 unless moe.pool.kind='window' (kind={k!r})")
  if k == "none":
    return
  n = layout.layer_plan(cfg)[1]
  if k == "global" and size < 1:
    fail("moe.pool.size", size, "allowed: a positive integer (the pool's experts) with "
         "moe.pool.kind='global'")
  if k == "window":
    if window < 1:
      fail("moe.pool.window", window, "allowed: an integer >= 1 (MoE layers whose experts a "
           "layer routes over) with moe.pool.kind='window'")
    if window > n:
      fail("moe.pool.window", window, f"allowed: at most the {n} MoE layers of the model "
           "(model.num_layers, moe.first_dense_layers, moe.every)")
  if moe.router not in mappable:
    fail("moe.pool.kind", k, f"needs moe.router in {list(mappable)} (a token's choice of "
         f"router expert ids that the layer maps onto pool experts); moe.router={moe.router!r}")
  if moe.router == "topk" and (moe.topk.get("copies", 1) > 1 or moe.topk.get("grown_groups", 0)):
    fail("moe.pool.kind", k, "needs moe.topk.copies=1 and moe.topk.grown_groups=0 (grown "
         "groups of copies are a map of their own)")
  if moe.get("num_router_experts", 0):
    fail("moe.num_router_experts", moe.num_router_experts, f"must be 0 with moe.pool.kind="
         f"{k!r} (the pool's map replaces the merged experts' map)")
  quant = moe.get("quant", {}).get("scheme", "none")
  if quant != "none":
    fail("moe.quant.scheme", quant, f"must be 'none' with moe.pool.kind={k!r} (quantized "
         "experts are stored per layer)")
  ad = moe.get("adapters")
  if ad is not None and ad.get("enabled", False):
    fail("moe.adapters.enabled", True, f"must be False with moe.pool.kind={k!r} (adapter "
         "runs keep their base run's per-layer experts)")
  shared = sorted(get_family(moe).shared_leaves())
  if shared:
    fail("moe.expert", moe.expert, f"must be a family whose experts own all their leaves with "
         f"moe.pool.kind={k!r} (the leaves {shared} are shared by the experts of one layer; "
         "a pool spans layers)")
  # parallel.expert must divide the pool: moejax/parallel/mesh.py (`dispatched_experts`).

__all__ = ["ExpertPool", "KINDS", "MODULE", "check_config", "dispatched_experts", "enabled",
           "kind", "layer_map", "num_choices", "pool_size", "refusal", "window_start"]
