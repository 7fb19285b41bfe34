"""Hash router: an independent pure-Python hash, distinct picks, no params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe.routers.hash import HashRouter, hash_experts, hash_route, mix32
from tests.conftest import tiny_config

M32 = 0xFFFFFFFF


def _lowbias32(x: int) -> int:
  x &= M32
  x ^= x >> 16
  x = (x * 0x7FEB352D) & M32
  x ^= x >> 15
  x = (x * 0x846CA68B) & M32
  return x ^ (x >> 16)


def _py_hash_experts(token_id: int, e: int, k: int, seed: int) -> list[int]:
  """Choice j: the (h_j mod (E - j))-th expert not chosen yet."""
  free, picks = list(range(e)), []
  for j in range(k):
    salt = ((seed * k + j + 1) * 0x9E3779B9) & M32
    r = _lowbias32(token_id + salt) % (e - j)
    picks.append(free.pop(r))
  return picks


def test_mix32_matches_python():
  xs = [0, 1, 2, 255, 257, 2**31 + 5, M32]
  got = np.asarray(mix32(jnp.asarray(np.array(xs, np.uint32))))
  assert got.tolist() == [_lowbias32(x) for x in xs]
  assert _lowbias32(0) == 0  # lowbias32 fixes 0: the salt keeps id 0 from it


@pytest.mark.parametrize("e,k,seed", [(4, 2, 0), (8, 3, 7), (3, 3, 1), (5, 1, 2)])
def test_matches_python_reference_and_is_distinct(e, k, seed):
  ids = np.array([0, 1, 2, 3, 100, 255, 256, 257, 1000, 3], np.int32)
  got = np.asarray(hash_experts(jnp.asarray(ids), e, k, seed))
  want = [_py_hash_experts(int(i), e, k, seed) for i in ids]
  np.testing.assert_array_equal(got, want)
  for row in got:
    assert len(set(row.tolist())) == k
  np.testing.assert_array_equal(got[3], got[-1])  # same id, same experts
  if k == e:
    assert all(sorted(r) == list(range(e)) for r in got.tolist())


def test_assignment_layout_and_weights():
  ids = jnp.array([5, 9, 5], jnp.int32)
  a = hash_route(ids, 4, 2, 0)
  np.testing.assert_array_equal(a.token, [0, 1, 2, 0, 1, 2])  # choice-major
  e_TxK = np.asarray(hash_experts(ids, 4, 2, 0))
  np.testing.assert_array_equal(a.expert, e_TxK.T.reshape(-1))
  np.testing.assert_allclose(a.weight, 0.5)
  assert np.asarray(a.valid).all() and a.expert.dtype == jnp.int32


def test_roughly_uniform_over_the_byte_vocabulary():
  ids = jnp.arange(256, dtype=jnp.int32)
  counts = np.bincount(np.asarray(hash_experts(ids, 8, 2, 0)).reshape(-1), minlength=8)
  assert counts.min() > 0.6 * 64 and counts.max() < 1.4 * 64
  other = np.asarray(hash_experts(ids, 8, 2, 1))
  assert np.mean(other != np.asarray(hash_experts(ids, 8, 2, 0))) > 0.5  # seed matters


def _cfg(e=4, k=2, seed=0):
  c = default_config().moe
  c.router, c.num_experts, c.top_k = "hash", e, k
  c.hash.seed = seed
  return ml_collections.FrozenConfigDict(c)


def test_module_has_no_params_and_needs_ids():
  x = jnp.ones((6, 3))
  ids = jnp.arange(6, dtype=jnp.int32)
  mod = HashRouter(_cfg())
  variables = mod.init(jax.random.key(0), x, shape_BxL=(2, 3), token_ids=ids)
  assert not jax.tree.leaves(variables)
  assert HashRouter.param_count(_cfg(), 3) == 0
  out = mod.apply(variables, x, shape_BxL=(2, 3), token_ids=ids)
  assert out.logits_TxE is None and out.probs_TxE is None
  np.testing.assert_array_equal(out.assignment.expert,
                                hash_route(ids, 4, 2, 0).expert)
  with pytest.raises(ValueError, match="token_ids"):
    mod.apply(variables, x, shape_BxL=(2, 3), token_ids=None)


def test_config_validation():
  cfg = tiny_config(router="hash")
  cfg.moe.hash.seed = -1
  with pytest.raises(ConfigError, match="moe.hash.seed.*-1"):
    validate(cfg)
