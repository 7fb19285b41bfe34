"""Mixtral: GQA, top-k-then-softmax router (`block_sparse_moe.gate`), SwiGLU experts w1/w3/w2.

HF's router takes the softmax over all experts, the top-k and renormalises,
which equals softmax over the top-k logits: moejax `topk` with
order='topk_softmax'. `router_jitter_noise` (training only, multiplicative
input jitter) is moejax's `moe.topk.jitter`. Every layer is an MoE layer.
"""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop.hf_config import HFConfig

ARCH = "MixtralForCausalLM"
EXPERT = "block_sparse_moe.experts.{e}.{name}"
NAMES = (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2"))


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=True)
  dec.set_head_dim(c, hf)
  hf.expect("sliding_window", (None,), None, "moejax attention is full causal attention")
  c.moe.num_experts = int(hf.get("num_local_experts"))
  c.moe.top_k = int(hf.get("num_experts_per_tok"))
  c.moe.expert_hidden = c.model.ffn_hidden
  c.moe.router = "topk"
  c.moe.topk.order = "topk_softmax"
  c.moe.topk.jitter = float(hf.get("router_jitter_noise", 0.0))
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i)
    out += [dec.router_group(i, "block_sparse_moe.gate.weight")]
    out += dec.expert_groups(cfg, i, EXPERT, NAMES)
  return out


def export_reasons(cfg) -> list[str]:
  m, moe = cfg.model, cfg.moe
  out = []
  if m.attention != "mha":
    out.append(f"model.attention={m.attention!r} (Mixtral has grouped-query attention)")
  for key, v in (("attn_bias", m.attn_bias), ("qk_norm", m.qk_norm)):
    if v != "none":
      out.append(f"model.{key}={v!r} (Mixtral has none)")
  if not moe.enabled:
    return out + ["moe.enabled=False (Mixtral is an MoE)"]
  if moe.router != "topk":
    out.append(f"moe.router={moe.router!r} (Mixtral: topk)")
  elif moe.topk.order == "softmax_topk" and not moe.topk.renormalize:
    out.append("moe.topk.renormalize=False (Mixtral's k weights sum to 1)")
  if moe.first_dense_layers or moe.every != 1:
    out.append(f"moe.first_dense_layers={moe.first_dense_layers}, moe.every={moe.every} "
               "(every Mixtral layer is MoE)")
  if moe.num_shared_experts:
    out.append(f"moe.num_shared_experts={moe.num_shared_experts} (Mixtral has none)")
  if moe.expert_hidden != m.ffn_hidden:
    out.append(f"moe.expert_hidden={moe.expert_hidden} != model.ffn_hidden={m.ffn_hidden} "
               "(Mixtral has one intermediate_size)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  out = dec.hf_base(cfg, origin, "mixtral", ARCH)
  out.update(head_dim=dec.head_dim(cfg), num_local_experts=cfg.moe.num_experts,
             num_experts_per_tok=cfg.moe.top_k, sliding_window=None,
             router_jitter_noise=cfg.moe.topk.jitter, output_router_logits=False,
             router_aux_loss_coef=origin.get("router_aux_loss_coef", 0.001))
  return out
