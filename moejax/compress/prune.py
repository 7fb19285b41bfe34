"""Expert pruning: the same MoE with fewer experts in every layer, chosen from calibration.

`prune(cfg, variables, criterion, remove=fraction, calib)` removes
round(fraction * moe.num_experts) experts from every MoE layer (the layers
are scanned, so moe.num_experts is one number for all of them; each layer
drops its own experts) and returns a new config and variables. Removing
expert e cuts it from every leaf of the expert family along the expert axis
the family declares (`Leaf.dims`, gathered as moejax/init/grow.py gathers
grown experts), its router column (w_gate [D, E], and w_noise of noisy top-k)
and its per-expert router state (the sigmoid_bias "bias" [E] in "moe_state").
The router then scores and renormalises over the remaining experts as it
would have had they been the only ones; the shared experts are untouched.

Criteria (per layer, from a `Calibration`):
  frequency: drop the experts that route the fewest calibration tokens (ties:
      the smaller summed gate weight, then the lower index);
  gate_weight: drop the smallest summed gate (combine) weight (ties: fewer
      tokens, then the lower index);
  output_error: greedy: repeatedly drop the expert whose removal changes the
      MoE layer output on the layer's calibration inputs least (mean over
      tokens of the squared L2 distance to the unpruned output), each
      candidate computed by the MoE layer module itself on the remaining
      experts (routing renormalised over them; dispatch "dropless", so no
      capacity drop blurs the comparison). Each layer is judged on its
      inputs in the unpruned model;
  random: a seeded baseline.

Routers: topk (plain or noisy; not grown groups of copies), sigmoid_bias and
group_limited. Routers whose experts form contiguous groups (group_limited,
sigmoid_bias with num_groups > 1) lose the same number of experts in every
group, so the groups stay contiguous and equal; output_error is refused for
them, since its one-at-a-time steps would pass through unequal groups.
Merged runs (moe.num_router_experts > moe.num_experts, moejax/compress/merge.py)
are refused: prune before merging.
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
from moejax.compress.method import (Method, Option, Result, check_routed_experts,
                                    quant_scheme)
from moejax.init import grow
from moejax.moe import chain
from moejax.moe import layer as moe_layer
from moejax.moe.experts import get_family

CRITERIA = ("frequency", "gate_weight", "output_error", "random")
PRUNABLE = ("topk", "sigmoid_bias", "group_limited")
MEANINGLESS = {
    "soft": "Soft MoE mixes every token into the slots of all experts (a SoftAssignment); "
            "there is no per-token choice of experts that could renormalise over the rest",
    "expert_choice": "experts choose their tokens (each its top C = ceil(capacity_factor * "
                     "S * top_k / E) of a group), so a removed expert's tokens are not "
                     "rerouted to the others, they just lose it, and every other expert's "
                     "capacity changes with moe.num_experts",
}
UNSUPPORTED = {
    "hash": "hash routing maps token ids onto the E experts by a fixed hash: with fewer "
            "experts every token's experts change, and it has no scores to renormalise",
}
ROUTER_LEAVES = ("w_gate", "w_noise")  # router params with a last expert axis
ROUTER_STATE = ("bias",)  # "moe_state" router entries with a last expert axis


@dataclasses.dataclass
class Pruned:
  """A pruned model and what was removed, per MoE layer in stack order (`layers`)."""

  cfg: ml_collections.ConfigDict
  variables: dict
  layers: list[int]
  criterion: str
  removed_NxR: np.ndarray  # int64, ascending per layer: old expert indices
  kept_NxK: np.ndarray  # int64, ascending: new expert j is old expert kept[n, j]
  scores_NxE: np.ndarray | None = None  # what frequency / gate_weight ranked by
  order_NxR: np.ndarray | None = None  # output_error: the removal order
  errors_NxR: np.ndarray | None = None  # output_error: the error after each removal


# --------------------------------------------------------------------------- checks


def check_prunable(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the option when `cfg`'s experts cannot be pruned."""
  check_routed_experts(cfg, "prune")
  moe = cfg.moe
  if moe_layer.has_expert_map(moe):
    raise ValueError(
        f"moe.num_router_experts={moe.num_router_experts} with moe.num_experts="
        f"{moe.num_experts}: the run's experts are merged (its router scores "
        f"{moe.num_router_experts} experts, mapped onto {moe.num_experts}); removing a merged "
        "expert would remove as many router experts as were merged into it, a different "
        "number in each layer, which the layers of one scanned stack cannot hold; prune "
        "before merging, or merge to fewer experts")
  if quant_scheme(cfg) != "none":
    raise ValueError(f"moe.quant.scheme={moe.quant.scheme!r}: the run's experts are "
                     "quantized (tools/compress.py --method quantize); prune the float run "
                     "before quantizing")
  if chain.rounds(moe) > 1:
    raise ValueError(f"moe.chain.rounds={chain.rounds(moe)}: pruning cuts the columns of one "
                     "router per MoE layer, not those of every Chain-of-Experts round; "
                     "allowed: 1")
  if moe.router in MEANINGLESS:
    raise ValueError(f"moe.router={moe.router!r}: pruning has no meaning: "
                     f"{MEANINGLESS[moe.router]}")
  if moe.router not in PRUNABLE:
    why = UNSUPPORTED.get(moe.router, "")
    raise ValueError(f"moe.router={moe.router!r} cannot be pruned; allowed: {list(PRUNABLE)} "
                     f"(a linear gate over the experts and top_k experts per token)"
                     + (f"; {why}" if why else ""))
  if moe.router == "topk":
    copies, groups = moe.topk.get("copies", 1), moe.topk.get("grown_groups", 0)
    if copies > 1 or groups > 0:
      raise ValueError(f"moe.topk.copies={copies} / moe.topk.grown_groups={groups}: a grown "
                       "MoE routes over groups of copies, which pruning would leave unequal "
                       "or empty; allowed: copies=1 and grown_groups=0")


