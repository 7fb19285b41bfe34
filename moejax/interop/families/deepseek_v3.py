"""DeepSeek-V3: multi-head latent attention, sigmoid router with a selection bias, shared experts.

Attention: `q_a_proj` / `q_a_layernorm` / `q_b_proj` (or `q_proj` when
`q_lora_rank` is null), `kv_a_proj_with_mqa` / `kv_a_layernorm` /
`kv_b_proj`, `o_proj` -> moejax `model.attention='mla'`. With
`rope_interleave` (transformers' default for DeepSeek-V3) the rope rows are
stored as interleaved pairs; they are reordered to moejax's rotate-half
layout on import and back on export. transformers builds the two latent
RMSNorms with its default epsilon 1e-6 while moejax uses `model.norm_eps`
for every norm, so `rms_norm_eps` must be 1e-6.
Router: `mlp.gate.weight` and `mlp.gate.e_score_correction_bias` -> the
`sigmoid_bias` router (the bias is its "moe_state" variable), `n_group` /
`topk_group` -> num_groups / top_groups, `norm_topk_prob` -> renormalize,
`routed_scaling_factor` -> routed_scaling. Shared experts
(`mlp.shared_experts.*`, width n_shared_experts * moe_intermediate_size);
the first `first_k_dense_replace` layers are dense. Multi-token-prediction
layers (`num_nextn_predict_layers`) are not part of the transformers model
either: their tensors, if present, are refused as unexpected.
"""

from __future__ import annotations

from moejax import layout
from moejax.interop import decoder as dec
from moejax.interop import mapping as mp
from moejax.interop.errors import ConversionError
from moejax.interop.hf_config import HFConfig

ARCH = "DeepseekV3ForCausalLM"
EXPERT = "mlp.experts.{e}.{name}"
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default (q_a / kv_a layernorms)


def config_from_hf(hf: HFConfig):
  c = dec.base_config(hf, moe=True)
  m, ml, moe = c.model, c.model.mla, c.moe
  if m.norm_eps != LATENT_NORM_EPS:
    raise ConversionError(f"config.json key rms_norm_eps={m.norm_eps!r} is not supported for "
                          f"deepseek_v3; supported: [{LATENT_NORM_EPS}] (transformers' latent "
                          "norms always use 1e-6; moejax uses one epsilon for every norm)")
  m.attention, m.num_kv_heads = "mla", 0
  hf.inert("num_key_value_heads", "head_dim", "num_nextn_predict_layers",  # unused by MLA
           "aux_loss_alpha", "seq_aux")  # training-only balancing coefficients
  ml.q_lora_rank = int(hf.get("q_lora_rank", 0))
  ml.kv_lora_rank = int(hf.get("kv_lora_rank"))
  ml.qk_nope_head_dim = int(hf.get("qk_nope_head_dim"))
  ml.qk_rope_head_dim = int(hf.get("qk_rope_head_dim"))
  ml.v_head_dim = int(hf.get("v_head_dim"))
  qk = hf.get("qk_head_dim", ml.qk_nope_head_dim + ml.qk_rope_head_dim)
  if qk != ml.qk_nope_head_dim + ml.qk_rope_head_dim:
    raise ConversionError(f"config.json key qk_head_dim={qk} must equal qk_nope_head_dim + "
                          f"qk_rope_head_dim = {ml.qk_nope_head_dim + ml.qk_rope_head_dim}")
  m.attn_bias = "qkvo" if hf.get("attention_bias", False) else "none"
  hf.get("rope_interleave", True)
  hf.expect("scoring_func", ("sigmoid",), "sigmoid")
  hf.expect("topk_method", ("noaux_tc",), "noaux_tc")
  hf.expect("moe_layer_freq", (1,), 1, "MoE in every layer after first_k_dense_replace")
  hf.expect("ep_size", (1,), 1)
  moe.num_experts = int(hf.get("n_routed_experts"))
  moe.top_k = int(hf.get("num_experts_per_tok"))
  moe.expert_hidden = int(hf.get("moe_intermediate_size"))
  moe.router = "sigmoid_bias"
  sb = moe.sigmoid_bias
  sb.routed_scaling = float(hf.get("routed_scaling_factor", 1.0))
  sb.renormalize = bool(hf.get("norm_topk_prob", True))
  sb.num_groups = int(hf.get("n_group", 1))
  sb.top_groups = int(hf.get("topk_group", 1))
  shared = int(hf.get("n_shared_experts", 0))
  if shared < 1:
    raise ConversionError(f"config.json key n_shared_experts={shared} is not supported; "
                          "supported: >= 1")
  moe.num_shared_experts = shared
  moe.first_dense_layers = int(hf.get("first_k_dense_replace", 0))
  moe.every = 1
  return c


