"""Parameter and FLOP counts from the config (for summary.json and scaling laws).

Counts follow Kaplan et al. (2020): a training step costs 6 FLOPs per active
parameter per token (2 forward, 4 backward) plus the attention score/value
products, 6 * num_layers * seq_len * W per token (causal masking not
discounted), W = H * (K_qk + K_v) / 2 the attention width (`attention_width`:
d_model for plain multi-head attention, H * head_dim with model.head_dim;
grouped-query attention shares K/V projections, not score products, so W
ignores num_kv_heads; latent attention has K_qk = qk_nope + qk_rope head
dims and K_v = v_head_dim). Active parameters are those a token uses: every
non-expert weight plus top_k routed experts and the shared experts (with the
shared gate) of each MoE layer. With a layer-wise schedule (moe.layer_schedule)
each MoE layer counts its own experts, router width and top-k.

Attention parameters (`plain_attention_params`) follow the layer's options:
grouped-query K/V projections (model.num_kv_heads), model.head_dim, the
biases of model.attn_bias, the q/k norm gains of model.qk_norm, and for
latent attention (model.attention="mla") its down/up projections, their
norm gains and its biases.

Mixture of attention experts (model.attn_experts = E_a > 0): a token uses
attn_top_k experts' projections (params_active), but the layer computes all
E_a experts for every token (dense compute), so flops_per_token counts the
projections and the score/value products of all E_a experts.
"""

from __future__ import annotations

import ml_collections

from moejax.layout import is_uniform, layer_config, layer_plan, moe_schedule
from moejax.moe.experts import get_family
from moejax.moe.layer import router_moe, shared_width
from moejax.moe.routers import get_router


def experts_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Expert applications per token: the router's `experts_per_token(cfg)`.

  moe.top_k unless the router says otherwise (Soft MoE's slots, expert
  choice's capacity); for adaptive routers (ReLU, top-p, null experts) top_k
  is the nominal budget, the measured mean is the `experts_per_token` metric.
  """
  return get_router(cfg.moe.router).experts_per_token(cfg)


def plain_attention_params(m: ml_collections.ConfigDict) -> int:
  """Parameters of one (multi-head, grouped-query or latent) attention layer."""
  d, h = m.d_model, m.num_heads
  if m.get("attention", "mha") == "mla":
    a = m.mla
    kqk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = (d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * kqk if a.q_lora_rank
         else d * h * kqk)
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank
    kv += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)
    out = h * a.v_head_dim * d
    bias = 0
    if m.attn_bias == "qkvo":
      bias = a.q_lora_rank + a.kv_lora_rank + a.qk_rope_head_dim + d  # no bias on w_q
    return q + kv + out + bias
  k = m.get("head_dim", 0) or d // h
  g = m.get("num_kv_heads", 0) or h
  total = d * (h + 2 * g) * k + h * k * d
  bias = m.get("attn_bias", "none")
  total += (h + 2 * g) * k if bias in ("qkv", "qkvo") else 0
  total += d if bias == "qkvo" else 0
  qk = m.get("qk_norm", "none")
  total += 2 * k if qk == "head" else (h + g) * k if qk == "full" else 0
  return total


def attention_width(m: ml_collections.ConfigDict) -> float:
  """H * (K_qk + K_v) / 2: the width the score/value products cost per context token
  (d_model for plain multi-head attention)."""
  h = m.num_heads
  if m.get("attention", "mha") == "mla":
    a = m.mla
    return h * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) / 2
  return h * (m.get("head_dim", 0) or m.d_model // h)


def attention_params(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(total, active, computed) parameters of one layer's attention.

  With E_a attention experts: per-expert Q and O (and K, V unless shared),
  the shared K/V projection and the [D, E_a] router; active counts
  attn_top_k experts, computed all E_a.
  """
  m = cfg.model
  d, e = m.d_model, m.get("attn_experts", 0)
  if not e:
    n = plain_attention_params(m)
    return n, n, n
  per_expert, shared = (2 * d * d, 2 * d * d) if m.attn_shared_kv else (4 * d * d, 0)
  base = shared + d * e
  return base + e * per_expert, base + m.attn_top_k * per_expert, base + e * per_expert


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """{"params_total", "params_active", "params_embedding"} from the config.

  params_active may be fractional for routers whose experts per token are an
  average (Soft MoE, expert choice).
  """
  m, moe = cfg.model, cfg.moe
  d, v = m.d_model, m.vocab_size
  embedding = v * d * (1 if m.tie_embeddings else 2)
  norms = 2 * d
  attn, attn_active, _ = attention_params(cfg)
  dense_layer = attn + 3 * d * m.ffn_hidden + norms
  n_dense, n_periods = layer_plan(cfg)
  n_dense_layers = n_dense + n_periods * (moe.every - 1 if moe.enabled else 0)
  total = active = embedding + d + n_dense_layers * dense_layer
  active -= n_dense_layers * (attn - attn_active)
  if n_periods:
    router, family = get_router(moe.router), get_family(moe)
    expert = family.param_count(d, moe.expert_hidden)
    width = shared_width(moe)
    shared = (family.param_count(d, width) + (d if moe.get("shared_gate", False) else 0)
              if width else 0)
    schedule = moe_schedule(cfg)
    for shape in sorted(set(schedule)):  # each distinct (E, k) of moe.layer_schedule
      n = schedule.count(shape)
      layer_cfg = cfg if is_uniform(cfg) else layer_config(cfg, shape)
      base = attn + norms + router.param_count(router_moe(layer_cfg.moe), d) + shared  # R
      total += n * (base + shape[0] * expert)
      active += n * (base - attn + attn_active + experts_per_token(layer_cfg) * expert)
    total += router.shared_param_count(moe, d)
    active += router.shared_param_count(moe, d)
  return {"params_total": total, "params_active": active,
          "params_embedding": embedding}


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token: 6 * (active non-embedding params + head) + attention.

  Attention experts are all computed (module docstring): their projections
  count as computed, not active, and each expert has its own scores.
  """
  m = cfg.model
  c = param_counts(cfg)
  _, attn_active, attn_computed = attention_params(cfg)
  matmul_params = (c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model
                   + m.num_layers * (attn_computed - attn_active))
  heads = max(m.get("attn_experts", 0), 1)
  return (6.0 * matmul_params
          + 6.0 * m.num_layers * cfg.train.seq_len * attention_width(m) * heads)
