"""Mesh sizes, config checks and parameter shardings (one device is enough)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

from moejax.checks import ConfigError
from moejax.config import default_config
from moejax.validation import validate
from moejax.moe.experts import MLPExperts
from moejax.parallel import mesh as pm
from moejax.train import trainer
from tests.conftest import tiny_config


def sizes(data=-1, fsdp=1, expert=1):
  return {"data": data, "fsdp": fsdp, "expert": expert}


@pytest.mark.parametrize("given,n,want", [
    (sizes(), 8, (8, 1, 1)),
    (sizes(expert=4), 8, (2, 1, 4)),
    (sizes(data=2, expert=-1), 8, (2, 1, 4)),
    (sizes(data=1, fsdp=-1, expert=2), 8, (1, 4, 2)),
    (sizes(data=2, fsdp=2, expert=2), 8, (2, 2, 2)),
    (sizes(), 1, (1, 1, 1)),
])
def test_resolve_axes(given, n, want):
  got = pm.resolve_axes(given, n, num_experts=8, batch_size=8)
  assert tuple(got[a] for a in pm.AXES) == want


@pytest.mark.parametrize("given,kw,message", [
    (sizes(data=2, expert=2), {}, "product is 4 but there are 8 devices"),
    (sizes(data=3), {}, "product is 3 but there are 8 devices"),
    (sizes(data=-1, expert=-1), {}, "at most one parallel axis may be -1"),
    (sizes(data=1, expert=8), {"num_experts": 4}, "must divide moe.num_experts=4"),
    (sizes(data=1, expert=-1), {"num_experts": 6}, "must divide moe.num_experts=6"),
    (sizes(fsdp=3), {}, "does not divide the 8 available devices"),
    (sizes(data=0), {}, "parallel.data=0 is invalid"),
    (sizes(), {"batch_size": 4}, "train.batch_size=4 is invalid"),
])
def test_resolve_axes_errors_name_key_and_value(given, kw, message):
  with pytest.raises(ConfigError, match="parallel|train.batch_size") as e:
    pm.resolve_axes(given, 8, **{"num_experts": 8, **kw})
  assert message in str(e.value)


def test_validate_checks_parallel_without_devices():
  c = default_config()
  c.parallel.expert = 3
  with pytest.raises(ConfigError, match=r"parallel.expert=3 .*moe.num_experts=8"):
    validate(c)
  c.parallel.expert, c.parallel.fsdp = -1, -1
  with pytest.raises(ConfigError, match="at most one"):
    validate(c)
  c.parallel.fsdp, c.parallel.expert = 1, 1
  c.data.shards = 3
  with pytest.raises(ConfigError, match=r"data.shards=3 .*train.batch_size=32"):
    validate(c)


def test_prepare_rejects_a_mesh_that_does_not_fit_before_compiling(monkeypatch):
  """1 device here: data=2 cannot fit; prepare fails before init or jit runs."""
  cfg = tiny_config()
  cfg.parallel.data = 2
  compiled = []
  monkeypatch.setattr(trainer.lm, "init", lambda *a: compiled.append(a))
  with pytest.raises(ConfigError, match=r"parallel.data=2.*product is 2 but there are 1 devices"):
    trainer.prepare(cfg)
  assert not compiled


def test_param_specs_rules():
  s = {"data": 1, "fsdp": 4, "expert": 2}
  # Expert leaves follow their family's declaration: E over 'expert', F over 'fsdp'
  # when divisible (SwiGLU's w_up [E, D, F], under the scan's layer axis).
  assert pm.param_spec(["moe_layers", "block0", "moe", "experts", "w_up"], (3, 8, 16, 32), s) \
      == P(None, "expert", None, "fsdp")
  assert pm.param_spec(["moe_layers", "block0", "moe", "experts", "w_down"], (3, 8, 30, 16), s) \
      == P(None, "expert", None, None)  # F = 30 does not split over 4
  mlp = MLPExperts("gelu", bias=True).leaves()
  assert pm.param_spec(["experts", "b_out"], (3, 8, 16), s, mlp) == P(None, "expert", None)
  assert pm.param_spec(["experts", "b_in"], (3, 8, 32), s, mlp) == P(None, "expert", "fsdp")
  # largest dimension divisible by fsdp; none divisible: replicated
  assert pm.param_spec(["embed"], (258, 32), s) == P(None, "fsdp")
  assert pm.param_spec(["attn", "w_qkv"], (3, 64, 96), s) == P(None, None, "fsdp")
  assert pm.param_spec(["norm", "scale"], (30,), s) == P()
  assert pm.param_spec(["embed"], (258, 32), {**s, "fsdp": 1}) == P()


def test_optimizer_state_follows_params():
  params = {"moe": {"experts": {"w_gate": jnp.zeros((8, 4, 6))}}, "dense": jnp.zeros((6, 4))}
  s = {"data": 1, "fsdp": 2, "expert": 4}
  specs = pm.param_specs(params, s)
  opt = optax.adamw(1e-3).init(params)
  got = pm.state_specs(opt, params, specs)
  leaves = jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, P))
  by_key = {jax.tree_util.keystr(p): v for p, v in leaves}
  mu = [v for k, v in by_key.items() if ".mu" in k]
  assert sorted(map(str, mu)) == sorted(map(str, [P("expert", None, "fsdp"), P("fsdp", None)]))
  assert [v for k, v in by_key.items() if "count" in k] == [P()]


def test_write_sharding_json(tmp_path):
  mesh = pm.make_mesh({"data": 1, "fsdp": 1, "expert": 1})
  params = {"experts": {"w_down": jnp.zeros((4, 8, 2))}, "head": jnp.zeros((2, 3))}
  specs = pm.param_specs(params, {"data": 1, "fsdp": 1, "expert": 1})
  path = pm.write_sharding(str(tmp_path), mesh, params, specs)
  with open(path) as f:
    out = json.load(f)
  assert out["mesh"] == {"data": 1, "fsdp": 1, "expert": 1}
  assert out["params"]["experts/w_down"] == {"shape": [4, 8, 2], "spec": ["expert", None, None]}
  assert out["params"]["head"]["spec"] == []
