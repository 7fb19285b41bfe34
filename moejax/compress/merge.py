"""Expert merging: each MoE layer's E experts averaged into N, the router left as it was.

`merge(cfg, variables, calib, to=N)` turns every MoE layer's E experts into
N merged experts (MC-SMoE's recipe: group, align, frequency-weighted average)
and returns a new config and variables:

Grouping (per layer): the N anchors are the N most frequent experts of the
calibration (`calib.counts`; ties: the larger summed gate weight, then the
lower index). Every other expert joins the anchor it is most similar to
(ties: the lower anchor index); an anchor never joins another, so the N
groups partition the experts and none is empty. Merged expert j is the group
of the j-th anchor in ascending index order. Similarity (`group_by`):
  router_logits: cosine similarity, over the calibration's sampled tokens, of
      the experts' router-logit columns, logits = inputs @ w_gate (the
      router's clean linear gate over its R experts; for an already merged
      expert, the log-sum-exp of the logits of the router experts mapped to
      it, which is its logit when it has one);
  weights: cosine similarity of the experts' concatenated, flattened leaves
      (sensitive to the order of the hidden neurons; router_logits is not).

Alignment (`align`, on by default): the F hidden neurons of every group
member are permuted to match the anchor's: the permutation maximising the
summed Pearson correlation of matched neurons (the Hungarian algorithm,
scipy.optimize.linear_sum_assignment). A neuron's features (`align_by`):
  weights: its slices of every family leaf with an F axis, concatenated
      (swiglu: its w_gate and w_up columns and its w_down row);
  activations: its hidden activation on the calibration's sampled inputs of
      the layer (found through the family's output leaf, which is linear:
      the output's derivative along a one-hot direction of that leaf).
Permuting F in every leaf with an F axis leaves an expert's function as it
was.

Averaging: merged leaf = sum over the group of w_e * aligned leaf_e, with
w_e proportional to max(count_e, ZERO_COUNT_FLOOR) (calibration tokens), so
a group of unused experts still averages (equally).

Routing: the router keeps scoring its R experts (R = E of an unmerged run)
and picking top-k among them; each MoE layer maps the chosen ids onto the
merged experts (moe.num_router_experts = R, the "expert_map" collection of
moejax/moe/layer.py), so the merged model routes every token as the source
did. Merging a merged run composes the maps.

Routers: topk (not grown groups of copies), sigmoid_bias and group_limited
(a linear gate and a sparse choice of expert ids a map can redirect). The
router's expert groups (group_limited, sigmoid_bias num_groups) stay as
they were: they group the router's experts, which merging does not change.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.optimize

from moejax import layout
from moejax.checks import ConfigError
from moejax.compress.calibrate import Calibration
from moejax.compress.method import (Method, Option, Result, check_own_leaves,
                                    check_routed_experts, quant_scheme)
from moejax.moe import chain
from moejax.moe import layer as moe_layer
from moejax.moe.experts import ExpertFamily, get_family

GROUP_BY = ("router_logits", "weights")
ALIGN_BY = ("weights", "activations")
MERGEABLE = ("topk", "sigmoid_bias", "group_limited")
ZERO_COUNT_FLOOR = 1e-2  # tokens: the averaging weight of an expert no token chose
NOT_MERGEABLE = {
    "soft": "Soft MoE mixes every token into slots of all experts (a SoftAssignment): there "
            "are no per-token expert ids to map onto merged experts",
    "expert_choice": "experts choose their tokens, each its top C of a group, so experts of "
                     "one group would fill one merged expert's buffer with duplicates and "
                     "every capacity depends on moe.num_experts",
    "hash": "hash routing has no scores: nothing to group the experts by, and its fixed "
            "hash over moe.num_experts would change with it",
}


@dataclasses.dataclass
class Merged:
  """A merged model and how it was built, per MoE layer in stack order (`layers`).

  Expert indices are those of the source model (its moe.num_experts experts).
  """

  cfg: ml_collections.ConfigDict
  variables: dict
  layers: list[int]
  anchors_NxG: np.ndarray  # int64, ascending: the anchor of merged expert j
  group_NxE: np.ndarray  # int64: the merged expert each source expert went into
  weights_NxE: np.ndarray  # float64: each expert's averaging weight within its group
  perm_NxExF: np.ndarray | None  # int64: aligned expert e = expert e's neurons perm[e]
  map_NxR: np.ndarray  # int32: the new router-expert -> merged-expert map

  def groups(self, n: int) -> list[list[int]]:
    """Layer n's groups (ascending source indices), in merged-expert order."""
    return [np.flatnonzero(self.group_NxE[n] == j).tolist()
            for j in range(self.anchors_NxG.shape[1])]


