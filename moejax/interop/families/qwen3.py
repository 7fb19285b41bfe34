"""Qwen3 (dense): GQA with per-head q/k RMSNorm; the dense model that Qwen3-style MoEs upcycle from."""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop.hf_config import HFConfig

ARCH = "Qwen3ForCausalLM"


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=False)
  dec.set_head_dim(c, hf)
  dec.qwen_sliding_window(hf)
  c.model.qk_norm = "head"
  c.model.attn_bias = "qkvo" if hf.get("attention_bias", False) else "none"
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i) + dec.dense_ffn_groups(i, "mlp.")
  return out


def export_reasons(cfg) -> list[str]:
  out = dec.attn_reasons(cfg, "Qwen3", ("none", "qkvo"), "head")
  if cfg.moe.enabled:
    out.append("moe.enabled=True (Qwen3 is dense)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  out = dec.hf_base(cfg, origin, "qwen3", ARCH)
  out.update(head_dim=dec.head_dim(cfg), attention_bias=cfg.model.attn_bias == "qkvo",
             use_sliding_window=False, sliding_window=None,
             layer_types=["full_attention"] * cfg.model.num_layers)
  return out
