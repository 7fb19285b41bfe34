"""Llama (dense): GQA, `attention_bias` on q/k/v/o; the dense model that MoEs upcycle from.

`mlp_bias` (biases on the FFN) is refused: moejax's dense FFN has none.
"""

from __future__ import annotations

from moejax.interop import decoder as dec
from moejax.interop.hf_config import HFConfig

ARCH = "LlamaForCausalLM"


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=False)
  dec.set_head_dim(c, hf)
  hf.expect("mlp_bias", (False,), False, "moejax's dense FFN has no biases")
  c.model.attn_bias = "qkvo" if hf.get("attention_bias", False) else "none"
  return c


def tensors(cfg, hf: dict) -> list:
  out = dec.embedding_groups(cfg)
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.attention_groups(cfg, i) + dec.dense_ffn_groups(i, "mlp.")
  return out


def export_reasons(cfg) -> list[str]:
  out = dec.attn_reasons(cfg, "Llama", ("none", "qkvo"), "none")
  if cfg.moe.enabled:
    out.append("moe.enabled=True (Llama is dense)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  out = dec.hf_base(cfg, origin, "llama", ARCH)
  out.update(head_dim=dec.head_dim(cfg), attention_bias=cfg.model.attn_bias == "qkvo",
             mlp_bias=False)
  return out