# --------------------------------------------------------------------------- checks


def check_mergeable(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the option when `cfg`'s experts cannot be merged."""
  check_routed_experts(cfg, "merge")
  check_own_leaves(cfg, "merging")
  moe = cfg.moe
  if quant_scheme(cfg) != "none":
    raise ValueError(f"moe.quant.scheme={moe.quant.scheme!r}: the experts are quantized codes; "
                     "merging averages float weights: merge before quantizing")
  if chain.rounds(moe) > 1:
    raise ValueError(f"moe.chain.rounds={chain.rounds(moe)}: merging groups the experts by "
                     "one router per MoE layer, not by every Chain-of-Experts round's; "
                     "allowed: 1")
  if moe.router not in MERGEABLE:
    why = NOT_MERGEABLE.get(moe.router, "its choices are not a fixed top-k of a linear gate's "
                                        "expert ids")
    raise ValueError(f"moe.router={moe.router!r} cannot be merged: {why}; allowed: "
                     f"{list(MERGEABLE)}")
  if moe.router == "topk":
    copies, groups = moe.topk.get("copies", 1), moe.topk.get("grown_groups", 0)
    if copies > 1 or groups > 0:
      raise ValueError(f"moe.topk.copies={copies} / moe.topk.grown_groups={groups}: a grown "
                       "MoE routes over groups of copies, a map of its own; allowed: copies=1 "
                       "and grown_groups=0")


def merged_config(cfg: ml_collections.ConfigDict, to: int) -> ml_collections.ConfigDict:
  """`cfg` with moe.num_experts = to and the router's R experts kept, checked; no init source."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.moe.num_router_experts = moe_layer.router_experts(cfg.moe)
  out.moe.num_experts = int(to)
  if "init" in out:  # upcycled / grown runs: their variables now live in the checkpoint
    out.init.from_dense = ""
    out.init.grow_from = ""
  try:
    moe_layer.check_config(out)
  except ConfigError as e:
    raise ValueError(f"merging to moe.num_experts={to} gives an invalid config: {e}") from None
  return out


def _output_leaf(family: ExpertFamily) -> str | None:
  """The family's output leaf of axes (F, D) besides E (the down projection), if exactly one."""
  names = [k for k, leaf in family.leaves().items()
           if leaf.output and sorted(d for d in leaf.dims if d != "E") == ["D", "F"]]
  return names[0] if len(names) == 1 else None


def check_options(cfg: ml_collections.ConfigDict, to: Any, align: Any = True,
                  group_by: str = "router_logits", align_by: str = "weights",
                  names: dict | None = None) -> int:
  """Every check of `merge` that needs no variables; returns `to`.

  `names` maps an option to how errors call it (the CLI's flags).
  """
  name = {"to": "to", "align": "align", "group_by": "group_by", "align_by": "align_by",
          **(names or {})}
  if group_by not in GROUP_BY:
    raise ValueError(f"{name['group_by']}={group_by!r}; allowed: {list(GROUP_BY)}")
  if align_by not in ALIGN_BY:
    raise ValueError(f"{name['align_by']}={align_by!r}; allowed: {list(ALIGN_BY)}")
  if not isinstance(align, (bool, np.bool_)):
    raise ValueError(f"{name['align']}={align!r}; allowed: True or False")
  check_mergeable(cfg)
  e = cfg.moe.num_experts
  if isinstance(to, bool) or not isinstance(to, (int, np.integer)) or not 1 <= to < e:
    raise ValueError(f"{name['to']}={to!r} is invalid: allowed: an integer number of merged "
                     f"experts per layer in [1, {e - 1}] (fewer than moe.num_experts={e})")
  family = get_family(cfg.moe)
  if align and not any("F" in leaf.dims for leaf in family.leaves().values()):
    raise ValueError(f"{name['align']}: moe.expert={cfg.moe.expert!r} has no leaf with a "
                     "hidden (F) axis to align; merge without alignment")
  if align and align_by == "activations" and _output_leaf(family) is None:
    raise ValueError(f"{name['align_by']}='activations' needs one output leaf with F and D "
                     f"axes (the down projection); moe.expert={cfg.moe.expert!r} has "
                     f"{[k for k, l in family.leaves().items() if l.output]}")
  merged_config(cfg, int(to))
  return int(to)


def _check_calibration(cfg: ml_collections.ConfigDict, calib: Calibration | None,
                       needs_inputs: list[str]) -> Calibration:
  if calib is None:
    raise ValueError("merging needs calibration statistics (a moejax.compress.Calibration of "
                     "this model): the anchors and the averaging weights are its counts")
  layers = layout.moe_layer_indices(cfg)
  if list(calib.layers) != layers or calib.num_experts != cfg.moe.num_experts:
    raise ValueError(f"the calibration is of {calib.num_experts} experts in layers "
                     f"{list(calib.layers)}; this model has moe.num_experts="
                     f"{cfg.moe.num_experts} in MoE layers {layers}: calibrate this model")
  if needs_inputs and calib.inputs_NxSxD.shape[1] == 0:
    raise ValueError(f"{' and '.join(needs_inputs)} need sampled layer inputs; the "
                     "calibration holds none (max_tokens)")
  return calib


# --------------------------------------------------------------------------- grouping


def router_logit_features(x_SxD: np.ndarray, w_gate_DxR: np.ndarray, map_R: np.ndarray,
                          num_experts: int) -> np.ndarray:
  """[S, E] float64: each expert's router logit on each token (log-sum-exp of the logits of
  the router experts mapped to it; an expert no router expert maps to gets -inf)."""
  logits_SxR = np.asarray(x_SxD, np.float64) @ np.asarray(w_gate_DxR, np.float64)
  out = np.full((logits_SxR.shape[0], num_experts), -np.inf)
  for e in range(num_experts):
    cols = np.flatnonzero(np.asarray(map_R) == e)
    if cols.size:
      out[:, e] = np.logaddexp.reduce(logits_SxR[:, cols], axis=1)
  return out


def cosine_similarity(a_ExK: np.ndarray) -> np.ndarray:
  """[E, E] cosine similarity of the rows (0 where a row is zero or not finite)."""
  a = np.asarray(a_ExK, np.float64)
  a = np.where(np.isfinite(a).all(axis=1, keepdims=True), a, 0.0)
  norm = np.linalg.norm(a, axis=1)
  safe = np.where(norm > 0, norm, 1.0)
  u = a / safe[:, None]
  return u @ u.T


def weight_similarity(leaves_ExK: list[np.ndarray]) -> np.ndarray:
  """[E, E] cosine similarity of the experts' leaves, flattened and concatenated (given as
  one [E, ...] array per leaf, accumulated leaf by leaf)."""
  e = leaves_ExK[0].shape[0]
  dots = np.zeros((e, e))
  for leaf in leaves_ExK:
    flat = np.asarray(leaf, np.float64).reshape(e, -1)
    dots += flat @ flat.T
  norm = np.sqrt(np.diag(dots))
  safe = np.where(norm > 0, norm, 1.0)
  return dots / safe[:, None] / safe[None, :]


def choose_anchors(counts_E: np.ndarray, n: int, gate_E: np.ndarray | None = None
                   ) -> np.ndarray:
  """The n most frequent experts, ascending (ties: larger gate weight, then lower index)."""
  counts_E = np.asarray(counts_E, np.float64)
  gate_E = np.zeros_like(counts_E) if gate_E is None else np.asarray(gate_E, np.float64)
  order = np.lexsort((np.arange(counts_E.size), -gate_E, -counts_E))
  return np.sort(order[:n])


def assign_groups(sim_ExE: np.ndarray, anchors_G: np.ndarray) -> np.ndarray:
  """[E] int64 group of each expert: an anchor's is its own position in `anchors_G`
  (ascending); every other expert goes to its most similar anchor (ties: lower index)."""
  sim_ExE = np.asarray(sim_ExE, np.float64)
  anchors_G = np.asarray(anchors_G, np.int64)
  group_E = np.argmax(sim_ExE[:, anchors_G], axis=1).astype(np.int64)
  group_E[anchors_G] = np.arange(anchors_G.size)
  return group_E


def compose_map(map_R: np.ndarray, group_E: np.ndarray) -> np.ndarray:
  """[R] int32: router expert r -> the merged expert its (source) expert went into."""
  return np.asarray(group_E, np.int64)[np.asarray(map_R, np.int64)].astype(np.int32)


# --------------------------------------------------------------------------- alignment


def neuron_weight_features(expert: dict[str, np.ndarray], family: ExpertFamily) -> np.ndarray:
  """[F, K] float32: each hidden neuron's slices of every leaf with an F axis (one expert's
  leaves, without the E axis), concatenated."""
  parts = []
  for name, leaf in family.leaves().items():
    dims = [d for d in leaf.dims if d != "E"]
    if "F" in dims:
      a = np.moveaxis(np.asarray(expert[name], np.float32), dims.index("F"), 0)
      parts.append(a.reshape(a.shape[0], -1))
  return np.concatenate(parts, axis=1)


@functools.lru_cache(maxsize=16)
def _hidden_fn(family: ExpertFamily, out_name: str):
  leaf = family.leaves()[out_name]
  dims = [d for d in leaf.dims if d != "E"]

  @jax.jit
  def fn(expert: dict, x_SxD: jax.Array, block: jax.Array) -> jax.Array:
    """[S, D]: hidden activations of neurons block * D + d (0 past F)."""
    w_out = expert[out_name]
    f, d = w_out.shape[dims.index("F")], w_out.shape[dims.index("D")]
    eye_FxD = (jnp.arange(f)[:, None] == block * d + jnp.arange(d)[None, :]).astype(
        w_out.dtype)
    tangent = eye_FxD if dims == ["F", "D"] else eye_FxD.T

    def out(w):
      w_E = {k: jnp.expand_dims(v, family.leaves()[k].expert_axis)
             for k, v in {**expert, out_name: w}.items()}
      return family.batched(w_E, x_SxD[None], jnp.float32)[0]

    return jax.jvp(out, (w_out,), (tangent,))[1]

  return fn


def hidden_activations(expert: dict[str, np.ndarray], family: ExpertFamily,
                       x_SxD: np.ndarray) -> np.ndarray:
  """[S, F] float32 hidden activations of one expert on x: the output is linear in the
  family's output leaf W [F, D], so its derivative along W = one-hot(f, d) is h_f at d."""
  out_name = _output_leaf(family)
  leaf = family.leaves()[out_name]
  dims = [d for d in leaf.dims if d != "E"]
  w_out = np.asarray(expert[out_name])
  f, d = w_out.shape[dims.index("F")], w_out.shape[dims.index("D")]
  fn = _hidden_fn(family, out_name)
  w = {k: jnp.asarray(v, jnp.float32) for k, v in expert.items()}
  x = jnp.asarray(x_SxD, jnp.float32)
  blocks = [np.asarray(fn(w, x, jnp.int32(j))) for j in range(-(-f // d))]
  return np.concatenate(blocks, axis=1)[:, :f]


def correlation(a_FxK: np.ndarray, b_FxK: np.ndarray) -> np.ndarray:
  """[F, F] float64 Pearson correlation of row i of a with row j of b (0 for a constant row)."""
  def standard(x):
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)
  return standard(a_FxK) @ standard(b_FxK).T


def align_permutation(anchor_FxK: np.ndarray, member_FxK: np.ndarray) -> np.ndarray:
  """[F] int64 perm maximising sum_i corr(anchor neuron i, member neuron perm[i]): the
  member's neurons reordered as perm match the anchor's (Hungarian algorithm)."""
  corr = correlation(anchor_FxK, member_FxK)
  rows, cols = scipy.optimize.linear_sum_assignment(corr, maximize=True)
  perm = np.empty(corr.shape[0], np.int64)
  perm[rows] = cols
  return perm


def permute_expert(expert: dict[str, np.ndarray], perm_F: np.ndarray,
                   family: ExpertFamily) -> dict[str, np.ndarray]:
  """One expert (leaves without the E axis) with its hidden neurons reordered as perm_F."""
  out = {}
  for name, leaf in family.leaves().items():
    dims = [d for d in leaf.dims if d != "E"]
    out[name] = (np.take(expert[name], perm_F, axis=dims.index("F")) if "F" in dims
                 else expert[name])
  return out


# --------------------------------------------------------------------------- averaging


def merge_weights(counts_G: np.ndarray) -> np.ndarray:
  """[G] float64 averaging weights of a group: max(count, ZERO_COUNT_FLOOR), normalised."""
  w = np.maximum(np.asarray(counts_G, np.float64), ZERO_COUNT_FLOOR)
  return w / w.sum()


def average(experts: list[dict[str, np.ndarray]], weights_G: np.ndarray) -> dict:
  """sum_g weights[g] * experts[g], leaf by leaf (float64, cast back to each leaf's dtype)."""
  out = {}
  for name in experts[0]:
    acc = sum(float(w) * np.asarray(ex[name], np.float64) for ex, w in zip(experts, weights_G))
    out[name] = acc.astype(np.asarray(experts[0][name]).dtype)
  return out


# --------------------------------------------------------------------------- entry point


def _expert(leaves: dict[str, np.ndarray], family: ExpertFamily, p: int, e: int) -> dict:
  """Layer p's expert e (leaves without the E axis) from stacked [P, ...] leaves."""
  return {k: np.take(v[p], e, axis=family.leaves()[k].expert_axis) for k, v in leaves.items()}


def source_map(cfg: ml_collections.ConfigDict, variables: dict) -> np.ndarray:
  """[P, R] int64: each MoE layer's router-expert -> expert map (identity when unmerged)."""
  periods = len(layout.moe_layer_indices(cfg))
  if not moe_layer.has_expert_map(cfg.moe):
    return np.tile(np.arange(cfg.moe.num_experts), (periods, 1))
  tree = variables.get(moe_layer.EXPERT_MAP)
  if tree is None or not layout.has(tree, layout.MOE_PATH + ("map",)):
    raise ValueError(f"moe.num_router_experts={cfg.moe.num_router_experts} but the variables "
                     f"hold no {moe_layer.EXPERT_MAP!r} map of the MoE layers")
  return np.asarray(layout.get(tree, layout.MOE_PATH + ("map",)), np.int64)


def merge(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration | None, to: int,
          align: bool = True, group_by: str = "router_logits",
          align_by: str = "weights") -> Merged:
  """Merge every MoE layer's moe.num_experts experts into `to` (module docstring).

  calib: the model's `Calibration` (counts; its sampled inputs for
  group_by="router_logits" and align_by="activations"). Every option is
  checked before anything is computed.
  """
  to = check_options(cfg, to, align, group_by, align_by)
  new_cfg = merged_config(cfg, to)
  needs = ([f"group_by={group_by!r}"] if group_by == "router_logits" else []) + (
      [f"align_by={align_by!r}"] if align and align_by == "activations" else [])
  calib = _check_calibration(cfg, calib, needs)
  family = get_family(cfg.moe)
  params = variables["params"]
  moe = layout.moe_params(params)
  leaves = {k: np.asarray(jax.device_get(v)) for k, v in moe[layout.EXPERTS].items()}
  bad = {k: str(v.dtype) for k, v in leaves.items() if not np.issubdtype(v.dtype, np.floating)}
  if bad:
    raise ValueError(f"expert leaves {bad} are not floating point; merging averages weights")
  w_gate = np.asarray(jax.device_get(moe[layout.ROUTER]["w_gate"]))
  map_PxR = source_map(cfg, variables)
  layers = layout.moe_layer_indices(cfg)
  e, f = cfg.moe.num_experts, cfg.moe.expert_hidden
  anchors = np.empty((len(layers), to), np.int64)
  group = np.empty((len(layers), e), np.int64)
  weights = np.empty((len(layers), e), np.float64)
  perms = np.tile(np.arange(f), (len(layers), e, 1)) if align else None
  out_leaves = {k: np.empty(v.shape[:1] + tuple(
      to if d == "E" else s for d, s in zip(family.leaves()[k].dims, v.shape[1:])), v.dtype)
                for k, v in leaves.items()}
  for n in range(len(layers)):
    if group_by == "router_logits":
      feats = router_logit_features(calib.inputs_NxSxD[n], w_gate[n], map_PxR[n], e)
      sim = cosine_similarity(feats.T)
    else:
      sim = weight_similarity([np.moveaxis(v[n], family.leaves()[k].expert_axis, 0)
                               for k, v in leaves.items()])
    anchors[n] = choose_anchors(calib.counts_NxE[n], to, calib.gate_NxE[n])
    group[n] = assign_groups(sim, anchors[n])
    experts = [_expert(leaves, family, n, j) for j in range(e)]
    features = (lambda ex: neuron_weight_features(ex, family)) if align_by == "weights" else (
        lambda ex: hidden_activations(ex, family, calib.inputs_NxSxD[n]).T)
    for g, a in enumerate(anchors[n]):
      members = np.flatnonzero(group[n] == g)
      weights[n, members] = merge_weights(calib.counts_NxE[n, members])
      aligned = []
      fa = features(experts[a]) if align and members.size > 1 else None
      for m in members:
        if fa is not None and m != a:
          perms[n, m] = align_permutation(fa, features(experts[m]))
          aligned.append(permute_expert(experts[m], perms[n, m], family))
        else:
          aligned.append(experts[m])
      for k, v in average(aligned, weights[n, members]).items():
        out_leaves[k][n][(slice(None),) * family.leaves()[k].expert_axis + (g,)] = v
  new_map = np.stack([compose_map(map_PxR[n], group[n]) for n in range(len(layers))])
  new_params = layout.replace(params, layout.EXPERTS_PATH, out_leaves)
  out = {"params": new_params}
  for name, tree in variables.items():
    if name not in ("params", "intermediates"):
      out[name] = tree
  out[moe_layer.EXPERT_MAP] = layout.replace(out.get(moe_layer.EXPERT_MAP, {}),
                                             layout.MOE_PATH, {"map": new_map})
  return Merged(cfg=new_cfg, variables=jax.device_get(out), layers=layers,
                anchors_NxG=anchors, group_NxE=group, weights_NxE=weights, perm_NxExF=perms,
                map_NxR=new_map)


# --------------------------------------------------------------------------- the CLI method


def original_experts(previous: list[dict], layers: list[int], num_experts: int
                     ) -> dict[str, list[list[int]]]:
  """{layer: the original experts each current expert stands for}, from the newest previous
  step that recorded them (a merge's groups_original, a prune's kept_original)."""
  for step in reversed(previous):
    if "groups_original" in step:
      return {str(l): step["groups_original"][str(l)] for l in layers}
    if "kept_original" in step:
      return {str(l): [[j] for j in step["kept_original"][str(l)]] for l in layers}
  return {str(l): [[j] for j in range(num_experts)] for l in layers}


FLAGS = {"to": "--to", "align": "--no-align", "group_by": "--group-by", "align_by": "--align-by"}


def _cli_align_by(args) -> str:
  if args.no_align and args.align_by is not None:
    raise ValueError(f"--align-by {args.align_by!r} with --no-align: nothing is aligned; give "
                     "one of them")
  return "weights" if args.align_by is None else args.align_by


def _cli_check(cfg: ml_collections.ConfigDict, args) -> None:
  check_options(cfg, args.to, not args.no_align, args.group_by, _cli_align_by(args), FLAGS)


def _cli_apply(cfg: ml_collections.ConfigDict, variables: dict, calib: Calibration | None,
               args, previous: list[dict]) -> Result:
  align = not args.no_align
  m = merge(cfg, variables, calib, args.to, align, args.group_by, _cli_align_by(args))
  orig = original_experts(previous, m.layers, cfg.moe.num_experts)
  entry = {"to": args.to, "align": align, "group_by": args.group_by,
           "align_by": _cli_align_by(args) if align else None,
           "num_experts_before": cfg.moe.num_experts, "num_experts_after": m.cfg.moe.num_experts,
           "num_router_experts": m.cfg.moe.num_router_experts,
           "groups": {}, "groups_original": {}, "anchors": {}, "weights": {},
           "neurons_moved": {}, "expert_map": {}}
  for n, layer in enumerate(m.layers):
    key = str(layer)
    groups = m.groups(n)
    entry["groups"][key] = groups
    entry["groups_original"][key] = [sorted(o for j in g for o in orig[key][j]) for g in groups]
    entry["anchors"][key] = m.anchors_NxG[n].tolist()
    entry["weights"][key] = [m.weights_NxE[n, g].tolist() for g in groups]
    entry["neurons_moved"][key] = [
        [int(np.sum(m.perm_NxExF[n, j] != np.arange(m.perm_NxExF.shape[-1])))
         if m.perm_NxExF is not None else 0 for j in g] for g in groups]
    entry["expert_map"][key] = m.map_NxR[n].tolist()
  return Result(m.cfg, m.variables, entry)


def _cli_describe(entry: dict) -> list[str]:
  how = (f"aligned by {entry['align_by']}" if entry["align"] else "not aligned")
  lines = [f"merged {entry['num_experts_before']} experts per layer into "
           f"{entry['num_experts_after']} (grouped by {entry['group_by']}, {how}): "
           f"moe.num_experts {entry['num_experts_before']} -> {entry['num_experts_after']}, "
           f"the router still scores moe.num_router_experts={entry['num_router_experts']}"]
  for layer, groups in entry["groups"].items():
    moved = sum(sum(g) for g in entry["neurons_moved"][layer])
    lines.append(f"  layer {layer}: groups {groups} (anchors {entry['anchors'][layer]}; "
                 f"{moved} neurons moved)")
  return lines


METHOD = Method(
    name="merge", summary="average groups of experts into fewer (moejax/compress/merge.py)",
    options=(Option("--to", {"required": True, "type": int,
                             "help": "merged experts per layer, below moe.num_experts"}),
             Option("--no-align", {"action": "store_true", "default": False,
                                   "help": "average without permuting hidden neurons"}),
             Option("--group-by", {"default": "router_logits",
                                   "help": f"expert similarity: {', '.join(GROUP_BY)}"}),
             Option("--align-by", {"help": f"neuron correlation: {', '.join(ALIGN_BY)} "
                                           "(default weights)"})),
    check=_cli_check, apply=_cli_apply, describe=_cli_describe)
