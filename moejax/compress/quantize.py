"""Weight-only quantization of the routed experts, uniform or mixed precision per expert.

`quantize_run(cfg, variables, scheme, bits=b)` stores every expert of every
MoE layer at b bits; `quantize_run(..., avg_bits=B, calib=...)` chooses a
width per expert (8, 4 or 2 bits) under the budget of B bits per expert
weight on average. The result is a run whose moe.quant config and "quant"
collection hold the packed experts (moejax/moe/experts/quantized.py: the
format, the schemes sym / asym / fp8 and the model that runs on them); the
router, attention, shared experts and biases stay float.

Mixed precision. The layers are scanned, so every layer has the same shapes:
each layer holds n_b experts at b bits with the SAME n_b in every layer (the
bit classes), and which experts get which width is chosen per layer. From
the calibration inputs of each layer (calib.inputs_NxSxD) the sensitivity

  s[l, e, b] = mean over the S sampled tokens of ||y - y_float||^2,

the squared change of MoE layer l's output when expert e alone is stored at
b bits (the layer module itself, dispatch "dropless"; a token routed to e
contributes through its gate weight, an expert no token routes to costs
nothing, so the error is weighted by how often and how strongly each expert
is used). The allocation is the integer program (scipy.optimize.milp)

  minimise  sum_{l,e,b} s[l,e,b] x[l,e,b]
  subject to  sum_b x[l,e,b] = 1           (one width per expert)
              sum_e x[l,e,b] = n_b          (the same class sizes in every layer)
              sum_b b * n_b <= B * E        (the code budget: B bits per weight)
              x binary, n_b integer in [0, E].

Every expert has the same number of weights, and every width has the same
float16 scales (one per group, plus the zero per group for asym), so the
scales are a constant on top of the codes and the budget is on the codes.
`greedy_allocation` is a baseline (one expert per layer moved down one
width at a time, the cheapest move per bit saved); uniform allocation is
the case n_b = E.

Memory is reported measured: the .nbytes of the float32 expert arrays of
the source, of the quantized experts in the returned variable tree (codes,
scales, zeros, slot maps and any float leaves such as biases), and, once
tools/compress.py has written the run, of the same arrays as the checkpoint
gives them back.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moejax import layout
from moejax.checks import ConfigError
from moejax.compress.calibrate import Calibration
from moejax.compress.method import (Method, Option, Result, check_own_leaves,
                                    check_routed_experts, quant_scheme)
from moejax.compress.prune import _layer_cfg, _one_layer
from moejax.moe import layer as moe_layer
from moejax.moe.experts import get_family
from moejax.moe.experts import quantized as q

SCHEMES = q.SCHEMES
DEFAULT_GROUP_SIZE = 32
FLAGS = {"scheme": "--scheme", "bits": "--bits", "group_size": "--group-size",
         "avg_bits": "--avg-bits"}
NAMES = {k: k for k in FLAGS}  # how the library's errors call the options


@dataclasses.dataclass
class Quantized:
  """A quantized model, the width of every expert (per MoE layer in stack order) and, for
  mixed precision, the sensitivities [N, E, W] over `widths` and the objectives."""

  cfg: ml_collections.ConfigDict
  variables: dict
  layers: list[int]
  spec: q.QuantSpec
  bits_NxE: np.ndarray  # int64
  widths: tuple[int, ...]
  sensitivity_NxExW: np.ndarray | None = None
  objective: float | None = None
  greedy_objective: float | None = None


# --------------------------------------------------------------------------- checks


def check_quantizable(cfg: ml_collections.ConfigDict) -> None:
  """ValueError when `cfg`'s experts cannot be quantized (before any reading)."""
  check_routed_experts(cfg, "quantize")
  check_own_leaves(cfg, "quantization")
  scheme = quant_scheme(cfg)
  if scheme != "none":
    raise ValueError(f"moe.quant.scheme={scheme!r}: the run's experts are already quantized "
                     "(--method quantize); quantize its float source run instead")


