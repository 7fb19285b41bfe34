"""The MoE feed-forward layer: router -> assignment -> dispatcher -> experts -> combine.

Config (`moe.*`): num_experts, top_k, router, expert (the expert family),
dispatch, capacity_factor, expert_hidden (F of each routed expert),
num_shared_experts (dense experts of the same family every token uses,
DeepSeekMoE; one FFN of width `shared_hidden`, default num_shared_experts *
expert_hidden, optionally scaled per token by a sigmoid gate, `shared_gate`,
Qwen2-MoE), balance / aux_loss_weight / z_loss_weight and the router's
and the family's own options under `moe.<name>`; layer-level auxiliary
losses on any router: `moe.router_entropy` (moejax/moe/router_entropy.py)
and `moe.erc` (moejax/moe/erc.py). A router returning a
`SoftAssignment` (soft) is applied by the soft dispatcher whatever
`moe.dispatch` is, and reports load 1/E per expert and E experts per token.

With `moe.num_router_experts` R > moe.num_experts (merged experts,
moejax/compress/merge.py) the router scores R experts as before (its
params, state, balancing losses and probabilities are over R) and each MoE
layer maps the router's chosen ids through its int32 "map" [R] in the
non-trained `EXPERT_MAP` collection onto the moe.num_experts experts before
dispatch, so a token that picks two router experts of one merged expert sends
it two rows, (w1 + w2) f(x). The sown routing, the load metrics and the
calibration counts are over the experts (after the map). A fresh model's map
is contiguous near-equal groups (`default_map`).

A router that declares zero-computation choices (`Router.zero_computation`:
zero, copy and constant experts, moejax/moe/zero_experts.py) returns their
per-token weights; the layer adds the copy and constant experts' output to
the dispatcher's. With `moe.chain.rounds` C > 1 (Chain-of-Experts,
moejax/moe/chain.py) the layer routes C times over the same experts, round c
with its own router on x_{c-1} (x_c = x_{c-1} + y_c), returns sum_c y_c, and
combines the rounds' losses and metrics as chain.py documents.

With a cross-layer expert pool (`moe.pool.kind` "global" or "window",
moejax/moe/pool.py) the layer owns no experts: it gets the pool's weights
from the model, its router scores the R choices of `pool.num_choices` and
the same "map" [R] sends choice r of MoE layer i to pool expert
`pool.layer_map(i)[r]`; load metrics are over the pool's experts.

A layer-wise expert schedule (`moe.layer_schedule`, moejax/layout.py) gives
each MoE layer its own experts and top-k: the model hands each layer the
`moe` config `layout.layer_moe(cfg.moe, (E, k))`, and `check_config` checks
the schedule, the router's rules at every (E, k) it uses, the expert axis
against every layer's E, and refuses the options that hold one value for
all layers (`UNSCHEDULED`).

What the layer reports is declared: `aux_losses(cfg)` (the balancing losses
of `moe.balance`, the z-loss, the router-entropy and ERC losses when on, and
the router's own) and `metric_schema(cfg)`
(`LAYER_METRICS` plus the router's), so nothing downstream keeps a list.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moejax import layout
from moejax.aux_losses import AuxLoss
from moejax.checks import ConfigError, choice, fail, positive, positive_int, reraise
from moejax.layers import DTYPES
from moejax.moe import chain
from moejax.moe import erc as erc_lib
from moejax.moe import losses as moe_losses
from moejax.moe import router_entropy
from moejax.moe import metrics as moe_metrics
from moejax.moe import experts as expert_families
from moejax.moe import pool as pool_lib
from moejax.moe.dispatch import DISPATCHERS, expert_parallel, get_dispatcher
from moejax.moe.dispatch.soft import soft_dispatch
from moejax.moe.experts import ExpertWeights, SharedExperts, get_family
from moejax.moe.experts import quantized as quantized_experts
from moejax.moe.metrics import LAYER_METRICS, Metric
from moejax.moe.routers import ROUTERS, get_router
from moejax.moe.skipping import skip_low_weight
from moejax.moe.types import SoftAssignment
from moejax.moe.zero_experts import ZeroComputationExperts


SKIPPED = Metric("skipped_fraction", summary=True)  # with moe.skip_threshold > 0
EXPERT_MAP = "expert_map"  # collection: each MoE layer's router-expert -> expert "map" [R]
MAPPABLE_ROUTERS = ("topk", "sigmoid_bias", "group_limited")  # sparse choices over R ids


def router_experts(cfg_moe) -> int:
  """R, the experts the router scores: a pool layer's choices (moejax/moe/pool.py), else
  moe.num_router_experts, or moe.num_experts when 0."""
  if pool_lib.enabled(cfg_moe):
    return pool_lib.num_choices(cfg_moe)
  return int(cfg_moe.get("num_router_experts", 0) or cfg_moe.num_experts)


def has_expert_map(cfg_moe) -> bool:
  """Whether the router's choices go through the layer's expert map (R != moe.num_experts,
  or a cross-layer pool)."""
  return pool_lib.enabled(cfg_moe) or router_experts(cfg_moe) != cfg_moe.num_experts


def default_map(num_router_experts: int, num_experts: int) -> jax.Array:
  """[R] int32 contiguous near-equal groups of router experts: a fresh model's map."""
  return jnp.arange(num_router_experts, dtype=jnp.int32) * num_experts // num_router_experts


