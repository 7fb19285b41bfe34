"""Expert placement for expert parallelism: which of D devices holds each layer's experts.

Why: with expert parallelism a token's activations travel to the devices of
its experts and back (all-to-all). Placing experts that tokens use together
on one device cuts that traffic; copying the busiest experts evens the load.
This module places the experts of every MoE layer from the co-activation
statistics of a routing trace and scores the placement on held-out tokens.

A placement of N layers is `hosts_NxExD` (bool: device d holds a copy of
expert e). Every method puts E / D experts on each device, so D must divide
E (1 <= D <= E); `replicate_hot` adds R copies per layer, at most ceil(R / D)
more per device. Each layer is placed on its own:

- `round_robin`: expert e on device e % D (the baseline);
- `greedy`: from the co-activation matrix C[i, j] (tokens using both i and
  j, counted on the fitting part), start from one group per expert and
  repeatedly merge the pair of groups with the largest co-activation between
  them whose sizes sum to at most E / D; then give the groups, largest first
  (ties: most load), each to the device with room and the least load so far;
  a group that fits nowhere is split, each expert going to the device with
  room it is most co-activated with;
- `milp`: scipy.optimize.milp (HiGHS) maximises the co-activation inside
  devices, sum over devices d and pairs i < j of C[i, j] * y[i, j, d] with
  binary x[e, d] (expert e on device d), each expert on one device, E / D per
  device, and the linearisation y[i, j, d] <= x[i, d], y[i, j, d] <= x[j, d]
  (pairs with C[i, j] > 0 only; expert e on a device <= e breaks the devices'
  symmetry). A time limit per layer (`milp_time_limit`, default 10 s) keeps
  the best solution found, replaced by the greedy's where that is better;
  above `MILP_MAX_EXPERTS` = 32 experts per layer (E * D binaries plus up to
  E (E - 1) / 2 * D pair variables) or without a solution the layer uses the
  greedy. The row's "note" says which was used in which layers;
- `replicate_hot`: round robin plus R extra copies per layer, one at a time:
  to the expert with the most load per copy (load = its assignments in the
  fitting part), on the device with the least expected load (load per copy
  summed over its experts) that has room and no copy of it.

Routing: a token's home device is (its sequence index in the trace,
`sequence_T`) % D, as when each device decodes its own sequences. An expert
with one copy runs there; with several, on the home device if it holds one,
else on the copy whose device has processed the fewest assignments of that
layer so far in the replay.

Reported per placement on the evaluation tokens, averaged over the layers:
a2a_bytes_per_token_layer = expert assignments of the token sent off its
home device * d_model * dtype_bytes * 2 (dispatch and combine), per token
and layer (a2a_bytes_per_token: summed over the N layers);
a2a_dedup_bytes_per_token_layer = the same counting one copy per remote
device (a dispatcher that sends a token once to a device running several of
its experts); load_imbalance = max device load / mean device load (load =
expert assignments processed); devices_per_token = the number of distinct
devices running a token's experts in a layer.

Note: where the home device does not depend on the routing (as here), each
assignment is remote with probability (D - 1) / D whatever the placement, so
co-activation-aware placement leaves a2a_bytes_per_token_layer about
unchanged in expectation; it lowers devices_per_token and the deduplicated
bytes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from moejax.inference import trace as trace_lib
from moejax.inference.trace import Trace

METHODS = ("round_robin", "greedy", "milp", "replicate_hot")
MILP_MAX_EXPERTS = 32


@dataclasses.dataclass
class Placement:
  """Which devices hold a copy of each expert, per MoE layer, and how it was obtained."""

  method: str
  hosts_NxExD: np.ndarray  # bool
  capacity: int  # expert slots per device
  note: str = ""  # milp: which layers were solved, stopped by the time limit or fell back

  @property
  def num_devices(self) -> int:
    return int(self.hosts_NxExD.shape[2])


def _int(name: str, value, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ValueError(f"{name}={value!r}; allowed: an integer >= {lo}")
  return int(value)


def check_devices(devices, num_experts: int, arg_name: str = "devices") -> int:
  """E / D, the experts per device; ValueError naming `arg_name` unless D divides E."""
  d = _int(arg_name, devices, 1)
  if d > num_experts or num_experts % d:
    raise ValueError(f"{arg_name}={d}; allowed: a divisor of the {num_experts} experts per "
                     "layer (each device holds the same number of experts)")
  return num_experts // d


def check_replicas(replicas, num_experts: int, devices: int, arg_name: str = "replicas"
                   ) -> int:
  """R as an int; ValueError naming `arg_name` unless 0 <= R <= E (D - 1) (one copy of an
  expert per device)."""
  r = _int(arg_name, replicas, 0)
  if r > num_experts * (devices - 1):
    raise ValueError(f"{arg_name}={r}; allowed: at most {num_experts * (devices - 1)} for "
                     f"{num_experts} experts on {devices} devices (one copy per device)")
  return r


def default_replicas(devices: int, num_experts: int) -> int:
  """replicate_hot's default R: one extra copy per device, min(D, E (D - 1)) (0 for D = 1)."""
  return min(devices, num_experts * (devices - 1))