def _interleaved(hf: dict) -> bool:
  """transformers' DeepseekV3Config defaults rope_interleave to True."""
  return bool(hf.get("rope_interleave", True))


def tensors(cfg, hf: dict) -> list:
  interleaved = _interleaved(hf)
  out = dec.embedding_groups(cfg)
  moe_layers = set(dec.moe_layers(cfg))
  for i in range(cfg.model.num_layers):
    out += dec.norm_groups(i) + dec.mla_groups(cfg, i, interleaved)
    if i in moe_layers:
      out += [dec.router_group(i, "mlp.gate.weight"),
              mp.identity(dec.LAYER.format(i=i) + "mlp.gate.e_score_correction_bias",
                          (layout.MOE, layout.ROUTER, "bias"), i, "moe_state")]
      out += dec.expert_groups(cfg, i, EXPERT)
      out += dec.dense_ffn_groups(i, "mlp.shared_experts.", ("moe", "shared"))
    else:
      out += dec.dense_ffn_groups(i, "mlp.")
  return out


def export_reasons(cfg) -> list[str]:
  m, moe = cfg.model, cfg.moe
  out = []
  if m.attention != "mla":
    out.append(f"model.attention={m.attention!r} (DeepSeek-V3 has 'mla')")
  if m.norm_eps != LATENT_NORM_EPS:
    out.append(f"model.norm_eps={m.norm_eps} (transformers' DeepSeek-V3 latent norms use 1e-6)")
  if not moe.enabled:
    return out + ["moe.enabled=False (DeepSeek-V3 is an MoE)"]
  if moe.router != "sigmoid_bias":
    out.append(f"moe.router={moe.router!r} (DeepSeek-V3: sigmoid_bias)")
  if moe.every != 1:
    out.append(f"moe.every={moe.every} (DeepSeek-V3 has MoE in every layer after "
               "first_k_dense_replace)")
  if not moe.num_shared_experts or moe.get("shared_gate", False):
    out.append(f"moe.num_shared_experts={moe.num_shared_experts}, moe.shared_gate="
               f"{moe.get('shared_gate', False)} (DeepSeek-V3 has >= 1 ungated shared experts)")
  elif moe.shared_hidden not in (0, moe.num_shared_experts * moe.expert_hidden):
    out.append(f"moe.shared_hidden={moe.shared_hidden} (DeepSeek-V3: n_shared_experts * "
               "moe_intermediate_size)")
  return out


def config_to_hf(cfg, origin: dict) -> dict:
  m, ml, moe = cfg.model, cfg.model.mla, cfg.moe
  sb = moe.sigmoid_bias
  out = dec.hf_base(cfg, origin, "deepseek_v3", ARCH)
  out.update(num_key_value_heads=m.num_heads, q_lora_rank=ml.q_lora_rank or None,
             kv_lora_rank=ml.kv_lora_rank, qk_nope_head_dim=ml.qk_nope_head_dim,
             qk_rope_head_dim=ml.qk_rope_head_dim, v_head_dim=ml.v_head_dim,
             qk_head_dim=ml.qk_nope_head_dim + ml.qk_rope_head_dim,
             head_dim=ml.qk_rope_head_dim, attention_bias=m.attn_bias == "qkvo",
             rope_interleave=_interleaved(origin), n_routed_experts=moe.num_experts,
             num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_hidden,
             n_shared_experts=moe.num_shared_experts, routed_scaling_factor=sb.routed_scaling,
             norm_topk_prob=sb.renormalize, n_group=sb.num_groups, topk_group=sb.top_groups,
             first_k_dense_replace=moe.first_dense_layers, num_nextn_predict_layers=0,
             output_router_logits=False)
  return out
