"""Where everything lives in the parameter tree: layer stacks, MoE layers, routers, experts.

The model scans its layers in stacks (`lax.scan`, so compile time does not
grow with depth): the first `moe.first_dense_layers` layers as
"dense_layers" (one block per scan step), the rest as MoE stacks of
identical scan steps, each step holding `moe.every` blocks per MoE layer
whose first block holds the MoE FFN ("moe"). Every leaf of a stack has a
leading scan axis.

With every MoE layer alike (`moe.layer_schedule.kind="constant"`, or any
schedule giving every layer moe.num_experts experts and moe.top_k) there is
one MoE stack, "moe_layers", of one MoE layer per step, so the MoE layers'
variables, in every collection (params, moe_state, intermediates, ...), live
under

  moe_layers / block0 / moe / {router, experts, shared, shared_gate, zero_experts}

with step p of the stack being model layer `moe_layer_indices(cfg)[p]`.

A layer-wise schedule (`moe_schedule`: experts E and top-k k of each MoE
layer) groups the MoE layers into stacks of equal shapes (`moe_stacks`):
one stack per run of consecutive layers with the same (E, k), or, when the
schedule repeats with a period p (a wave) and that needs fewer distinct
blocks, one stack whose scan step holds the p MoE layers of a period (MoE
blocks block0, block{every}, ...), plus runs for a remainder. The stacks are
"moe_layers", "moe_layers_1", ...; their number depends on the distinct
shapes and the period, not on depth. `moe_layer_paths` gives each MoE
layer's (stack, block, step); `layer_nodes` reads per-layer values of any
collection, `column_tree` places per-column ones (`moe_columns`: one MoE
block of a stack, scanned over its steps). Every module that needs a path
asks this one; readers that handle only one MoE stack refuse other models
(`is_uniform`, `require_uniform`).

Schedules (`moe.layer_schedule.*`; N MoE layers, m = min_experts, q =
moe.num_experts / m): pyramid (the pyramid of DeepSpeed-MoE's PR-MoE,
Rajbhandari et al. 2022: fewer experts in early layers; DynaMoE's
"ascending", Gülmez 2026) splits the layers into min(q, N) equal stages of m, 2m, ...,
num_experts experts (with fewer layers than levels the stages' levels are
spread over m..num_experts, rounded); reverse_pyramid is its mirror; wave
is a triangle wave of `period` layers from m up to num_experts at
period / 2 and back, rounded to multiples of m; list gives `experts`
explicitly (its largest entry must be moe.num_experts). `top_k` gives each
layer's k (its largest entry must be moe.top_k), "" = moe.top_k everywhere.
With moe.chain.rounds = C > 1 (Chain-of-Experts, moejax/moe/chain.py) the
routers of rounds 2..C sit beside `router` as `router_round2`, ...
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections

from moejax.checks import fail, is_int, lookup

DENSE_STACK = "dense_layers"
MOE_STACK = "moe_layers"
MOE_BLOCK = "block0"
MOE = "moe"
ROUTER = "router"
EXPERTS = "experts"
SHARED = "shared"
ZERO_EXPERTS = "zero_experts"  # copy / constant experts (moejax/moe/zero_experts.py)
MOE_PATH = (MOE_STACK, MOE_BLOCK, MOE)
ROUTER_PATH = MOE_PATH + (ROUTER,)
EXPERTS_PATH = MOE_PATH + (EXPERTS,)
SCHEDULE_KINDS = ("constant", "pyramid", "reverse_pyramid", "wave", "list")
SCHEDULE_KEY = "moe.layer_schedule"

Shape = tuple[int, int]  # (experts E, top-k k) of one MoE layer


def layer_plan(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
  """(number of leading dense layers, number of MoE layers = periods of moe.every layers)."""
  m, moe = cfg.model, cfg.moe
  if not moe.enabled:
    return m.num_layers, 0
  return moe.first_dense_layers, (m.num_layers - moe.first_dense_layers) // moe.every


# --------------------------------------------------------------------------- schedules


def _int_list(text: Any, key: str, n: int) -> list[int]:
  """Comma-separated positive ints, exactly n of them (one per MoE layer)."""
  parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else None
  if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
    fail(key, text, f"allowed: {n} comma-separated positive integers, one per MoE layer")
  if len(parts) != n:
    fail(key, text, f"has {len(parts)} entries but the model has {n} MoE layers "
         "(model.num_layers, moe.first_dense_layers, moe.every); allowed: one per MoE layer")
  return [int(p) for p in parts]


def _half_up(num: int, den: int) -> int:
  """round(num / den), halves rounded up, in integers."""
  return (2 * num + den) // (2 * den)


def _generated_levels(kind: str, n: int, q: int, period: int) -> list[int]:
  """Level 0..q-1 of each of the n MoE layers (E = min_experts * (1 + level))."""
  if kind == "wave":
    return [_half_up((q - 1) * 2 * min(i % period, period - i % period), period)
            for i in range(n)]
  stages = min(q, n)
  if stages == 1:
    levels = [q - 1] * n
  else:
    levels = [_half_up((i * stages // n) * (q - 1), stages - 1) for i in range(n)]
  return levels if kind == "pyramid" else levels[::-1]


def _experts(cfg: ml_collections.ConfigDict, n: int) -> list[int]:
  moe, s = cfg.moe, cfg.moe.layer_schedule
  kind = s.kind
  if kind not in SCHEDULE_KINDS:
    fail(f"{SCHEDULE_KEY}.kind", kind, f"allowed: {sorted(SCHEDULE_KINDS)}")
  if kind != "list" and s.experts:
    fail(f"{SCHEDULE_KEY}.experts", s.experts, f"must be '' unless {SCHEDULE_KEY}.kind="
         f"'list' (kind={kind!r} computes the experts of each layer)")
  e_max = moe.num_experts
  if kind == "constant":
    return [e_max] * n
  if kind == "list":
    experts = _int_list(s.experts, f"{SCHEDULE_KEY}.experts", n)
    if max(experts) != e_max:
      fail(f"{SCHEDULE_KEY}.experts", s.experts, f"its largest entry must be moe.num_experts="
           f"{e_max} (the widest layer; set moe.num_experts={max(experts)})")
    return experts
  m = s.min_experts
  if not is_int(m) or m < 1 or m > e_max or e_max % m:
    fail(f"{SCHEDULE_KEY}.min_experts", m, f"allowed: a positive integer dividing "
         f"moe.num_experts={e_max} (the levels are its multiples up to num_experts)")
  period = s.period
  if kind == "wave" and (not is_int(period) or period < 2 or period % 2):
    fail(f"{SCHEDULE_KEY}.period", period, "allowed: an even integer >= 2 (MoE layers per "
         "wave; it peaks at moe.num_experts at period / 2)")
  if kind == "wave" and period // 2 >= n and m != e_max:
    fail(f"{SCHEDULE_KEY}.period", period, f"the wave peaks at MoE layer period/2="
         f"{period // 2} but the model has {n} MoE layers; allowed: period <= {2 * n - 2}")
  return [m * (1 + lv) for lv in _generated_levels(kind, n, e_max // m, period)]


def moe_schedule(cfg: ml_collections.ConfigDict) -> tuple[Shape, ...]:
  """(E, k) of each MoE layer in layer order; ConfigError naming the key on bad values."""
  n = layer_plan(cfg)[1]
  if not n:
    return ()
  moe = cfg.moe
  s = moe.get("layer_schedule")
  if s is None:  # a config from before schedules existed
    return ((moe.num_experts, moe.top_k),) * n
  experts = _experts(cfg, n)
  if s.top_k == "":
    ks = [moe.top_k] * n
  else:
    ks = _int_list(s.top_k, f"{SCHEDULE_KEY}.top_k", n)
    if max(ks) != moe.top_k:
      fail(f"{SCHEDULE_KEY}.top_k", s.top_k, f"its largest entry must be moe.top_k="
           f"{moe.top_k} (the widest layer's k; set moe.top_k={max(ks)})")
  first, every = layer_plan(cfg)[0], moe.every
  for i, (e, k) in enumerate(zip(experts, ks)):
    # The plain model (constant, one k): moe.top_k against the router's experts is the
    # router's rule (merged experts route top-k of R >= k router experts onto fewer).
    if k > e and not (s.kind == "constant" and s.top_k == ""):
      key = (f"{SCHEDULE_KEY}.top_k" if s.top_k else "moe.top_k" if s.kind == "constant"
             else f"{SCHEDULE_KEY}.experts" if s.kind == "list" else
             f"{SCHEDULE_KEY}.min_experts")
      fail(key, lookup(cfg, key), f"MoE layer {i} (model layer {first + i * every}) "
           f"would route top-k {k} of its {e} experts; allowed: top-k <= experts in every "
           "layer")
  return tuple(zip(experts, ks))


def _runs(shapes: list[Shape]) -> list[tuple[tuple[Shape, ...], int]]:
  out: list[tuple[tuple[Shape, ...], int]] = []
  for s in shapes:
    if out and out[-1][0] == (s,):
      out[-1] = (out[-1][0], out[-1][1] + 1)
    else:
      out.append(((s,), 1))
  return out


def _segments(shapes: tuple[Shape, ...]) -> list[tuple[tuple[Shape, ...], int]]:
  """(shapes of one scan step, steps) per stack: runs of equal shapes, or a period
  repeated (plus runs of its remainder) when that traces fewer MoE blocks."""
  n = len(shapes)
  best = _runs(list(shapes))
  for p in range(2, n // 2 + 1):
    if all(shapes[i] == shapes[i % p] for i in range(n)):
      reps = n // p
      segs = [(tuple(shapes[:p]), reps)] + _runs(list(shapes[reps * p:]))
      if sum(len(s) for s, _ in segs) < sum(len(s) for s, _ in best):
        best = segs
      break
  return best


@dataclasses.dataclass(frozen=True)
class Stack:
  """One scanned MoE stack: `steps` scan steps of len(shapes) MoE layers each (each MoE
  layer followed by moe.every - 1 dense blocks); its first MoE layer is MoE layer
  `first` (in MoE-layer order)."""

  name: str
  first: int
  steps: int
  shapes: tuple[Shape, ...]

  @property
  def per_step(self) -> int:
    return len(self.shapes)

  @property
  def num_layers(self) -> int:
    return self.steps * self.per_step


def stack_name(s: int) -> str:
  return MOE_STACK if s == 0 else f"{MOE_STACK}_{s}"


def is_stack(name: str) -> bool:
  """Whether `name` is a scanned layer stack of the parameter tree (leaves [steps, ...])."""
  return name in (DENSE_STACK, MOE_STACK) or (
      name.startswith(MOE_STACK + "_") and name[len(MOE_STACK) + 1:].isdigit())


def moe_stacks(cfg: ml_collections.ConfigDict) -> tuple[Stack, ...]:
  """The MoE stacks in layer order (one for a uniform model, none for a dense one)."""
  out, first = [], 0
  for s, (shapes, steps) in enumerate(_segments(moe_schedule(cfg))):
    out.append(Stack(stack_name(s), first, steps, shapes))
    first += steps * len(shapes)
  return tuple(out)


def is_uniform(cfg: ml_collections.ConfigDict) -> bool:
  """Every MoE layer has moe.num_experts experts and top-k moe.top_k (one MoE stack)."""
  return all(s == (cfg.moe.num_experts, cfg.moe.top_k) for s in moe_schedule(cfg))


def require_uniform(cfg: ml_collections.ConfigDict, what: str) -> None:
  """ConfigError naming moe.layer_schedule.kind unless every MoE layer is alike."""
  if not is_uniform(cfg):
    shapes = [e for e, _ in moe_schedule(cfg)]
    ks = [k for _, k in moe_schedule(cfg)]
    fail(f"{SCHEDULE_KEY}.kind", cfg.moe.layer_schedule.kind,
         f"{what} needs every MoE layer to have moe.num_experts experts and moe.top_k; "
         f"this schedule gives experts {shapes}, top-k {ks}; allowed: kind='constant' "
         f"with {SCHEDULE_KEY}.top_k=''")


@functools.lru_cache(maxsize=128)
def _layer_moe(frozen: ml_collections.FrozenConfigDict, e: int, k: int
               ) -> ml_collections.FrozenConfigDict:
  moe = ml_collections.ConfigDict(frozen.to_dict())
  moe.num_experts, moe.top_k = e, k
  if "layer_schedule" in moe:
    moe.layer_schedule.kind, moe.layer_schedule.experts, moe.layer_schedule.top_k = (
        "constant", "", "")
  return ml_collections.FrozenConfigDict(moe)


def layer_moe(cfg_moe, shape: Shape) -> ml_collections.FrozenConfigDict:
  """The `moe` config of one MoE layer of `shape`: num_experts, top_k set, no schedule."""
  return _layer_moe(ml_collections.FrozenConfigDict(cfg_moe), *shape)


def layer_config(cfg: ml_collections.ConfigDict, shape: Shape) -> ml_collections.ConfigDict:
  """The full config with `moe` replaced by `layer_moe(cfg.moe, shape)` (counting, checks)."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe = ml_collections.ConfigDict(layer_moe(cfg.moe, shape).to_dict())
  return out


