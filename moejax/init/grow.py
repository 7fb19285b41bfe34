"""Growing an MoE's experts during continued training by duplicating experts.

Which experts are duplicated (`init.grow_select`):
  "all": every expert becomes `init.grow_factor` consecutive copies;
  "importance": the grown layer has `moe.num_experts` experts, the originals
      plus extra copies given out by first-order (Taylor) importance on a few
      training batches of the source model: I_e = |sum_theta theta * dL/dtheta|
      over expert e's weights, the estimated change of the LM loss if e were
      removed (Molchanov et al., 2019). Extra copies go one at a time to the
      expert with the largest I_e / (copies it has), the D'Hondt rule, so the
      most important experts are duplicated first and no copy's share of
      importance is much above another's.

Both are one pure gather: `grow_params(params, src_PxE, noise, rng, family)`
makes grown expert j of MoE period p a copy of source expert src_PxE[p, j]
(every leaf of the expert family, along the expert axis it declares, and the
router column), plus N(0, noise^2) on every router column. Leaves the family
shares by all experts of a layer (no expert axis) are kept as they are: the
copies share them as the originals did; importance sums over the experts'
own leaves only.

Why the forward pass is unchanged at the switch (top-k fixed): with plain
softmax-then-top-k, tied copies split their expert's probability and a
token's k slots can all go to copies of its best expert, which changes the
output. The grown model therefore routes over groups of copies
(moejax/moe/routers/topk.group_route): a group's logit is the log-mean-exp of
its copies' logits, equal to the original logit while the copies are tied, so
the k groups and their weights are chosen exactly as the k experts were, and
each chosen group uses its highest-logit copy, identical to the original
expert. Equal-size consecutive groups ("all") are `moe.topk.copies = m`; any
other grouping is `moe.topk.grown_groups = G` with each layer's group ids in
the "moe_state" variable "group". After the switch the copies' router columns
and weights diverge through training (and the `noise` perturbation), and the
balancing loss, computed over all experts, spreads tokens over the copies.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import layout
from moejax.config import default_config
from moejax.moe.experts import ExpertFamily, get_family

ROUTER_KEYS = ("w_gate",)  # the plain topk router's only leaf
SELECTS = ("all", "importance")
GROUP_PATH = layout.ROUTER_PATH + ("group",)


def _moe(params: dict) -> dict:
  if not layout.has(params, layout.MOE_PATH):
    raise ValueError("the source run has no MoE layers to grow (init.grow_from needs an MoE run)")
  return layout.moe_params(params)


def _family(family: ExpertFamily | None) -> ExpertFamily:
  """The given family, or the default `moe.expert`'s."""
  return family or get_family(default_config().moe)


def num_periods(params: dict) -> int:
  return int(_moe(params)[layout.ROUTER]["w_gate"].shape[0])


def all_copies(num_experts: int, periods: int, factor: int) -> np.ndarray:
  """src_PxE for init.grow_select='all': expert e -> experts e*m .. e*m+m-1."""
  if factor < 1:
    raise ValueError(f"config key init.grow_factor={factor} is invalid: must be >= 1")
  return np.tile(np.repeat(np.arange(num_experts), factor), (periods, 1))


def dhondt_copies(score_PxE: np.ndarray, num_experts: int) -> np.ndarray:
  """src_PxE for init.grow_select='importance': originals, then extra copies by D'Hondt.

  Each extra copy goes to argmax_e score_e / copies_e (ties: the lowest
  index); extras are listed after the originals in order of source index.
  """
  p, e = score_PxE.shape
  if num_experts <= e:
    raise ValueError(f"config key moe.num_experts={num_experts} is invalid for growing: must "
                     f"exceed the source run's {e} experts")
  out = np.empty((p, num_experts), np.int64)
  for i, score_E in enumerate(np.asarray(score_PxE, np.float64)):
    copies_E = np.ones(e)
    for _ in range(num_experts - e):
      copies_E[int(np.argmax(score_E / copies_E))] += 1
    extra = np.repeat(np.arange(e), copies_E.astype(np.int64) - 1)
    out[i] = np.concatenate([np.arange(e), extra])
  return out


