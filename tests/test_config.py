"""Config validation: bad values fail early, naming key, value and what is allowed."""

from __future__ import annotations

import ml_collections
import pytest

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.train import trainer
from tests.conftest import tiny_config


def test_defaults_and_quickstart_are_valid():
  from configs import quickstart  # noqa: PLC0415
  validate(default_config())
  validate(quickstart.get_config("moe"))
  validate(quickstart.get_config("dense"))


@pytest.mark.parametrize("key,value,words", [
    ("moe.router", "nope", ["moe.router", "'nope'", "topk"]),
    ("moe.dispatch", "sparse", ["moe.dispatch", "'sparse'", "dropless", "capacity", "dense"]),
    ("moe.top_k", 9, ["moe.top_k", "9", "moe.num_experts=4"]),
    ("moe.capacity_factor", 0.0, ["moe.capacity_factor", "0.0", "positive"]),
    ("moe.capacity_factor", -1.0, ["moe.capacity_factor", "-1.0", "positive"]),
    ("model.num_heads", 3, ["model.num_heads", "3", "d_model=32"]),
    ("model.dtype", "float16", ["model.dtype", "'float16'", "bfloat16"]),
    ("moe.every", 3, ["moe.every", "3", "must divide"]),
    ("moe.topk.order", "random", ["moe.topk.order", "'random'", "topk_softmax"]),
    ("moe.gmm_backend", "magic", ["moe.gmm_backend", "'magic'", "xla"]),
    ("data.val_fraction", 1.5, ["data.val_fraction", "1.5", "(0, 1)"]),
    ("train.steps", 0, ["train.steps", "0", "positive"]),
    ("train.warmup_steps", 100, ["train.warmup_steps", "100", "train.steps=30"]),
    ("model.d_model", "128", ["model.d_model", "'128'", "type int"]),
    ("moe.enabled", "yes", ["moe.enabled", "'yes'", "type bool"]),
    ("train.lr", "fast", ["train.lr", "'fast'", "type float"]),
    ("data.path", 3, ["data.path", "3", "type str"]),
    ("moe.top_k", 2.5, ["moe.top_k", "2.5", "type int"]),
    ("moe.aux_loss_weight", -1.0, ["moe.aux_loss_weight", "-1.0", "non-negative"]),
    ("train.weight_decay", -0.1, ["train.weight_decay", "-0.1", "non-negative"]),
    ("train.grad_clip", -1.0, ["train.grad_clip", "-1.0", "non-negative"]),
    ("moe.num_shared_experts", -1, ["moe.num_shared_experts", "-1", "non-negative"]),
    ("moe.first_dense_layers", 5, ["moe.first_dense_layers", "5", "model.num_layers=2"]),
    ("train.min_lr_ratio", 2.0, ["train.min_lr_ratio", "2.0", "[0, 1]"]),
    ("train.batch_size", 0, ["train.batch_size", "0", "positive"]),
    ("train.seq_len", -1, ["train.seq_len", "-1", "positive"]),
    ("moe.expert_hidden", 0, ["moe.expert_hidden", "0", "positive"]),
    ("moe.num_experts", 0, ["moe.num_experts", "0", "positive"]),
    ("train.keep_checkpoints", 0, ["train.keep_checkpoints", "0", "positive"]),
    ("train.max_bad_steps", 0, ["train.max_bad_steps", "0", "positive"]),
    ("model.num_heads", 32, ["model.num_heads", "32", "even for RoPE"]),
    ("moe.topk.jitter", -0.5, ["moe.topk.jitter", "-0.5", "non-negative"]),
    ("model.tie_embeddings", 1, ["model.tie_embeddings", "1", "type bool"]),
])
def test_bad_values(key, value, words):
  d = tiny_config().to_dict()  # a raw dict: as loaded from JSON, no type safety
  *path, last = key.split(".")
  node = d
  for p in path:
    node = node[p]
  node[last] = value
  cfg = ml_collections.ConfigDict(d)
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


