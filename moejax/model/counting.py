"""Parameter and FLOP counts from the config (for summary.json and scaling laws).

Counts follow Kaplan et al. (2020): a training step costs 6 FLOPs per active
parameter per token (2 forward, 4 backward) plus the attention score/value
products, 6 * num_layers * seq_len * d_model per token (causal masking not
discounted). Active parameters are those a token uses: every non-expert
weight plus top_k routed experts and the shared experts of each MoE layer.

Mixture of attention experts (model.attn_experts = E_a > 0): a token uses
attn_top_k experts' projections (params_active), but the layer computes all
E_a experts for every token (dense compute), so flops_per_token counts the
projections and the score/value products of all E_a experts.
"""

from __future__ import annotations

import ml_collections

from moejax.layout import layer_plan
from moejax.moe.experts import get_family
from moejax.moe.routers import get_router


def experts_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Expert applications per token: the router's `experts_per_token(cfg)`.

  moe.top_k unless the router says otherwise (Soft MoE's slots, expert
  choice's capacity); for adaptive routers (ReLU, top-p, null experts) top_k
  is the nominal budget, the measured mean is the `experts_per_token` metric.
  """
  return get_router(cfg.moe.router).experts_per_token(cfg)


def attention_params(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(total, active, computed) parameters of one layer's attention.

  With E_a attention experts: per-expert Q and O (and K, V unless shared),
  the shared K/V projection and the [D, E_a] router; active counts
  attn_top_k experts, computed all E_a.
  """
  m = cfg.model
  d, e = m.d_model, m.get("attn_experts", 0)
  if not e:
    return 4 * d * d, 4 * d * d, 4 * d * d
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
    shared = (family.param_count(d, moe.num_shared_experts * moe.expert_hidden)
              if moe.num_shared_experts else 0)
    base = attn + norms + router.param_count(moe, d) + shared
    total += n_periods * (base + moe.num_experts * expert)
    active += n_periods * (base - attn + attn_active + experts_per_token(cfg) * expert)
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
  return 6.0 * matmul_params + 6.0 * m.num_layers * cfg.train.seq_len * m.d_model * heads
