"""Tiny random transformers models for the interop tests (built from a config, no downloads)."""

from __future__ import annotations

import numpy as np

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")

VOCAB = 300  # >= 258 so the converted run trains on moejax's byte-level data
BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB)

# (id, model_type, config overrides): several GQA ratios, expert counts, top-k, options.
CASES = [
    ("mixtral-gqa2", "mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("mixtral-mha-e3", "mixtral", dict(num_key_value_heads=4, num_local_experts=3,
                                       num_experts_per_tok=2, num_hidden_layers=3)),
    ("qwen2_moe-mqa-step2", "qwen2_moe", dict(num_key_value_heads=1, num_experts=4,
                                              num_experts_per_tok=2, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=24,
                                              num_hidden_layers=3, decoder_sparse_step=2)),
    ("qwen3_moe-norm-tied", "qwen3_moe", dict(num_experts=6, num_experts_per_tok=3,
                                              moe_intermediate_size=16, norm_topk_prob=True,
                                              head_dim=12, mlp_only_layers=[0],
                                              num_hidden_layers=3, tie_word_embeddings=True)),
    ("olmoe", "olmoe", dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=2)),
    ("deepseek_v3-qlora", "deepseek_v3", dict(
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=12,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2,
        first_k_dense_replace=1, num_hidden_layers=3, routed_scaling_factor=2.5)),
    ("deepseek_v3-fullq-bias", "deepseek_v3", dict(
        num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, n_shared_experts=2, kv_lora_rank=8, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=4, v_head_dim=6, n_group=1, topk_group=1,
        first_k_dense_replace=0, attention_bias=True, norm_topk_prob=False)),
    ("llama-bias-tied", "llama", dict(attention_bias=True, tie_word_embeddings=True)),
    ("qwen3-mqa", "qwen3", dict(num_key_value_heads=1, head_dim=8)),
]


def make_model(model_type: str, seed: int = 0, **overrides):
  """A random transformers model with O(1) weights (router gates spread out: no near-ties)."""
  cfg = transformers.AutoConfig.for_model(model_type, **{**BASE, **overrides})
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif name.endswith("gate.weight") and p.shape[0] > 1:  # routers
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / max(1.0, p.shape[-1]) ** 0.5 * (1.0 if p.ndim > 1 else 0.3))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):  # >= 0: every kept score stays positive
        b.copy_(0.1 * torch.rand(b.shape, generator=g))
  return model


def routers(model) -> list:
  """(layer index, router module) of every MoE layer of a transformers model."""
  out = []
  for i, layer in enumerate(model.model.layers):
    moe = getattr(layer, "block_sparse_moe", None) or layer.mlp
    gate = getattr(moe, "gate", None)
    if gate is not None and not hasattr(moe, "gate_proj"):
      out.append((i, gate))
  return out


def run(model, ids: np.ndarray) -> tuple[np.ndarray, dict[int, np.ndarray]]:
  """(float32 logits [B, L, V], {layer: sorted expert ids [B*L, k]}) of a transformers model."""
  chosen, hooks = {}, []
  for i, gate in routers(model):
    hooks.append(gate.register_forward_hook(
        lambda mod, inp, out, i=i: chosen.__setitem__(i, np.sort(out[2].numpy(), axis=-1))))
  with torch.no_grad():
    logits = model(torch.tensor(ids)).logits.float().numpy()
  for h in hooks:
    h.remove()
  return logits, chosen
