"""OLMoE: q/k RMSNorm over the whole projection (moejax qk_norm='full'), softmax-then-top-k router.

`norm_topk_prob` (False in OLMoE-1B-7B: the weights are the softmax
probabilities) is moejax `moe.topk.renormalize`; `attention_bias` puts biases
on q/k/v/o; `clip_qkv` (clamping q/k/v) is refused: moejax has no clamp.
Every layer is an MoE layer.
"""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop.hf_config import HFConfig

ARCH = "OlmoeForCausalLM"
EXPERT = "mlp.experts.{e}.{name}"


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=True)
  hf.expect("clip_qkv", (None,), None, "moejax does not clamp q/k/v")
  m, moe = c.model, c.moe
  m.qk_norm = "full"
  m.attn_bias = "qkvo" if hf.get("attention_bias", False) else "none"
  moe.num_experts = int(hf.get("num_experts"))
  moe.top_k = int(hf.get("num_experts_per_tok"))
  moe.expert_hidden = m.ffn_hidden
  moe.router = "topk"
  moe.topk.order = "softmax_topk"
  moe.topk.renormalize = bool(hf.get("norm_topk_prob", False))
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i)
    out += [dec.router_group(i, "mlp.gate.weight")] + dec.expert_groups(cfg, i, EXPERT)
  return out


def export_reasons(cfg) -> list[str]:
  m, moe = cfg.model, cfg.moe
  out = dec.attn_reasons(cfg, "OLMoE", ("none", "qkvo"), "full")
  if m.head_dim and m.head_dim * m.num_heads != m.d_model:
    out.append(f"model.head_dim={m.head_dim} (OLMoE heads are d_model / num_heads wide)")
  if not moe.enabled:
    return out + ["moe.enabled=False (OLMoE is an MoE)"]
  out += dec.topk_reasons(cfg, "OLMoE")
  if moe.first_dense_layers or moe.every != 1:
    out.append(f"moe.first_dense_layers={moe.first_dense_layers}, moe.every={moe.every} "
               "(every OLMoE layer is MoE)")
  if moe.num_shared_experts:
    out.append(f"moe.num_shared_experts={moe.num_shared_experts} (OLMoE has none)")
  if moe.expert_hidden != m.ffn_hidden:
    out.append(f"moe.expert_hidden={moe.expert_hidden} != model.ffn_hidden={m.ffn_hidden} "
               "(OLMoE has one intermediate_size)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  moe = cfg.moe
  out = dec.hf_base(cfg, origin, "olmoe", ARCH)
  out.update(attention_bias=cfg.model.attn_bias == "qkvo", clip_qkv=None,
             num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
             norm_topk_prob=moe.topk.order == "topk_softmax" or moe.topk.renormalize,
             output_router_logits=False,
             router_aux_loss_coef=origin.get("router_aux_loss_coef", 0.01))
  return out
