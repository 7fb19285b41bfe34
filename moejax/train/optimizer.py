"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """0 -> train.lr over warmup_steps, then cosine to lr * min_lr_ratio at train.steps."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
      decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.lr * t.min_lr_ratio)


FROZEN_PREFIX = "frozen_"  # leaves a module reads under stop_gradient (never trained)


def decay_mask(params):
  """Weight decay on weight matrices, not on norm gains (leaves named `scale`) nor on
  frozen leaves (named `frozen_*`: no gradient and no decay leave them unchanged)."""
  def keep(path, _):
    name = str(getattr(path[-1], "key", ""))
    return name != "scale" and not name.startswith(FROZEN_PREFIX)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  chain = []
  if t.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(t.grad_clip))
  chain.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
