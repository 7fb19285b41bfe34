"""The training loop: one jitted step, periodic eval, logs, checkpoints, summary.

`prepare(cfg)` validates the config and builds the data (fails fast with a
ConfigError / ValueError before anything compiles); `train(cfg, workdir)`
runs or resumes the run in `workdir` (its format: docs/architecture.md) and
returns the summary. With train.distill.teacher set, the step trains against
that teacher run's logits (moejax/train/distill.py); eval stays the LM loss.
A router that declares two-pass `consistency` (THOR) gets two forward passes
of every (micro-)batch under independent "router" rngs: the mean of their
losses plus the weighted symmetric KL between their predictions
(moejax/moe/routers/base.py), logged as "train/consistency_loss".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moejax import aux_losses as aux_lib
from moejax import layout
from moejax import model as lm
from moejax import schedules as schedules_lib
from moejax.analysis import online as routing_online
from moejax.config import config_changes
from moejax.init import hooks as init_hooks
from moejax.model.transformer import aux_losses as declared_aux_losses
from moejax.moe import adapters
from moejax.moe.layer import metric_schema
from moejax.moe.losses import balance_kinds
from moejax.moe.routers import get_router
from moejax.moe.routers.base import Consistency, symmetric_kl
from moejax.moe.state import update_router_state
from moejax.parallel import mesh as mesh_lib
from moejax.parallel.runtime import Placement
from moejax.train import data as data_lib
from moejax.train import distill as distill_lib
from moejax.train.checkpoint import Checkpointer
from moejax.train.optimizer import lr_schedule, make_optimizer
from moejax.train.lock import workdir_lock
from moejax.train.preemption import StopRequest
from moejax.train.progress import Progress
from moejax.train.writers import MetricWriter
from moejax.validation import validate

State = dict[str, Any]  # step, params, opt_state, collections, wall_seconds


def prepare(cfg: ml_collections.ConfigDict) -> data_lib.LMData:
  """Validate the config and load the data; raises before any compilation."""
  validate(cfg)
  mesh_lib.axes_from_config(cfg)  # the mesh fits the devices (ConfigError)
  data_lib.check_vocab(cfg)
  data = data_lib.from_config(cfg)
  data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)  # checks sizes
  return data


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array,
                  weights_BxL: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy in nats, float32 (weighted mean with weights)."""
  nats = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxLxV.astype(jnp.float32), targets_BxL)
  if weights_BxL is None:
    return jnp.mean(nats)
  return jnp.sum(nats * weights_BxL) / jnp.sum(weights_BxL)


def total_loss(ce: jax.Array, aux: dict, cfg: ml_collections.ConfigDict,
               scheduled: dict[str, jax.Array] | None = None) -> jax.Array:
  """Cross-entropy plus every auxiliary loss, weighted by its declared config key (or that
  key's scheduled value at this step)."""
  return ce + aux_lib.total(aux["losses"], declared_aux_losses(cfg), cfg, scheduled)


def reduce_metrics(metrics: dict, cfg: ml_collections.ConfigDict, axis: int = 0) -> dict:
  """Per-MoE-layer metrics reduced over `axis` (micro-batches) as each declares."""
  schema = {m.name: m for m in metric_schema(cfg)}
  return {k: schema[k].apply(v, axis) for k, v in metrics.items()}


def consistency_of(cfg: ml_collections.ConfigDict) -> Consistency | None:
  """The chosen router's two-pass consistency declaration (None: one pass per batch)."""
  if not cfg.moe.enabled:
    return None
  return get_router(cfg.moe.router).consistency(cfg.moe)


def mean_of_passes(aux_a: dict, aux_b: dict, cfg: ml_collections.ConfigDict) -> dict:
  """The model aux of two passes over the same batch: losses, state_stats and
  balance_counts averaged, metrics reduced as each declares."""
  out = {k: jax.tree.map(lambda a, b: (a + b) / 2, aux_a[k], aux_b[k])
         for k in aux_a if k != "metrics"}
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), aux_a["metrics"], aux_b["metrics"])
  return {**out, "metrics": reduce_metrics(stacked, cfg)}


