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
shared gate) of each MoE layer. A cross-layer expert pool (moe.pool.kind !=
"none") is counted once in the total; a token still uses top_k of its
experts in each MoE layer, and each layer's router scores its R choices.
With a layer-wise schedule (moe.layer_schedule) each MoE layer counts its
own experts, router width and top-k.

Training vs inference: `params_active` counts the experts a token uses in
training (the router's `experts_per_token`), `params_active_inference` those
it uses with deterministic=True (`inference_experts_per_token`); they differ
for THOR (top_k random experts in training; all E, or 1, at inference).
`flops_per_token` is the training cost of one token in one optimizer step:
6 FLOPs per training-active parameter plus attention, times the forward
passes the step runs (`training_passes`: 2 for a router that declares
two-pass consistency training, THOR; else 1). Per-step costs that do not
scale with the tokens (the ERC loss's E^2 proxy activations per MoE layer)
are not in it.

Zero-computation experts (moe.router="zero_experts"): the router's gate has
E + Z columns, and the constant experts' v [D] and W_c [D, 2] are active (the
layer computes them for every token); the routed experts count the nominal
top_k choices, an upper bound of the FFN work (the measured mean FFN experts
per token is the `experts_per_token` metric). Chain-of-Experts
(moe.chain.rounds = C): C routers per MoE layer, all active, and C * top_k
routed experts and C times the shared experts per token (the same weights
applied C times: active counts applications, what the FLOPs follow).

Expert families with leaves shared by all experts of a layer (Leaf without
the expert axis, e.g. the latent projections of moe.expert="latent"): those
count once per MoE layer in params_total and params_active, and since every
expert application computes them (`experts_per_token` per token),
flops_per_token counts them experts_per_token times (`shared_leaf_params`).

Attention parameters (`plain_attention_params`) follow the layer's options:
grouped-query K/V projections (model.num_kv_heads), model.head_dim, the
biases of model.attn_bias, the q/k norm gains of model.qk_norm, and for
latent attention (model.attention="mla") its down/up projections, their
norm gains and its biases.

Mixture of attention experts (model.attn_experts = E_a > 0): a token uses
attn_top_k experts' projections (params_active), but the layer computes all
E_a experts for every token (dense compute), so flops_per_token counts the
projections and the score/value products of all E_a experts.

Mixture-of-Head attention (model.moh.top_k = k > 0; moejax/model/head_experts.py):
the parameters are the plain attention's plus the head gates (router [D, h_r],
shared_router [D, h_s] when h_s >= 2, stage_router [D, 2] when h_s >= 1). A
token uses every K/V projection, the gates, b_out, and the Q and O slices of
the h_s shared and k routed heads (params_active): an unselected head's
w_q[:, h] and b_q[h] (with model.attn_bias) and w_out[h] are inactive; with
model.qk_norm="full" its Q slice still feeds the norm's RMS over all heads, so
only its q_norm gain slice and w_out[h] are. The layer computes every head
for every token, so flops_per_token counts all heads' projections and all H
heads' score/value products (the attention width is unchanged).
"""

from __future__ import annotations

import ml_collections

from moejax.layout import is_uniform, layer_config, layer_plan, moe_schedule
from moejax.model import head_experts
from moejax.moe import chain
from moejax.moe.experts import get_family
from moejax.moe import pool as pool_lib
from moejax.moe.layer import router_moe, shared_width
from moejax.moe.routers import get_router


def experts_per_token(cfg: ml_collections.ConfigDict, inference: bool = False) -> float:
  """Expert applications per token in training: the router's `experts_per_token(cfg)` per
  round (with `inference`: its `inference_experts_per_token(cfg)`).

  moe.top_k unless the router says otherwise (Soft MoE's slots, expert
  choice's capacity, THOR at inference); for adaptive routers (ReLU, top-p,
  null experts, zero-computation experts) top_k is the nominal budget, the
  measured mean is the `experts_per_token` metric. Times moe.chain.rounds
  (Chain-of-Experts).
  """
  router = get_router(cfg.moe.router)
  per_round = (router.inference_experts_per_token(cfg) if inference
               else router.experts_per_token(cfg))
  return chain.rounds(cfg.moe) * per_round


def training_passes(cfg: ml_collections.ConfigDict) -> int:
  """Forward (and backward) passes of each batch in a training step: 2 with a router that
  declares `consistency` (moejax/moe/routers/base.py), else 1."""
  if not cfg.moe.enabled or get_router(cfg.moe.router).consistency(cfg.moe) is None:
    return 1
  return 2


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
  attn_top_k experts, computed all E_a. With Mixture-of-Head attention: the
  plain attention plus the head gates; active without the Q/O slices of the
  h_r - k unselected heads, computed all of them (module docstring).
  """
  m = cfg.model
  d, e = m.d_model, m.get("attn_experts", 0)
  if head_experts.enabled(cfg):
    n = plain_attention_params(m)
    h, s, kd = m.num_heads, m.moh.shared_heads, m.get("head_dim", 0) or d // m.num_heads
    gates = d * (h - s) + (d * s if s >= 2 else 0) + (2 * d if s >= 1 else 0)
    if m.get("qk_norm", "none") == "full":  # w_q feeds the RMS over all heads
      unused_head = kd * d + kd
    else:
      unused_head = 2 * kd * d + (kd if m.get("attn_bias", "none") != "none" else 0)
    unused = (h - s - m.moh.top_k) * unused_head
    return n + gates, n + gates - unused, n + gates
  if not e:
    n = plain_attention_params(m)
    return n, n, n
  per_expert, shared = (2 * d * d, 2 * d * d) if m.attn_shared_kv else (4 * d * d, 0)
  base = shared + d * e
  return base + e * per_expert, base + m.attn_top_k * per_expert, base + e * per_expert


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """{"params_total", "params_active", "params_active_inference", "params_embedding"}.

  params_active (training) and params_active_inference (deterministic=True)
  may be fractional for routers whose experts per token are an average (Soft
  MoE, expert choice).
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
  inference = active
  if n_periods:
    router, family = get_router(moe.router), get_family(moe)
    expert = family.param_count(d, moe.expert_hidden)
    width = shared_width(moe)
    shared = (family.param_count(d, width) + family.shared_param_count(d, width)
              + (d if moe.get("shared_gate", False) else 0) if width else 0)
    rounds = chain.rounds(moe)  # a router per round; shared experts applied every round
    zero = router.zero_computation(moe)
    zero = zero.param_count(d) if zero is not None else 0  # constant experts: every token
    schedule = moe_schedule(cfg)
    for shape in sorted(set(schedule)):  # each distinct (E, k) of moe.layer_schedule
      n = schedule.count(shape)
      layer_cfg = cfg if is_uniform(cfg) else layer_config(cfg, shape)
      routers = rounds * router.param_count(router_moe(layer_cfg.moe), d)  # over R experts
      base = attn + norms + routers + zero + shared_leaf_params(cfg)
      if pool_lib.enabled(moe):  # one pool for all MoE layers (uniform layers only)
        total += n * (base + shared) + pool_lib.pool_size(cfg) * expert
      else:
        total += n * (base + shared + shape[0] * expert)
      active += n * (base - attn + attn_active + rounds * shared
                     + experts_per_token(layer_cfg) * expert)
      inference += n * (base - attn + attn_active + rounds * shared
                        + experts_per_token(layer_cfg, inference=True) * expert)
    total += router.shared_param_count(moe, d)
    active += router.shared_param_count(moe, d)
    inference += router.shared_param_count(moe, d)
  return {"params_total": total, "params_active": active,
          "params_active_inference": inference, "params_embedding": embedding}


def shared_leaf_params(cfg: ml_collections.ConfigDict) -> int:
  """Parameters of one MoE layer's routed-expert leaves shared by all its experts (0 for
  families whose every leaf has the expert axis)."""
  moe = cfg.moe
  if not moe.enabled:
    return 0
  return get_family(moe).shared_param_count(cfg.model.d_model, moe.expert_hidden)


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token: training_passes * (6 * (active non-embedding params + head)
  + attention).

  Attention experts are all computed (module docstring): their projections
  count as computed, not active, and each expert has its own scores. Leaves
  shared by the routed experts are computed once per expert application.
  """
  m = cfg.model
  c = param_counts(cfg)
  _, attn_active, attn_computed = attention_params(cfg)
  matmul_params = (c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model
                   + m.num_layers * (attn_computed - attn_active))
  if cfg.moe.enabled and layer_plan(cfg)[1]:
    for shape in moe_schedule(cfg):  # each MoE layer: its own experts per token
      layer_cfg = cfg if is_uniform(cfg) else layer_config(cfg, shape)
      matmul_params += (experts_per_token(layer_cfg) - 1) * shared_leaf_params(cfg)
  heads = max(m.get("attn_experts", 0), 1)
  return training_passes(cfg) * (
      6.0 * matmul_params + 6.0 * m.num_layers * cfg.train.seq_len * attention_width(m) * heads)