def check_placement(placement: Placement) -> None:
  """ValueError unless every expert has a copy and no device exceeds its capacity."""
  h = np.asarray(placement.hosts_NxExD, bool)
  if h.ndim != 3:
    raise ValueError(f"hosts_NxExD has shape {h.shape}; allowed: 3-D [N, E, D]")
  orphans = np.argwhere(~h.any(-1))
  if orphans.size:
    raise ValueError(f"{placement.method}: (layer row, expert) {orphans[0].tolist()} is on "
                     "no device")
  over = np.argwhere(h.sum(1) > placement.capacity)
  if over.size:
    raise ValueError(f"{placement.method}: (layer row, device) {over[0].tolist()} holds more "
                     f"than capacity={placement.capacity} experts")


def coactivation(trace: Trace) -> np.ndarray:
  """float64 [N, E, E]: tokens using both i and j in a layer (diagonal: i's load)."""
  sel_TxNxE = trace.selected().astype(np.float64)
  return np.einsum("tni,tnj->nij", sel_TxNxE, sel_TxNxE)


def intra_coactivation(coact_ExE: np.ndarray, device_E: np.ndarray) -> float:
  """Co-activation of the pairs i < j on one device: the milp objective."""
  same_ExE = device_E[:, None] == device_E[None, :]
  return float(np.triu(np.where(same_ExE, coact_ExE, 0.0), k=1).sum())


def _hosts(device_E: np.ndarray, devices: int) -> np.ndarray:
  h = np.zeros((device_E.size, devices), bool)
  h[np.arange(device_E.size), device_E] = True
  return h


# --------------------------------------------------------------------------- methods


def greedy_devices(coact_ExE: np.ndarray, devices: int) -> np.ndarray:
  """int64 [E]: one layer's greedy merge-and-pack placement (module docstring)."""
  e = coact_ExE.shape[0]
  cap = e // devices
  w = np.asarray(coact_ExE, np.float64).copy()
  load_E = np.diagonal(w).copy()
  np.fill_diagonal(w, 0.0)
  members = [[i] for i in range(e)]
  alive = np.ones(e, bool)
  size = np.ones(e, np.int64)
  upper = np.triu(np.ones((e, e), bool), k=1)
  while True:
    ok = upper & alive[:, None] & alive[None, :] & (size[:, None] + size[None, :] <= cap)
    score = np.where(ok & (w > 0), w, -1.0)
    a, b = np.unravel_index(int(np.argmax(score)), score.shape)  # ties: lowest (a, b)
    if score[a, b] < 0:
      break
    members[a] += members[b]
    size[a] += size[b]
    alive[b] = False
    w[a] += w[b]
    w[:, a] = w[a]
    w[a, a] = 0.0
  groups = sorted((members[g] for g in np.flatnonzero(alive)),
                  key=lambda m: (-len(m), -load_E[m].sum(), min(m)))
  device_E = np.full(e, -1, np.int64)
  room = np.full(devices, cap)
  dev_load = np.zeros(devices)
  for m in groups:
    fits = np.flatnonzero(room >= len(m))
    if fits.size:
      d = min(fits, key=lambda g: (dev_load[g], g))
      device_E[m] = d
      room[d] -= len(m)
      dev_load[d] += load_E[m].sum()
      continue
    for i in m:  # split: expert by expert to the device with room it is most tied to
      free = np.flatnonzero(room > 0)
      tie = [coact_ExE[i, device_E == g].sum() for g in free]
      d = free[min(range(free.size), key=lambda j: (-tie[j], dev_load[free[j]], free[j]))]
      device_E[i] = d
      room[d] -= 1
      dev_load[d] += load_E[i]
  return device_E


