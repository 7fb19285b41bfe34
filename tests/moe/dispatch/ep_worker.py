"""8-fake-device checks of the expert-parallel dispatch (run in a subprocess).

`python -m tests.moe.dispatch.ep_worker` sets XLA_FLAGS before JAX starts,
runs every comparison and prints one JSON line {"failures": [...], "checked": n}.
Comparisons are against the single-device layer in the same process (and a
NumPy reference for the exchange and for capacity drops).
"""

from __future__ import annotations

import os

from tests.conftest import fake_devices

os.environ["XLA_FLAGS"] = fake_devices(8)["XLA_FLAGS"]

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from moejax.config import default_config  # noqa: E402
from moejax.moe import MoELayer  # noqa: E402
from moejax.moe.dispatch import expert_parallel as epd  # noqa: E402
from moejax.moe.experts import ExpertWeights, SwiGLUExperts  # noqa: E402
from moejax.moe.routers import ROUTERS  # noqa: E402
from moejax.moe.routers.sigmoid_bias import update_bias  # noqa: E402
from moejax.moe.types import Assignment  # noqa: E402
from moejax.parallel import mesh as pm  # noqa: E402

B, L, D, F, E, K = 8, 4, 8, 16, 8, 2  # T = 32 tokens, 4 per device
# Token-choice routers (choice-major slots); expert choice and soft MoE keep
# the single-program path.
# The scheduled routers (smoe_dropout, dts) route top-k at eval like topk and are left
# out to keep this worker within its time on 2 cores.
ROUTER_NAMES = sorted(r for r in ROUTERS if getattr(ROUTERS[r], "choice_major_slots", True)
                      and r not in ("smoe_dropout", "dts")
                      and r != "soft")
MESHES = {"data8": (8, 1, 1), "expert8": (1, 1, 8), "data2_expert4": (2, 1, 4)}
RTOL = 1e-5
failures: list[str] = []
checked = 0


def close(name: str, got, want, rtol: float = RTOL) -> None:
  """Records a failure unless every leaf agrees to rtol (atol = rtol * max |want|)."""
  global checked
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    checked += 1
    tol = rtol * np.abs(b) + rtol * (np.max(np.abs(b)) if b.size else 0.0) + 1e-30
    bad = np.abs(a - b) > tol
    if a.shape != b.shape or np.any(bad):
      err = float(np.max(np.abs(a - b))) if a.shape == b.shape else "shape"
      failures.append(f"{name}{jax.tree_util.keystr(path)}: max abs err {err}")


def moe_cfg(router: str, dispatch: str, cf: float = float(E)) -> ml_collections.FrozenConfigDict:
  c = default_config().moe
  c.router, c.num_experts, c.top_k, c.expert_hidden, c.dispatch = router, E, K, F, dispatch
  c.capacity_factor = cf
  c.balance = "switch,global_batch"
  c.gmm_backend = "xla"  # compiles fastest; the kernels have their own tests
  return ml_collections.FrozenConfigDict(c)


def check_exchange() -> None:
  """emulated_ragged_all_to_all on a 4-device axis equals ragged_all_to_all semantics."""
  mesh = pm.make_mesh({"data": 2, "fsdp": 1, "expert": 4})
  n, rows, width = 4, 6, 3
  rng = np.random.default_rng(0)

  def body(x, sizes_SxS):
    me = jax.lax.axis_index("expert")
    offs = epd.ragged_offsets(sizes_SxS[0], me)
    out = jnp.full((n * rows, width), -1.0, jnp.float32)
    fwd = epd.emulated_ragged_all_to_all(x[0], out, *offs, axis_name="expert",
                                         axis_size=n, max_chunk=rows)
    back = epd.emulated_ragged_all_to_all(fwd, jnp.zeros((rows, width), jnp.float32),
                                          *epd.ragged_offsets(sizes_SxS[0].T, me),
                                          axis_name="expert", axis_size=n, max_chunk=rows)
    return fwd[None], back[None]

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("expert"), P("data")),
                             out_specs=(P("expert"), P("expert")), check_vma=False))
  for trial in range(3):
    # each device sends at most `rows` rows in total, some chunks empty
    sizes = np.stack([rng.multinomial(rng.integers(0, rows + 1), [1 / n] * n)
                      for _ in range(n)]).astype(np.int32)
    x = rng.standard_normal((n, rows, width)).astype(np.float32)
    # data axis replicas get the same sizes
    fwd, back = fn(jnp.asarray(x), jnp.asarray(np.stack([sizes, sizes])))
    want = np.full((n, n * rows, width), -1.0, np.float32)
    for j in range(n):  # receiver j: chunks from sources in order
      pos = 0
      for i in range(n):
        start = sizes[i, :j].sum()
        want[j, pos:pos + sizes[i, j]] = x[i, start:start + sizes[i, j]]
        pos += sizes[i, j]
    close(f"exchange[{trial}]", np.asarray(fwd), want, rtol=0)
    want_back = np.where(np.arange(rows)[None, :, None] < sizes.sum(1)[:, None, None], x, 0)
    close(f"exchange_back[{trial}]", np.asarray(back), want_back, rtol=0)


def random_variables(layer, x, ids, seed: int):
  shapes = jax.eval_shape(lambda k: layer.init(k, x, token_ids_BxL=ids), jax.random.key(0))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.4 * rng.standard_normal(s.shape), s.dtype), shapes)


