"""init.* keys and the source runs they name (the only config check that reads run directories).

Checks the values of init.* (upcycling, growing) and that every source run
the config names (init.from_dense, init.grow_from, moe.adapters.base) is a
run directory whose config can initialise this one (`sources.check_sources`).
"""

from __future__ import annotations

import os

import ml_collections

from moejax import layout
from moejax.checks import ConfigError, choice, fail, is_int, positive
from moejax.init.grow import SELECTS
from moejax.init.sources import check_sources
from moejax.moe import chain
from moejax.moe.experts import get_family
from moejax.moe import pool as pool_lib


def _run_dir(key: str, path: str) -> None:
  if not (os.path.exists(os.path.join(path, "config.json"))
          and os.path.isdir(os.path.join(path, "checkpoints"))):
    fail(key, path, "must be a run directory (holding config.json and checkpoints/)")


def check_config(cfg: ml_collections.ConfigDict) -> None:
  moe, init = cfg.moe, cfg.get("init")
  a = moe.get("adapters")
  adapters = a is not None and a.enabled
  if init is not None:
    if init.step < -1:
      fail("init.step", init.step, "must be -1 (newest) or a checkpoint step >= 0")
    if init.from_dense and init.grow_from:
      fail("init.grow_from", init.grow_from, "cannot be combined with init.from_dense")
    if init.from_dense:
      _run_dir("init.from_dense", init.from_dense)
      choice(init.upcycle, "init.upcycle", ("copy", "split"))
      choice(init.router, "init.router", ("fresh", "zero"))
      positive(cfg, "init.noise", allow_zero=True)
      if moe.enabled and moe.num_shared_experts:
        fail("moe.num_shared_experts", moe.num_shared_experts,
             "must be 0 with init.from_dense (every FFN becomes routed experts)")
      shared = get_family(moe).shared_leaves() if moe.enabled else {}
      if shared:
        fail("moe.expert", moe.expert, f"cannot be upcycled into with init.from_dense: its "
             f"leaves {sorted(shared)} are shared by all experts of a layer, which copies or "
             "slices of one dense FFN do not define; upcycle into moe.expert='swiglu' (the "
             "dense FFN's form)")
    if init.grow_from:
      _run_dir("init.grow_from", init.grow_from)
      positive(cfg, "init.grow_noise", allow_zero=True)
      select = init.get("grow_select", "all")
      choice(select, "init.grow_select", SELECTS)
      if select == "all" and (not is_int(init.grow_factor) or init.grow_factor < 1):
        fail("init.grow_factor", init.grow_factor, "must be an integer >= 1 (1: a warm "
             "start of the MoE run, the no-growth baseline)")
      nb = init.get("grow_batches", 4)
      if select == "importance" and (not is_int(nb) or nb < 1):
        fail("init.grow_batches", nb, "must be a positive integer")
      if not moe.enabled or moe.router != "topk":
        fail("init.grow_from", init.grow_from, "needs moe.enabled=True and moe.router='topk'")
      if chain.rounds(moe) > 1:
        fail("moe.chain.rounds", chain.rounds(moe), "must be 1 with init.grow_from (growing "
             "duplicates the columns of one router per MoE layer)")
    if (init.from_dense or init.grow_from) and (why := pool_lib.refusal(
        cfg, "upcycling (init.from_dense) or growing (init.grow_from)")):
      fail("moe.pool.kind", moe.pool.kind, why.split(": ", 1)[1])
    if (init.from_dense or init.grow_from) and adapters:
      fail("moe.adapters.enabled", True, "cannot be combined with init.from_dense/grow_from")
  if adapters:
    if not a.base:
      fail("moe.adapters.base", a.base, "must name the frozen base run directory")
    _run_dir("moe.adapters.base", a.base)
  sources = [(k, v) for k, v in (("init.from_dense", init.from_dense if init else ""),
                                  ("init.grow_from", init.grow_from if init else ""),
                                  ("moe.adapters.enabled", adapters)) if v]
  if sources and moe.enabled and not layout.is_uniform(cfg):
    fail(sources[0][0], sources[0][1], f"cannot be combined with moe.layer_schedule.kind="
         f"{moe.layer_schedule.kind!r} (MoE layers with different experts); allowed: "
         "kind='constant' with moe.layer_schedule.top_k=''")
  if (init is not None and (init.from_dense or init.grow_from)) or adapters:
    try:
      check_sources(cfg)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from None