def milp_devices(coact_ExE: np.ndarray, devices: int, time_limit: float = 10.0
                 ) -> tuple[np.ndarray | None, str]:
  """(int64 [E] or None when the solver found no solution, its status): one layer's MILP
  (module docstring)."""
  from scipy import optimize, sparse  # noqa: PLC0415

  e, d = coact_ExE.shape[0], devices
  cap = e // d
  iu, ju = np.triu_indices(e, k=1)
  w_P = np.asarray(coact_ExE, np.float64)[iu, ju]
  keep = w_P > 0
  iu, ju, w_P = iu[keep], ju[keep], w_P[keep]
  p = w_P.size
  nx, ny = e * d, p * d  # x[i, g] at i * d + g; y[q, g] at nx + q * d + g
  cost = np.concatenate([np.zeros(nx), -np.repeat(w_P, d)])
  expert_E, device_D = np.arange(e), np.arange(d)
  q_Y, g_Y = np.divmod(np.arange(ny), d)
  blocks = [  # (row index, column index, value) triples of the constraint matrix
      (np.repeat(expert_E, d), np.arange(nx), 1.0),  # rows 0..E-1: one device per expert
      (e + np.tile(device_D, e), np.arange(nx), 1.0),  # rows E..E+D-1: E / D per device
  ]
  for j, ends in enumerate((iu, ju)):  # y[q, g] - x[end, g] <= 0
    r_Y = e + d + j * ny + np.arange(ny)
    blocks += [(r_Y, nx + np.arange(ny), 1.0), (r_Y, ends[q_Y] * d + g_Y, -1.0)]
  rows = np.concatenate([b[0] for b in blocks])
  cols = np.concatenate([b[1] for b in blocks])
  vals = np.concatenate([np.full(b[0].size, b[2]) for b in blocks])
  a = sparse.csr_array((vals, (rows, cols)), shape=(e + d + 2 * ny, nx + ny))
  lo = np.r_[np.ones(e), np.full(d, cap), np.full(2 * ny, -np.inf)]
  hi = np.r_[np.ones(e), np.full(d, cap), np.zeros(2 * ny)]
  ub = np.ones(nx + ny)
  ub[:nx] = (device_D[None, :] <= expert_E[:, None]).ravel()  # symmetry: device <= expert
  res = optimize.milp(cost, constraints=optimize.LinearConstraint(a, lo, hi),
                      integrality=np.r_[np.ones(nx), np.zeros(ny)],
                      bounds=optimize.Bounds(np.zeros(nx + ny), ub),
                      options={"time_limit": float(time_limit), "disp": False})
  if res.x is None:
    return None, f"no solution ({res.message})"
  x_ExD = res.x[:nx].reshape(e, d) > 0.5
  if not ((x_ExD.sum(1) == 1).all() and (x_ExD.sum(0) == cap).all()):
    return None, "the rounded solution breaks the constraints"
  return x_ExD.argmax(1).astype(np.int64), "optimal" if res.status == 0 else "time limit"


