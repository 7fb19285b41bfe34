"""Decoder-only Transformer LM with dense or MoE FFNs, layers under `lax.scan`.

Layer i uses an MoE FFN iff MoE is enabled, i >= moe.first_dense_layers and
(i - first_dense_layers) % moe.every == 0. The first_dense_layers layers run
as one scanned stack; the rest as a scanned stack of identical "periods" of
moe.every layers (one MoE layer followed by every-1 dense layers), so compile
time does not grow with depth.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax.layers import DTYPES, RMSNorm, SwiGLU, dot
from moejax.model.attention import CausalAttention
from moejax.moe import MoELayer


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(norm x); x + FFN(norm x)."""

  cfg: ml_collections.FrozenConfigDict
  use_moe: bool
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, token_ids_BxL: jax.Array
               ) -> tuple[jax.Array, dict | None]:
    m = self.cfg.model
    out_scale = 1.0 / math.sqrt(2 * m.num_layers)
    h = CausalAttention(m.num_heads, m.rope_theta, m.dtype, out_scale,
                        name="attn")(RMSNorm(name="attn_norm")(x_BxLxD))
    x_BxLxD = x_BxLxD + h
    z = RMSNorm(name="ffn_norm")(x_BxLxD)
    aux = None
    if self.use_moe:
      h, aux = MoELayer(self.cfg.moe, m.dtype, out_scale, name="moe")(
          z, token_ids_BxL=token_ids_BxL, deterministic=self.deterministic)
    else:
      h = SwiGLU(m.ffn_hidden, m.dtype, out_scale, name="ffn")(z)
    return x_BxLxD + h, aux


class Period(nn.Module):
  """`n` consecutive blocks; the first is an MoE block iff `first_moe`."""

  cfg: ml_collections.FrozenConfigDict
  n: int
  first_moe: bool
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, token_ids_BxL: jax.Array):
    block = Block
    if self.cfg.model.remat:
      block = nn.remat(Block, prevent_cse=False, static_argnums=())
    aux = None
    for j in range(self.n):
      x_BxLxD, a = block(self.cfg, self.first_moe and j == 0, self.deterministic,
                         name=f"block{j}")(x_BxLxD, token_ids_BxL)
      aux = a if a is not None else aux
    return x_BxLxD, aux


def _scanned(cfg, length: int, n: int, first_moe: bool, deterministic: bool,
             name: str) -> nn.Module:
  stack = nn.scan(Period, variable_axes={"params": 0, "moe_state": 0},
                  split_rngs={"params": True, "router": True},
                  in_axes=nn.broadcast, length=length,
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

  aux = {"losses": {name: [num_moe_layers]}, "metrics": {name: [num_moe_layers, ...]}}
  (empty dicts for a dense model).
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
    if n_dense:
      x, _ = _scanned(self.cfg, n_dense, 1, False, self.deterministic,
                      "dense_layers")(x, ids_BxL)
    aux = {"losses": {}, "metrics": {}}
    if n_periods:
      x, aux = _scanned(self.cfg, n_periods, self.cfg.moe.every, True,
                        self.deterministic, "moe_layers")(x, ids_BxL)
    x = RMSNorm(name="final_norm")(x)
    if m.tie_embeddings:
      logits = dot("bld,vd->blv", x, embed, DTYPES[m.dtype])
    else:
      head = self.param("head", nn.initializers.normal(1.0 / math.sqrt(m.d_model)),
                        (m.d_model, m.vocab_size))
      logits = dot("bld,dv->blv", x, head, DTYPES[m.dtype])
    return logits, aux
