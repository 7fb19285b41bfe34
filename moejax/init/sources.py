"""Reading source run directories: their config, compatibility checks and parameters.

A source run is any run directory (docs/architecture.md, "The run directory"): `config.json` plus
orbax checkpoints. Only its config and the "params" / "collections" entries
of one checkpoint are read, so runs made by any trainer version work.
"""

from __future__ import annotations

import json
import os

import ml_collections

from moejax.checks import lookup
from moejax.config import flat_keys, with_defaults
from moejax.init.grow import grown_grouping
from moejax.layout import layer_plan
from moejax.moe.experts import get_family
from moejax.moe import pool as pool_lib

# Keys that shape the parameters: a source run must agree on them (the
# attention's form included: grouped-query K/V heads, head width, biases,
# q/k norms, latent attention and, when either run uses it, its dims).
MODEL_KEYS = ("vocab_size", "d_model", "num_layers", "num_heads", "tie_embeddings",
              "attention", "num_kv_heads", "head_dim", "attn_bias", "qk_norm")
MLA_KEYS = ("mla.q_lora_rank", "mla.kv_lora_rank", "mla.qk_nope_head_dim",
            "mla.qk_rope_head_dim", "mla.v_head_dim")
# moe.* keys an adapter run may change on an MoE base (they do not change the
# base parameters or what the base computes at evaluation).
MOE_FREE_KEYS = ("adapters", "dispatch", "gmm_backend", "capacity_factor", "aux_loss_weight",
                 "z_loss_weight", "balance")


def run_config(run_dir: str) -> ml_collections.ConfigDict:
  """The run's config.json, with keys added since it was written at their defaults."""
  with open(os.path.join(run_dir, "config.json")) as f:
    return ml_collections.ConfigDict(with_defaults(json.load(f)))


def _model_value(m: ml_collections.ConfigDict, key: str):
  """model.<key> as the model uses it (0 = the default for num_kv_heads / head_dim)."""
  if key == "num_kv_heads":
    return m.num_kv_heads or m.num_heads
  if key == "head_dim" and m.attention != "mla":
    return m.head_dim or m.d_model // m.num_heads
  return lookup(m, key)


def _model_mismatch(src, cfg, source_key: str, path: str, keys=MODEL_KEYS) -> None:
  if "mla" in (src.model.attention, cfg.model.attention):
    keys = tuple(keys) + MLA_KEYS
  for k in keys:
    mine, theirs = _model_value(cfg.model, k), _model_value(src.model, k)
    if mine != theirs:
      raise ValueError(f"config key model.{k}={lookup(cfg.model, k)!r} does not match the "
                       f"source run {source_key}={path!r}, which has "
                       f"model.{k}={lookup(src.model, k)!r}")


