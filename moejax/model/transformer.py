"""Decoder-only Transformer LM with dense or MoE FFNs, layers under `lax.scan`.

Layer i uses an MoE FFN iff MoE is enabled, i >= moe.first_dense_layers and
(i - first_dense_layers) % moe.every == 0. The first_dense_layers layers run
as one scanned stack; the rest as a scanned stack of identical "periods" of
moe.every layers (one MoE layer followed by every-1 dense layers), so compile
time does not grow with depth.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES, RMSNorm, SwiGLU, dot, linear
from moejax.model.attention import AttentionExperts, CausalAttention
from moejax.moe import MoELayer
from moejax.moe.adapters import AUX_COLLECTION as ADAPTER_AUX
from moejax.moe.adapters import MASK_COLLECTION as ADAPTER_MASK
from moejax.moe.adapters import make_adapter
from moejax.moe.routers import get_router

ATTN_LOSSES = ("attn_load_balance", "attn_z_loss")  # AttentionExperts' router losses


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(norm x); x + FFN(norm x).

  The carry is (x [B, L, D], router carry, attention-expert losses); the
  router carry is state a router passes from one MoE layer to the next (the
  layerwise recurrent router's hidden state) and `shared` holds router
  weights shared by all layers; both are empty for other routers. With
  model.attn_experts > 0 the attention is a mixture of attention experts and
  the third entry sums its (unweighted) router losses over layers; else {}.
  """

  cfg: ml_collections.FrozenConfigDict
  use_moe: bool
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, Any], token_ids_BxL: jax.Array,
               shared: dict) -> tuple[tuple[jax.Array, Any], dict | None]:
    x_BxLxD, router_carry, attn_losses = carry
    m = self.cfg.model
    out_scale = 1.0 / math.sqrt(2 * m.num_layers)
    a_in = RMSNorm(name="attn_norm")(x_BxLxD)
    if m.get("attn_experts", 0):  # mixture of attention experts (MoA)
      h, losses = AttentionExperts(m.num_heads, m.attn_experts, m.attn_top_k, m.attn_shared_kv,
                                   m.rope_theta, m.dtype, out_scale,
                                   m.get("attn_renormalize", True), name="attn")(a_in)
      attn_losses = {k: attn_losses[k] + v for k, v in losses.items()}
    else:
      h = CausalAttention(m.num_heads, m.rope_theta, m.dtype, out_scale, name="attn")(a_in)
    if (adapter := make_adapter(self.cfg, "attn")) is not None:  # moe.adapters
      h = h + adapter(a_in)
    x_BxLxD = x_BxLxD + h
    z = RMSNorm(name="ffn_norm")(x_BxLxD)
    aux = None
    if self.use_moe:
      h, aux, router_carry = MoELayer(self.cfg.moe, m.dtype, out_scale, name="moe")(
          z, token_ids_BxL=token_ids_BxL, router_carry=router_carry, shared=shared,
          deterministic=self.deterministic)
    else:
      h = SwiGLU(m.ffn_hidden, m.dtype, out_scale, name="ffn")(z)
    if (adapter := make_adapter(self.cfg, "ffn")) is not None:  # moe.adapters
      h = h + adapter(z)
    return (x_BxLxD + h, router_carry, attn_losses), aux


class Period(nn.Module):
  """`n` consecutive blocks; the first is an MoE block iff `first_moe`."""

  cfg: ml_collections.FrozenConfigDict
  n: int
  first_moe: bool
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, token_ids_BxL: jax.Array, shared: dict):
    block = Block
    if self.cfg.model.remat:
      block = nn.remat(Block, prevent_cse=False)
    aux = None
    for j in range(self.n):
      carry, a = block(self.cfg, self.first_moe and j == 0, self.deterministic,
                       name=f"block{j}")(carry, token_ids_BxL, shared)
      aux = a if a is not None else aux
    return carry, aux


def _scanned(cfg, length: int, n: int, first_moe: bool, deterministic: bool,
             name: str) -> nn.Module:
  stack = nn.scan(Period, variable_axes={"params": 0, "moe_state": 0, "balance": 0,
                                          "intermediates": 0, ADAPTER_MASK: 0,
                                          ADAPTER_AUX: 0},
                  split_rngs={"params": True, "router": True},
                  in_axes=(nn.broadcast, nn.broadcast), length=length,
                  metadata_params={nn.PARTITION_NAME: "layers"})
  return stack(cfg, n, first_moe, deterministic, name=name)


def layer_plan(cfg) -> tuple[int, int]:
  """(number of leading dense layers, number of periods of moe.every layers)."""
  m, moe = cfg.model, cfg.moe
  if not moe.enabled:
    return m.num_layers, 0
  return moe.first_dense_layers, (m.num_layers - moe.first_dense_layers) // moe.every


class TransformerLM(nn.Module):
  """ids [B, L] -> (logits [B, L, V] float32, aux).

  aux = {"losses": {name: [num_moe_layers]}, "metrics": {name: [num_moe_layers, ...]},
         "state_stats": {name: [num_moe_layers, ...]}} (empty dicts for a dense model);
  state_stats feed the routers' non-trained state updates (moejax.moe.state).
  With model.attn_experts > 0, aux["attn_losses"] = {name: scalar}: the
  attention experts' router losses summed over layers, already weighted.
  """

  cfg: ml_collections.FrozenConfigDict
  deterministic: bool = True

  @nn.compact
  def __call__(self, ids_BxL: jax.Array) -> tuple[jax.Array, dict]:
    m = self.cfg.model
    embed = self.param("embed", nn.initializers.normal(0.02),
                       (m.vocab_size, m.d_model))
    x = jnp.take(embed, ids_BxL, axis=0)
    n_dense, n_periods = layer_plan(self.cfg)
    attn_losses = ({k: jnp.zeros((), jnp.float32) for k in ATTN_LOSSES}
                   if m.get("attn_experts", 0) else {})
    carry, shared = (x, {}, attn_losses), {}
    if n_periods:
      router = get_router(self.cfg.moe.router)
      if getattr(router, "uses_carry", False):
        b, l = ids_BxL.shape
        carry = (x, router.init_carry(b * l, self.cfg.moe), attn_losses)
        shared = router.make_shared(self, m.d_model, self.cfg.moe)
    if n_dense:
      carry, _ = _scanned(self.cfg, n_dense, 1, False, self.deterministic,
                          "dense_layers")(carry, ids_BxL, shared)
    aux = {"losses": {}, "metrics": {}, "state_stats": {}, "balance_counts": None}
    if n_periods:
      carry, aux = _scanned(self.cfg, n_periods, self.cfg.moe.every, True,
                            self.deterministic, "moe_layers")(carry, ids_BxL, shared)
    if attn_losses:  # summed over layers, weighted by model.attn_*_weight
      w = {"attn_load_balance": m.attn_aux_loss_weight, "attn_z_loss": m.attn_z_loss_weight}
      aux = {**aux, "attn_losses": {k: w[k] * v for k, v in carry[2].items()}}
    x = carry[0]
    x = RMSNorm(name="final_norm")(x)
    if m.tie_embeddings:
      logits = dot("bld,vd->blv", x, embed, DTYPES[m.dtype])
    else:
      head = self.param("head", nn.initializers.normal(1.0 / math.sqrt(m.d_model)),
                        (m.d_model, m.vocab_size))
      logits = linear(x, head, DTYPES[m.dtype])
    return logits, aux
