"""Decoder-only Transformer LM with dense or MoE FFNs, layers under `lax.scan`.

Layer i uses an MoE FFN iff MoE is enabled, i >= moe.first_dense_layers and
(i - first_dense_layers) % moe.every == 0. The first_dense_layers layers run
as one scanned stack; the rest as scanned stacks of identical "periods" of
moe.every layers (one MoE layer followed by every-1 dense layers), so compile
time does not grow with depth (moejax/layout.py: where they live). With a
layer-wise expert schedule (moe.layer_schedule) each MoE layer has its own
experts and top-k; layers of equal shape share a stack (`layout.moe_stacks`),
so the number of stacks follows the schedule's distinct shapes, not depth.

With a cross-layer expert pool (moe.pool.kind != "none", moejax/moe/pool.py)
the pool's experts are created once here, outside the scan, and passed to
every MoE layer with its index among the MoE layers (a scanned input).

Auxiliary losses (the MoE layers', the attention experts', Mixture-of-Head
attention's, the adapters') come out of every block the same way, unweighted
and by name, and the model returns them in aux["losses"]
(moejax/aux_losses.py weights and sums them).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.aux_losses import AuxLoss
from moejax.checks import choice, fail, positive, positive_int
from moejax.layers import DTYPES, RMSNorm, SwiGLU, dot, linear
from moejax.model import attention as attention_lib
from moejax.model import head_experts
from moejax.model.attention import AttentionExperts, CausalAttention, Decoding
from moejax.model.head_experts import HeadExperts
from moejax.model.latent_attention import LatentAttention
from moejax.moe import MoELayer
from moejax.moe import adapters as adapters_lib
from moejax.moe import layer as moe_layer
from moejax.moe import pool as pool_lib
from moejax.moe.adapters import MASK_COLLECTION as ADAPTER_MASK
from moejax.moe.adapters import make_adapter
from moejax.moe.experts import ExpertWeights, get_family
from moejax.moe.experts.quantized import COLLECTION as QUANT
from moejax.moe.routers import get_router
from moejax.schedules import SCHEDULE

COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTIONS = ("mha", "mla")
ATTN_BIASES = ("none", "qkv", "qkvo")
QK_NORMS = ("none", "head", "full")


def aux_losses(cfg: ml_collections.ConfigDict) -> dict[str, AuxLoss]:
  """{name: AuxLoss} of every auxiliary loss the model of `cfg` reports."""
  out: dict[str, AuxLoss] = {}
  for loss in (*moe_layer.aux_losses(cfg), *attention_lib.aux_losses(cfg),
               *head_experts.aux_losses(cfg), *adapters_lib.aux_losses(cfg)):
    if loss.name in out:
      raise ValueError(f"auxiliary loss {loss.name!r} is declared twice")
    out[loss.name] = loss
  return out


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """model.* keys (attention experts by moejax/model/attention.py, Mixture-of-Head
  attention by moejax/model/head_experts.py)."""
  m = cfg.model
  for key in ("model.d_model", "model.num_layers", "model.num_heads",
              "model.ffn_hidden", "model.vocab_size", "model.rope_theta", "model.norm_eps"):
    positive(cfg, key)
  for key in ("model.num_kv_heads", "model.head_dim"):
    positive_int(cfg, key, allow_zero=True)
  choice(m.dtype, "model.dtype", COMPUTE_DTYPES)
  choice(m.attention, "model.attention", ATTENTIONS)
  choice(m.attn_bias, "model.attn_bias", ATTN_BIASES)
  choice(m.qk_norm, "model.qk_norm", QK_NORMS)
  if m.attention == "mla":
    for key in ("model.mla.kv_lora_rank", "model.mla.qk_nope_head_dim",
                "model.mla.qk_rope_head_dim", "model.mla.v_head_dim"):
      positive_int(cfg, key)
    positive_int(cfg, "model.mla.q_lora_rank", allow_zero=True)
    if m.mla.qk_rope_head_dim % 2:
      fail("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim, "must be even for RoPE")
    for key, v in (("model.attn_bias", m.attn_bias), ("model.qk_norm", m.qk_norm)):
      allowed = ("none", "qkvo") if key == "model.attn_bias" else ("none",)
      if v not in allowed:
        fail(key, v, f"with model.attention='mla' allowed: {list(allowed)}")
    if m.num_kv_heads not in (0, m.num_heads):
      fail("model.num_kv_heads", m.num_kv_heads, "must be 0 (or model.num_heads) with "
           "model.attention='mla' (every head reads the shared latent)")
    if m.head_dim:
      fail("model.head_dim", m.head_dim, "must be 0 with model.attention='mla' (its head "
           "widths are model.mla.qk_nope_head_dim + qk_rope_head_dim and v_head_dim)")
  else:
    head = m.head_dim or (m.d_model // m.num_heads)
    if not m.head_dim and m.d_model % m.num_heads:
      fail("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model} "
           "(or set model.head_dim)")
    if head % 2:
      fail("model.num_heads" if not m.head_dim else "model.head_dim",
           m.head_dim or m.num_heads, f"head dim {head} must be even for RoPE")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
      fail("model.num_kv_heads", m.num_kv_heads,
           f"must divide model.num_heads={m.num_heads} (grouped-query attention)")
  attention_lib.check_config(cfg)
  head_experts.check_config(cfg)


class Block(nn.Module):
  """Pre-norm residual block: x + Attn(norm x); x + FFN(norm x).

  The carry is (x [B, L, D], router carry); the router carry is state a
  router passes from one MoE layer to the next (the layerwise recurrent
  router's hidden state) and `shared` holds router weights shared by all
  layers; both are empty for other routers. `pool` is the cross-layer
  expert pool (or None) and `moe_layer` the block's index among the MoE
  layers. Returns (carry, {"losses":
  this block's unweighted auxiliary losses, "moe": the MoE layer's aux or
  None}).
  """

  cfg: ml_collections.FrozenConfigDict
  use_moe: bool
  deterministic: bool = True
  moe_shape: tuple[int, int] | None = None  # (E, k) of a scheduled MoE layer; None: cfg.moe

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, Any], token_ids_BxL: jax.Array,
               shared: dict, dec: Decoding | None = None, pool: ExpertWeights | None = None,
               moe_layer: jax.Array | int = 0) -> tuple[tuple[jax.Array, Any], dict]:
    x_BxLxD, router_carry = carry
    m = self.cfg.model
    out_scale = 1.0 / math.sqrt(2 * m.num_layers)
    losses: dict[str, jax.Array] = {}
    eps = m.get("norm_eps", 1e-6)
    a_in = RMSNorm(eps, name="attn_norm")(x_BxLxD)
    if m.get("attention", "mha") == "mla":
      h = LatentAttention(m.num_heads, m.mla.q_lora_rank, m.mla.kv_lora_rank,
                          m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim,
                          m.rope_theta, m.dtype, out_scale, m.attn_bias == "qkvo", eps,
                          name="attn")(a_in, dec=dec)
    elif m.get("attn_experts", 0):  # mixture of attention experts (MoA)
      h, attn_losses = AttentionExperts(
          m.num_heads, m.attn_experts, m.attn_top_k, m.attn_shared_kv, m.rope_theta, m.dtype,
          out_scale, m.get("attn_renormalize", True), name="attn")(a_in, dec)
      losses.update(attn_losses)
    elif head_experts.enabled(self.cfg):  # Mixture-of-Head attention (MoH)
      h, attn_losses = HeadExperts(
          m.num_heads, m.rope_theta, m.dtype, out_scale, m.get("num_kv_heads", 0),
          m.get("head_dim", 0), m.get("attn_bias", "none"), m.get("qk_norm", "none"), eps,
          top_k=m.moh.top_k, shared_heads=m.moh.shared_heads,
          renormalize=m.moh.renormalize, name="attn")(a_in, dec=dec)
      losses.update(attn_losses)
    else:
      h = CausalAttention(m.num_heads, m.rope_theta, m.dtype, out_scale,
                          m.get("num_kv_heads", 0), m.get("head_dim", 0),
                          m.get("attn_bias", "none"), m.get("qk_norm", "none"), eps,
                          name="attn")(a_in, dec=dec)
    if (adapter := make_adapter(self.cfg, "attn")) is not None:  # moe.adapters
      delta, ad_losses = adapter(a_in)
      h = h + delta
      losses = _add(losses, ad_losses)
    x_BxLxD = x_BxLxD + h
    z = RMSNorm(eps, name="ffn_norm")(x_BxLxD)
    moe_aux = None
    if self.use_moe:
      cfg_moe = (self.cfg.moe if self.moe_shape is None
                 else layout.layer_moe(self.cfg.moe, self.moe_shape))
      h, moe_aux, router_carry = MoELayer(cfg_moe, m.dtype, out_scale, name=layout.MOE)(
          z, token_ids_BxL=token_ids_BxL, router_carry=router_carry, shared=shared,
          deterministic=self.deterministic, pool=pool, moe_layer=moe_layer)
      losses.update(moe_aux.pop("losses"))
    else:
      h = SwiGLU(m.ffn_hidden, m.dtype, out_scale, name="ffn")(z)
    if (adapter := make_adapter(self.cfg, "ffn")) is not None:  # moe.adapters
      delta, ad_losses = adapter(z)
      h = h + delta
      losses = _add(losses, ad_losses)
    return (x_BxLxD + h, router_carry), {"losses": losses, "moe": moe_aux}


def _add(a: dict, b: dict) -> dict:
  return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


class Period(nn.Module):
  """`n` consecutive blocks; block j is an MoE block iff `moe[j]` is not False
  (True: the `moe` config; an (E, k) pair: a scheduled layer's shape).

  Returns (carry, {"losses": {name: [blocks reporting it]}, "moe": [the MoE
  blocks' aux, in block order]}).
  """

  cfg: ml_collections.FrozenConfigDict
  n: int
  moe: tuple = ()  # per block: False, True or (E, k)
  deterministic: bool = True

  @nn.compact
  def __call__(self, carry, token_ids_BxL: jax.Array, shared: dict, dec: Decoding | None,
               pool: ExpertWeights | None, index: jax.Array):
    """`index`: the period's index along its stack (scanned): an MoE period's MoE layer."""
    block = Block
    if self.cfg.model.remat:
      block = nn.remat(Block, prevent_cse=False)
    per_block, moe_aux = [], []
    for j in range(self.n):
      kind = self.moe[j] if j < len(self.moe) else False
      carry, out = block(self.cfg, kind is not False, self.deterministic,
                         None if isinstance(kind, bool) else kind,
                         name=f"block{j}")(carry, token_ids_BxL, shared, dec, pool, index)
      per_block.append(out["losses"])
      if out["moe"] is not None:
        moe_aux.append(out["moe"])
    names = sorted({k for losses in per_block for k in losses})
    losses = {k: jnp.stack([ls[k] for ls in per_block if k in ls]) for k in names}
    return carry, {"losses": losses, "moe": moe_aux}


def _scanned(cfg, length: int, n: int, moe: tuple, deterministic: bool,
             name: str) -> nn.Module:
  stack = nn.scan(Period, variable_axes={"params": 0, "moe_state": 0, "balance": 0,
                                          moe_layer.EXPERT_MAP: 0, "intermediates": 0,
                                          ADAPTER_MASK: 0, "cache": 0, QUANT: 0},
                  split_rngs={"params": True, "router": True},
                  in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                  length=length,
                  metadata_params={nn.PARTITION_NAME: "layers"})
  return stack(cfg, n, moe, deterministic, name=name)


def _pad_experts(x: jax.Array, width: int, lead: int) -> jax.Array:
  """Pads a per-layer [E] axis (the last; arrays with more than `lead` axes) to `width`
  with zeros: per-expert rows of layers with fewer experts stack with the widest."""
  if x.ndim <= lead or x.shape[-1] == width:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _layer_rows(columns: list[dict], steps: int) -> dict:
  """A stack's per-layer arrays (one dict per MoE block of a step, leaves [steps, ...]) as
  rows in layer order (leaves [steps * blocks, ...])."""
  if len(columns) == 1:
    return columns[0]
  return jax.tree.map(lambda *xs: jnp.stack(xs, 1).reshape(steps * len(xs), *xs[0].shape[1:]),
                      *columns)


class TransformerLM(nn.Module):
  """ids [B, L] -> (logits [B, L, V] float32, aux).

  aux = {"losses": {name: [layers reporting it] (layer order), unweighted},
         "metrics": {name: [num_moe_layers, ...]},
         "state_stats": {name: [num_moe_layers, ...]}, "balance_counts": [num_moe_layers, E]
         or None} (empty dicts for a dense model); state_stats feed the routers'
  non-trained state updates (moejax.moe.state).

  With a layer-wise schedule (MoE layers of different shapes) per-expert metrics are
  padded with zeros to moe.num_experts (the widest layer; `layout.moe_schedule` gives
  each layer's E), and "state_stats" / "balance_counts" are tuples with one entry per
  MoE column (`layout.moe_columns`: a scanned run of identical MoE layers), each as
  above over that column's layers.

  `schedule` ({config key: float32 scalar}, `moejax.schedules.values`) holds the values
  of the training-time schedules at the step being trained; the MoE layers' routers read
  theirs from it. None (evaluation, decoding): routers route by their inference settings.

  With `cache_len` M > 0 the model is a cached decoder (moejax/inference/decode.py):
  `__call__(ids, positions_BxL=..., valid_BxL=..., cache_index=...)` runs the
  new tokens ids [B, L] at cache slots cache_index..cache_index+L-1 over the
  keys and values of the mutable "cache" collection (per attention layer,
  M slots; "valid" marks slots holding real tokens).
  """

  cfg: ml_collections.FrozenConfigDict
  deterministic: bool = True
  cache_len: int = 0

  @nn.compact
  def __call__(self, ids_BxL: jax.Array, positions_BxL: jax.Array | None = None,
               valid_BxL: jax.Array | None = None, cache_index: jax.Array | None = None,
               schedule: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    m = self.cfg.model
    dec = None
    if self.cache_len:
      if positions_BxL is None or valid_BxL is None or cache_index is None:
        raise ValueError("a cached decoder (cache_len > 0) needs positions_BxL, valid_BxL "
                         "and cache_index")
      valid = self.variable("cache", "valid", jnp.zeros, (ids_BxL.shape[0], self.cache_len),
                            bool)
      valid.value = jax.lax.dynamic_update_slice(valid.value, valid_BxL.astype(bool),
                                                 (0, cache_index))
      dec = Decoding(positions_BxL.astype(jnp.int32), jnp.asarray(cache_index, jnp.int32),
                     valid.value)
    embed = self.param("embed", nn.initializers.normal(0.02),
                       (m.vocab_size, m.d_model))
    x = jnp.take(embed, ids_BxL, axis=0)
    n_dense, n_periods = layout.layer_plan(self.cfg)
    carry, shared, pool = (x, None), {}, None
    if n_periods:
      router = get_router(self.cfg.moe.router)
      b, l = ids_BxL.shape
      carry = (x, router.init_carry(b * l, self.cfg.moe))
      shared = router.make_shared(self, m.d_model, self.cfg.moe)
      if schedule is not None and router.schedules(self.cfg.moe):  # read by `scheduled`
        shared = {**shared, SCHEDULE: schedule}
      if pool_lib.enabled(self.cfg.moe):  # one set of experts for every MoE layer
        pool = pool_lib.ExpertPool(
            get_family(self.cfg.moe), pool_lib.pool_size(self.cfg), self.cfg.moe.expert_hidden,
            DTYPES[m.dtype], 1.0 / math.sqrt(2 * m.num_layers), name=pool_lib.MODULE)(m.d_model)
    outs = []
    if n_dense:
      carry, out = _scanned(self.cfg, n_dense, 1, (), self.deterministic,
                            layout.DENSE_STACK)(carry, ids_BxL, shared, dec, None,
                                                jnp.arange(n_dense, dtype=jnp.int32))
      outs.append(out)
    aux = {"metrics": {}, "state_stats": {}, "balance_counts": None}
    every = self.cfg.moe.every
    stacks = layout.moe_stacks(self.cfg) if n_periods else ()
    uniform = layout.is_uniform(self.cfg)
    metrics, columns = [], []
    e_max = pool_lib.dispatched_experts(self.cfg)[0]  # the widest layer's (or the pool's)
    for st in stacks:
      moe = (True,) if uniform else sum(((s,) + (False,) * (every - 1) for s in st.shapes),
                                        ())
      carry, out = _scanned(self.cfg, st.steps, every * st.per_step, moe, self.deterministic,
                            st.name)(carry, ids_BxL, shared, dec, pool,
                                     jnp.arange(st.steps, dtype=jnp.int32))
      outs.append(out)
      columns.extend(out["moe"])
      metrics.append(_layer_rows([jax.tree.map(lambda x: _pad_experts(x, e_max, 1),
                                               c["metrics"]) for c in out["moe"]], st.steps))
    if uniform and columns:
      aux = dict(columns[0])
    elif columns:
      aux = {"metrics": jax.tree.map(lambda *xs: jnp.concatenate(xs), *metrics),
             "state_stats": tuple(c["state_stats"] for c in columns),
             "balance_counts": tuple(c["balance_counts"] for c in columns)}
    per_name: dict[str, list[jax.Array]] = {}
    for out in outs:  # stacks in layer order; within one, [length, blocks] row-major
      for k, v in out["losses"].items():
        per_name.setdefault(k, []).append(v.reshape(-1))
    aux["losses"] = {k: jnp.concatenate(v) for k, v in per_name.items()}
    x = RMSNorm(m.get("norm_eps", 1e-6), name="final_norm")(carry[0])
    if m.tie_embeddings:
      logits = dot("bld,vd->blv", x, embed, DTYPES[m.dtype])
    else:
      head = self.param("head", nn.initializers.normal(1.0 / math.sqrt(m.d_model)),
                        (m.d_model, m.vocab_size))
      logits = linear(x, head, DTYPES[m.dtype])
    return logits, aux
