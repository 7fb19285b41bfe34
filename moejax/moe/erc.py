"""Expert-router coupling (ERC) loss (Lv et al. 2025, "Coupling Experts and Routers in
Mixture-of-Experts via an Auxiliary Loss").

The router's per-expert embeddings R [E, D] (the columns of a linear gate:
the router contract's `expert_embedding`) stand for the tokens routed to
each expert. Perturbed copies of them are proxy tokens,

    R~_i = R_i * delta_i,   delta_i ~ U(1 - eps_i, 1 + eps_i)^D elementwise,
    eps_i = min(noise, min_{j != i} ||R_i - R_j|| / (2 ||R_i||)),

so a proxy stays closer to its own embedding than to any other (eps_i
without gradient); noise is drawn from the "router" rng stream in training
only (deterministic=True: R~ = R). Every proxy goes through every expert's
input projection (the expert family's `activation_norms`: SwiGLU's gate
projection, the paper's W_g; MLP's x W_in + b_in), giving the E x E matrix
M[i, j] = ||R~_i W^j||, proxy i in expert j. The loss enforces the paper's
two constraints with the multiplicative margin alpha:

    L = 1/E^2 sum_i sum_{j != i} [ relu(M[i, j] - alpha M[i, i])     (proxy i excites
                                                                      expert i most)
                                 + relu(M[j, i] - alpha M[i, i]) ]   (expert i answers
                                                                      its own proxy most)

It trains both sides: the router embeddings (through the proxies) and the
experts' input projections. Its cost is E^2 proxy activations per MoE layer
and step, independent of the batch; the parameter and FLOP counts do not
include it (it adds no parameters, and flops_per_token counts per-token work).

Config `moe.erc`: weight (0 = off; the MoE layers report "erc_loss"
unweighted and moejax/aux_losses.py weights it), alpha in [0, 1] (1: an
off-diagonal activation only has to stay below the diagonal one; smaller is
stricter), noise in [0, 1] (the cap of eps_i; 0: the proxies are the
embeddings themselves). Refused by config key: a router without per-expert
embeddings (hash, soft, recurrent, thor) and merged experts
(moe.num_router_experts: the router's embeddings are not the experts').
Quantized experts (moe.quant) give their dequantized weights to the family,
so the loss is measured as for float experts but trains only the router
(the packed codes are not parameters).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.aux_losses import AuxLoss
from moejax.checks import fail
from moejax.moe.experts.base import ExpertWeights

LOSS = "erc_loss"


def noise_bounds(emb_ExD: jax.Array, noise: float) -> jax.Array:
  """[E] eps_i = min(noise, min_{j != i} ||R_i - R_j|| / (2 ||R_i||)), no gradient."""
  r = jax.lax.stop_gradient(emb_ExD.astype(jnp.float32))
  e = r.shape[0]
  dist_ExE = jnp.sqrt(jnp.sum(jnp.square(r[:, None, :] - r[None, :, :]), axis=-1))
  nearest_E = jnp.min(jnp.where(jnp.eye(e, dtype=bool), jnp.inf, dist_ExE), axis=-1)
  bound_E = nearest_E / (2.0 * jnp.maximum(jnp.sqrt(jnp.sum(r * r, axis=-1)), 1e-30))
  return jnp.minimum(jnp.float32(noise), bound_E)


def proxy_tokens(emb_ExD: jax.Array, key: jax.Array | None, noise: float) -> jax.Array:
  """[E, D] float32 R * delta with delta ~ U(1 - eps_i, 1 + eps_i); key None: R itself."""
  r = emb_ExD.astype(jnp.float32)
  if key is None or noise == 0:
    return r
  eps_Ex1 = noise_bounds(r, noise)[:, None]
  u_ExD = jax.random.uniform(key, r.shape, jnp.float32, minval=-1.0, maxval=1.0)
  return r * (1.0 + eps_Ex1 * u_ExD)


def coupling_loss(m_ExE: jax.Array, alpha: float) -> jax.Array:
  """1/E^2 sum_{i != j} relu(M[i, j] - alpha M[i, i]) + relu(M[j, i] - alpha M[i, i])."""
  m = m_ExE.astype(jnp.float32)
  e = m.shape[0]
  diag_E = jnp.diagonal(m)
  off = ~jnp.eye(e, dtype=bool)
  rows = jnp.where(off, jax.nn.relu(m - alpha * diag_E[:, None]), 0.0)  # M[i, j] vs M[i, i]
  cols = jnp.where(off, jax.nn.relu(m.T - alpha * diag_E[:, None]), 0.0)  # M[j, i] vs M[i, i]
  return (jnp.sum(rows) + jnp.sum(cols)) / (e * e)


def erc_loss(emb_ExD: jax.Array, experts: ExpertWeights, key: jax.Array | None,
             alpha: float, noise: float) -> jax.Array:
  """The ERC loss of one MoE layer: proxies of `emb_ExD` through every expert."""
  proxies_ExD = proxy_tokens(emb_ExD, key, noise)
  return coupling_loss(experts.activation_norms(proxies_ExD), alpha)


def enabled(cfg_moe) -> bool:
  opts = cfg_moe.get("erc")
  return opts is not None and opts.weight != 0


def aux_losses(cfg_moe) -> tuple[AuxLoss, ...]:
  """The loss every MoE layer reports when moe.erc.weight is not 0."""
  return (AuxLoss(LOSS, "moe.erc.weight"),) if enabled(cfg_moe) else ()


def check_config(cfg, has_embedding: bool, mapped: bool) -> None:
  """moe.erc.*; `has_embedding`: the chosen router declares per-expert embeddings;
  `mapped`: its experts go through the merged-expert map."""
  opts = cfg.moe.erc
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not number(opts.weight) or not math.isfinite(opts.weight) or opts.weight < 0:
    fail("moe.erc.weight", opts.weight, "must be a finite number >= 0 (0: off)")
  for key, v in (("moe.erc.alpha", opts.alpha), ("moe.erc.noise", opts.noise)):
    if not number(v) or not 0 <= v <= 1:
      fail(key, v, "allowed: a number in [0, 1]")
  if not opts.weight:
    return
  if not has_embedding:
    fail("moe.erc.weight", opts.weight, f"needs a router with per-expert embeddings (a "
         f"linear gate); moe.router={cfg.moe.router!r} has none (allowed with it: 0)")
  if mapped:
    fail("moe.erc.weight", opts.weight, "needs moe.num_router_experts=0: with merged experts "
         "the router's embeddings are not the experts' (allowed: 0)")