def test_unknown_keys():
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.moe.num_expert = 3
  with pytest.raises(ConfigError, match="unknown config key 'moe.num_expert'.*num_experts"):
    validate(cfg)
  cfg = tiny_config()
  with cfg.unlocked():
    cfg.optimizer = 1
  with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
    validate(cfg)


def test_sequence_longer_than_corpus(tmp_path):
  for name in "abc":  # three short documents, a few hundred bytes in all
    (tmp_path / f"{name}.txt").write_text("hello world, second paragraph here\n" * 3)
  cfg = tiny_config()
  cfg.data.path = str(tmp_path)
  cfg.train.seq_len = 4096
  with pytest.raises(ValueError, match="train.seq_len"):
    trainer.prepare(cfg)


def test_vocab_too_small():
  cfg = tiny_config()
  cfg.model.vocab_size = 100
  with pytest.raises(ValueError, match="model.vocab_size=100.*258"):
    trainer.prepare(cfg)


def test_missing_data_path():
  cfg = tiny_config()
  cfg.data.path = "/nonexistent/corpus"
  with pytest.raises(ValueError, match="data.path"):
    trainer.prepare(cfg)


def test_top1_router_must_keep_a_gradient():
  """top-1 with a normalised gate (weight always 1) would cut the router off the LM loss."""
  cfg = tiny_config(num_experts=4, top_k=1)
  cfg.moe.topk.renormalize = True
  with pytest.raises(ConfigError, match="moe.topk.renormalize=True.*renormalize=False"):
    validate(cfg)
  cfg.moe.topk.renormalize = False
  cfg.moe.topk.order = "topk_softmax"
  with pytest.raises(ConfigError, match="moe.topk.order='topk_softmax'"):
    validate(cfg)
  cfg.moe.topk.order = "softmax_topk"
  validate(cfg)  # Switch routing


def _with(overrides) -> ml_collections.ConfigDict:
  d = tiny_config().to_dict()  # num_heads=2, d_model=32, E=4, k=2, no shared experts
  for key, value in overrides.items():
    *path, last = key.split(".")
    node = d
    for p in path:
      node = node[p]
    node[last] = value
  return ml_collections.ConfigDict(d)


SB = {"moe.router": "sigmoid_bias"}
MLA = {"model.attention": "mla"}


