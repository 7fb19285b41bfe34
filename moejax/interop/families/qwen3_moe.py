"""Qwen3-MoE: GQA with per-head q/k RMSNorm (`q_norm`/`k_norm` [head_dim]), softmax-then-top-k router.

`norm_topk_prob` is moejax `moe.topk.renormalize`; `attention_bias` puts
biases on q/k/v/o (moejax attn_bias='qkvo'); MoE layers follow
`decoder_sparse_step` / `mlp_only_layers` as Qwen2-MoE (no shared expert).
"""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop.hf_config import HFConfig

ARCH = "Qwen3MoeForCausalLM"
EXPERT = "mlp.experts.{e}.{name}"


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=True)
  dec.set_head_dim(c, hf)
  dec.qwen_sliding_window(hf)
  m, moe = c.model, c.moe
  m.qk_norm = "head"
  m.attn_bias = "qkvo" if hf.get("attention_bias", False) else "none"
  moe.num_experts = int(hf.get("num_experts", None) or hf.get("num_local_experts"))
  hf.inert("num_experts", "num_local_experts")
  moe.top_k = int(hf.get("num_experts_per_tok"))
  moe.expert_hidden = int(hf.get("moe_intermediate_size"))
  moe.router = "topk"
  moe.topk.order = "softmax_topk"
  moe.topk.renormalize = bool(hf.get("norm_topk_prob", False))
  moe.first_dense_layers, moe.every = dec.layer_pattern(
      dec.sparse_layers(hf, m.num_layers), m.num_layers,
      "decoder_sparse_step / mlp_only_layers")
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  moe_layers = set(dec.moe_layers(cfg))
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i)
    if i in moe_layers:
      out += [dec.router_group(i, "mlp.gate.weight")] + dec.expert_groups(cfg, i, EXPERT)
    else:
      out += dec.dense_ffn_groups(i, "mlp.")
  return out


def export_reasons(cfg) -> list[str]:
  moe = cfg.moe
  out = dec.attn_reasons(cfg, "Qwen3-MoE", ("none", "qkvo"), "head")
  if not moe.enabled:
    return out + ["moe.enabled=False (Qwen3-MoE is an MoE)"]
  out += dec.topk_reasons(cfg, "Qwen3-MoE")
  if moe.num_shared_experts:
    out.append(f"moe.num_shared_experts={moe.num_shared_experts} (Qwen3-MoE has none)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  moe = cfg.moe
  out = dec.hf_base(cfg, origin, "qwen3_moe", ARCH)
  moe_layers = set(dec.moe_layers(cfg))
  out.update(head_dim=dec.head_dim(cfg), attention_bias=cfg.model.attn_bias == "qkvo",
             num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
             moe_intermediate_size=moe.expert_hidden,
             norm_topk_prob=moe.topk.order == "topk_softmax" or moe.topk.renormalize,
             decoder_sparse_step=1,
             mlp_only_layers=[i for i in range(cfg.model.num_layers) if i not in moe_layers],
             use_sliding_window=False, sliding_window=None, output_router_logits=False,
             router_aux_loss_coef=origin.get("router_aux_loss_coef", 0.001))
  return out
