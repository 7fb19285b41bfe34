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


def param_counts(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """{"params_total", "params_active", "params_embedding"} from the config."""
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
    expert = 3 * d * moe.expert_hidden
    shared = moe.num_shared_experts * expert
    base = attn + norms + d * moe.num_experts + shared
    total += n_periods * (base + moe.num_experts * expert)
    active += n_periods * (base + moe.top_k * expert)
  return {"params_total": total, "params_active": active,
          "params_embedding": embedding}


def flops_per_token(cfg: ml_collections.ConfigDict) -> float:
  """Training FLOPs per token: 6 * (active non-embedding params + head) + attention."""
  m = cfg.model
  c = param_counts(cfg)
  matmul_params = c["params_active"] - c["params_embedding"] + m.vocab_size * m.d_model
  return 6.0 * matmul_params + 6.0 * m.num_layers * cfg.train.seq_len * m.d_model
