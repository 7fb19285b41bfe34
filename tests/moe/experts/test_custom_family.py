"""The expert-family interface is real: a family defined only here trains everywhere.

`GainLowRank` (y = g_e * (x A_e) B_e, a low-rank linear expert with a
learned gain) lives in this file and is registered at run time; nothing in
the package names it. It trains a few steps through every dispatcher
(dense, capacity, dropless, and Soft MoE's slots) and, on 4 fake devices in
a subprocess, through expert parallelism (the dropless exchange, one expert
per device), whose losses must equal the one-device run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from moejax.layers import dot
from moejax.moe import experts as ex
from tests.conftest import REPO, fake_devices, tiny_config


@dataclasses.dataclass(frozen=True)
class GainLowRank(ex.ExpertFamily):
  name = "gain_lowrank"

  def leaves(self) -> dict[str, ex.Leaf]:
    return {"a": ex.Leaf(("E", "D", "F"), fan_in="D", fsdp="F"),
            "b": ex.Leaf(("E", "F", "D"), fan_in="F", output=True),
            "g": ex.Leaf(("E",), init="ones")}

  def batched(self, w: dict, x_ExCxD: jax.Array, dtype) -> jax.Array:
    h = dot("ecd,edf->ecf", x_ExCxD, w["a"], dtype)
    return dot("ecf,efd->ecd", h, w["b"], dtype) * w["g"][:, None, None]

  def grouped(self, w: dict, x_AxD: jax.Array, group_sizes: jax.Array, dtype, *,
              backend: str = "auto", group_offset: Any = None,
              scale_A: jax.Array | None = None) -> jax.Array:
    def gmm(lhs, rhs):
      return pallas_kernels.gmm(lhs.astype(dtype), rhs.astype(dtype), group_sizes,
                                preferred_element_type=jnp.float32,
                                group_offset=group_offset, backend=backend)
    y = gmm(gmm(x_AxD, w["a"]), w["b"])  # rows of other groups: zero
    e_loc = w["g"].shape[0]
    local = ex.group_of_rows(group_sizes, x_AxD.shape[0]) - (0 if group_offset is None else group_offset)
    gain = jnp.where((local >= 0) & (local < e_loc), w["g"][jnp.clip(local, 0, e_loc - 1)], 0.0)
    if scale_A is not None:
      gain = gain * scale_A
    return y * gain[:, None]

  def activation_norms(self, w: dict, x_NxD: jax.Array, dtype) -> jax.Array:
    return ex.row_norms(dot("nd,edf->nef", x_NxD, w["a"], dtype))  # its hidden x A_e


ex.register(GainLowRank)

STEPS = 2
DEVICES = 4  # fake CPU devices of the expert-parallel subprocess (8 took ~1/4 longer)


def _cfg(dispatch: str, router: str = "topk", expert: int = 1):
  c = tiny_config(expert="gain_lowrank", dispatch=dispatch, router=router,
                  capacity_factor=4.0)  # capacity drops nothing: same function as dense
  c.train.steps, c.train.warmup_steps, c.train.eval_every = STEPS, 1, STEPS
  c.train.checkpoint_every, c.train.log_every, c.train.eval_batches = STEPS, 1, 1
  c.model.num_layers = 1  # the family is per MoE layer; one layer compiles in ~3/4 the time
  c.parallel.expert = expert
  if expert > 1:
    c.parallel.data = DEVICES // expert
  return c


def _train(cfg, workdir: str) -> tuple[list[float], dict, dict]:
  from moejax.init.sources import load_run  # noqa: PLC0415
  from moejax.train import trainer  # noqa: PLC0415
  summary = trainer.train(cfg, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
  params, _, _ = load_run(workdir)
  return losses, summary, params


def test_family_trains_through_every_dispatcher(tmp_path):
  from moejax import layout, model as lm  # noqa: PLC0415
  start = layout.moe_params(lm.init(jax.random.key(0), _cfg("dense"))["params"])["experts"]
  assert sorted(start) == ["a", "b", "g"]
  runs = {"dense": _cfg("dense"), "capacity": _cfg("capacity"), "dropless": _cfg("dropless"),
          "soft": _cfg("dropless", router="soft")}
  losses = {}
  for name, cfg in runs.items():
    losses[name], summary, params = _train(cfg, str(tmp_path / name))
    assert len(losses[name]) == STEPS and np.all(np.isfinite(losses[name])), name
    assert summary["params_total"] == sum(x.size for x in jax.tree.leaves(params)), name
    trained = layout.moe_params(params)["experts"]
    for leaf in ("a", "b", "g"):  # every declared leaf got gradient and moved
      assert not np.allclose(trained[leaf], start[leaf]), (name, leaf)
  # The ragged path and the per-expert buffers compute the same function.
  np.testing.assert_allclose(losses["dropless"], losses["dense"], rtol=1e-4)
  np.testing.assert_allclose(losses["capacity"], losses["dense"], rtol=1e-4)
  # ... and expert parallelism over 4 fake devices gives the same losses.
  out = subprocess.run([sys.executable, "-m", "tests.moe.experts.test_custom_family",
                        str(tmp_path / "ep")], cwd=REPO, capture_output=True, text=True,
                       env=fake_devices(DEVICES, {**os.environ, "PYTHONPATH": REPO}),
                       timeout=900)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  ep = json.loads(out.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(ep["dropless"], losses["dropless"], rtol=1e-4)


def _expert_parallel(workdir: str) -> None:
  assert jax.device_count() == DEVICES, jax.device_count()
  d = os.path.join(workdir, "dropless")
  losses, _, _ = _train(_cfg("dropless", expert=4), d)
  with open(os.path.join(d, "sharding.json")) as f:
    specs = json.load(f)["params"]
  assert specs["moe_layers/block0/moe/experts/g"]["spec"] == [None, "expert"], specs
  print(json.dumps({"dropless": losses}))


if __name__ == "__main__":
  _expert_parallel(sys.argv[1])