@functools.lru_cache(maxsize=64)
def _router_moe(frozen: ml_collections.FrozenConfigDict) -> ml_collections.FrozenConfigDict:
  moe = ml_collections.ConfigDict(frozen.to_dict())
  moe.num_experts = router_experts(frozen)
  return ml_collections.FrozenConfigDict(moe)


def router_moe(cfg_moe) -> ml_collections.FrozenConfigDict:
  """The `moe` config as the router sees it: moe.num_experts = R (its count of choices)."""
  frozen = ml_collections.FrozenConfigDict(cfg_moe)
  return _router_moe(frozen) if router_experts(frozen) != frozen.num_experts else frozen


def _check_expert_map(cfg: ml_collections.ConfigDict) -> None:
  moe = cfg.moe
  r, e = moe.get("num_router_experts", 0), moe.num_experts
  if not r:
    return
  if r <= e:
    fail("moe.num_router_experts", r, f"allowed: 0 (the router scores the moe.num_experts={e} "
         f"experts) or more than moe.num_experts={e} (router experts mapped onto the experts "
         f"by the {EXPERT_MAP!r} collection)")
  if moe.router not in MAPPABLE_ROUTERS:
    fail("moe.num_router_experts", r, f"needs moe.router in {list(MAPPABLE_ROUTERS)} (a "
         f"token's choice of router expert ids that a map can redirect); moe.router="
         f"{moe.router!r}")
  if moe.router == "topk" and (moe.topk.get("copies", 1) > 1 or moe.topk.get("grown_groups", 0)):
    fail("moe.num_router_experts", r, "needs moe.topk.copies=1 and moe.topk.grown_groups=0 "
         "(grown groups of copies are a map of their own)")


def _check_skipping(cfg: ml_collections.ConfigDict) -> None:
  tau = cfg.moe.get("skip_threshold", 0.0)
  if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < 1.0:
    fail("moe.skip_threshold", tau, "allowed: a number in [0, 1) (0: no skipping)")
  if tau > 0 and (get_router(cfg.moe.router).adaptive or cfg.moe.router in ("soft",
                                                                            "expert_choice")):
    fail("moe.skip_threshold", tau, f"needs a token-choice top-k router; moe.router="
         f"{cfg.moe.router!r} does not give each token a fixed set of weighted choices")


# Options that hold one value for every MoE layer, refused with a layer-wise schedule.
UNSCHEDULED = (("moe.num_router_experts", 0, "merged experts map R router experts onto "
                "moe.num_experts in every layer"),
               ("moe.quant.scheme", "none", "quantized experts split moe.num_experts into "
                "moe.quant.experts8/4/2 in every layer"),
               ("moe.topk.grown_groups", 0, "grown groups come from init.grow_from, which "
                "grows every layer alike"),
               ("moe.pool.kind", "none", "a cross-layer pool gives every MoE layer the same "
                "choices"),
               ("moe.chain.rounds", 1, "Chain-of-Experts runs one MoE stack of equal layers"))