def check_options(cfg: ml_collections.ConfigDict, scheme: Any, bits: Any, group_size: Any,
                  avg_bits: Any, names: dict[str, str] = NAMES) -> tuple[int, ...]:
  """Every check of `quantize_run` that needs no variables; returns the candidate widths
  (one for uniform allocation). `names` are how errors call the options."""
  check_quantizable(cfg)
  if scheme not in SCHEMES:
    raise ValueError(f"{names['scheme']}={scheme!r} is not a quantization scheme; allowed: "
                     f"{list(SCHEMES)}")
  allowed = q.SCHEME_WIDTHS[scheme]
  if (bits is None) == (avg_bits is None):
    raise ValueError(f"give exactly one of {names['bits']} (every expert at that width) and "
                     f"{names['avg_bits']} (a width per expert under that average); got "
                     f"{names['bits']}={bits!r}, {names['avg_bits']}={avg_bits!r}")
  if bits is not None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in allowed:
      raise ValueError(f"{names['bits']}={bits!r} is not a width of {names['scheme']}="
                       f"{scheme!r}; allowed: {list(allowed)} bits")
    widths = (int(bits),)
  else:
    if len(allowed) == 1:
      raise ValueError(f"{names['avg_bits']} needs several widths; {names['scheme']}="
                       f"{scheme!r} has one ({allowed[0]} bits): use {names['bits']} "
                       f"{allowed[0]}, or {names['scheme']} sym / asym")
    if (isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, float, np.floating))
        or not min(allowed) <= avg_bits <= max(allowed)):
      raise ValueError(f"{names['avg_bits']}={avg_bits!r} is unreachable: allowed: an average "
                       f"code width in [{min(allowed)}, {max(allowed)}] bits per weight (the "
                       f"widths {list(allowed)})")
    widths = tuple(allowed)
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or (
      group_size < 1):
    raise ValueError(f"{names['group_size']}={group_size!r}; allowed: a positive integer")
  sizes = {"D": cfg.model.d_model, "F": cfg.moe.expert_hidden}
  for name, leaf in get_family(cfg.moe).leaves().items():
    if q.quantizable(leaf) and sizes[leaf.fan_in] % group_size:
      raise ValueError(f"{names['group_size']}={group_size} does not divide the experts' "
                       f"{name} input dim {leaf.fan_in}={sizes[leaf.fan_in]} (groups run "
                       "along it); allowed: a divisor of it")
  for b in widths:
    if scheme != "fp8" and group_size % (8 // b):
      raise ValueError(f"{names['group_size']}={group_size} with {b}-bit experts: allowed: a "
                       f"multiple of {8 // b} ({8 // b} codes per byte)")
  counts = {b: 0 for b in widths}
  counts[max(widths)] = cfg.moe.num_experts
  quantized_config(cfg, scheme, group_size, counts)  # the config checks (moe.quant, parallel)
  return widths


def quantized_config(cfg: ml_collections.ConfigDict, scheme: str, group_size: int,
                     counts: dict[int, int]) -> ml_collections.ConfigDict:
  """`cfg` with moe.quant set ({bits: experts per layer}), checked."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe.quant.scheme = scheme
  out.moe.quant.group_size = int(group_size)
  for b in q.WIDTHS:
    out.moe.quant[f"experts{b}"] = int(counts.get(b, 0))
  try:
    moe_layer.check_config(out)
  except ConfigError as e:
    raise ValueError(f"the quantized run's config would be invalid: {e}") from None
  return out


def _check_calibration(cfg: ml_collections.ConfigDict, calib: Calibration | None
                       ) -> Calibration:
  if calib is None:
    raise ValueError("mixed precision (avg_bits) needs calibration statistics (a "
                     "moejax.compress.Calibration of this model) to measure sensitivities")
  layers = layout.moe_layer_indices(cfg)
  if list(calib.layers) != layers or calib.num_experts != cfg.moe.num_experts:
    raise ValueError(f"the calibration is of {calib.num_experts} experts in layers "
                     f"{list(calib.layers)}; this model has moe.num_experts="
                     f"{cfg.moe.num_experts} in MoE layers {layers}: calibrate this model")
  if calib.inputs_NxSxD.shape[1] == 0:
    raise ValueError("mixed precision needs sampled layer inputs; the calibration holds "
                     "none (max_tokens)")
  return calib


# --------------------------------------------------------------------------- allocation


def class_counts(bits_E: np.ndarray, widths: tuple[int, ...]) -> dict[int, int]:
  return {int(b): int(np.sum(np.asarray(bits_E) == b)) for b in widths}


def allocation_cost(sens_NxExW: np.ndarray, widths: tuple[int, ...],
                    bits_NxE: np.ndarray) -> float:
  """sum over layers and experts of s[l, e, width of e]."""
  idx = np.searchsorted(-np.asarray(widths), -np.asarray(bits_NxE))
  n, e = idx.shape
  return float(np.sum(np.asarray(sens_NxExW, np.float64)[np.arange(n)[:, None],
                                                         np.arange(e)[None], idx]))


def _budget_ok(counts: np.ndarray, widths: np.ndarray, avg_bits: float) -> bool:
  e = counts.sum()
  return float(np.dot(counts, widths)) <= avg_bits * e + 1e-9


def milp_allocation(sens_NxExW: np.ndarray, widths: tuple[int, ...], avg_bits: float
                    ) -> np.ndarray:
  """bits_NxE minimising the summed sensitivity with equal class sizes in every layer and
  sum_b b n_b <= avg_bits * E (module docstring); widths descending."""
  from scipy import sparse  # noqa: PLC0415
  from scipy.optimize import Bounds, LinearConstraint, milp  # noqa: PLC0415

  s = np.asarray(sens_NxExW, np.float64)
  n, e, w = s.shape
  wv = np.asarray(widths, np.float64)
  nx = n * e * w
  top = float(np.max(np.abs(s))) if s.size else 0.0
  c = np.concatenate([(s / top if top > 0 else s).ravel(), np.zeros(w)])
  x_index = np.arange(nx).reshape(n, e, w)
  one_rows = np.repeat(np.arange(n * e), w)
  one = sparse.csr_matrix((np.ones(nx), (one_rows, x_index.ravel())), shape=(n * e, nx + w))
  cls_rows = np.broadcast_to(np.arange(n)[:, None, None] * w + np.arange(w), (n, e, w))
  cls = sparse.csr_matrix(
      (np.concatenate([np.ones(nx), -np.ones(n * w)]),
       (np.concatenate([cls_rows.ravel(), np.arange(n * w)]),
        np.concatenate([x_index.ravel(), nx + np.tile(np.arange(w), n)]))),
      shape=(n * w, nx + w))
  budget = np.concatenate([np.zeros(nx), wv])[None]
  res = milp(c, integrality=np.ones(nx + w),
             bounds=Bounds(np.zeros(nx + w), np.concatenate([np.ones(nx), np.full(w, e)])),
             constraints=[LinearConstraint(one, 1, 1), LinearConstraint(cls, 0, 0),
                          LinearConstraint(budget, -np.inf, avg_bits * e + 1e-9)],
             options={"mip_rel_gap": 0.0})
  if res.status != 0 or res.x is None:
    raise RuntimeError(f"the bit allocation program found no optimum: {res.message}")
  x = np.round(res.x[:nx]).reshape(n, e, w)
  return np.asarray(widths, np.int64)[np.argmax(x, axis=-1)]


def greedy_allocation(sens_NxExW: np.ndarray, widths: tuple[int, ...], avg_bits: float
                      ) -> np.ndarray:
  """A baseline for `milp_allocation`: from every expert at the widest width, repeatedly
  move one expert per layer from class i to class i + 1 (the next narrower width), choosing
  per layer the expert whose sensitivity grows least (ties: lower index) and the class i
  whose move costs least per bit saved, until the budget holds."""
  s = np.asarray(sens_NxExW, np.float64)
  n, e, w = s.shape
  wv = np.asarray(widths)
  cls = np.zeros((n, e), np.int64)
  counts = np.zeros(w, np.int64)
  counts[0] = e
  while not _budget_ok(counts, wv, avg_bits):
    best = None
    for i in range(w - 1):
      if counts[i] == 0:
        continue
      picks, cost = [], 0.0
      for layer in range(n):
        here = np.flatnonzero(cls[layer] == i)
        delta = s[layer, here, i + 1] - s[layer, here, i]
        j = int(np.argmin(delta))
        picks.append(here[j])
        cost += float(delta[j])
      per_bit = cost / float(wv[i] - wv[i + 1])
      if best is None or per_bit < best[0]:
        best = (per_bit, i, picks)
    _, i, picks = best
    for layer, ex in enumerate(picks):
      cls[layer, ex] = i + 1
    counts[i] -= 1
    counts[i + 1] += 1
  return wv[cls].astype(np.int64)


# --------------------------------------------------------------------------- sensitivity


def _matrix_leaves(cfg_moe) -> dict:
  return {n: l for n, l in get_family(cfg_moe).leaves().items() if q.quantizable(l)}


@functools.lru_cache(maxsize=16)
def _sensitivity_fn(frozen: ml_collections.FrozenConfigDict, scheme: str, group_size: int,
                    widths: tuple[int, ...]):
  """jit(one-layer variables, x_SxD, e_C, w_C) -> [C] errors of candidate c: expert e_C[c]
  alone at widths[w_C[c]] (one candidate at a time: lax.map)."""
  e = frozen.moe.num_experts
  layer = moe_layer.MoELayer(_layer_cfg(frozen, e), frozen.model.dtype)
  leaves = _matrix_leaves(frozen.moe)

  def run(v, x_SxD):
    y, _, _ = layer.apply(v, x_SxD[None])
    return y[0]

  @jax.jit
  def fn(one, x_SxD, e_C, w_C):
    v = {name: jax.tree.map(lambda a: a[0], layout.get(tree, layout.MOE_PATH, name))
         for name, tree in one.items()}
    experts = v["params"][layout.EXPERTS]
    deq = {n: jnp.stack([q.dequantize(q.quantize(experts[n], b, scheme, group_size,
                                                 q.group_axis(leaf)),
                                      b, scheme, group_size, q.group_axis(leaf))
                         for b in widths]) for n, leaf in leaves.items()}
    y_full = run(v, x_SxD)

    def err(c):
      ex, wi = c
      new = dict(experts)
      for n, leaf in leaves.items():
        shape = [1] * len(leaf.dims)
        shape[leaf.expert_axis] = e
        mine = (jnp.arange(e) == ex).reshape(shape)
        new[n] = jnp.where(mine, deq[n][wi], experts[n])
      vv = {**v, "params": {**v["params"], layout.EXPERTS: new}}
      return jnp.mean(jnp.sum(jnp.square(run(vv, x_SxD) - y_full), axis=-1))

    return jax.lax.map(err, (e_C, w_C))

  return fn


def sensitivity(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration,
                scheme: str, group_size: int, widths: tuple[int, ...]) -> np.ndarray:
  """s [N, E, W]: layer n's output error on its calibration inputs when expert e alone is
  stored at widths[w] bits (module docstring)."""
  calib = _check_calibration(cfg, calib)
  fn = _sensitivity_fn(ml_collections.FrozenConfigDict(cfg), scheme, int(group_size),
                       tuple(widths))
  e, w = cfg.moe.num_experts, len(widths)
  e_C = jnp.asarray(np.repeat(np.arange(e), w), jnp.int32)
  w_C = jnp.asarray(np.tile(np.arange(w), e), jnp.int32)
  out = np.empty((len(calib.layers), e, w), np.float64)
  for n in range(len(calib.layers)):
    err = fn(_one_layer(variables, n), jnp.asarray(calib.inputs_NxSxD[n], jnp.float32),
             e_C, w_C)
    out[n] = np.asarray(err, np.float64).reshape(e, w)
  return out


# --------------------------------------------------------------------------- packing


@functools.lru_cache(maxsize=64)
def _pack_stack(leaf, spec: q.QuantSpec):
  return jax.jit(jax.vmap(lambda w, slot: q.pack_leaf(w, slot, leaf, spec)))


def quantize_experts(cfg: ml_collections.ConfigDict, variables: dict, spec: q.QuantSpec,
                     bits_NxE: np.ndarray) -> dict:
  """`variables` with the experts' matrix leaves moved from "params" into the packed "quant"
  collection (expert e of layer n at bits_NxE[n, e]); "intermediates" dropped."""
  params = variables["params"]
  moe = dict(layout.get(params, layout.MOE_PATH, "the parameter tree"))
  experts = moe.pop(layout.EXPERTS)
  slot_NxE = np.stack([q.slot_map(b, spec) for b in np.asarray(bits_NxE)])
  stored: dict[str, Any] = {q.SLOT: jnp.asarray(slot_NxE, jnp.int32)}
  kept = {}
  for name, leaf in get_family(cfg.moe).leaves().items():
    w = experts[name]
    if not q.quantizable(leaf):
      kept[name] = w
      continue
    if not np.isfinite(np.asarray(w)).all():
      raise ValueError(f"the experts' {name} holds non-finite values; they cannot be "
                       "quantized")
    stored[name] = _pack_stack(leaf, spec)(jnp.asarray(w, jnp.float32),
                                           jnp.asarray(slot_NxE))
    for key, part in stored[name].items():
      if not np.isfinite(np.asarray(part["scale"], np.float32)).all():
        raise ValueError(f"the experts' {name} ({key}) needs scales beyond float16's range "
                         f"({float(jnp.finfo(jnp.float16).max)}); they cannot be stored")
  if kept:
    moe[layout.EXPERTS] = kept
  out = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
  out["params"] = layout.replace(params, layout.MOE_PATH, moe)
  out[q.COLLECTION] = layout.replace({}, layout.EXPERTS_PATH, stored)
  return jax.device_get(out)


def nbytes(tree: Any) -> int:
  """Summed .nbytes of a tree's arrays."""
  return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree)))


def expert_bytes(variables: dict) -> dict[str, int]:
  """Measured bytes of the routed experts of a variable tree: {"codes", "scale", "zero",
  "slot", "float" (float leaves: the source's experts, or biases), "total"}."""
  out = {"codes": 0, "scale": 0, "zero": 0, "slot": 0, "float": 0}
  if layout.has(variables["params"], layout.EXPERTS_PATH):
    out["float"] = nbytes(layout.get(variables["params"], layout.EXPERTS_PATH))
  stored = variables.get(q.COLLECTION, {})
  if layout.has(stored, layout.EXPERTS_PATH):
    for name, node in layout.get(stored, layout.EXPERTS_PATH).items():
      if name == q.SLOT:
        out["slot"] += nbytes(node)
        continue
      for part in node.values():
        for key, a in part.items():
          out[key] += nbytes(a)
  out["total"] = sum(out.values())
  return out


# --------------------------------------------------------------------------- entry point


def quantize_run(cfg: ml_collections.ConfigDict, variables: dict, scheme: str = "sym",
                 bits: int | None = None, group_size: int = DEFAULT_GROUP_SIZE,
                 avg_bits: float | None = None, calib: Calibration | None = None
                 ) -> Quantized:
  """Quantize the routed experts: all at `bits`, or a width per expert under `avg_bits`
  (then `calib`, the model's Calibration, is needed). Options are checked first."""
  widths = check_options(cfg, scheme, bits, group_size, avg_bits)
  layers = layout.moe_layer_indices(cfg)
  e = cfg.moe.num_experts
  sens = objective = greedy = None
  if avg_bits is None:
    bits_NxE = np.full((len(layers), e), int(bits), np.int64)
  else:
    sens = sensitivity(cfg, variables, calib, scheme, group_size, widths)
    bits_NxE = milp_allocation(sens, widths, float(avg_bits))
    objective = allocation_cost(sens, widths, bits_NxE)
    greedy = allocation_cost(sens, widths, greedy_allocation(sens, widths, float(avg_bits)))
  counts = class_counts(bits_NxE[0], widths)
  new_cfg = quantized_config(cfg, scheme, group_size, counts)
  spec = q.QuantSpec.from_config(new_cfg.moe)
  new_vars = quantize_experts(cfg, variables, spec, bits_NxE)
  return Quantized(cfg=new_cfg, variables=new_vars, layers=layers, spec=spec,
                   bits_NxE=bits_NxE, widths=widths, sensitivity_NxExW=sens,
                   objective=objective, greedy_objective=greedy)


