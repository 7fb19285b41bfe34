"""Growing an MoE's experts during continued training: every expert becomes m copies.

`grow_params(params, factor, noise, rng)` is pure: in every MoE layer expert e
becomes experts e*m .. e*m+m-1 (identical weights) and its router column is
repeated m times, plus N(0, noise^2) on every repeated column. Everything
else is unchanged.

Why the forward pass is unchanged at the switch (top-k fixed): with plain
softmax-then-top-k, m tied copies split their expert's probability into m
equal parts and a token's k slots can all go to copies of its best expert,
which changes the output. The grown model therefore routes with
`moe.topk.copies = m` (moejax/moe/routers/topk.copy_group_route): a group of
copies has logit logsumexp(copy logits), which for tied copies is the
original logit + log(m); the k groups and their weights are chosen exactly
as the k experts were before (softmax of logits shifted by the same log(m) is
unchanged; so is top-k and the renormalisation), and each chosen group uses
its highest-logit copy, identical to the original expert. After the switch
the copies' router columns and weights diverge through training (and the
`noise` perturbation), and the balancing loss, computed over all E*m
experts, spreads tokens over the copies.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

ROUTER_KEYS = ("w_gate",)


def _grow_moe(moe: dict, factor: int, noise: float, rng: jax.Array) -> dict:
  extra = set(moe["router"]) - set(ROUTER_KEYS)
  if extra:
    raise ValueError(f"growing supports the plain topk router (w_gate only); this router "
                     f"also has {sorted(extra)} (config key moe.topk.noise must be 'none')")
  experts = {k: jnp.repeat(v, factor, axis=1) for k, v in moe["experts"].items()}
  w_PxDxE = jnp.repeat(moe["router"]["w_gate"], factor, axis=-1)
  if noise > 0:
    w_PxDxE = w_PxDxE + noise * jax.random.normal(rng, w_PxDxE.shape, w_PxDxE.dtype)
  out = dict(moe)
  out["experts"] = experts
  out["router"] = {"w_gate": w_PxDxE}
  return out


def grow_params(params: dict, factor: int, noise: float = 0.0,
                rng: jax.Array | None = None) -> dict:
  """params with every MoE layer's E experts grown to E * factor (module docstring)."""
  if factor < 1:
    raise ValueError(f"config key init.grow_factor={factor} is invalid: must be >= 1")
  rng = jax.random.key(0) if rng is None else rng
  out: dict[str, Any] = dict(params)
  if "moe_layers" not in params:
    raise ValueError("the source run has no MoE layers to grow (init.grow_from needs an MoE run)")
  stack = dict(params["moe_layers"])
  block0 = dict(stack["block0"])
  block0["moe"] = _grow_moe(block0["moe"], factor, noise, rng)
  stack["block0"] = block0
  out["moe_layers"] = stack
  return out
