"""Knowledge distillation from a teacher run (train.distill.*): the loss, the teacher, the checks.

With train.distill.teacher set, the trainer's language-model loss becomes

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

per predicted token (nats, averaged like the cross-entropy), plus the usual
auxiliary losses. alpha = 1 is pure distillation, alpha = 0 the LM loss
alone. The T^2 keeps the soft term's gradient at the cross-entropy's scale
whatever the temperature (the tempered KL's gradient shrinks as 1 / T^2).

The teacher is any run with the same vocabulary (model.vocab_size and
data.tokenizer); its model.*/moe.* config is its own (other num_experts,
another router, dense). The trainer reads its variables once when the run
starts and passes them to the jitted step as constants: no gradient, not in
the optimizer, not in the student's checkpoint. A resumed run reads them
again from the teacher run (train.distill.step fixes the checkpoint; -1 is
the newest at each start).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from moejax.checks import ConfigError, is_int

KEY = "config key train.distill"
NAMES = {k: f"{KEY}.{k}" for k in ("teacher", "step", "temperature", "alpha")}


def settings(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """train.distill when it names a teacher, else None (plain LM training)."""
  d = cfg.train.get("distill")
  return d if d is not None and d.teacher else None


def kd_loss(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, temperature: float,
            weights_BxL: jax.Array | None = None) -> jax.Array:
  """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per token, mean over tokens
  (weighted mean with weights), float32 nats."""
  t = float(temperature)
  log_q = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / t, axis=-1)
  log_p = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / t, axis=-1)
  kl_BxL = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if weights_BxL is None:
    return t * t * jnp.mean(kl_BxL)
  return t * t * jnp.sum(kl_BxL * weights_BxL) / jnp.sum(weights_BxL)


def combined_loss(ce: jax.Array, kd: jax.Array, alpha: float) -> jax.Array:
  """The language-model term of the distillation loss: alpha * kd + (1 - alpha) * ce."""
  return alpha * kd + (1.0 - alpha) * ce


def _invalid(name: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def check_values(temperature: Any, alpha: Any, names: dict[str, str] = NAMES) -> None:
  """T > 0 (finite) and alpha in [0, 1]; errors name `names[...]` (a key or an option)."""
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
  if not number(temperature) or not math.isfinite(temperature) or temperature <= 0:
    _invalid(names["temperature"], temperature, "must be a finite number > 0")
  if not number(alpha) or not 0 <= alpha <= 1:
    _invalid(names["alpha"], alpha, "must be in [0, 1] (1: pure distillation, 0: the LM "
                                    "cross-entropy alone)")


def _vocabulary(tokenizer: str, name: str, teacher: str) -> Any:
  """What identifies data.tokenizer's vocabulary: "bytes", or its tokenizer.json contents."""
  from moejax.train import tokenizer as tok_lib  # noqa: PLC0415

  if not tokenizer or tokenizer == tok_lib.BYTES:
    return tok_lib.BYTES
  try:
    tok = tok_lib.get(tokenizer)
  except (ValueError, OSError) as e:
    _invalid(name, teacher, f"data.tokenizer={tokenizer!r} cannot be read ({e})")
  return json.loads(tok.file.read_text(encoding="utf-8"))


def check_teacher(cfg: ml_collections.ConfigDict, teacher: str,
                  name: str = NAMES["teacher"]) -> ml_collections.ConfigDict:
  """The teacher run's config; ConfigError naming `name` unless the run can teach `cfg`
  (a run directory with complete parameters and the student's vocabulary)."""
  from moejax.init.sources import run_config  # noqa: PLC0415

  if not isinstance(teacher, str) or not (
      os.path.isfile(os.path.join(teacher, "config.json"))
      and os.path.isdir(os.path.join(teacher, "checkpoints"))):
    _invalid(name, teacher, "must be a run directory (holding config.json and checkpoints/)")
  tcfg = run_config(teacher)
  if tcfg.model.vocab_size != cfg.model.vocab_size:
    _invalid(name, teacher, f"that run has model.vocab_size={tcfg.model.vocab_size}, this one "
                            f"{cfg.model.vocab_size}: the teacher's and the student's "
                            "vocabularies must match")
  mine, theirs = cfg.data.get("tokenizer", "bytes"), tcfg.data.get("tokenizer", "bytes")
  if _vocabulary(mine, name, teacher) != _vocabulary(theirs, name, teacher):
    _invalid(name, teacher, f"that run has data.tokenizer={theirs!r}, this one {mine!r}, and "
                            "they differ: the teacher's and the student's vocabularies must "
                            "match")
  a = tcfg.moe.get("adapters")
  if a is not None and a.enabled:
    _invalid(name, teacher, "that run is an adapter run (moe.adapters.enabled=True), whose "
                            "checkpoints hold only the adapters; give a run with complete "
                            "parameters")
  return tcfg


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """train.distill.*: the values always; the teacher run (its config.json) when one is named."""
  d = cfg.train.get("distill")
  if d is None:
    return
  check_values(d.temperature, d.alpha)
  if not is_int(d.step) or d.step < -1:
    _invalid(NAMES["step"], d.step, "must be -1 (the newest) or a checkpoint step >= 0")
  if d.teacher:
    check_teacher(cfg, d.teacher)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A teacher run read for distillation: its config, variables and checkpoint step."""

  run_dir: str
  step: int
  cfg: ml_collections.ConfigDict
  variables: dict


def load_teacher(cfg: ml_collections.ConfigDict) -> Teacher:
  """The teacher train.distill names, read once (params and collections, no optimizer
  state). It runs on the student's device mesh: its parallel.* is the student's."""
  from moejax.init.sources import load_run  # noqa: PLC0415

  d = settings(cfg)
  if d is None:
    raise ValueError(f"{NAMES['teacher']}={cfg.train.distill.teacher!r}: no teacher to load")
  tcfg = check_teacher(cfg, d.teacher)
  tcfg.parallel = ml_collections.ConfigDict(cfg.parallel.to_dict())
  try:
    params, collections, step = load_run(d.teacher, d.step)
  except ValueError as e:
    raise ConfigError(f"{NAMES['teacher']}={d.teacher!r} with {NAMES['step']}={d.step}: "
                      f"{e}") from None
  return Teacher(os.path.abspath(d.teacher), int(step), tcfg,
                 {"params": params, **collections})


def logits_fn(tcfg: ml_collections.ConfigDict) -> Callable[[dict, jax.Array], jax.Array]:
  """(teacher variables, inputs [B, L]) -> float32 logits [B, L, V] of the teacher's own
  model in evaluation mode, with no gradient."""
  from moejax import model as lm  # noqa: PLC0415

  model = lm.make_model(tcfg, deterministic=True)

  def logits(variables: dict, inputs_BxL: jax.Array) -> jax.Array:
    out_BxLxV, _ = model.apply(variables, inputs_BxL)
    return jax.lax.stop_gradient(out_BxLxV.astype(jnp.float32))

  return logits