# --------------------------------------------------------------------------- the CLI method


def _cli_check(cfg: ml_collections.ConfigDict, args) -> None:
  check_options(cfg, args.scheme, args.bits, args.group_size, args.avg_bits, FLAGS)


def _cli_apply(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration | None,
               args, previous: list[dict]) -> Result:
  del previous
  r = quantize_run(cfg, variables, args.scheme, args.bits, args.group_size, args.avg_bits,
                   calib)
  before, after = expert_bytes(variables), expert_bytes(r.variables)
  entry = {"scheme": args.scheme, "bits": args.bits, "avg_bits": args.avg_bits,
           "group_size": args.group_size, "scale_dtype": "float16",
           "classes": {str(b): n for b, n in r.spec.classes},
           "code_bits_per_weight": float(sum(b * n for b, n in r.spec.classes)
                                         / r.spec.num_experts),
           "expert_bits": {str(l): r.bits_NxE[i].tolist() for i, l in enumerate(r.layers)},
           "bytes": {"float32": before["float"], "live": after["total"],
                     "live_parts": {k: v for k, v in after.items() if k != "total"}}}
  arrays = {}
  if r.sensitivity_NxExW is not None:
    entry.update(widths=list(r.widths), objective=r.objective,
                 greedy_objective=r.greedy_objective)
    arrays["quant_sensitivity"] = r.sensitivity_NxExW
  return Result(r.cfg, r.variables, entry, arrays)