def expert_groups(cfg: ml_collections.ConfigDict) -> tuple[str, int]:
  """(config key, count) of the router's contiguous expert groups that must stay equal
  in size; ("", 1) for routers without groups."""
  if cfg.moe.router == "group_limited":
    return "moe.group_limited.num_groups", int(cfg.moe.group_limited.num_groups)
  if cfg.moe.router == "sigmoid_bias" and cfg.moe.sigmoid_bias.num_groups > 1:
    return "moe.sigmoid_bias.num_groups", int(cfg.moe.sigmoid_bias.num_groups)
  return "", 1


def experts_to_remove(cfg: ml_collections.ConfigDict, remove: Any, name: str = "remove") -> int:
  """Experts to remove per layer, round(remove * moe.num_experts), checked; `name` is how
  errors call the fraction (the CLI's --remove)."""
  e, k = cfg.moe.num_experts, cfg.moe.top_k
  if (isinstance(remove, bool) or not isinstance(remove, (int, float, np.floating))
      or not 0 < remove < 1):
    raise ValueError(f"{name}={remove!r} is invalid: allowed: a fraction of each layer's "
                     "experts in (0, 1)")
  r = int(round(float(remove) * e))
  if r < 1:
    raise ValueError(f"{name}={remove!r} removes no expert of moe.num_experts={e} (rounded "
                     f"to the nearest integer); allowed: at least {0.5 / e:.3g}")
  if r >= e:
    raise ValueError(f"{name}={remove!r} removes all {e} experts of moe.num_experts={e} "
                     f"(rounded to the nearest integer); allowed: below {(e - 0.5) / e:.3g}")
  if e - r < k:
    raise ValueError(f"{name}={remove!r} leaves {e - r} experts per layer, fewer than "
                     f"moe.top_k={k}; allowed: at most {(e - k) / e:.3g} ({e - k} of {e})")
  key, g = expert_groups(cfg)
  if r % g:
    raise ValueError(f"{name}={remove!r} removes {r} of {e} experts per layer, which cannot "
                     f"be spread evenly over the {key}={g} contiguous expert groups of "
                     f"moe.router={cfg.moe.router!r}; allowed: a multiple of {g} experts")
  return r