def make_train_step(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                    state_shardings: Any = None,
                    teacher: distill_lib.Teacher | None = None):
  """The jitted `step(state, batch) -> (state, outputs)`.

  With train.distill.teacher set, `teacher` (distill_lib.load_teacher) is
  required: its variables go into every call as a non-donated argument, its
  logits are computed per (micro-)batch, and the step also reports
  "train/kd_loss" (T^2 * KL, the term alpha weights). With a router's
  `consistency` (THOR), each (micro-)batch runs two passes with independent
  "router" rngs (one teacher forward for both) and the step reports
  "train/consistency_loss" (the unweighted symmetric KL); "train/loss" is the
  passes' mean cross-entropy.
  """
  model = lm.make_model(cfg, deterministic=False)
  lr_at = lr_schedule(cfg.train)
  frozen_base = adapters.adapters_cfg(cfg) is not None
  distill = distill_lib.settings(cfg)
  if (distill is None) != (teacher is None):
    raise ValueError(f"make_train_step: train.distill.teacher={cfg.train.distill.teacher!r} "
                     f"and a teacher {'given' if teacher is not None else 'missing'}; pass "
                     "distill_lib.load_teacher(cfg) exactly when the config names a teacher")
  teacher_logits = None if teacher is None else distill_lib.logits_fn(teacher.cfg)
  consistency = consistency_of(cfg)
  scheds = schedules_lib.all_schedules(cfg)

  def forward(params, collections, batch, rng, t_logits, sv):
    """(logits, LM loss, cross-entropy, aux) of one pass (aux["kd_loss"] when distilling)."""
    logits, aux = model.apply({"params": params, **collections}, batch["inputs"],
                              rngs={"router": rng}, schedule=sv)
    ce = cross_entropy(logits, batch["targets"], batch.get("weights"))
    if distill is None:
      return logits, ce, ce, aux
    kd = distill_lib.kd_loss(logits, t_logits, distill.temperature, batch.get("weights"))
    return logits, distill_lib.combined_loss(ce, kd, distill.alpha), ce, {**aux, "kd_loss": kd}

  def loss_fn(params, collections, batch, rng, teacher_vars, sv):
    if frozen_base:  # moe.adapters: no gradient reaches the base model
      params = adapters.freeze_base(params)
    t_logits = None if distill is None else teacher_logits(teacher_vars, batch["inputs"])
    if consistency is None:
      _, lm_loss, ce, aux = forward(params, collections, batch, rng, t_logits, sv)
      return total_loss(lm_loss, aux, cfg, sv), (ce, aux)
    # Two passes, independent "router" rngs (THOR: independent random experts).
    rng_a, rng_b = jax.random.split(rng)
    logits_a, lm_a, ce_a, aux_a = forward(params, collections, batch, rng_a, t_logits, sv)
    logits_b, lm_b, ce_b, aux_b = forward(params, collections, batch, rng_b, t_logits, sv)
    sym = symmetric_kl(logits_a, logits_b, batch.get("weights"))
    aux = mean_of_passes(aux_a, aux_b, cfg)
    aux["consistency_loss"] = sym
    lm_loss = (lm_a + lm_b) / 2 + consistency.weight_value(cfg) * sym
    return total_loss(lm_loss, aux, cfg, sv), ((ce_a + ce_b) / 2, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n = cfg.train.grad_accum_steps
  global_counts = "global_batch" in balance_kinds(cfg.moe) and cfg.moe.enabled
  columns = layout.moe_columns(cfg)  # a scheduled model's stats come per MoE column

  def accumulated(params, collections, batch, rng, teacher_vars, sv):
    """Gradients of the mean loss over n micro-batches, one at a time.

    With global-batch balancing, a first forward pass over all micro-batches
    sums each layer's expert counts; every micro-batch's balancing loss then
    uses those global counts, so the loss equals the one-batch loss.
    """
    micro = jax.tree.map(lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:]), batch)
    rngs = jax.random.split(rng, n)
    if global_counts:
      def layer_counts(mb, r):
        _, aux = model.apply({"params": params, **collections}, mb["inputs"],
                             rngs={"router": r}, schedule=sv)
        return aux["balance_counts"]  # [num_moe_layers, choices] (or one per MoE column)

      def count(acc, xs):
        return jax.tree.map(jnp.add, acc, layer_counts(*xs)), None

      first = jax.tree.map(lambda a: a[0], (micro, rngs))
      shapes = jax.eval_shape(layer_counts, *first)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)
      counts, _ = jax.lax.scan(count, zeros, (micro, rngs))
      counts = jax.lax.stop_gradient(counts)
      balance = (layout.column_tree([{"counts": c} for c in counts], cfg)
                 if isinstance(counts, tuple)
                 else layout.replace({}, layout.MOE_PATH, {"counts": counts}))
      collections = {**collections, "balance": balance}

    def body(acc, xs):
      mb, r = xs
      (l, (ce, aux)), g = grad_fn(params, collections, mb, r, teacher_vars, sv)
      return jax.tree.map(jnp.add, acc, g), (l, ce, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (ls, ces, auxs) = jax.lax.scan(body, zeros, (micro, rngs))
    mean0 = lambda t: jax.tree.map(lambda v: jnp.mean(v, axis=0), t)
    sum0 = lambda t: jax.tree.map(lambda v: jnp.sum(v, axis=0), t)
    aux = {"losses": mean0(auxs["losses"]), "metrics": reduce_metrics(auxs["metrics"], cfg),
           "state_stats": sum0(auxs["state_stats"])}
    for key in ("kd_loss", "consistency_loss"):  # equal micro-batches: the mean is the batch's
      if key in auxs:
        aux[key] = jnp.mean(auxs[key])
    return (jnp.mean(ls), (jnp.mean(ces), aux)), jax.tree.map(lambda g: g / n, grads)

  def step_fn(state: State, batch: dict, teacher_vars=None) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.key(cfg.seed), state["step"])
    sv = schedules_lib.values(scheds, state["step"])  # a function of the restored step
    fn = grad_fn if n == 1 else accumulated
    (loss, (ce, aux)), grads = fn(state["params"], state["collections"], batch, rng,
                                  teacher_vars, sv)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    collections = state["collections"]
    if "moe_state" in collections and aux["state_stats"]:
      # A non-finite step keeps the old router state, like the params.
      new_moe_state = update_router_state(collections["moe_state"], aux["state_stats"], cfg.moe,
                                          columns)
      collections = {**collections, "moe_state": keep(new_moe_state, collections["moe_state"])}
    new_state = {**state, "step": state["step"] + 1, "collections": collections,
                 "params": keep(optax.apply_updates(state["params"], updates), state["params"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "bad_steps": jnp.where(finite, 0, state["bad_steps"] + 1),
                 "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32)}
    metrics = {"train/loss": ce, "train/total_loss": loss, "train/grad_norm": grad_norm,
               "train/lr": lr_at(state["step"]),
               "train/skipped_steps": new_state["skipped_steps"]}
    for key in ("kd_loss", "consistency_loss"):
      if key in aux:
        metrics[f"train/{key}"] = aux[key]
    metrics.update({f"schedule/{k}": v for k, v in sv.items()})
    for k, v in aux["losses"].items():  # unweighted, summed over the layers reporting it
      metrics[f"train/{k}"] = jnp.sum(v)
    specs = declared_aux_losses(cfg)
    per_layer = {k: v for k, v in aux["losses"].items() if specs[k].per_moe_layer}
    if state_shardings is not None:  # keep the mesh layout step after step
      new_state = jax.lax.with_sharding_constraint(new_state, state_shardings)
    return new_state, {"scalars": metrics, "finite": finite,
                       "moe": {**per_layer, **aux["metrics"]}}

  step = jax.jit(step_fn, donate_argnums=0)
  if teacher is None:
    return step
  return lambda state, batch: step(state, batch, teacher.variables)


def make_eval_step(cfg: ml_collections.ConfigDict):
  model = lm.make_model(cfg, deterministic=True)

  @jax.jit
  def eval_step(params, collections, batch):
    logits, _ = model.apply({"params": params, **collections}, batch["inputs"])
    nats = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(nats), nats.size

  return eval_step


def evaluate(eval_step, state: State, batches: list[dict], text_bytes: int | None = None
             ) -> dict[str, float]:
  """val/loss (nats per predicted token) and val/bpb (bits per byte of the
  `text_bytes` the targets stand for; None: one byte per token)."""
  total, count = 0.0, 0
  for b in batches:
    s, n = eval_step(state["params"], state["collections"],
                     {"inputs": b["inputs"], "targets": b["targets"]})
    total += float(s)
    count += int(n)
  loss = total / count
  per_byte = 1.0 if text_bytes is None else count / max(int(text_bytes), 1)
  return {"val/loss": loss, "val/bpb": data_lib.bits_per_byte(loss, per_byte)}


def init_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> State:
  variables = init_hooks.initial_variables(cfg, lm.init(jax.random.key(cfg.seed), cfg))
  return state_from_variables(variables, tx)


def state_from_variables(variables: dict, tx: optax.GradientTransformation) -> State:
  """A step-0 training state around given variables (fresh optimizer state, counters 0)."""
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "opt_state": tx.init(params),
          "collections": {k: v for k, v in variables.items() if k != "params"},
          "wall_seconds": jnp.zeros((), jnp.float32),
          "bad_steps": jnp.zeros((), jnp.int32),  # consecutive non-finite steps
          "skipped_steps": jnp.zeros((), jnp.int32)}


def flatten_moe_metrics(moe: dict, layers: list[int], experts: list[int] | None = None
                        ) -> dict[str, float]:
  """Stacked per-MoE-layer arrays -> {"moe/layer{i}/{name}[/e{j}]": value}.

  `experts` (a layer-wise schedule: each layer's E) cuts per-expert rows, padded to the
  widest layer, to the experts the layer has.
  """
  out = {}
  for name, v in moe.items():
    v = np.asarray(v)
    for i, (row, layer) in enumerate(zip(v, layers)):
      if row.ndim == 0:
        out[f"moe/layer{layer}/{name}"] = float(row)
      else:
        for j, x in enumerate(row if experts is None else row[..., :experts[i]]):
          out[f"moe/layer{layer}/{name}/e{j}"] = float(x)
  return out


def check_workdir(cfg: ml_collections.ConfigDict, workdir: str, overwrite: bool) -> None:
  """Refuses a workdir that holds a run of a different config (unless overwrite)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = config_changes(saved, cfg)
  if not changed:
    return
  if not overwrite:
    shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
    raise ValueError(f"--workdir {workdir} holds a run with a different config "
                     f"(differs in: {shown}); use a fresh --workdir, continue it without "
                     "--config, or pass --overwrite to discard that run")
  for name in ("checkpoints", "tb", "metrics.jsonl", "summary.json", "config.json"):
    p = os.path.join(workdir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


def write_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))


def write_run(cfg: ml_collections.ConfigDict, variables: dict, run_dir: str,
              step: int = 0) -> None:
  """An ordinary run directory around `variables`: config.json and checkpoints/<step>
  (fresh optimizer state, the data iterator at its start), which training resumes
  from and every tool that reads runs accepts."""
  variables = jax.tree.map(jnp.asarray, variables)
  tx = init_hooks.wrap_optimizer(cfg, make_optimizer(cfg.train))
  state = state_from_variables(variables, tx)
  data = data_lib.from_config(cfg)
  os.makedirs(run_dir, exist_ok=True)
  ckpt = Checkpointer(run_dir, cfg.train.keep_checkpoints)
  ckpt.save(step, state, data.train_iterator(cfg.train.batch_size, cfg.seed).get_state())
  ckpt.close()
  write_config(cfg, run_dir)


@dataclasses.dataclass
class _Clock:
  t: float = dataclasses.field(default_factory=time.time)
  step: int = 0

  def lap(self, step: int) -> tuple[float, int]:
    now = time.time()
    dt, n = now - self.t, step - self.step
    self.t, self.step = now, step
    return dt, n


def train(cfg: ml_collections.ConfigDict, workdir: str,
          data: data_lib.LMData | None = None, *, overwrite: bool = False,
          batch_hook: Callable[[int, dict], dict] | None = None) -> dict:
  """Train (or resume) the run in `workdir`; returns the summary dict.

  On SIGTERM/SIGINT the run stops after the current step with a checkpoint
  and returns {"preempted": True, "steps": step} without writing summary.json.
  A step with a non-finite loss or gradient norm leaves params and optimizer
  state untouched and is counted; `train.max_bad_steps` consecutive ones stop
  the run with NonFiniteError. `batch_hook(step, batch) -> batch` may edit
  each batch before its step (tests poison one through an optional float
  "weights" [B, L] entry, the per-token loss weights).
  """
  data = data or prepare(cfg)
  place = Placement(cfg, workdir)  # mesh; multi-host: per-host log dirs
  with workdir_lock(place.logdir), StopRequest() as stop, place:
    check_workdir(cfg, place.logdir, overwrite)
    return _train(cfg, place.logdir, data, stop, batch_hook, place)


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


def _train(cfg: ml_collections.ConfigDict, workdir: str, data: data_lib.LMData,
           stop: StopRequest, batch_hook, place: Placement) -> dict:
  t_start = time.time()
  write_config(cfg, workdir)
  t = cfg.train
  tokens_per_step = t.batch_size * t.seq_len
  tx = init_hooks.wrap_optimizer(cfg, make_optimizer(t))
  state = place.state(init_state(cfg, tx))  # on the mesh, if any
  teacher = None
  if distill_lib.settings(cfg) is not None:  # read once; replicated on a mesh
    teacher = distill_lib.load_teacher(cfg)
    teacher = dataclasses.replace(teacher, variables=jax.tree.map(place.scalar,
                                                                  teacher.variables))
  ckpt = Checkpointer(place.workdir, t.keep_checkpoints)
  it = place.train_iterator(data, t.batch_size, cfg.seed)
  start, saved, data_state = ckpt.restore_latest(init_hooks.checkpoint_view(cfg, state))
  state = init_hooks.from_checkpoint(cfg, state, saved)
  if start:
    it.set_state(data_state)
    print(f"resumed from {place.workdir}/checkpoints/{start}")
  writer = MetricWriter(workdir, resume_step=start)
  train_step = make_train_step(cfg, tx, place.state_shardings, teacher)
  eval_step = make_eval_step(cfg)
  val_host = data.val_batches(t.batch_size, t.eval_batches)
  val_bytes = sum(data.text_bytes(b["targets"]) for b in val_host)
  val = place.batches(val_host)
  layers = layout.moe_layer_indices(cfg)
  experts = [e for e, _ in layout.moe_schedule(cfg)]  # per MoE layer (padded rows cut)
  prior_wall = float(state["wall_seconds"])
  progress = Progress(t.steps, start, every=t.log_every * 10)
  clock = _Clock(step=start)
  last_eval: dict[str, float] = {}
  last_moe: dict = {}
  last_routing = None  # routing of val[0] at the previous eval (saturation)
  step = start
  first = True
  while step < t.steps:
    position = it.get_state()
    batch = next(it)
    batch = {"inputs": batch["inputs"], "targets": batch["targets"]}
    if batch_hook is not None:
      batch = batch_hook(step + 1, batch)
    state, out = train_step(state, place.batch(batch))
    step += 1
    if not bool(out["finite"]):
      bad = int(state["bad_steps"])
      writer.scalars(step, {"train/skipped_step": 1.0,
                            "train/skipped_steps": float(state["skipped_steps"])})
      print(f"warning: step {step} (data position {json.dumps(position)}) had a non-finite "
            f"loss or gradient norm; skipped ({bad} in a row)")
      if bad >= t.max_bad_steps:
        progress.close()
        writer.close()
        ckpt.close()
        raise NonFiniteError(
            f"{bad} consecutive non-finite steps, the last at step {step} (data position "
            f"{json.dumps(position)}); stopping (train.max_bad_steps={t.max_bad_steps}). "
            f"The last good checkpoint is kept in {workdir}/checkpoints.")
    if first:  # exclude compilation from the measured throughput
      jax.block_until_ready(out)
      clock.lap(step)
    if step % t.log_every == 0 or step == t.steps or step == 1:
      scalars = {k: float(v) for k, v in jax.device_get(out["scalars"]).items()}
      dt, n = clock.lap(step)
      if n > 0:
        scalars["perf/step_time_s"] = dt / n
        scalars["perf/tokens_per_second"] = n * tokens_per_step / dt
      moe = jax.device_get(out["moe"])
      last_moe = moe
      scalars.update(flatten_moe_metrics(moe, layers, experts))
      writer.scalars(step, scalars)
      progress.update(step, loss=scalars["train/loss"],
                      **({"tok/s": scalars["perf/tokens_per_second"]}
                         if "perf/tokens_per_second" in scalars else {}))
    first = False
    if step % t.eval_every == 0 or step == t.steps:
      last_eval = evaluate(eval_step, state, val, val_bytes)
      writer.scalars(step, last_eval)
      if layers:
        load = np.asarray(jax.device_get(out["moe"]["load"]))
        writer.heatmap(step, "moe/load_layer_x_expert", load)
        for row, layer, e in zip(load, layers, experts):
          writer.histogram(step, f"moe/layer{layer}/load_hist", row[:e])
        if jax.process_count() == 1:  # reads the live state: one host's arrays only
          routing_scalars, last_routing = routing_online.eval_metrics(
              cfg, {"params": state["params"], **state["collections"]}, val[0]["inputs"],
              last_routing)
          writer.scalars(step, routing_scalars)
      clock.lap(step)  # eval time is not training throughput
    stopping = stop.agreed()  # the same answer on every host
    if step % t.checkpoint_every == 0 or step == t.steps or stopping:
      state["wall_seconds"] = place.scalar(
          jnp.asarray(prior_wall + time.time() - t_start, jnp.float32))
      ckpt.save(step, init_hooks.checkpoint_view(cfg, state), it.get_state())
    if stopping and step < t.steps:
      progress.close()
      ckpt.close()
      writer.close()
      print(f"stopped by signal {stop.signum} after step {step}; checkpoint saved, "
            "re-run the same command to resume")
      return {"preempted": True, "steps": int(step)}
  progress.close()
  if not last_eval:  # resumed a finished run: evaluate again for the summary
    last_eval = evaluate(eval_step, state, val, val_bytes)
  ckpt.close()
  writer.close()
  wall = prior_wall + time.time() - t_start
  counts = lm.param_counts(cfg)
  summary = {
      "name": cfg.name,
      "final_val_loss": last_eval["val/loss"],
      "final_val_bpb": last_eval["val/bpb"],
      "params_total": counts["params_total"],
      "params_active": counts["params_active"],
      "flops_per_token": lm.flops_per_token(cfg),  # per training token, every pass
      "tokens_seen": int(step) * tokens_per_step,
      "steps": int(step),
      "wall_seconds": wall,
      "tokens_per_second": int(step) * tokens_per_step / max(wall, 1e-9),
  }
  if counts["params_active_inference"] != counts["params_active"]:  # THOR: plain runs unchanged
    summary["params_active_inference"] = counts["params_active_inference"]
  summary.update(init_hooks.summary_fields(cfg, state["params"]))
  if teacher is not None:  # plain runs keep their summary unchanged
    summary.update(distill_teacher=teacher.run_dir, distill_teacher_step=teacher.step)
  for metric in metric_schema(cfg):  # reduced over MoE layers at the last logged step
    if metric.summary and metric.name in last_moe:
      summary[f"moe_{metric.name}"] = float(metric.apply(np.asarray(last_moe[metric.name])))
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary
