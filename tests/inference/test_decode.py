"""moejax.inference.decode: cached decoding equals the full forward, batching changes nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.conftest import tiny_config
from moejax import model as lm
from moejax.inference import decode
from moejax.inference.sampling import Sampling


def _cfg(**kw):
  cfg = tiny_config()
  cfg.train.seq_len = 64
  for key, v in kw.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


CASES = {
    "mha-topk": {},
    "gqa-bias-headnorm-recurrent": {"model.num_heads": 4, "model.num_kv_heads": 2,
                                    "model.attn_bias": "qkv", "model.qk_norm": "head",
                                    "moe.router": "recurrent"},
    "mla-hash-dense": {"model.attention": "mla", "model.mla.kv_lora_rank": 12,
                       "model.mla.q_lora_rank": 8, "model.mla.qk_nope_head_dim": 8,
                       "model.mla.qk_rope_head_dim": 4, "model.mla.v_head_dim": 6,
                       "moe.router": "hash", "moe.dispatch": "dense"},
    "attention-experts-top_p": {"model.attn_experts": 3, "model.attn_top_k": 2,
                                "moe.router": "top_p", "model.num_layers": 3,
                                "moe.first_dense_layers": 1},
}


def _rel(got, want) -> float:
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_equal_full_forward_at_every_position(case):
  cfg = _cfg(**CASES[case])
  variables = lm.init(jax.random.key(1), cfg)
  dec = decode.Decoder(cfg, variables)
  rng = np.random.default_rng(0)
  lengths, split = np.array([12, 9]), np.array([5, 2])  # tokens per row; prefilled ones
  ids = rng.integers(0, cfg.model.vocab_size, (2, 12)).astype(np.int32)
  full, _ = lm.apply(variables, ids, cfg)  # row 1 uses its first 9 tokens only (causal)
  width, steps = 16, 7
  ids_BxP = np.zeros((2, width), np.int32)
  pad_B = width - split
  for b in range(2):
    ids_BxP[b, pad_B[b]:] = ids[b, :split[b]]
  logits, cache = dec.prefill(ids_BxP, pad_B, width + steps)
  for b in range(2):
    assert _rel(logits[b, pad_B[b]:], full[b, :split[b]]) <= 1e-5
  for i in range(steps):
    pos = split + i
    out, cache = dec.step(cache, ids[np.arange(2), pos], pos, width + i)
    for b in range(2):
      if pos[b] < lengths[b]:
        assert _rel(out[b], full[b, pos[b]]) <= 1e-5, (case, i, b)
  assert decode._step_fn(dec.cfg, width + steps, False)._cache_size() == 1  # noqa: SLF001


CFG = _cfg()
VARIABLES = lm.init(jax.random.key(0), CFG)
DEC = decode.Decoder(CFG, VARIABLES)
PROMPTS = [[256, 5, 9], [256, *range(40, 51)], [7], [256, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(False, 1.3, 0, 0.9),
                                      Sampling(False, 0.7, 20, 1.0)], ids=str)
def test_batched_generation_equals_one_by_one(sampling):
  together, _ = DEC.generate(PROMPTS, max_new_tokens=9, sampling=sampling, seed=3)
  for i, p in enumerate(PROMPTS):
    alone = DEC.generate([p], max_new_tokens=9, sampling=sampling, seed=3)[0][0]
    # batch size 1 alone: the key of prompt i is fold_in(seed, i), so pass i as position
    if sampling.greedy:
      np.testing.assert_array_equal(together[i].tokens, alone.tokens)
  # Sampled: each prompt's key depends only on its index, so batch sizes 1 and 4 agree.
  by_two = DEC.generate(PROMPTS, max_new_tokens=9, sampling=sampling, seed=3, batch_size=2)[0]
  for a, b in zip(together, by_two):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.tokens.shape == (9,) and not a.stopped


def test_generation_compiles_once_per_width_and_greedy_matches_argmax_of_full_forward():
  out, _ = DEC.generate([[256, 10, 11]], max_new_tokens=6)
  out2, _ = DEC.generate([[256, 90, 91, 92]], max_new_tokens=6)
  fn = decode._generate_fn(DEC.cfg, 16, 6, Sampling(), False)  # noqa: SLF001
  assert fn._cache_size() == 1  # noqa: SLF001
  seq = [256, 10, 11]
  for _ in range(6):  # the slow reference: a full forward per token
    logits, _ = lm.apply(VARIABLES, np.asarray([seq], np.int32), CFG)
    seq.append(int(np.argmax(logits[0, -1])))
  np.testing.assert_array_equal(out[0].tokens, seq[3:])
  assert out2[0].tokens.size == 6


def test_stop_tokens_end_each_sequence_separately():
  free, _ = DEC.generate(PROMPTS[:2], max_new_tokens=8)
  stop = int(free[0].tokens[2])
  first = int(np.flatnonzero(free[0].tokens == stop)[0])
  out, _ = DEC.generate(PROMPTS[:2], max_new_tokens=8, stop_tokens=[stop])
  np.testing.assert_array_equal(out[0].tokens, free[0].tokens[:first + 1])
  assert out[0].stopped
  hit = np.flatnonzero(free[1].tokens == stop)
  want = free[1].tokens[:hit[0] + 1] if hit.size else free[1].tokens
  np.testing.assert_array_equal(out[1].tokens, want)
  assert out[1].stopped == bool(hit.size)


def test_trace_holds_one_routing_row_per_generated_token():
  gens, w = DEC.generate(PROMPTS[:3], max_new_tokens=5, trace=True)
  assert w.shape == (15, 2, CFG.moe.num_experts)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)  # top-2 softmax weights, renormalised
  assert ((w > 0).sum(-1) == CFG.moe.top_k).all()
  # The trace's routing of a generated token is the routing the full forward gives it.
  from moejax.analysis import routing as routing_lib  # noqa: PLC0415
  seq = np.asarray([PROMPTS[0] + gens[0].tokens.tolist()], np.int32)
  sown = routing_lib._routing_fn(DEC.cfg)(VARIABLES, seq)  # noqa: SLF001
  want, *_ = routing_lib.dense_routing(sown, 1, seq.shape[1], CFG.moe.num_experts, 2)
  np.testing.assert_allclose(w[:5], want[:, 0, 3:].transpose(1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("over, message", [
    ({"moe.router": "expert_choice"}, "moe.router='expert_choice' cannot decode"),
    ({"moe.router": "soft"}, "moe.router='soft' cannot decode"),
    ({"moe.dispatch": "capacity"}, "moe.dispatch='capacity' cannot decode"),
])
def test_routers_that_mix_tokens_are_refused(over, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    decode.Decoder(_cfg(**over), VARIABLES)
  assert decode.decode_refusal(CFG) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": [[1] * 60]}, "exceeds the model's maximum context of 64"),
    ({"prompts": [[]]}, "prompt 0 is empty"),
    ({"prompts": []}, "no prompt given"),
    ({"prompts": [[1, 999]]}, r"outside \[0, 258\)"),
    ({"max_new_tokens": 0}, "--max-new-tokens 0"),
    ({"stop_tokens": [300]}, "--stop-tokens"),
    ({"batch_size": 0}, "--batch-size 0"),
])
def test_bad_generation_arguments_are_named(kwargs, message):
  args = {"prompts": [[1, 2]], "max_new_tokens": 8, **kwargs}
  with pytest.raises(ValueError, match=message):
    DEC.generate(args.pop("prompts"), **args)
