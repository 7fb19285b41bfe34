"""Qwen2-MoE: q/k/v biases, softmax-then-top-k router (`norm_topk_prob`), a sigmoid-gated shared expert.

MoE layers follow `decoder_sparse_step` / `mlp_only_layers` when moejax's
(first_dense_layers, every) can express them (else refused); the other
layers have a dense SwiGLU of `intermediate_size`. The shared expert
(`shared_expert.*`, width `shared_expert_intermediate_size`) is scaled by
sigmoid(x `shared_expert_gate`): moejax `moe.num_shared_experts=1`,
`moe.shared_hidden`, `moe.shared_gate=True`.
"""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop import mapping as mp
from moejax.interop.errors import ConversionError
from moejax.interop.hf_config import HFConfig

ARCH = "Qwen2MoeForCausalLM"
EXPERT = "mlp.experts.{e}.{name}"


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=True)
  dec.qwen_sliding_window(hf)
  c.model.attn_bias = "qkv" if hf.get("qkv_bias", True) else "none"
  m, moe = c.model, c.moe
  moe.num_experts = int(hf.get("num_experts"))
  moe.top_k = int(hf.get("num_experts_per_tok"))
  moe.expert_hidden = int(hf.get("moe_intermediate_size"))
  moe.router = "topk"
  moe.topk.order = "softmax_topk"
  moe.topk.renormalize = bool(hf.get("norm_topk_prob", False))
  moe.first_dense_layers, moe.every = dec.layer_pattern(
      dec.sparse_layers(hf, m.num_layers), m.num_layers,
      "decoder_sparse_step / mlp_only_layers")
  shared = int(hf.get("shared_expert_intermediate_size"))
  if shared <= 0:
    raise ConversionError(f"config.json key shared_expert_intermediate_size={shared} is not "
                          "supported; supported: > 0 (Qwen2-MoE always has a shared expert)")
  moe.num_shared_experts, moe.shared_hidden, moe.shared_gate = 1, shared, True
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  moe_layers = set(dec.moe_layers(cfg))
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i)
    if i in moe_layers:
      out += [dec.router_group(i, "mlp.gate.weight")]
      out += dec.expert_groups(cfg, i, EXPERT)
      out += dec.dense_ffn_groups(i, "mlp.shared_expert.", ("moe", "shared"))
      out.append(mp.Group((dec.LAYER.format(i=i) + "mlp.shared_expert_gate.weight",),
                          ("moe", "shared_gate", "w"), lambda ws: ws[0].T, lambda x: [x.T], i))
    else:
      out += dec.dense_ffn_groups(i, "mlp.")
  return out


def export_reasons(cfg) -> list[str]:
  moe = cfg.moe
  out = dec.attn_reasons(cfg, "Qwen2-MoE", ("none", "qkv"), "none")
  if not moe.enabled:
    return out + ["moe.enabled=False (Qwen2-MoE is an MoE)"]
  out += dec.topk_reasons(cfg, "Qwen2-MoE")
  if moe.num_shared_experts != 1 or not moe.shared_gate:
    out.append(f"moe.num_shared_experts={moe.num_shared_experts}, moe.shared_gate="
               f"{moe.shared_gate} (Qwen2-MoE has one sigmoid-gated shared expert)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  moe = cfg.moe
  out = dec.hf_base(cfg, origin, "qwen2_moe", ARCH)
  renorm = moe.topk.order == "topk_softmax" or moe.topk.renormalize
  moe_layers = set(dec.moe_layers(cfg))
  out.update(qkv_bias=cfg.model.attn_bias == "qkv", num_experts=moe.num_experts,
             num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_hidden,
             shared_expert_intermediate_size=moe.shared_hidden or moe.expert_hidden,
             norm_topk_prob=renorm, decoder_sparse_step=1,
             mlp_only_layers=[i for i in range(cfg.model.num_layers) if i not in moe_layers],
             use_sliding_window=False, sliding_window=None, output_router_logits=False,
             layer_types=["full_attention"] * cfg.model.num_layers,
             router_aux_loss_coef=origin.get("router_aux_loss_coef", 0.001))
  return out