# --------------------------------------------------------------------------- locations


@dataclasses.dataclass(frozen=True)
class Column:
  """One MoE block of a stack's scan step, scanned over the steps: a run of identical
  MoE layers; `positions` are their indices in MoE-layer order, one per step."""

  stack: str
  block: str
  shape: Shape
  positions: tuple[int, ...]

  @property
  def path(self) -> tuple[str, str, str]:
    return (self.stack, self.block, MOE)


def moe_columns(cfg: ml_collections.ConfigDict) -> tuple[Column, ...]:
  """The MoE columns, stack by stack and block by block (the order of the per-column
  tuples of a scheduled model's aux)."""
  out = []
  for st in moe_stacks(cfg):
    for j, shape in enumerate(st.shapes):
      out.append(Column(st.name, f"block{j * cfg.moe.every}", shape,
                        tuple(st.first + step * st.per_step + j for step in range(st.steps))))
  return tuple(out)


def moe_layer_paths(cfg: ml_collections.ConfigDict) -> list[tuple[str, str, int]]:
  """(stack, block, step) of each MoE layer, in layer order."""
  out = []
  for st in moe_stacks(cfg):
    for step in range(st.steps):
      for j in range(st.per_step):
        out.append((st.name, f"block{j * cfg.moe.every}", step))
  return out


