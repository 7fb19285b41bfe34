"""Reading a Hugging Face config.json strictly: every key is mapped, checked or declared inert.

`HFConfig` records which keys a family read; `finish` refuses any key left
over, so no setting of a checkpoint is silently ignored. Keys that do not
change what the model computes (bookkeeping, tokenizer ids, training-only
coefficients) are declared in `INERT` and carried along in the run
directory's hf_config.json.
"""

from __future__ import annotations

from typing import Any

from moejax.interop.errors import ConversionError

_MISSING = object()

# Keys that do not change the logits: bookkeeping, generation / tokenizer ids,
# the training-only auxiliary-loss coefficient, output switches.
INERT = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "max_position_embeddings", "output_router_logits", "router_aux_loss_coef",
    "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "_name_or_path", "id2label", "label2id",
    "tokenizer_class", "pretraining_tp", "_attn_implementation_autoset", "tf_legacy_loss",
    "use_bfloat16", "pruned_heads", "torchscript", "finetuning_task", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "is_decoder",
})


class HFConfig:
  """A config.json dict whose reads are recorded (so unread keys can be refused)."""

  def __init__(self, d: dict, family: str):
    self.d, self.family, self.used = dict(d), family, set()

  def get(self, key: str, default: Any = _MISSING) -> Any:
    self.used.add(key)
    if key in self.d and self.d[key] is not None:
      return self.d[key]
    if default is _MISSING:
      raise ConversionError(f"config.json of model_type {self.family!r} lacks the key {key!r}")
    return default

  def expect(self, key: str, allowed: tuple, default: Any = _MISSING, why: str = "") -> Any:
    """The value of `key`, refused unless it is one of `allowed`."""
    v = self.get(key, default)
    if v not in allowed:
      raise ConversionError(f"config.json key {key}={v!r} is not supported for model_type "
                            f"{self.family!r}; supported: {list(allowed)}"
                            + (f" ({why})" if why else ""))
    return v

  def inert(self, *keys: str) -> None:
    """Keys this family reads nothing from (they do not change the logits)."""
    self.used.update(keys)

  def rope_theta(self) -> float:
    """theta of plain RoPE; any scaling (yarn, linear, dynamic, llama3, ...) is refused."""
    scaling = self.get("rope_scaling", None)
    params = self.get("rope_parameters", None)
    for key, p in (("rope_scaling", scaling), ("rope_parameters", params)):
      if p is None:
        continue
      if not isinstance(p, dict):
        raise ConversionError(f"config.json key {key}={p!r} must be a dict")
      kind = p.get("rope_type", p.get("type", "default"))
      if kind != "default":
        raise ConversionError(f"config.json key {key}.rope_type={kind!r} is not supported; "
                              "supported: ['default'] (plain RoPE; moejax has no RoPE scaling)")
      extra = sorted(set(p) - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
      if extra:
        raise ConversionError(f"config.json key {key} has {extra}, which plain RoPE does not "
                              "use; supported: rope_type='default', rope_theta")
      if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConversionError(f"config.json key {key}.partial_rotary_factor="
                              f"{p['partial_rotary_factor']!r} is not supported; supported: [1.0]")
    if params is not None and "rope_theta" in params:
      self.used.add("rope_theta")
      return float(params["rope_theta"])
    return float(self.get("rope_theta", 10_000.0))

  def finish(self) -> None:
    """Refuses the keys no mapping read."""
    if self.get("quantization_config", None) is not None:
      raise ConversionError(f"config.json key quantization_config="
                            f"{self.d['quantization_config']!r} is not supported: dequantize "
                            "the checkpoint first (moejax reads float tensors)")
    left = sorted(k for k in self.d if k not in self.used and k not in INERT)
    if left:
      raise ConversionError(f"config.json of model_type {self.family!r} has keys the "
                            f"converter does not know: {left} = "
                            f"{[self.d[k] for k in left]}; nothing is ignored silently")
