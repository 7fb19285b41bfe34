"""Parameter and FLOP counts from the config (for summary.json and scaling laws).

Counts follow Kaplan et al. (2020): a training step costs 6 FLOPs per active
parameter per token (2 forward, 4 backward) plus the attention score/value
products, 6 * num_layers * seq_len * d_model per token (causal masking not
discounted). Active parameters are those a token uses: every non-expert
weight plus top_k routed experts and the shared experts of each MoE layer.
"""

from __future__ import annotations

import ml_collections

from moejax.model.transformer import layer_plan
from moejax.moe.routers import get_router


def experts_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Expert applications per token (moe.top_k unless the router says otherwise).

  Routers whose count is not top_k (Soft MoE's slots, expert choice's
  capacity) define `experts_per_token(cfg)`; for adaptive routers (ReLU,
  top-p, null experts) top_k is the nominal budget, the measured mean is the
  `experts_per_token` metric.
  """
  router = get_router(cfg.moe.router)
  if hasattr(router, "experts_per_token"):
    return router.experts_per_token(cfg)
  return cfg.moe.top_k


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """{"params_total", "params_active", "params_embedding"} from the config.

  params_active may be fractional for routers whose experts per token are an
  average (Soft MoE, expert choice).
  """
  m, moe = cfg.model, cfg.moe
  d, v = m.d_model, m.vocab_size
  embedding = v * d * (1 if m.tie_embeddings else 2)
  norms = 2 * d
  attn = 4 * d * d
  dense_layer = attn + 3 * d * m.ffn_hidden + norms
  n_dense, n_periods = layer_plan(cfg)
  n_dense_layers = n_dense + n_periods * (moe.every - 1 if moe.enabled else 0)
  total = active = embedding + d + n_dense_layers * dense_layer
  if n_periods:
    router = get_router(moe.router)
    expert = 3 * d * moe.expert_hidden
    shared = moe.num_shared_experts * expert
    base = attn + norms + router.param_count(moe, d) + shared
    total += n_periods * (base + moe.num_experts * expert)
    active += n_periods * (base + experts_per_token(cfg) * expert)
    if hasattr(router, "shared_param_count"):
      total += router.shared_param_count(moe, d)
      active += router.shared_param_count(moe, d)
  return {"params_total": total, "params_active": active,
          "params_embedding": embedding}


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token: 6 * (active non-embedding params + head) + attention."""
  m = cfg.model
  c = param_counts(cfg)
  matmul_params = c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model
  return 6.0 * matmul_params + 6.0 * m.num_layers * cfg.train.seq_len * m.d_model