def layer_location(cfg: ml_collections.ConfigDict, layer: int) -> tuple[str, str, int]:
  """(scanned stack, block name, index along the stack) holding model layer `layer`."""
  n_dense, _ = layer_plan(cfg)
  if layer < n_dense:
    return DENSE_STACK, "block0", layer
  j = layer - n_dense
  every = cfg.moe.every
  p, offset = divmod(j, every)
  for st in moe_stacks(cfg):
    if p < st.first + st.num_layers:
      step, i = divmod(p - st.first, st.per_step)
      return st.name, f"block{i * every + offset}", step
  raise ValueError(f"layer={layer} is not a layer of this model "
                   f"(model.num_layers={cfg.model.num_layers})")


def is_moe_layer(cfg: ml_collections.ConfigDict, layer: int) -> bool:
  return layer in moe_layer_indices(cfg)


def moe_layer_indices(cfg: ml_collections.ConfigDict) -> list[int]:
  """Model layer index of each MoE layer, in layer order (the order of per-layer aux rows)."""
  n_dense, n_periods = layer_plan(cfg)
  return [n_dense + p * cfg.moe.every for p in range(n_periods)]


def layer_nodes(cfg: ml_collections.ConfigDict, tree: dict, sub: tuple = (),
                what: str = "tree") -> list[Any]:
  """Each MoE layer's node `tree[stack][block]["moe"][*sub]` at its scan step, in layer order."""
  import jax  # noqa: PLC0415 (layout itself is config arithmetic)

  return [jax.tree.map(lambda a, s=step: a[s], get(tree, (stack, block, MOE) + tuple(sub),
                                                   what))
          for stack, block, step in moe_layer_paths(cfg)]