def pruned_config(cfg: ml_collections.ConfigDict, num_kept: int) -> ml_collections.ConfigDict:
  """`cfg` with moe.num_experts = num_kept, checked; no init source (the run is its own)."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe.num_experts = int(num_kept)
  if "init" in out:  # upcycled / grown runs: their variables now live in the checkpoint
    out.init.from_dense = ""
    out.init.grow_from = ""
  try:
    moe_layer.check_config(out)
  except ConfigError as e:
    raise ValueError(f"pruning to moe.num_experts={num_kept} gives an invalid config: {e}"
                     ) from None
  return out


# --------------------------------------------------------------------------- choosing


def lowest(score_NxE: np.ndarray, remove: int, groups: int = 1,
           tiebreak_NxE: np.ndarray | None = None) -> np.ndarray:
  """removed_NxR: each layer's `remove` lowest-scoring experts, remove / groups per group.

  Ties go to the lower `tiebreak`, then to the lower expert index.
  """
  score_NxE = np.asarray(score_NxE, np.float64)
  n, e = score_NxE.shape
  tie_NxE = np.zeros_like(score_NxE) if tiebreak_NxE is None else np.asarray(tiebreak_NxE,
                                                                             np.float64)
  group_E = np.arange(e) * groups // e
  out = np.empty((n, remove), np.int64)
  for i in range(n):
    order = np.lexsort((np.arange(e), tie_NxE[i], score_NxE[i]))
    left = np.full(groups, remove // groups)
    picked = []
    for j in order:
      if left[group_E[j]] > 0:
        left[group_E[j]] -= 1
        picked.append(j)
    out[i] = np.sort(picked)
  return out


def random_removal(num_layers: int, num_experts: int, remove: int, groups: int = 1,
                   seed: int = 0) -> np.ndarray:
  """removed_NxR drawn uniformly (seeded), remove / groups per group, per layer."""
  rng = np.random.default_rng(seed)
  size = num_experts // groups
  out = np.empty((num_layers, remove), np.int64)
  for i in range(num_layers):
    out[i] = np.sort(np.concatenate([
        g * size + rng.choice(size, remove // groups, replace=False) for g in range(groups)]))
  return out


def kept_experts(num_experts: int, removed_NxR: np.ndarray) -> np.ndarray:
  """kept_NxK: each layer's remaining experts, ascending."""
  removed_NxR = np.asarray(removed_NxR, np.int64)
  return np.stack([np.setdiff1d(np.arange(num_experts), r) for r in removed_NxR])


# --------------------------------------------------------------------------- cutting


def _take_last(a_PxE: jax.Array, idx_PxK: jax.Array) -> jax.Array:
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=-1))(a_PxE, idx_PxK)