def _after_write(out: str, args) -> dict:
  """The experts' bytes as the written checkpoint gives them back."""
  del args
  from moejax.init.sources import load_run  # noqa: PLC0415

  params, collections, _ = load_run(out)
  return {"checkpoint_bytes": expert_bytes({"params": params, **collections})["total"]}


def _mib(n: int) -> str:
  return f"{n / 2 ** 20:.3f} MiB"


def _cli_describe(entry: dict) -> list[str]:
  classes = " + ".join(f"{n} at {b} bits" for b, n in entry["classes"].items())
  lines = [f"quantized the routed experts ({entry['scheme']}, group size "
           f"{entry['group_size']}, {entry['scale_dtype']} scales): per layer {classes} "
           f"({entry['code_bits_per_weight']:.3g} code bits per weight)"]
  if entry.get("avg_bits") is not None:
    lines.append(f"  allocation under --avg-bits {entry['avg_bits']}: summed sensitivity "
                 f"{entry['objective']:.4g} (greedy: {entry['greedy_objective']:.4g})")
    for layer, bits in entry["expert_bits"].items():
      lines.append(f"  layer {layer}: bits {bits}")
  b = entry["bytes"]
  ckpt = entry.get("checkpoint_bytes")
  lines.append(f"expert bytes: float32 {_mib(b['float32'])} -> live {_mib(b['live'])} "
               f"({b['float32'] / max(b['live'], 1):.2f}x smaller)"
               + ("" if ckpt is None else f", checkpoint {_mib(ckpt)}"))
  return lines


METHOD = Method(
    name="quantize",
    summary="weight-only quantization of the routed experts (moejax/compress/quantize.py)",
    options=(Option("--bits", {"type": int, "help": "every expert at this width: 8, 4 or 2 "
                                                   "(fp8: 8)"}),
             Option("--group-size", {"type": int, "default": DEFAULT_GROUP_SIZE,
                                     "help": "weights per float16 scale along each leaf's "
                                             f"input dim (default {DEFAULT_GROUP_SIZE})"}),
             Option("--scheme", {"default": "sym", "help": "sym, asym (group-wise integers) "
                                                           "or fp8 (e4m3); default sym"}),
             Option("--avg-bits", {"type": float, "help": "mixed precision: a width (8/4/2) "
                                                          "per expert from calibration "
                                                          "under this average"})),
    check=_cli_check, apply=_cli_apply, calibrates=lambda args: args.avg_bits is not None,
    describe=_cli_describe, after_write=_after_write)
