"""What the supported families share: the Llama-style decoder skeleton, both ways.

Config: `base_config` reads the keys every family has (widths, heads, RoPE,
norm epsilon, tied output); `hf_base` writes them back. Tensors: embeddings
and final norm, the two pre-norms, grouped-query attention (biases, q/k
norms), multi-head latent attention, the dense SwiGLU FFN, stacked SwiGLU
experts and shared experts. Export: `export_reasons` lists what of a moejax
config no Hugging Face family can hold. All functions are pure.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from moejax import layout
from moejax.config import default_config
from moejax.interop import mapping as mp
from moejax.interop.errors import ConversionError
from moejax.interop.hf_config import HFConfig
from moejax.moe import chain
from moejax.moe import pool as pool_lib

LAYER = "model.layers.{i}."


def base_config(hf: HFConfig, moe: bool) -> ml_collections.ConfigDict:
  """A moejax config with the decoder keys of `hf` (moe.* left to the family)."""
  c = default_config()
  c.name = hf.family
  m = c.model
  m.vocab_size = int(hf.get("vocab_size"))
  m.d_model = int(hf.get("hidden_size"))
  m.num_layers = int(hf.get("num_hidden_layers"))
  m.num_heads = int(hf.get("num_attention_heads"))
  kv = int(hf.get("num_key_value_heads", m.num_heads))
  m.num_kv_heads = 0 if kv == m.num_heads else kv
  m.ffn_hidden = int(hf.get("intermediate_size"))
  m.rope_theta = hf.rope_theta()
  m.norm_eps = float(hf.get("rms_norm_eps"))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  hf.expect("hidden_act", ("silu",), "silu", "moejax's FFNs and experts are SwiGLU")
  hf.expect("attention_dropout", (0, 0.0), 0.0, "moejax has no dropout")
  c.moe.enabled = moe
  return c


def set_head_dim(c: ml_collections.ConfigDict, hf: HFConfig) -> None:
  """model.head_dim from `head_dim` (0 when it is d_model / num_heads)."""
  m = c.model
  k = hf.get("head_dim", None)
  k = m.d_model // m.num_heads if k is None else int(k)
  m.head_dim = 0 if k * m.num_heads == m.d_model else k


def head_dim(cfg) -> int:
  m = cfg.model
  return m.head_dim or m.d_model // m.num_heads


def layer_pattern(moe_layers: list[int], n: int, key: str) -> tuple[int, int]:
  """(moe.first_dense_layers, moe.every) whose MoE layers are exactly `moe_layers`."""
  want = sorted(moe_layers)
  for f in range(n):
    for every in range(1, n - f + 1):
      if (n - f) % every == 0 and list(range(f, n, every)) == want:
        return f, every
  raise ConversionError(f"config.json keys {key} put MoE FFNs at layers {want} of {n}; moejax "
                        "can express only layers first_dense_layers, first_dense_layers + every, "
                        "... with every dividing the remaining layers (moe.first_dense_layers, "
                        "moe.every)")


def moe_layers(cfg) -> list[int]:
  return [i for i in range(cfg.model.num_layers) if cfg.moe.enabled and layout.is_moe_layer(cfg, i)]


# --- tensors -----------------------------------------------------------------------------

def embedding_groups(cfg) -> list[mp.Group]:
  out = [mp.identity("model.embed_tokens.weight", ("embed",)),
         mp.identity("model.norm.weight", ("final_norm", "scale"))]
  if not cfg.model.tie_embeddings:
    out.append(mp.Group(("lm_head.weight",), ("head",), lambda ws: ws[0].T, lambda x: [x.T]))
  return out


def norm_groups(i: int) -> list[mp.Group]:
  p = LAYER.format(i=i)
  return [mp.identity(p + "input_layernorm.weight", ("attn_norm", "scale"), i),
          mp.identity(p + "post_attention_layernorm.weight", ("ffn_norm", "scale"), i)]


def attention_groups(cfg, i: int) -> list[mp.Group]:
  """q/k/v/o_proj (+ biases, q_norm/k_norm) of layer i <-> moejax CausalAttention."""
  m = cfg.model
  p = LAYER.format(i=i) + "self_attn."
  h, k = m.num_heads, head_dim(cfg)
  g = m.num_kv_heads or h
  a = ("attn",)
  q, kk, v = (p + f"{n}_proj.weight" for n in "qkv")
  qb, kb, vb = (p + f"{n}_proj.bias" for n in "qkv")
  if g == h:
    out = [mp.fused((q, kk, v), a + ("w_qkv",), i, (h, k))]
    if m.attn_bias in ("qkv", "qkvo"):
      out.append(mp.fused_bias((qb, kb, vb), a + ("b_qkv",), i, (h, k)))
  else:
    out = [mp.linear(q, a + ("w_q",), i, (h, k)), mp.fused((kk, v), a + ("w_kv",), i, (g, k))]
    if m.attn_bias in ("qkv", "qkvo"):
      out += [mp.reshaped(qb, a + ("b_q",), i, (h, k)),
              mp.fused_bias((kb, vb), a + ("b_kv",), i, (g, k))]
  out.append(mp.out_proj(p + "o_proj.weight", a + ("w_out",), i, (h, k)))
  if m.attn_bias == "qkvo":
    out.append(mp.identity(p + "o_proj.bias", a + ("b_out",), i))
  if m.qk_norm != "none":
    out += [mp.identity(p + "q_norm.weight", a + ("q_norm", "scale"), i),
            mp.identity(p + "k_norm.weight", a + ("k_norm", "scale"), i)]
  return out


def rope_deinterleave(nope: int, rope: int) -> np.ndarray:
  """Index map moejax[j] = hf[perm[j]]: nope dims, then the even rope dims, then the odd ones.

  DeepSeek's interleaved RoPE rotates pairs (x0, x1), (x2, x3), ...;
  transformers' `apply_rotary_pos_emb_interleave` equals rotate-half RoPE on
  the dims reordered even-then-odd, which is moejax's layout.
  """
  return np.concatenate([np.arange(nope), nope + np.arange(0, rope, 2),
                         nope + np.arange(1, rope, 2)])


def mla_groups(cfg, i: int, interleaved: bool) -> list[mp.Group]:
  """DeepSeek MLA projections of layer i <-> moejax LatentAttention (rope rows reordered)."""
  m, ml = cfg.model, cfg.model.mla
  p = LAYER.format(i=i) + "self_attn."
  h, nope, rope, v, r = (m.num_heads, ml.qk_nope_head_dim, ml.qk_rope_head_dim,
                         ml.v_head_dim, ml.kv_lora_rank)
  bias = m.attn_bias == "qkvo"
  a = ("attn",)

  def perm(g, n_before):
    return mp.permuted(g, rope_deinterleave(n_before, rope)) if interleaved else g

  out = []
  if ml.q_lora_rank:
    out += [mp.linear(p + "q_a_proj.weight", a + ("w_q_a",), i, (ml.q_lora_rank,)),
            mp.identity(p + "q_a_layernorm.weight", a + ("q_a_norm", "scale"), i),
            perm(mp.linear(p + "q_b_proj.weight", a + ("w_q_b",), i, (h, nope + rope)), nope)]
    if bias:
      out.append(mp.identity(p + "q_a_proj.bias", a + ("b_q_a",), i))
  else:
    out.append(perm(mp.linear(p + "q_proj.weight", a + ("w_q",), i, (h, nope + rope)), nope))
  out += [perm(mp.linear(p + "kv_a_proj_with_mqa.weight", a + ("w_kv_a",), i, (r + rope,)), r),
          mp.identity(p + "kv_a_layernorm.weight", a + ("kv_a_norm", "scale"), i),
          mp.linear(p + "kv_b_proj.weight", a + ("w_kv_b",), i, (h, nope + v)),
          mp.out_proj(p + "o_proj.weight", a + ("w_out",), i, (h, v))]
  if bias:
    out += [perm(mp.identity(p + "kv_a_proj_with_mqa.bias", a + ("b_kv_a",), i), r),
            mp.identity(p + "o_proj.bias", a + ("b_out",), i)]
  return out


SWIGLU = (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))


def dense_ffn_groups(i: int, prefix: str, path=("ffn",), names=SWIGLU) -> list[mp.Group]:
  """`prefix`{gate,up,down}_proj.weight <-> a dense SwiGLU (the FFN or the shared experts)."""
  p = LAYER.format(i=i) + prefix
  return [mp.Group((p + f"{hf}.weight",), tuple(path) + (leaf,), lambda ws: ws[0].T,
                   lambda x: [x.T], i) for leaf, hf in names]


def expert_groups(cfg, i: int, fmt: str, names=SWIGLU) -> list[mp.Group]:
  """Per-expert `fmt`.format(e=e, name=...) weights <-> stacked moejax experts [E, ...]."""
  p = LAYER.format(i=i)
  e = cfg.moe.num_experts
  return [mp.experts(tuple(p + fmt.format(e=j, name=hf) + ".weight" for j in range(e)),
                     (layout.MOE, layout.EXPERTS, leaf), i) for leaf, hf in names]


def router_group(i: int, name: str) -> mp.Group:
  """The gate Linear [E, D] <-> router w_gate [D, E]."""
  return mp.Group((LAYER.format(i=i) + name,), (layout.MOE, layout.ROUTER, "w_gate"),
                  lambda ws: ws[0].T, lambda x: [x.T], i)


# --- export ------------------------------------------------------------------------------

def export_reasons(cfg) -> list[str]:
  """What of `cfg` no supported Hugging Face family holds (empty: nothing)."""
  m, moe = cfg.model, cfg.moe
  out = []
  if m.get("attn_experts", 0):
    out.append(f"model.attn_experts={m.attn_experts} (attention experts)")
  if m.get("moh") is not None and m.moh.top_k:
    out.append(f"model.moh.top_k={m.moh.top_k} (Mixture-of-Head attention)")
  if moe.get("adapters") is not None and moe.adapters.enabled:
    out.append("moe.adapters.enabled=True (routed LoRA adapters)")
  if not moe.enabled:
    return out
  if pool_lib.enabled(moe):
    out.append(f"moe.pool.kind={pool_lib.kind(moe)!r} (a cross-layer expert pool; HF MoE "
               "layers own their experts)")
  if not layout.is_uniform(cfg):
    schedule = layout.moe_schedule(cfg)
    out.append(f"moe.layer_schedule.kind={moe.layer_schedule.kind!r} (experts per MoE layer "
               f"{[e for e, _ in schedule]}, top-k {[k for _, k in schedule]}; HF MoE "
               "families have one num_experts and top-k for every layer)")
  if moe.expert != "swiglu":
    out.append(f"moe.expert={moe.expert!r} (HF MoE experts are SwiGLU)")
  if chain.rounds(moe) > 1:
    out.append(f"moe.chain.rounds={chain.rounds(moe)} (Chain-of-Experts: HF MoE layers "
               "route once)")
  if moe.dispatch == "capacity":
    out.append("moe.dispatch='capacity' (drops tokens; HF MoE layers are dropless: set "
               "moe.dispatch='dropless' to export these weights)")
  if moe.router == "topk":
    t = moe.topk
    for key, v, ok in (("noise", t.noise, "none"), ("copies", t.get("copies", 1), 1),
                       ("grown_groups", t.get("grown_groups", 0), 0)):
      if v != ok:
        out.append(f"moe.topk.{key}={v!r} (HF routers have no such option; needs {ok!r})")
  return out


def hf_base(cfg, origin: dict, model_type: str, architecture: str) -> dict:
  """The config.json keys every family shares; `origin` (the source config, if any) keeps
  the keys moejax does not model (token ids, max_position_embeddings)."""
  from moejax.train import data as data_lib  # noqa: PLC0415

  m = cfg.model
  byte_vocab = m.vocab_size == data_lib.VOCAB_SIZE
  out = {
      "architectures": [architecture], "model_type": model_type,
      "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
      "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads or m.num_heads,
      "intermediate_size": m.ffn_hidden, "rms_norm_eps": m.norm_eps,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_dropout": 0.0,
      "dtype": "float32", "use_cache": True, "initializer_range": 0.02,
      "max_position_embeddings": max(4096, cfg.train.seq_len),
      "bos_token_id": data_lib.BOS_ID if byte_vocab else None,
      "eos_token_id": data_lib.EOS_ID if byte_vocab else None,
      "pad_token_id": None,
  }
  for key in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"):
    if key in origin:
      out[key] = origin[key]
  return out


def topk_reasons(cfg, family: str) -> list[str]:
  """A plain `topk` router (either order: top-k-then-softmax is softmax-top-k renormalised)."""
  moe = cfg.moe
  if moe.router != "topk":
    return [f"moe.router={moe.router!r} ({family}: topk)"]
  out = []
  if moe.topk.jitter:
    out.append(f"moe.topk.jitter={moe.topk.jitter} ({family} has no router jitter)")
  return out


def sparse_layers(hf: HFConfig, n: int) -> list[int]:
  """Qwen-MoE's MoE layers: not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
  step = int(hf.get("decoder_sparse_step", 1))
  only = set(hf.get("mlp_only_layers", []))
  return [i for i in range(n) if i not in only and (i + 1) % step == 0]


def qwen_sliding_window(hf: HFConfig) -> None:
  """Qwen configs carry sliding-window keys; only full attention is supported."""
  hf.expect("use_sliding_window", (False,), False, "moejax attention is full causal attention")
  hf.inert("sliding_window", "max_window_layers")  # read by HF only with use_sliding_window
  types = hf.get("layer_types", None)
  if types is not None and set(types) - {"full_attention"}:
    raise ConversionError(f"config.json key layer_types={types!r} is not supported; "
                          "supported: only 'full_attention' layers")


def attn_reasons(cfg, family: str, biases: tuple[str, ...], qk_norm: str) -> list[str]:
  m = cfg.model
  out = []
  if m.attention != "mha":
    out.append(f"model.attention={m.attention!r} ({family} has grouped-query attention)")
  if m.attn_bias not in biases:
    out.append(f"model.attn_bias={m.attn_bias!r} ({family} allows {list(biases)})")
  if m.qk_norm != qk_norm:
    out.append(f"model.qk_norm={m.qk_norm!r} ({family} has {qk_norm!r})")
  return out