def keep_experts(cfg: ml_collections.ConfigDict, variables: dict,
                 keep_PxK: np.ndarray | jax.Array) -> dict:
  """`variables` with MoE period p's new expert j = old expert keep_PxK[p, j] (jittable).

  Expert leaves and router columns go through `grow.grow_params` (no
  noise); the router's per-expert state is gathered along its expert axis.
  The "intermediates" collection is dropped.
  """
  params = variables["params"]
  moe = layout.moe_params(params)
  router = moe[layout.ROUTER]
  extra = sorted(set(router) - set(ROUTER_LEAVES))
  if extra:
    raise ValueError(f"moe.router={cfg.moe.router!r} has router params {extra} that pruning "
                     f"cannot cut; it knows {list(ROUTER_LEAVES)}")
  idx = jnp.asarray(keep_PxK, jnp.int32)
  core = layout.replace(params, layout.ROUTER_PATH, {"w_gate": router["w_gate"]})
  out = {"params": grow.grow_params(core, idx, family=get_family(cfg.moe))}
  if "w_noise" in router:
    out["params"] = layout.replace(out["params"], layout.ROUTER_PATH + ("w_noise",),
                                   _take_last(router["w_noise"], idx))
  for name, tree in variables.items():
    if name in ("params", "intermediates"):
      continue
    if layout.has(tree, layout.MOE_PATH):
      node = layout.get(tree, layout.MOE_PATH, name)
      bad = [k for k in node if k != layout.ROUTER] + [
          f"router/{k}" for k in node.get(layout.ROUTER, {}) if k not in ROUTER_STATE]
      if bad:
        raise ValueError(f"collection {name!r} holds {bad} in the MoE layers, which pruning "
                         f"cannot cut; it knows router/{list(ROUTER_STATE)}")
      tree = layout.replace(tree, layout.MOE_PATH, {layout.ROUTER: {
          k: _take_last(v, idx) for k, v in node.get(layout.ROUTER, {}).items()}})
    out[name] = tree
  return out


# --------------------------------------------------------------------------- output error


def _layer_cfg(frozen: ml_collections.FrozenConfigDict, num_experts: int):
  moe = ml_collections.ConfigDict(frozen.moe.to_dict())
  moe.num_experts = num_experts
  moe.dispatch = "dropless"
  return ml_collections.FrozenConfigDict(moe)


def _one_layer(variables: dict, p: int) -> dict:
  """Period p's MoE variables as a one-period stack ({collection: tree with [1, ...] leaves})."""
  out = {}
  for name, tree in variables.items():
    if name != "intermediates" and layout.has(tree, layout.MOE_PATH):
      node = jax.tree.map(lambda a: a[p:p + 1], layout.get(tree, layout.MOE_PATH, name))
      out[name] = layout.replace({}, layout.MOE_PATH, node)
  return out


@functools.lru_cache(maxsize=64)
def _layer_fn(frozen: ml_collections.FrozenConfigDict, num_kept: int):
  """jit(one-layer variables, x_SxD, y_SxD, keep_CxK) -> ([C] errors, [S, D] output of keep 0).

  Candidate c keeps the num_kept experts keep_CxK[c] (one candidate at a
  time: lax.map, so memory holds one pruned copy); its error is the mean over
  tokens of ||MoE layer output - y||^2.
  """
  layer = moe_layer.MoELayer(_layer_cfg(frozen, num_kept), frozen.model.dtype)

  def apply(one, x_SxD, keep_K):
    cut = keep_experts(frozen, one, keep_K[None])
    v = {name: jax.tree.map(lambda a: a[0], layout.get(tree, layout.MOE_PATH, name))
         for name, tree in cut.items()}
    y, _, _ = layer.apply(v, x_SxD[None])
    return y[0]

  @jax.jit
  def fn(one, x_SxD, y_SxD, keep_CxK):
    def err(keep_K):
      return jnp.mean(jnp.sum(jnp.square(apply(one, x_SxD, keep_K) - y_SxD), axis=-1))
    return jax.lax.map(err, keep_CxK), apply(one, x_SxD, keep_CxK[0])

  return fn


def layer_output(cfg: ml_collections.ConfigDict, variables: dict, p: int, x_SxD: np.ndarray,
                 keep_K: np.ndarray | None = None) -> np.ndarray:
  """[S, D] output of MoE period p's layer on x, keeping experts keep_K (default: all)."""
  e = cfg.moe.num_experts
  keep = np.arange(e) if keep_K is None else np.asarray(keep_K)
  fn = _layer_fn(ml_collections.FrozenConfigDict(cfg), int(keep.size))
  x = jnp.asarray(x_SxD, jnp.float32)
  _, y = fn(_one_layer(variables, p), x, jnp.zeros_like(x), jnp.asarray(keep[None], jnp.int32))
  return np.asarray(y)