def replicate_hot_hosts(load_E: np.ndarray, devices: int, replicas: int) -> np.ndarray:
  """bool [E, D]: round robin plus `replicas` copies (module docstring)."""
  e = load_E.shape[0]
  cap = e // devices + math.ceil(replicas / devices)
  h = _hosts(np.arange(e) % devices, devices)
  load = np.asarray(load_E, np.float64)
  for _ in range(replicas):
    copies = h.sum(1)
    dev_load = (h * (load / copies)[:, None]).sum(0)
    free_D = h.sum(0) < cap
    for i in sorted(range(e), key=lambda i: (-load[i] / copies[i], i)):
      ok = np.flatnonzero(free_D & ~h[i])
      if ok.size:  # some expert always has one: a device with room holds < cap <= E
        h[i, min(ok, key=lambda g: (dev_load[g], g))] = True
        break
  return h


def place(trace: Trace, method: str, devices: int, *, replicas: int = 0,
          milp_time_limit: float = 10.0, milp_max_experts: int = MILP_MAX_EXPERTS
          ) -> Placement:
  """Place every MoE layer's experts on `devices` devices from `trace`'s routing."""
  if method not in METHODS:
    raise ValueError(f"method={method!r}; allowed: {', '.join(METHODS)}")
  n, e = trace.num_layers, trace.num_experts
  per = check_devices(devices, e)
  r = check_replicas(replicas, e, devices) if method == "replicate_hot" else 0
  coact_NxExE = coactivation(trace)
  note = ""
  if method == "round_robin":
    hosts = np.stack([_hosts(np.arange(e) % devices, devices)] * n)
  elif method == "greedy":
    hosts = np.stack([_hosts(greedy_devices(c, devices), devices) for c in coact_NxExE])
  elif method == "replicate_hot":
    hosts = np.stack([replicate_hot_hosts(np.diagonal(c), devices, r) for c in coact_NxExE])
  else:
    if isinstance(milp_time_limit, bool) or not isinstance(milp_time_limit, (int, float)) \
        or not milp_time_limit > 0:
      raise ValueError(f"milp_time_limit={milp_time_limit!r}; allowed: seconds > 0")
    _int("milp_max_experts", milp_max_experts, 1)
    layers, used = [], {}
    for layer, c in zip(trace.layers, coact_NxExE):
      g = greedy_devices(c, devices)
      if devices == 1:
        m, status = np.zeros(e, np.int64), "milp (optimal)"
      elif e > milp_max_experts:
        m, status = None, f"greedy (E={e} > milp_max_experts={milp_max_experts})"
      else:
        m, why = milp_devices(c, devices, milp_time_limit)
        status = f"greedy (milp: {why})" if m is None else f"milp ({why})"
        if m is not None and why != "optimal" \
            and intra_coactivation(c, g) > intra_coactivation(c, m):
          m, status = None, "greedy (better than milp's best at the time limit)"
      layers.append(_hosts(g if m is None else m, devices))
      used.setdefault(status, []).append(layer)
    hosts = np.stack(layers)
    note = "; ".join(f"{s}: layers {v}" for s, v in used.items())
  out = Placement(method, hosts, per + math.ceil(r / devices), note)
  check_placement(out)
  return out


# --------------------------------------------------------------------------- evaluation


def home_devices(trace: Trace, devices: int) -> np.ndarray:
  """int64 [T]: each token's home device, its sequence index % D."""
  return trace.sequence_T.astype(np.int64) % _int("devices", devices, 1)


def route(placement: Placement, trace: Trace, home_T: np.ndarray) -> np.ndarray:
  """int64 [T, N, K]: the device running each (token, layer, slot); -1 on empty slots."""
  h = placement.hosts_NxExD
  n, e, d = h.shape
  if (n, e) != (trace.num_layers, trace.num_experts):
    raise ValueError(f"placement covers {n} layers x {e} experts; the trace has "
                     f"{trace.num_layers} x {trace.num_experts}")
  ex = trace.experts_TxNxK
  valid = ex >= 0
  safe = np.where(valid, ex, 0)
  layer = np.arange(n)[None, :, None]
  home = home_T[:, None, None]
  out = np.where(h[layer, safe, home], home, np.argmax(h, axis=-1)[layer, safe])
  choose = valid & (h.sum(-1) > 1)[layer, safe] & ~h[layer, safe, home]
  if choose.any():  # replicas off the home device: the least loaded so far, in trace order
    load_NxD = np.zeros((n, d), np.int64)
    for t in range(ex.shape[0]):
      for i in range(n):
        for k in np.flatnonzero(valid[t, i]):
          if choose[t, i, k]:
            copies = np.flatnonzero(h[i, ex[t, i, k]])
            out[t, i, k] = copies[np.argmin(load_NxD[i, copies])]
          load_NxD[i, out[t, i, k]] += 1
  return np.where(valid, out, -1)