def check_layers() -> None:
  """Outputs, losses, metrics, state stats, bias update and grads vs one device."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 256, (B, L)), jnp.int32)
  r = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  cases = {(name, d): MoELayer(moe_cfg(name, d)) for name in ROUTER_NAMES
           for d in ("dropless", "capacity")}
  # The same weights for both dispatch modes of a router.
  variables = {key: random_variables(layer, x, ids, ROUTER_NAMES.index(key[0]))
               for key, layer in cases.items()}

  def run_all(variables, x, keys):
    out = {}
    for key in keys:
      layer, v = cases[key], variables[key]

      def objective(p, x):
        y, aux, _ = layer.apply({**v, "params": p}, x, token_ids_BxL=ids)
        loss = jnp.sum(y * r) + sum(jnp.sum(a) for a in aux["losses"].values())
        return loss, (y, aux)

      (loss, (y, aux)), grads = jax.value_and_grad(objective, (0, 1), has_aux=True)(
          v["params"], x)
      res = {"y": y, "losses": aux["losses"], "dropped": aux["metrics"]["dropped_fraction"],
             "load": aux["metrics"]["load"], "stats": aux["state_stats"], "grads": grads}
      if key[0] == "sigmoid_bias":  # the aux-loss-free bias step from global counts
        bias = v["moe_state"]["router"]["bias"]
        res["new_bias"] = update_bias(bias, aux["state_stats"]["counts"], 0.1)
      out["/".join(key)] = res
    return out

  all_keys = tuple(cases)
  ref = jax.jit(run_all, static_argnums=2)(variables, x, all_keys)
  for key in all_keys:  # nothing dropped: single-device capacity == dropless
    if key[1] == "capacity":
      close(f"single/{key[0]}/capacity-vs-dropless", ref["/".join(key)]["y"],
            ref[f"{key[0]}/dropless"]["y"])
  for mesh_name, shape in MESHES.items():
    mesh = pm.make_mesh(dict(zip(pm.AXES, shape)))
    # Every router with dropless on every mesh; capacity for all on the mixed
    # mesh and for two routers (all-valid, some-invalid slots) elsewhere.
    keys = tuple(k for k in all_keys if k[1] == "dropless" or mesh_name == "data2_expert4"
                 or k[0] in ("topk", "null_experts"))
    with jax.set_mesh(mesh):
      got = jax.jit(run_all, static_argnums=2)(variables, x, keys)
    for k in keys:
      name = "/".join(k)
      close(f"{mesh_name}/{name}", got[name], ref[name])


def capacity_reference(assignment: Assignment, x_TxD, w, n_tok: int, ep: int, cf: float):
  """NumPy per-device capacity semantics: local first-come buffers per expert."""
  t = x_TxD.shape[0]
  k = assignment.num_slots // t
  t_loc = t // n_tok
  tok = np.asarray(assignment.token).reshape(k, t)
  exp = np.asarray(assignment.expert).reshape(k, t)
  wt = np.asarray(assignment.weight).reshape(k, t)
  val = np.asarray(assignment.valid).reshape(k, t)
  x = np.asarray(x_TxD, np.float64)
  wg, wu, wd = (np.asarray(w[n], np.float64) for n in ("w_gate", "w_up", "w_down"))
  y = np.zeros_like(x)
  dropped = 0
  c = max(1, math.ceil(cf * k * t_loc / E))
  for dev in range(n_tok):
    cols = slice(dev * t_loc, (dev + 1) * t_loc)
    used = np.zeros(E, int)
    for tt, ee, ww, vv in zip(tok[:, cols].reshape(-1), exp[:, cols].reshape(-1),
                              wt[:, cols].reshape(-1), val[:, cols].reshape(-1)):
      if not vv:
        continue
      if used[ee] >= c:
        dropped += 1
        continue
      used[ee] += 1
      g, u = x[tt] @ wg[ee], x[tt] @ wu[ee]
      y[tt] += ww * ((g / (1 + np.exp(-g))) * u) @ wd[ee]
  return y, dropped / max(int(val.sum()), 1)


def check_capacity_drops() -> None:
  """With drops, EP capacity equals per-device capacity semantics and counts drops."""
  rng = np.random.default_rng(2)
  t = B * L
  x = jnp.asarray(rng.standard_normal((t, D)), jnp.float32)
  w = {n: jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
       for n, s in (("w_gate", (E, D, F)), ("w_up", (E, D, F)), ("w_down", (E, F, D)))}
  # Skewed: most slots go to experts 0 and 1, a few are invalid.
  probs = np.array([0.4, 0.3] + [0.3 / (E - 2)] * (E - 2))
  a = Assignment(token=jnp.tile(jnp.arange(t, dtype=jnp.int32), K),
                 expert=jnp.asarray(rng.choice(E, size=K * t, p=probs), jnp.int32),
                 weight=jnp.asarray(rng.uniform(0.1, 1.0, K * t), jnp.float32),
                 valid=jnp.asarray(rng.uniform(size=K * t) > 0.1))
  cfg = moe_cfg("topk", "capacity", cf=1.0)
  mesh = pm.make_mesh({"data": 2, "fsdp": 1, "expert": 4})
  with jax.set_mesh(mesh):
    y, stats = jax.jit(lambda x, a, w: epd.expert_parallel_dispatch(
        x, a, ExpertWeights(w, SwiGLUExperts(), jnp.float32), cfg=cfg))(x, a, w)
  want_y, want_drop = capacity_reference(a, x, w, 8, 4, 1.0)
  close("capacity_drops/y", y, want_y, rtol=1e-4)
  close("capacity_drops/dropped_fraction", stats["dropped_fraction"], want_drop)
  if not want_drop > 0:
    failures.append("capacity_drops: the skewed case dropped nothing (test is vacuous)")


def main() -> None:
  assert jax.device_count() == 8, jax.device_count()
  check_exchange()
  check_capacity_drops()
  check_layers()
  print(json.dumps({"failures": failures, "checked": checked}))


if __name__ == "__main__":
  with contextlib.suppress(BrokenPipeError):
    main()