def greedy_output_error(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration,
                        remove: int) -> tuple[np.ndarray, np.ndarray]:
  """(removed_NxR in removal order, error_NxR after each removal) of the greedy.

  Step i of layer n removes, of the experts still there, the one whose
  removal gives the smallest error against the unpruned layer output on
  calib.inputs_NxSxD[n] (ties: the lower index).
  """
  frozen = ml_collections.FrozenConfigDict(cfg)
  e = cfg.moe.num_experts
  removed = np.empty((len(calib.layers), remove), np.int64)
  errors = np.empty((len(calib.layers), remove), np.float64)
  for n in range(len(calib.layers)):
    one = _one_layer(variables, n)
    x = jnp.asarray(calib.inputs_NxSxD[n], jnp.float32)
    y_full = jnp.asarray(layer_output(cfg, variables, n, calib.inputs_NxSxD[n]))
    kept = list(range(e))
    for i in range(remove):
      keep_CxK = np.asarray([[j for j in kept if j != c] for c in kept], np.int32)
      err_C, _ = _layer_fn(frozen, len(kept) - 1)(one, x, y_full, jnp.asarray(keep_CxK))
      best = int(np.argmin(np.asarray(err_C, np.float64)))
      removed[n, i], errors[n, i] = kept[best], float(err_C[best])
      kept.pop(best)
  return removed, errors


# --------------------------------------------------------------------------- entry point


def _check_calibration(cfg: ml_collections.ConfigDict, calib: Calibration | None,
                       criterion: str) -> Calibration:
  if calib is None:
    raise ValueError(f"criterion={criterion!r} needs calibration statistics (a "
                     "moejax.compress.Calibration of this model); only 'random' does not")
  layers = layout.moe_layer_indices(cfg)
  if list(calib.layers) != layers or calib.num_experts != cfg.moe.num_experts:
    raise ValueError(f"the calibration is of {calib.num_experts} experts in layers "
                     f"{list(calib.layers)}; this model has moe.num_experts="
                     f"{cfg.moe.num_experts} in MoE layers {layers}: calibrate this model")
  if criterion == "output_error" and calib.inputs_NxSxD.shape[1] == 0:
    raise ValueError("criterion='output_error' needs sampled layer inputs; the calibration "
                     "holds none (max_tokens)")
  return calib