def evaluate_placement(placement: Placement, trace: Trace, *, dtype_bytes: int = 2) -> dict:
  """One report row of `placement` on `trace` (module docstring)."""
  act = _int("dtype_bytes", dtype_bytes, 1)
  d_model, _ = trace_lib.expert_shape(trace.model, "trace")
  dev = placement.num_devices
  home_T = home_devices(trace, dev)
  dev_TxNxK = route(placement, trace, home_T)
  t, n, _ = dev_TxNxK.shape
  valid = dev_TxNxK >= 0
  remote_TxN = (valid & (dev_TxNxK != home_T[:, None, None])).sum(-1)
  touched_TxNxD = np.zeros((t, n, dev), bool)
  ti, ni, ki = np.nonzero(valid)
  touched_TxNxD[ti, ni, dev_TxNxK[ti, ni, ki]] = True
  remote_devices_TxN = touched_TxNxD.sum(-1) - touched_TxNxD[np.arange(t), :, home_T]
  used_TxN = valid.any(-1)
  load_NxD = np.zeros((n, dev), np.int64)
  np.add.at(load_NxD, (ni, dev_TxNxK[ti, ni, ki]), 1)
  mean_N = load_NxD.mean(-1)
  imbalance_N = np.where(mean_N > 0, load_NxD.max(-1) / np.where(mean_N > 0, mean_N, 1), 1.0)
  per_value = d_model * act * 2
  per_layer = float(remote_TxN.mean()) * per_value if t * n else 0.0
  dedup = float(remote_devices_TxN.mean()) * per_value if t * n else 0.0
  return {"method": placement.method, "devices": dev,
          "replicas": int(placement.hosts_NxExD.sum()) // max(n, 1) - trace.num_experts,
          "a2a_bytes_per_token_layer": per_layer, "a2a_bytes_per_token": per_layer * n,
          "a2a_dedup_bytes_per_token_layer": dedup,
          "load_imbalance": float(imbalance_N.mean()) if n else 1.0,
          "devices_per_token": float(touched_TxNxD.sum(-1)[used_TxN].mean())
          if used_TxN.any() else 0.0,
          "note": placement.note}


def evaluate(trace: Trace, devices: int, methods: Sequence[str] = METHODS, *,
             replicas: int | None = None, train_fraction: float = 0.5, dtype_bytes: int = 2,
             milp_time_limit: float = 10.0, milp_max_experts: int = MILP_MAX_EXPERTS
             ) -> list[dict]:
  """One row per method, in order: placed from the first `train_fraction` of the sequences,
  scored on the rest. replicas (replicate_hot's R per layer) defaults to
  `default_replicas`."""
  methods = list(methods)
  if not methods:
    raise ValueError(f"methods is empty; allowed: one or more of {', '.join(METHODS)}")
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"method={m!r}; allowed: {', '.join(METHODS)}")
  check_devices(devices, trace.num_experts)
  r = check_replicas(default_replicas(devices, trace.num_experts) if replicas is None
                     else replicas, trace.num_experts, devices)
  _int("dtype_bytes", dtype_bytes, 1)
  trace_lib.expert_shape(trace.model, "trace")
  if isinstance(train_fraction, bool) or not isinstance(train_fraction, (int, float)) \
      or not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction={train_fraction!r}; allowed: a number in (0, 1)")
  fit, held = trace.split(train_fraction)
  return [evaluate_placement(place(fit, m, devices, replicas=r, milp_time_limit=milp_time_limit,
                                   milp_max_experts=milp_max_experts),
                             held, dtype_bytes=dtype_bytes)
          for m in methods]