def check_sources(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when a source run cannot initialise `cfg`."""
  init = cfg.get("init")
  if init is not None and init.from_dense:
    src = run_config(init.from_dense)
    if src.moe.enabled:
      raise ValueError(f"config key init.from_dense={init.from_dense!r} is invalid: that run "
                       "is an MoE (moe.enabled=True); upcycling needs a dense run")
    if src.model.get("attn_experts", 0):
      raise ValueError(f"config key init.from_dense={init.from_dense!r} is invalid: that run "
                       "has attention experts (model.attn_experts > 0); upcycling needs "
                       "plain attention")
    _model_mismatch(src, cfg, "init.from_dense", init.from_dense)
    f, fe, e = src.model.ffn_hidden, cfg.moe.expert_hidden, cfg.moe.num_experts
    if not cfg.moe.enabled:
      fe = e = f  # a dense config: a warm start, every parameter copied
    if init.upcycle == "copy" and fe != f:
      raise ValueError(f"config key moe.expert_hidden={fe} is invalid with init.upcycle="
                       f"'copy': must equal the dense run's model.ffn_hidden={f}")
    if init.upcycle == "split" and (f % fe or e % (f // fe)):
      raise ValueError(f"config key moe.expert_hidden={fe} / moe.num_experts={e} are invalid "
                       f"with init.upcycle='split': expert_hidden must divide the dense "
                       f"ffn_hidden={f} and num_experts must be a multiple of {f}/{fe}")
    n_dense, _ = layer_plan(cfg)
    if (n_dense or cfg.moe.every > 1) and cfg.model.ffn_hidden != f:  # dense layers kept
      raise ValueError(f"config key model.ffn_hidden={cfg.model.ffn_hidden} must equal the "
                       f"dense run's {f}: the MoE model keeps dense layers")
  if init is not None and init.grow_from:
    src = run_config(init.grow_from)
    m = init.grow_factor
    if not src.moe.enabled or src.moe.router != "topk":
      raise ValueError(f"config key init.grow_from={init.grow_from!r} is invalid: that run "
                       "must be an MoE with moe.router='topk'")
    if why := pool_lib.refusal(src, "growing experts (init.grow_from)"):
      raise ValueError(f"config key init.grow_from={init.grow_from!r} is invalid: that run "
                       f"has {why}")
    _model_mismatch(src, cfg, "init.grow_from", init.grow_from, MODEL_KEYS + ("ffn_hidden",))
    select = init.get("grow_select", "all")
    e_src = src.moe.num_experts
    if select == "all" and cfg.moe.num_experts != e_src * m:
      raise ValueError(f"config key moe.num_experts={cfg.moe.num_experts} is invalid: growing "
                       f"{e_src} experts by init.grow_factor={m} gives {e_src * m}")
    if select == "importance" and cfg.moe.num_experts <= e_src:
      raise ValueError(f"config key moe.num_experts={cfg.moe.num_experts} is invalid with "
                       f"init.grow_select='importance': must exceed the source run's {e_src}")
    want_c, want_g = grown_grouping(src, select, m)
    for key, want in (("copies", want_c), ("grown_groups", want_g)):
      if cfg.moe.topk[key] != want:
        raise ValueError(f"config key moe.topk.{key}={cfg.moe.topk[key]} is invalid: must "
                         f"be {want} (moe.topk.copies={want_c}, moe.topk.grown_groups={want_g}) "
                         f"so the grown model computes what the source did")
    for k in ("top_k", "expert_hidden", "every", "first_dense_layers", "num_shared_experts",
              "shared_hidden", "shared_gate"):
      if src.moe[k] != cfg.moe[k]:
        raise ValueError(f"config key moe.{k}={cfg.moe[k]!r} does not match the source run "
                         f"init.grow_from={init.grow_from!r}, which has {src.moe[k]!r}")
    if get_family(src.moe) != get_family(cfg.moe):  # the family and its options
      raise ValueError(f"config key moe.expert={cfg.moe.expert!r} ({get_family(cfg.moe)}) does "
                       f"not match the source run init.grow_from={init.grow_from!r}, which has "
                       f"{src.moe.expert!r} ({get_family(src.moe)}): growing copies its experts")
  a = cfg.moe.get("adapters")
  if a is not None and a.enabled:
    src = run_config(a.base)
    if src.moe.get("adapters") is not None and src.moe.adapters.enabled:
      raise ValueError(f"config key moe.adapters.base={a.base!r} is invalid: that run is "
                       "itself an adapter run; give the run it was trained on")
    _model_mismatch(src, cfg, "moe.adapters.base", a.base, MODEL_KEYS + ("ffn_hidden",))
    mine = {k: v for k, v in flat_keys(cfg.moe).items() if k.split(".")[0] not in MOE_FREE_KEYS}
    theirs = {k: v for k, v in flat_keys(src.moe).items()
              if k.split(".")[0] not in MOE_FREE_KEYS}
    for k in sorted(set(mine) | set(theirs)):
      if k in mine and k in theirs and mine[k] != theirs[k]:
        raise ValueError(f"config key moe.{k}={mine[k]!r} does not match the base run "
                         f"moe.adapters.base={a.base!r}, which has {theirs[k]!r}")


def _open_step(run_dir: str, step: int, handler):
  """(read-only CheckpointManager of the run's checkpoints/ with `handler` for "state", the
  step to read: `step`, or the newest for -1); raises ValueError naming what is missing."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  path = os.path.abspath(os.path.join(run_dir, "checkpoints"))
  if not os.path.isdir(path):
    raise ValueError(f"run directory {run_dir!r} has no checkpoints/ to read")
  mgr = ocp.CheckpointManager(path, item_handlers={"state": handler},
                              options=ocp.CheckpointManagerOptions(create=False, read_only=True))
  steps = sorted(mgr.all_steps())
  use = steps[-1] if steps and step == -1 else step
  if not steps or use not in steps:
    mgr.close()
    if not steps:
      raise ValueError(f"run directory {run_dir!r} has no checkpoint")
    raise ValueError(f"checkpoint step {step} is not in {run_dir!r}; it has {steps}")
  return mgr, use


def load_run(run_dir: str, step: int = -1) -> tuple[dict, dict, int]:
  """(params, non-param collections, step) of a run's checkpoint (-1 = newest).

  Restores only those two entries of the "state" item (not the optimizer state).
  """
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415

  handler = ocp.PyTreeCheckpointHandler()
  mgr, use = _open_step(run_dir, step, handler)
  with mgr:
    tree = handler.metadata(epath.Path(mgr.directory) / str(use) / "state").tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        {k: tree[k] for k in ("params", "collections") if k in tree})
    state = mgr.restore(use, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))["state"]
  return state["params"], dict(state.get("collections", {})), use


def run_arrays(run_dir: str, step: int = -1):
  """(the "state" arrays of a run's checkpoint, read leaf by leaf or slice by slice, step):
  the lighter `load_run` for tools that go through a checkpoint one leaf at a time
  (moejax.train.checkpoint.StoredArrays; `.tree["params"]` / `.tree["collections"]`)."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from moejax.train.checkpoint import StoredArrays  # noqa: PLC0415

  mgr, use = _open_step(run_dir, step, ocp.PyTreeCheckpointHandler())
  mgr.close()
  return StoredArrays(run_dir, use), use