def check_options(cfg: ml_collections.ConfigDict, criterion: str, remove: Any, seed: Any = 0,
                  name: str = "remove") -> int:
  """Every check of `prune` that needs no variables; returns the experts to remove per layer.

  `name` is how errors call the fraction (the CLI's --remove).
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion={criterion!r}; allowed: {list(CRITERIA)}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r}; allowed: a non-negative integer")
  check_prunable(cfg)
  r = experts_to_remove(cfg, remove, name)
  key, g = expert_groups(cfg)
  if criterion == "output_error" and g > 1:
    raise ValueError(f"criterion='output_error' with {key}={g}: its one-at-a-time steps "
                     "would leave expert groups of unequal size, which the router cannot "
                     f"run; allowed here: {[c for c in CRITERIA if c != 'output_error']}")
  pruned_config(cfg, cfg.moe.num_experts - r)
  return r


def prune(cfg: ml_collections.ConfigDict, variables: dict, criterion: str, remove: float,
          calib: Calibration | None = None, seed: int = 0) -> Pruned:
  """Remove round(remove * moe.num_experts) experts from every MoE layer by `criterion`.

  calib: the model's `Calibration` (not needed by "random"); `seed` draws
  the random baseline. Every option is checked before anything is computed.
  """
  r = check_options(cfg, criterion, remove, seed)
  e, (_, g) = cfg.moe.num_experts, expert_groups(cfg)
  new_cfg = pruned_config(cfg, e - r)
  if criterion != "random":
    calib = _check_calibration(cfg, calib, criterion)
  layers = layout.moe_layer_indices(cfg)
  scores = order = errors = None
  if criterion == "random":
    removed = random_removal(len(layers), e, r, g, int(seed))
  elif criterion == "frequency":
    scores = calib.counts_NxE
    removed = lowest(scores, r, g, calib.gate_NxE)
  elif criterion == "gate_weight":
    scores = calib.gate_NxE
    removed = lowest(scores, r, g, calib.counts_NxE)
  else:
    order, errors = greedy_output_error(cfg, variables, calib, r)
    removed = np.sort(order, axis=1)
  kept = kept_experts(e, removed)
  new_vars = jax.device_get(keep_experts(cfg, variables, kept))
  return Pruned(cfg=new_cfg, variables=new_vars, layers=layers, criterion=criterion,
                removed_NxR=removed, kept_NxK=kept, scores_NxE=scores, order_NxR=order,
                errors_NxR=errors)


# --------------------------------------------------------------------------- the CLI method


def _share(part, total) -> float:
  return float(part / total) if total > 0 else 0.0


def _cli_check(cfg: ml_collections.ConfigDict, args) -> None:
  if args.criterion not in CRITERIA:
    raise ValueError(f"--criterion {args.criterion!r} is not a pruning criterion; allowed: "
                     f"{list(CRITERIA)}")
  check_options(cfg, args.criterion, args.remove, args.seed, "--remove")


def _cli_apply(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration | None,
               args, previous: list[dict]) -> Result:
  pruned = prune(cfg, variables, args.criterion, args.remove, calib, args.seed)
  prev_kept = previous[-1].get("kept_original") if previous else None
  entry = {"criterion": args.criterion, "remove": args.remove, "seed": args.seed,
           "num_experts_before": cfg.moe.num_experts,
           "num_experts_after": pruned.cfg.moe.num_experts,
           "removed_per_layer": int(pruned.removed_NxR.shape[1]),
           "removed": {}, "kept": {}, "kept_original": {}, "removed_share": {}}
  for i, layer in enumerate(pruned.layers):
    key = str(layer)
    rm, kept = pruned.removed_NxR[i], pruned.kept_NxK[i]
    entry["removed"][key] = rm.tolist()
    entry["kept"][key] = kept.tolist()
    entry["kept_original"][key] = ([prev_kept[key][j] for j in kept] if prev_kept
                                   else kept.tolist())
    if calib is not None:
      entry["removed_share"][key] = {
          "tokens": _share(calib.counts_NxE[i, rm].sum(), calib.counts_NxE[i].sum()),
          "gate_weight": _share(calib.gate_NxE[i, rm].sum(), calib.gate_NxE[i].sum())}
  if pruned.order_NxR is not None:
    entry["removal_order"] = {str(l): pruned.order_NxR[i].tolist()
                              for i, l in enumerate(pruned.layers)}
    entry["output_error"] = {str(l): np.asarray(pruned.errors_NxR[i]).tolist()
                             for i, l in enumerate(pruned.layers)}
  return Result(pruned.cfg, pruned.variables, entry)


def _cli_describe(entry: dict) -> list[str]:
  lines = [f"pruned {entry['removed_per_layer']} of {entry['num_experts_before']} experts per "
           f"layer ({entry['criterion']}): moe.num_experts {entry['num_experts_before']} -> "
           f"{entry['num_experts_after']}"]
  for layer, removed in entry["removed"].items():
    share = entry["removed_share"].get(layer)
    lines.append(f"  layer {layer}: removed {removed}" + (
        "" if share is None else f" (their share: tokens {100 * share['tokens']:.1f}%, "
                                 f"gate weight {100 * share['gate_weight']:.1f}%)"))
  return lines


METHOD = Method(
    name="prune", summary="remove experts by a criterion (moejax/compress/prune.py)",
    options=(Option("--criterion", {"required": True,
                                    "help": f"which experts go: {', '.join(CRITERIA)}"}),
             Option("--remove", {"required": True, "type": float,
                                 "help": "fraction of each layer's experts to remove, in "
                                         "(0, 1)"})),
    check=_cli_check, apply=_cli_apply,
    describe=_cli_describe)