def column_tree(columns: list[Any] | tuple, cfg: ml_collections.ConfigDict) -> dict:
  """{stack: {block: {"moe": value}}} from one value per MoE column (`moe_columns` order)."""
  out: dict = {}
  for c, value in zip(moe_columns(cfg), columns, strict=True):
    out.setdefault(c.stack, {})[c.block] = {MOE: value}
  return out


# --------------------------------------------------------------------------- trees


def get(tree: dict, path: tuple[str, ...], what: str = "tree") -> Any:
  """tree[path[0]][path[1]]...; a KeyError names the missing part."""
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, dict) or k not in node:
      raise KeyError(f"{what} has no {'/'.join(path[:i + 1])} (this model has no MoE "
                     "layers there)")
    node = node[k]
  return node


def has(tree: dict, path: tuple[str, ...]) -> bool:
  try:
    get(tree, path)
  except KeyError:
    return False
  return True


def replace(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  """A copy of `tree` with the node at `path` set (parents copied or created, siblings shared)."""
  if not path:
    return value
  return {**tree, path[0]: replace(tree.get(path[0], {}), path[1:], value)}


def moe_params(params: dict) -> dict:
  """The stacked MoE-layer params {router, experts, [shared, shared_gate]} (each leaf
  [P, ...]) of a model with one MoE stack (`require_uniform`)."""
  return get(params, MOE_PATH, "the parameter tree")