@pytest.mark.parametrize("overrides,words", [
    # attention: grouped-query heads, head width, biases, q/k norms, the attention kind
    ({"model.num_kv_heads": 3}, ["model.num_kv_heads", "3", "must divide model.num_heads=2"]),
    ({"model.num_heads": 4, "model.num_kv_heads": 3},
     ["model.num_kv_heads", "3", "must divide model.num_heads=4"]),
    ({"model.num_kv_heads": -1}, ["model.num_kv_heads", "-1", "non-negative integer"]),
    ({"model.head_dim": -8}, ["model.head_dim", "-8", "non-negative integer"]),
    ({"model.head_dim": 7}, ["model.head_dim", "7", "even for RoPE"]),
    ({"model.qk_norm": "foo"}, ["model.qk_norm", "'foo'", "'full'", "'head'", "'none'"]),
    ({"model.attn_bias": "qk"}, ["model.attn_bias", "'qk'", "'qkv'", "'qkvo'"]),
    ({"model.attention": "foo"}, ["model.attention", "'foo'", "'mha'", "'mla'"]),
    ({"model.norm_eps": 0.0}, ["model.norm_eps", "0.0", "positive"]),
    ({"model.num_heads": 3, "model.head_dim": 0}, ["model.num_heads", "3", "model.head_dim"]),
    # latent attention
    ({**MLA, "model.qk_norm": "head"}, ["model.qk_norm", "'head'", "model.attention='mla'"]),
    ({**MLA, "model.attn_bias": "qkv"}, ["model.attn_bias", "'qkv'", "'qkvo'"]),
    ({**MLA, "model.num_kv_heads": 1}, ["model.num_kv_heads", "1", "model.attention='mla'"]),
    ({**MLA, "model.head_dim": 8}, ["model.head_dim", "8", "model.attention='mla'"]),
    ({**MLA, "model.mla.qk_rope_head_dim": 3},
     ["model.mla.qk_rope_head_dim", "3", "even for RoPE"]),
    ({**MLA, "model.mla.kv_lora_rank": 0}, ["model.mla.kv_lora_rank", "0", "positive integer"]),
    ({**MLA, "model.mla.v_head_dim": -1}, ["model.mla.v_head_dim", "-1", "positive integer"]),
    ({**MLA, "model.mla.q_lora_rank": -2},
     ["model.mla.q_lora_rank", "-2", "non-negative integer"]),
    # attention experts are plain multi-head attention
    ({"model.attn_experts": 2, "model.num_kv_heads": 1},
     ["model.num_kv_heads", "1", "model.attn_experts=2"]),
    ({"model.attn_experts": 2, **MLA}, ["model.attention", "'mla'", "model.attn_experts=2"]),
    ({"model.attn_experts": 2, "model.qk_norm": "head"},
     ["model.qk_norm", "'head'", "model.attn_experts=2"]),
    # shared experts' width and gate
    ({"moe.shared_hidden": -4}, ["moe.shared_hidden", "-4", "non-negative integer"]),
    ({"moe.shared_hidden": 64}, ["moe.shared_hidden", "64", "moe.num_shared_experts=0"]),
    ({"moe.shared_gate": True}, ["moe.shared_gate", "True", "moe.num_shared_experts=0"]),
    ({"moe.shared_gate": 1}, ["moe.shared_gate", "1", "type bool"]),
    # DeepSeek-V3 group-limited selection of the sigmoid router
    ({**SB, "moe.sigmoid_bias.num_groups": 3},
     ["moe.sigmoid_bias.num_groups", "3", "must divide moe.num_experts=4"]),
    ({**SB, "moe.sigmoid_bias.num_groups": 2, "moe.sigmoid_bias.top_groups": 3},
     ["moe.sigmoid_bias.top_groups", "3", "<= moe.sigmoid_bias.num_groups=2"]),
    ({**SB, "moe.sigmoid_bias.top_groups": 2},
     ["moe.sigmoid_bias.top_groups", "2", "<= moe.sigmoid_bias.num_groups=1"]),
    ({**SB, "moe.sigmoid_bias.num_groups": 4, "moe.sigmoid_bias.top_groups": 1},
     ["moe.sigmoid_bias.top_groups", "1", "at least moe.top_k=2"]),
    ({"moe.sigmoid_bias.num_groups": 0},  # options are checked whichever router is chosen
     ["moe.sigmoid_bias.num_groups", "0", "positive integer"]),
    ({**SB, "moe.sigmoid_bias.top_groups": -1},
     ["moe.sigmoid_bias.top_groups", "-1", "positive integer"]),
    ({**SB, "moe.sigmoid_bias.renormalize": "yes"},
     ["moe.sigmoid_bias.renormalize", "'yes'", "type bool"]),
])
def test_bad_new_model_and_moe_options(overrides, words):
  with pytest.raises(ConfigError) as e:
    validate(_with(overrides))
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("overrides", [
    {"model.num_kv_heads": 1, "model.attn_bias": "qkvo", "model.qk_norm": "full"},  # MQA
    {"model.num_kv_heads": 2, "model.head_dim": 6, "model.qk_norm": "head"},
    {"model.num_heads": 3, "model.head_dim": 8, "model.num_kv_heads": 1},  # 3 does not divide 32
    {**MLA, "model.mla.q_lora_rank": 8, "model.attn_bias": "qkvo", "model.num_kv_heads": 2},
    {"moe.num_shared_experts": 1, "moe.shared_hidden": 24, "moe.shared_gate": True},
    {**SB, "moe.sigmoid_bias.num_groups": 2, "moe.sigmoid_bias.top_groups": 1,
     "moe.sigmoid_bias.renormalize": False},
    {"moe.sigmoid_bias.num_groups": 3},  # not the chosen router: its cross-key rules wait
    {"model.attn_experts": 2, "model.num_kv_heads": 2, "model.head_dim": 16},  # = the defaults
])
def test_new_options_valid(overrides):
  validate(_with(overrides))