def source_groups(src_cfg: ml_collections.ConfigDict, collections: dict,
                  periods: int) -> np.ndarray:
  """group_PxE: the group of each of the source run's experts, per MoE period."""
  topk = src_cfg.moe.topk
  if topk.grown_groups > 0:
    return np.asarray(layout.get(collections["moe_state"], GROUP_PATH, "moe_state"), np.int64)
  return np.tile(np.arange(src_cfg.moe.num_experts) // topk.copies, (periods, 1))


def grown_grouping(src_cfg: ml_collections.ConfigDict, select: str,
                   factor: int) -> tuple[int, int]:
  """(moe.topk.copies, moe.topk.grown_groups) the grown model must use."""
  e, topk = src_cfg.moe.num_experts, src_cfg.moe.topk
  if select == "all" and topk.grown_groups == 0:
    return topk.copies * factor, 0  # still equal consecutive groups
  return 1, topk.grown_groups if topk.grown_groups > 0 else e // topk.copies


def expert_importance(src_cfg: ml_collections.ConfigDict, params: dict, collections: dict,
                      batches: Iterable[dict]) -> np.ndarray:
  """score_PxE = |sum over expert e's weights of theta * mean-batch dL/dtheta| (LM loss)."""
  from moejax import model as lm  # noqa: PLC0415

  model = lm.make_model(src_cfg, deterministic=True)

  @jax.jit
  def grad(p, ids, targets):
    def loss(p):
      logits, _ = model.apply({"params": p, **collections}, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return jax.grad(loss)(p)

  total, n = None, 0
  for b in batches:
    g = _moe(grad(params, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"])))[layout.EXPERTS]
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    n += 1
  if not n:
    raise ValueError("init.grow_batches must give at least one calibration batch")
  experts = _moe(params)[layout.EXPERTS]
  taylor = []
  for name, leaf in get_family(src_cfg.moe).leaves().items():
    if leaf.shared:  # used by every expert: no expert's own share of the loss
      continue
    # Leaves are [P, ...] with the expert axis at 1 + leaf.expert_axis.
    prod = jnp.moveaxis(experts[name] * total[name] / n, 1 + leaf.expert_axis, 1)
    taylor.append(jnp.sum(prod.reshape(prod.shape[:2] + (-1,)), axis=-1))
  return np.abs(np.asarray(sum(taylor)))


def grow_params(params: dict, src_PxE: np.ndarray, noise: float = 0.0,
                rng: jax.Array | None = None, family: ExpertFamily | None = None) -> dict:
  """params with MoE period p's expert j a copy of source expert src_PxE[p, j].

  `family` (default: the default `moe.expert`'s) declares each expert leaf's axis.
  """
  moe = _moe(params)
  extra = set(moe[layout.ROUTER]) - set(ROUTER_KEYS)
  if extra:
    raise ValueError(f"growing supports the plain topk router (w_gate only); this router "
                     f"also has {sorted(extra)} (config key moe.topk.noise must be 'none')")
  idx = jnp.asarray(src_PxE, jnp.int32)
  if idx.shape[0] != num_periods(params):
    raise ValueError(f"src_PxE has {idx.shape[0]} rows for {num_periods(params)} MoE periods")
  leaves = _family(family).leaves()
  experts = {k: v if leaves[k].shared else  # shared by all experts: every copy uses it
             jax.vmap(lambda a, i, ax=leaves[k].expert_axis: jnp.take(a, i, axis=ax))(v, idx)
             for k, v in moe[layout.EXPERTS].items()}
  w_PxDxE = jax.vmap(lambda w, i: w[:, i])(moe[layout.ROUTER]["w_gate"], idx)
  if noise > 0:
    rng = jax.random.key(0) if rng is None else rng
    w_PxDxE = w_PxDxE + noise * jax.random.normal(rng, w_PxDxE.shape, w_PxDxE.dtype)
  return layout.replace(params, layout.MOE_PATH, {**moe, layout.EXPERTS: experts,
                                                  layout.ROUTER: {"w_gate": w_PxDxE}})


def set_groups(collections: dict, group_PxE: np.ndarray) -> dict:
  """`collections` with the "group" state of the grown router replaced."""
  state = collections.get("moe_state", {})
  if not layout.has(state, GROUP_PATH):
    raise ValueError("the grown config has no group state (moe.topk.grown_groups must be > 0)")
  return {**collections, "moe_state": layout.replace(state, GROUP_PATH,
                                                     jnp.asarray(group_PxE, jnp.int32))}