def _check_schedule(cfg: ml_collections.ConfigDict) -> None:
  """moe.layer_schedule.*: each MoE layer's (E, k) valid, the router's rules per layer."""
  shapes = layout.moe_schedule(cfg)  # ConfigError naming the schedule's keys
  if layout.is_uniform(cfg):
    return
  for key, default, why in UNSCHEDULED:
    parts = key.split(".")
    node = cfg
    for p in parts[:-1]:
      node = node.get(p, {})
    v = node.get(parts[-1], default)
    if v != default:
      fail(key, v, f"must be {default!r} with moe.layer_schedule.kind="
           f"{cfg.moe.layer_schedule.kind!r} (experts per layer {[e for e, _ in shapes]}): "
           f"{why}")
  indices = layout.moe_layer_indices(cfg)
  ep = cfg.parallel.expert if "parallel" in cfg else 1
  for i, (e, _) in enumerate(shapes):
    if ep > 0 and e % ep:
      fail("parallel.expert", ep, f"the expert axis size must divide the experts of every MoE "
           f"layer; moe.layer_schedule gives model layer {indices[i]} {e} experts")
  for shape in sorted(set(shapes)):
    layers = [indices[i] for i, s in enumerate(shapes) if s == shape]
    try:
      get_router(cfg.moe.router).check_config(layout.layer_config(cfg, shape), True)
    except ConfigError as e:
      raise ConfigError(f"moe.layer_schedule gives model layers {layers} {shape[0]} experts "
                        f"and top-k {shape[1]}: {e}") from None


def aux_losses(cfg: ml_collections.ConfigDict) -> tuple[AuxLoss, ...]:
  """The auxiliary losses every MoE layer of `cfg` reports (none for a dense model)."""
  if not cfg.moe.enabled:
    return ()
  balance = tuple(AuxLoss(moe_losses.BALANCE_KINDS[k], "moe.aux_loss_weight")
                  for k in moe_losses.balance_kinds(cfg.moe))
  return (*balance, AuxLoss("z_loss", "moe.z_loss_weight"),
          *router_entropy.aux_losses(cfg.moe), *erc_lib.aux_losses(cfg.moe),
          *get_router(cfg.moe.router).aux_losses(cfg.moe))


def metric_schema(cfg: ml_collections.ConfigDict) -> tuple[Metric, ...]:
  """The metrics every MoE layer of `cfg` reports: the layer's, then the router's."""
  if not cfg.moe.enabled:
    return ()
  return metric_schema_moe(cfg.moe)


def metric_schema_moe(cfg_moe) -> tuple[Metric, ...]:
  """`metric_schema` from the `moe` config of an MoE layer."""
  out = (*LAYER_METRICS, *get_router(cfg_moe.router).metrics(cfg_moe))
  if cfg_moe.get("skip_threshold", 0.0) > 0:
    out = (*out, SKIPPED)
  names = [m.name for m in out]
  if len(set(names)) != len(names):
    raise ValueError(f"moe.router={cfg_moe.router!r} declares metrics {names} with a "
                     "name used twice")
  return out


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """moe.* keys (each router's and the family's options by their own checks)."""
  moe, m = cfg.moe, cfg.model
  for key in ("moe.aux_loss_weight", "moe.z_loss_weight", "moe.num_shared_experts",
              "moe.first_dense_layers"):
    positive(cfg, key, allow_zero=True)
  positive_int(cfg, "moe.shared_hidden", allow_zero=True)
  if not moe.enabled:
    return
  if not moe.num_shared_experts:
    if moe.get("shared_hidden", 0):
      fail("moe.shared_hidden", moe.shared_hidden,
           "must be 0 with moe.num_shared_experts=0 (it is the shared experts' width)")
    if moe.get("shared_gate", False):
      fail("moe.shared_gate", moe.shared_gate,
           "must be False with moe.num_shared_experts=0 (it gates the shared experts)")
  choice(moe.router, "moe.router", ROUTERS)
  choice(moe.dispatch, "moe.dispatch", DISPATCHERS)
  for key in ("moe.num_experts", "moe.top_k", "moe.capacity_factor",
              "moe.expert_hidden", "moe.every"):
    positive(cfg, key)
  if "num_router_experts" in moe:
    positive_int(cfg, "moe.num_router_experts", allow_zero=True)
  _check_expert_map(cfg)
  pool_lib.check_config(cfg, MAPPABLE_ROUTERS)
  _check_skipping(cfg)
  chain.check_config(cfg)
  r = router_experts(moe)
  if pool_lib.enabled(moe) and moe.top_k > r:
    fail("moe.top_k", moe.top_k, f"must be <= the {r} experts each MoE layer's router "
         f"chooses from (moe.pool.kind={pool_lib.kind(moe)!r})")
  if moe.top_k > r:
    fail("moe.top_k", moe.top_k, f"must be <= moe.num_experts={moe.num_experts}" if r ==
         moe.num_experts else f"must be <= moe.num_router_experts={r}")
  reraise(moe_losses.balance_kinds, moe)
  chosen = get_router(moe.router)
  router_entropy.check_config(cfg, chosen.returns_probs)
  erc_lib.check_config(cfg, chosen.expert_embedding(moe) is not None, has_expert_map(moe))
  expert_families.check_config(cfg)
  quantized_experts.check_config(cfg)
  routed = cfg
  if r != moe.num_experts:  # the routers check their options against the R they score
    routed = ml_collections.ConfigDict(cfg.to_dict())
    routed.moe.num_experts = r
  for name, router in ROUTERS.items():  # every router's options; cross-key rules if chosen
    router.check_config(routed, name == moe.router)
  if moe.first_dense_layers > m.num_layers:
    fail("moe.first_dense_layers", moe.first_dense_layers,
         f"must be <= model.num_layers={m.num_layers}")
  rest = m.num_layers - moe.first_dense_layers
  if rest == 0 or rest % moe.every:
    fail("moe.every", moe.every,
         f"must divide model.num_layers - moe.first_dense_layers = {rest} (> 0)")
  _check_schedule(cfg)
  import pallas_kernels  # noqa: PLC0415 (kept local: only MoE runs need it)
  choice(moe.gmm_backend, "moe.gmm_backend", ("auto",) + tuple(pallas_kernels.BACKENDS))


