"""What the converters refuse, and that the message names the key/tensor, the value and what is allowed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.interop.hf_models import make_model
from moejax import interop
from moejax.interop import ConversionError
from moejax.interop.safetensors_io import TensorReader, write_tensors

MIXTRAL = dict(model_type="mixtral", vocab_size=300, hidden_size=32, intermediate_size=48,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
               rope_parameters={"rope_type": "default", "rope_theta": 1e6})


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported; supported: ['mixtral'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters.rope_type='yarn' is not supported; supported: ['default']"),
    (dict(sliding_window=4096), "sliding_window=4096 is not supported for model_type 'mixtral'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(frobnicate=3), "keys the converter does not know: ['frobnicate']"),
    (dict(quantization_config={"quant_method": "fp8"}), "quantization_config="),
])
def test_config_refusals(change, message):
  with pytest.raises(ConversionError, match=None) as e:
    interop.hf_to_config({**MIXTRAL, **change})
  assert message in str(e.value)


def test_family_specific_refusals():
  qwen = {**MIXTRAL, "model_type": "qwen2_moe", "num_experts": 4, "moe_intermediate_size": 16,
          "shared_expert_intermediate_size": 16, "num_hidden_layers": 4,
          "decoder_sparse_step": 2}
  del qwen["num_local_experts"]
  with pytest.raises(ConversionError, match=r"MoE FFNs at layers \[1, 3\] of 4"):
    interop.hf_to_config(qwen)
  with pytest.raises(ConversionError, match="use_sliding_window=True is not supported"):
    interop.hf_to_config({**qwen, "decoder_sparse_step": 1, "use_sliding_window": True})
  olmoe = {**MIXTRAL, "model_type": "olmoe", "num_experts": 4, "clip_qkv": 8.0}
  del olmoe["num_local_experts"]
  with pytest.raises(ConversionError, match="clip_qkv=8.0 is not supported"):
    interop.hf_to_config(olmoe)
  llama = {k: v for k, v in MIXTRAL.items() if "expert" not in k}
  with pytest.raises(ConversionError, match="mlp_bias=True is not supported"):
    interop.hf_to_config({**llama, "model_type": "llama", "mlp_bias": True})


def test_hub_name_and_missing_dir():
  with pytest.raises(ConversionError, match="huggingface-cli download mistralai/Mixtral"):
    interop.load_hf("mistralai/Mixtral-8x7B-v0.1")


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("mixtral"))
  make_model("mixtral", num_local_experts=4, num_experts_per_tok=2).save_pretrained(d)
  return d


def _rewrite(src: str, dst: str, edit) -> str:
  with TensorReader(src) as r:
    tensors = dict(edit({n: r.get(n) for n in r.names()}))
  write_tensors(dst, tensors.items(), max_shard_bytes=20_000)  # several shards + index
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_sharded_checkpoint_reads_like_single(mixtral_dir, tmp_path):
  d = _rewrite(mixtral_dir, str(tmp_path / "sharded"), lambda t: t)
  assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
  _, a, _ = interop.load_hf(mixtral_dir)
  _, b, _ = interop.load_hf(d)
  la, lb = jax_leaves(a), jax_leaves(b)
  assert len(la) == len(lb) > 0
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(x, y)


def jax_leaves(tree):
  import jax  # noqa: PLC0415
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("edit, message", [
    (lambda t: {k: v for k, v in t.items() if k != "model.layers.1.block_sparse_moe.experts.2.w3.weight"},
     "missing tensors (1): ['model.layers.1.block_sparse_moe.experts.2.w3.weight']"),
    (lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)},
     "unexpected tensors (1) the config.json does not explain: "
     "['model.layers.0.self_attn.rotary_emb.inv_freq']"),
    (lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.ones((8, 32), np.float32)},
     "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [8, 32]; the config.json "
     "implies [16, 32]"),
])
def test_tensor_refusals(mixtral_dir, tmp_path, edit, message):
  d = _rewrite(mixtral_dir, str(tmp_path / "bad"), edit)
  with pytest.raises(ConversionError) as e:
    interop.load_hf(d)
  assert message in str(e.value)


def test_export_refuses_what_hf_lacks(tmp_path):
  from tests.init.run_dirs import write_run  # noqa: PLC0415
  cfg = tiny_config(router="expert_choice")
  cfg.moe.expert = "mlp"
  write_run(str(tmp_path / "run"), cfg)
  with pytest.raises(ConversionError) as e:
    interop.to_hf(str(tmp_path / "run"), str(tmp_path / "hf"))
  msg = str(e.value)
  assert "no Hugging Face equivalent" in msg and "moe.expert='mlp'" in msg
  assert "moe.router='expert_choice' (Mixtral: topk)" in msg
  with pytest.raises(ConversionError, match="no deepseek_v3 equivalent: .*model.attention='mha'"):
    interop.to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), model_type="deepseek_v3")


def test_override_of_model_key_refused(mixtral_dir, tmp_path):
  with pytest.raises(ConversionError, match="override model.d_model=64 is not allowed"):
    interop.from_hf(mixtral_dir, str(tmp_path / "run"), {"model.d_model": 64})