def shared_width(cfg_moe) -> int:
  """F of the shared experts' one FFN (0 without shared experts)."""
  if not cfg_moe.num_shared_experts:
    return 0
  return cfg_moe.get("shared_hidden", 0) or cfg_moe.num_shared_experts * cfg_moe.expert_hidden


class SharedGate(nn.Module):
  """sigmoid(x w) [T, 1], w [D, 1] zero-initialised (a gate of 1/2 at init)."""

  @nn.compact
  def __call__(self, x_TxD: jax.Array) -> jax.Array:
    w_Dx1 = self.param("w", nn.initializers.zeros, (x_TxD.shape[-1], 1))
    return jax.nn.sigmoid(jnp.dot(x_TxD.astype(jnp.float32), w_Dx1, precision="highest"))


class MoELayer(nn.Module):
  """Routed experts of the configured family (plus optional shared experts) on [B, L, D].

  Returns (y [B, L, D] float32, aux, router carry) with aux = {"losses":
  unweighted auxiliary losses (those of `aux_losses`), "metrics": those of
  `metric_schema`, "state_stats": what the router's non-trained state update
  needs, "balance_counts": the per-choice counts of the balancing loss}.
  """

  cfg: ml_collections.FrozenConfigDict  # the `moe` config
  dtype: str = "float32"
  out_scale: float = 1.0

  def _balance(self, kinds, route, balance_E: jax.Array, b: int, l: int,
               round_c: int | None = None) -> dict:
    """The balancing losses named in moe.balance (unweighted); `round_c`: a chain's round."""
    out = {}
    probs = route.probs_TxE
    if "switch" in kinds:
      out["load_balance"] = moe_losses.switch_load_balance(probs, balance_E)
    if "global_batch" in kinds:
      # Counts over the whole global batch: summed over devices by the SPMD
      # program itself, and over gradient-accumulation micro-batches by the
      # trainer, which passes them in the "balance" collection ([rounds,
      # choices] for a chain: row c is round c's).
      counts = (self.get_variable("balance", "counts")
                if self.has_variable("balance", "counts") else None)
      if counts is not None and round_c is not None:
        counts = counts[round_c]
      out["global_balance"] = moe_losses.switch_load_balance(
          probs, balance_E if counts is None else counts)
    if "sequence" in kinds:
      a = route.assignment
      seq_A = a.token // l
      counts_BxE = jnp.zeros((b, probs.shape[-1]), jnp.float32).at[seq_A, a.expert].add(
          a.valid.astype(jnp.float32))
      out["sequence_balance"] = moe_losses.sequence_load_balance(probs, counts_BxE, b)
    return out

  @nn.compact
  def __call__(self, x_BxLxD: jax.Array, *, token_ids_BxL: jax.Array | None = None,
               router_carry: Any = None, shared: dict | None = None,
               deterministic: bool = True, pool: ExpertWeights | None = None,
               moe_layer: jax.Array | int = 0) -> tuple[jax.Array, dict, Any]:
    """`pool`: the cross-layer pool's experts (moe.pool.kind != "none", else None);
    `moe_layer`: this layer's index among the MoE layers (its pool map)."""
    cfg = self.cfg
    if pool_lib.enabled(cfg) != (pool is not None):
      raise ValueError(f"moe.pool.kind={pool_lib.kind(cfg)!r} but the MoE layer was "
                       f"{'given no' if pool is None else 'given a'} pool of experts")
    b, l, d = x_BxLxD.shape
    x_TxD = x_BxLxD.reshape(b * l, d)
    ids_T = None if token_ids_BxL is None else token_ids_BxL.reshape(b * l)
    router_cls = get_router(cfg.router)
    num_rounds = chain.rounds(cfg)
    map_R = None
    if pool is not None:  # router choices -> the pool's experts
      map_R = self.variable(EXPERT_MAP, "map", pool_lib.layer_map, moe_layer, cfg,
                            pool.num_experts).value
    elif has_expert_map(cfg):  # router experts -> (merged) experts
      map_R = self.variable(EXPERT_MAP, "map", default_map, router_experts(cfg),
                            cfg.num_experts).value
    self.sow("intermediates", "moe_input", x_TxD)  # the layer's input (moejax/compress)
    family = get_family(cfg)
    dtype = DTYPES[self.dtype]
    if pool is not None:
      experts = pool.replace(dtype=dtype)
    else:
      experts = quantized_experts.experts_module(cfg)(  # moe.quant: packed experts
          family, cfg.num_experts, cfg.expert_hidden, dtype, self.out_scale, name="experts")(d)
    num_experts = experts.num_experts  # what the assignment's ids index (the pool's, or E)
    shared_experts = shared_gate = None
    if cfg.num_shared_experts > 0:
      shared_experts = SharedExperts(family, shared_width(cfg), dtype, self.out_scale,
                                     name=layout.SHARED)
      if cfg.get("shared_gate", False):
        shared_gate = SharedGate(name="shared_gate")
    zero_spec = router_cls.zero_computation(cfg)
    zero_experts = None
    if zero_spec is not None and zero_spec.computes:  # copy / constant experts
      zero_experts = ZeroComputationExperts(zero_spec, name=layout.ZERO_EXPERTS)
    kinds = moe_losses.balance_kinds(cfg)

    def one_round(c: int, x_TxD: jax.Array, carry: Any):
      """Route x with round c's router, apply the layer's experts: (y, aux, counts, carry)."""
      router = router_cls(router_moe(cfg), name=chain.router_name(c))
      route = router(x_TxD, shape_BxL=(b, l), token_ids=ids_T, deterministic=deterministic,
                     carry=carry, shared=shared)
      assignment = route.assignment
      if map_R is not None:
        assignment = assignment.replace(expert=map_R[assignment.expert])
      skipped = None
      if cfg.get("skip_threshold", 0.0) > 0:  # dynamic expert skipping (moejax/moe/skipping.py)
        assignment, skipped = skip_low_weight(assignment, b * l, cfg.skip_threshold)
      # Routing capture for moejax.analysis: a no-op unless "intermediates" is mutable.
      sown = {"assignment": assignment}
      if route.probs_TxE is not None:
        sown["probs_TxE"] = route.probs_TxE
      self.sow("intermediates", "routing", sown)
      soft = isinstance(assignment, SoftAssignment)
      # A SoftAssignment (Soft MoE) always goes to the soft dispatcher: the
      # sparse dispatchers named by moe.dispatch take an `Assignment`.
      dispatch = soft_dispatch if soft else get_dispatcher(cfg.dispatch)
      if not soft and router_cls.choice_major_slots:  # multi-device mesh: shard_map EP
        dispatch = expert_parallel.select(cfg, b * l) or dispatch
      y_TxD, stats = dispatch(x_TxD, assignment, experts, cfg=cfg)
      if shared_experts is not None:
        y_shared = shared_experts(x_TxD)
        if shared_gate is not None:
          y_shared = y_shared * shared_gate(x_TxD)
        y_TxD = y_TxD + y_shared
      if zero_spec is not None:
        _check_zero_weights(cfg.router, route.zero_weights_TxZ, (b * l, zero_spec.total))
      if zero_experts is not None:  # the zero-computation picks, outside the dispatcher
        y_TxD = y_TxD + zero_experts(x_TxD, route.zero_weights_TxZ)

      if soft:  # every expert processes the same number of slots: uniform load
        counts_E = jnp.ones((num_experts,), jnp.float32)
        experts_per_token = jnp.asarray(num_experts, jnp.float32)
      else:
        counts_E = assignment.expert_counts(num_experts)
        experts_per_token = jnp.sum(assignment.valid) / (b * l)
      zero = jnp.zeros((), jnp.float32)
      losses = {moe_losses.BALANCE_KINDS[k]: zero for k in kinds}
      losses["z_loss"] = zero
      metrics = {**moe_metrics.load_metrics(counts_E),
                 "router_entropy": zero, "top1_prob": zero,
                 "experts_per_token": experts_per_token,
                 "dropped_fraction": stats["dropped_fraction"]}
      if skipped is not None:
        metrics["skipped_fraction"] = skipped
      balance_E = counts_E  # the balancing losses pair counts with the router's probabilities
      if assignment is not route.assignment:
        balance_E = route.assignment.expert_counts(router_experts(cfg))
      if route.probs_TxE is not None:
        if route.balance_counts_E is not None:
          balance_E = route.balance_counts_E
        balance_E = jnp.broadcast_to(balance_E, route.probs_TxE.shape[-1:])
        losses.update(self._balance(kinds, route, balance_E, b, l,
                                    c if num_rounds > 1 else None))
        metrics.update(moe_metrics.router_metrics(route.probs_TxE))
      if route.logits_TxE is not None:
        losses["z_loss"] = moe_losses.router_z_loss(route.logits_TxE)
      losses.update(router_entropy.layer_losses(cfg, route.probs_TxE))
      if erc_lib.enabled(cfg):  # the router's embeddings as proxy tokens through the experts
        emb_ExD = router_cls.expert_embedding(router_moe(cfg))(router.variables["params"])
        key = None if deterministic else self.make_rng("router")
        losses[erc_lib.LOSS] = erc_lib.erc_loss(emb_ExD, experts, key, cfg.erc.alpha,
                                                cfg.erc.noise)
      _check_declared(cfg.router, "metrics", route.metrics,
                      [m.name for m in router_cls.metrics(cfg)])
      _check_declared(cfg.router, "losses", route.losses,
                      [a.name for a in router_cls.aux_losses(cfg)])
      losses.update(route.losses)
      metrics.update(route.metrics)
      aux = {"losses": losses, "metrics": metrics, "state_stats": route.state_stats,
             "balance_counts": balance_E.astype(jnp.float32)}
      new_carry = route.carry if router_cls.uses_carry else carry
      return y_TxD, aux, counts_E, new_carry

    if num_rounds == 1:
      y_TxD, aux, _, new_carry = one_round(0, x_TxD, router_carry)
      return y_TxD.reshape(b, l, d), aux, new_carry
    # Chain-of-Experts (moejax/moe/chain.py): round c routes x_{c-1}; x_c = x_{c-1} + y_c.
    x_c, y_TxD, new_carry = x_TxD.astype(jnp.float32), None, router_carry
    per_round, counts = [], []
    for c in range(num_rounds):
      y_c, aux_c, counts_E, new_carry = one_round(c, x_c, new_carry)
      per_round.append(aux_c)
      counts.append(counts_E)
      y_TxD = y_c if y_TxD is None else y_TxD + y_c
      x_c = x_c + y_c
    aux = chain.combine_rounds(per_round, counts, metric_schema_moe(cfg))
    return y_TxD.reshape(b, l, d), aux, new_carry


def _check_zero_weights(router: str, w: jax.Array | None, shape: tuple[int, int]) -> None:
  if w is None or tuple(w.shape) != shape:
    raise ValueError(f"router {router!r} declares zero-computation choices but returned "
                     f"zero_weights_TxZ of shape {None if w is None else tuple(w.shape)}, not "
                     f"{shape} (moejax/moe/routers/base.py: the router contract)")


def _check_declared(router: str, what: str, got: dict, declared: list[str]) -> None:
  if sorted(got) != sorted(declared):
    raise ValueError(f"router {router!r} returned {what} {sorted(got)} but declares "
                     f"{sorted(declared)} (moejax/moe/routers/base.py: the router contract)")


__all__ = ["EXPERT_MAP", "MoELayer", "aux_losses", "check_config", "default_map",
           "has_expert_map", "metric_schema", "router_experts", "router_moe", "ConfigError"]
